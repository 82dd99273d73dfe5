"""Sandbox: one hardened, running container and the few things the harness may do with it.

This module owns where code runs: starting the container under a SandboxPolicy, closing it, and knowing
whether it still runs and within its limits. What runs there has modules of its own, which the verbs
here hand over to: exec and spawn (process.py), the workspace's files (files.py, through fsops.py).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import json
import secrets
import signal
import time
from collections.abc import Iterable, Iterator

import docker
import docker.errors
import structlog
from docker.types import DeviceRequest, Ulimit

from sandbox.cgroups import peak_memory
from sandbox.engine import engine_errors, owner_labels, remove_container, require_runtime, resolve_client
from sandbox.errors import FileTooLarge, SandboxClosed
from sandbox.files import FileEntry, fsop, read_chunks, write_chunks
from sandbox.policy import SandboxPolicy
from sandbox.process import ExecResult, SandboxProcess, execute, start_exec

log = structlog.get_logger(__name__)

_CLOSER = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="sandbox-close")
_REMOVING: set[concurrent.futures.Future] = set()  # removals close_later() has not finished yet


class Sandbox:
    """A running hardened container. Use as a context manager, or call close()."""

    def __init__(self, container, policy: SandboxPolicy, session: str, origin: str, client: docker.DockerClient):
        self.client = client  # the engine connection every call about this container goes through
        self.container = container
        self.policy = policy
        self.session = session
        self.origin = origin  # the image (sandbox image or snapshot) this container started from
        self.last_snapshot: str | None = None  # image id of the latest snapshot taken of this sandbox
        self._closed = False
        self._dead_reason: str | None = None  # set when the container died under us (OOM under gVisor, killed)
        self._last_disk_check = float("-inf")

    # -- lifecycle -------------------------------------------------------------------------------

    @classmethod
    def start(cls, policy: SandboxPolicy | None = None, *, session: str = "adhoc", role: str = "work",
              client: docker.DockerClient | None = None) -> Sandbox:
        """Create and start a container under `policy`: the one way this package makes containers."""
        policy = policy or SandboxPolicy()
        client = resolve_client(client)
        require_runtime(policy.runtime, client=client)
        name = f"labrat-{session}-{role}-{secrets.token_hex(3)}"
        args = _container_args(policy, name, owner_labels(session, role))
        try:
            with engine_errors(image=policy.image):
                # create + start, not run: run() would try to pull a missing image from a registry.
                container = client.containers.create(**args)
                container.start()
        except BaseException:
            # A create that failed at start (bad runtime, no GPU driver) leaves a container behind. Any
            # failure to remove it is swallowed: the error worth raising is the one that got us here.
            with contextlib.suppress(Exception):
                remove_container(name, client=client)
            raise
        log.debug("sandbox.started", name=name, image=policy.image, runtime=policy.runtime)
        return cls(container, policy, session, origin=policy.image, client=client)

    def close(self) -> None:
        """Remove the container. Safe to call twice, and when the engine already lost it."""
        if self._closed:
            return
        self._closed = True
        remove_container(self.container.id, client=self.client)
        log.debug("sandbox.closed", name=self.container.name)

    def close_later(self) -> None:
        """Remove the container on a background thread (removal takes ~0.1 s the caller need not wait for).
        The process waits for pending removals before it exits."""
        future = _CLOSER.submit(self.close)
        _REMOVING.add(future)
        future.add_done_callback(_REMOVING.discard)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def name(self) -> str:
        return self.container.name

    # -- liveness and limits (process.py checks them while an exec runs) --------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def dead_reason(self) -> str | None:
        """Why the container died under us ("memory" or "died"), once a call found it dead; else None."""
        return self._dead_reason

    def is_alive(self) -> bool:
        """False once the container was closed or was found dead (by a call that hit a limit); no engine call."""
        return not self._closed and self._dead_reason is None

    def is_running(self) -> bool:
        """Whether the container still runs (one engine call); False once it stopped, died or was closed."""
        if self._closed or self._dead_reason:
            return False
        with engine_errors(), contextlib.suppress(docker.errors.NotFound):
            self.container.reload()
            return bool(self.container.attrs.get("State", {}).get("Running"))
        return False

    def ensure_open(self) -> None:
        """SandboxClosed, saying why, if the sandbox was closed or its container died."""
        if self._closed:
            raise SandboxClosed(f"sandbox {self.name} is closed")
        if self._dead_reason:
            why = "ran out of memory" if self._dead_reason == "memory" else "stopped unexpectedly"
            raise SandboxClosed(f"sandbox {self.name} {why}; restore a snapshot to continue")

    def check_alive(self, settle: float = 0.5) -> str | None:
        """None while the container runs; else records and returns why it stopped ("memory" or "died").

        Called after an abnormal exit. A dying container (gVisor's sandbox hitting a limit) can still
        read as running for a moment, and the engine records OOMKilled from a separate event, so the
        state is read until it settles.
        """
        deadline = time.monotonic() + settle
        with engine_errors(), contextlib.suppress(docker.errors.NotFound):
            while True:
                self.container.reload()
                state = self.container.attrs.get("State", {})
                running, oom = state.get("Running"), state.get("OOMKilled")
                if oom or time.monotonic() >= deadline:
                    break
                time.sleep(0.05)
            if running and not oom:
                return None
            self._dead_reason = "memory" if oom else "died"
            return self._dead_reason
        self._dead_reason = "died"
        return self._dead_reason

    def poll_usage(self) -> tuple[int, bool]:
        """(writable-layer bytes, running?) in one engine call."""
        with engine_errors():
            rows = self.client.api.containers(all=True, size=True, filters={"id": self.container.id})
        if not rows:
            raise SandboxClosed(f"sandbox {self.name} is gone (its container was removed)")
        return int(rows[0].get("SizeRw") or 0), rows[0].get("State") == "running"

    def disk_check_due(self) -> bool:
        """At most one end-of-exec size check per poll interval: the engine walks the whole writable
        layer for it (~130 ms at 50,000 files). A burst it skips is caught by the next due check, and
        snapshot() always checks, so an over-limit layer never reaches the store."""
        now = time.monotonic()
        if now - self._last_disk_check < self.policy.disk_poll_seconds:
            return False
        self._last_disk_check = now
        return True

    def disk_usage(self) -> int:
        """Bytes in the container's writable layer (what a snapshot would store), as the engine counts them."""
        return self.poll_usage()[0]

    def peak_memory_bytes(self) -> int | None:
        """The container's peak memory use so far, read from its cgroup on the host (None if unreadable)."""
        return peak_memory(self.container.id)

    # -- what runs: processes (process.py) ---------------------------------------------------------

    def exec(
        self,
        cmd: str | list[str],
        *,
        timeout: float | None = None,
        max_output: int | None = None,
        input: bytes | None = None,
        user: str | None = None,
        workdir: str | None = None,
        env: dict[str, str] | None = None,
    ) -> ExecResult:
        """Run `cmd` (a bash script if a string) in the container and wait, at most `timeout` seconds.

        On timeout every process of the exec's user in the container is killed (background children
        and `setsid` escapees included). Each output stream keeps its head and tail up to `max_output`.
        """
        return execute(self, cmd, timeout=timeout, max_output=max_output, input=input, user=user, workdir=workdir,
                       env=env)

    def spawn(self, cmd: list[str], *, user: str | None = None, workdir: str | None = None,
              env: dict[str, str] | None = None) -> SandboxProcess:
        """Start `cmd` with live pipes and return at once: its stdin is written and its stdout read while
        it runs (exec() waits for the end). No wall-clock limit here: the caller reads with deadlines and
        close() kills the process and every other process of its user in the container."""
        self.ensure_open()
        user = user or self.policy.user
        exec_id, sock = start_exec(self, list(cmd), user, workdir, env, stdin=True)
        return SandboxProcess(self, exec_id, sock, user)

    # -- what runs: the workspace's files (files.py) -----------------------------------------------

    def read_file(self, path: str, max_bytes: int | None = None) -> bytes:
        """The bytes of a regular file in the workspace (symlinks followed only within it)."""
        return fsop(self, "read", path, max_bytes or self.policy.max_file_bytes)

    def read_text(self, path: str, max_bytes: int | None = None) -> str:
        return self.read_file(path, max_bytes).decode("utf-8", errors="replace")

    def stream_file(self, path: str, max_bytes: int) -> Iterator[bytes]:
        """The bytes of a workspace file as chunks, never held whole (symlink-safe like read_file). Raises the
        helper's one-line error (FileMissing, PathRefused, FileTooLarge) when it refuses, even after chunks."""
        return read_chunks(self, path, max_bytes)

    def pack_dir(self, path: str, max_bytes: int) -> Iterator[bytes]:
        """A tar stream of the regular files below a workspace directory (symlinks and special files left
        out, never followed), as chunks; FileTooLarge once their bytes pass `max_bytes`, FileMissing when
        there is no such directory."""
        return read_chunks(self, path, max_bytes, op="pack")

    def unpack_dir(self, path: str, chunks: Iterable[bytes], max_bytes: int) -> dict:
        """Extract a tar stream below a workspace directory as the agent's user: regular files only, each
        new, names confined below `path` (links, devices, '..' and absolute names skipped). Returns
        {"bytes": extracted, "skipped": members left out}."""
        return json.loads(write_chunks(self, path, chunks, max_bytes))

    def write_file(self, path: str, content: bytes | str) -> None:
        """Atomically create or replace a workspace file as the agent's user (parents created, mode kept)."""
        data = content.encode() if isinstance(content, str) else bytes(content)
        if len(data) > self.policy.max_file_bytes:
            raise FileTooLarge(f"content is {len(data)} bytes, over the {self.policy.max_file_bytes}-byte limit")
        fsop(self, "write", path, self.policy.max_file_bytes, data)

    def delete_file(self, path: str) -> None:
        """Remove a workspace file (a symlink is removed itself, never followed); directories are refused."""
        fsop(self, "delete", path, 0)

    def list_dir(self, path: str = ".", max_entries: int = 10_000) -> list[FileEntry]:
        return [FileEntry(**entry) for entry in json.loads(fsop(self, "list", path, max_entries))]

    def manifest(self, path: str = ".", max_entries: int = 10_000) -> list[dict]:
        """Regular files below a workspace directory: {path, size, sha256} (sha256 None past 1 MiB per file
        or 64 MiB in all). Symlinks are never followed; paths are relative to `path`."""
        return json.loads(fsop(self, "manifest", path, max_entries))


def _container_args(policy: SandboxPolicy, name: str, labels: dict[str, str]) -> dict:
    """docker-py's containers.create() arguments for a container hardened and limited as `policy` says."""
    args = dict(
        image=policy.image,
        command=["sleep", "infinity"],
        name=name,
        # PID 1 (tini) and its child run as root without capabilities, so the agent's user cannot
        # signal them: killing every agent process on a timeout never stops the container itself.
        user="root",
        working_dir=policy.workspace,
        network_mode=policy.network_mode,
        cap_drop=list(policy.cap_drop),
        cap_add=list(policy.cap_add) or None,
        security_opt=["no-new-privileges:true"] if policy.no_new_privileges else [],
        init=policy.init,
        pids_limit=policy.pids_limit,
        mem_limit=policy.memory_bytes,
        memswap_limit=policy.memory_bytes,  # equal to mem_limit: no extra swap
        tmpfs={"/tmp": f"rw,nosuid,nodev,size={policy.tmp_bytes},mode=1777"},
        ulimits=[
            Ulimit(name="fsize", soft=policy.file_size_bytes, hard=policy.file_size_bytes),
            Ulimit(name="core", soft=0, hard=0),
        ],
        ipc_mode="private",
        read_only=policy.read_only,
        environment=dict(policy.env),
        labels=labels,
        runtime=policy.runtime,
    )
    if policy.ro_mounts:
        args["volumes"] = {source: {"bind": target, "mode": "ro"} for target, source in policy.ro_mounts.items()}
    if policy.cpus:
        args["nano_cpus"] = int(policy.cpus * 1e9)
    if policy.cpuset:
        args["cpuset_cpus"] = policy.cpuset
    if policy.gpus:
        if policy.gpus == "all":
            args["device_requests"] = [DeviceRequest(count=-1, capabilities=[["gpu"]])]
        else:
            args["device_requests"] = [DeviceRequest(device_ids=list(policy.gpus), capabilities=[["gpu"]])]
    return args


def trial_run(policy: SandboxPolicy, argv: list[str], *, session: str, role: str, timeout: float,
              client: docker.DockerClient | None = None) -> tuple[int | None, str]:
    """Put a policy's runtime or device request to the test: start a sandbox of it, run `argv`, remove it.
    (exit code, output), or (None, why it did not run). RuntimeUnavailable and ImageMissing are raised:
    the engine lacks what the policy names, which is a different answer from "it broke"."""
    try:
        with Sandbox.start(policy, session=session, role=role, client=client) as box:
            result = box.exec(argv, timeout=timeout)
    except docker.errors.APIError as exc:  # the engine could not start it (a broken runtime): that is the finding
        return None, exc.explanation or str(exc)
    except SandboxClosed as exc:  # it started, then stopped before `argv` could run
        return None, str(exc)
    if result.timed_out:
        return None, f"did not exit within {timeout:g} s"
    return result.exit_code, (result.stdout + result.stderr).strip()


def interrupt_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C, so `with Sandbox` blocks and atexit remove their containers."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


@atexit.register
def wait_for_removals(timeout: float = 60) -> None:
    """Block until the removals close_later() started have finished (before removing their images)."""
    concurrent.futures.wait(list(_REMOVING), timeout=timeout)
