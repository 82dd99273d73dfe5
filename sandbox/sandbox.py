"""Sandbox: one hardened, running container and the few things the harness may do with it.

exec / read_file / write_file / list_dir / close. Limits come from a SandboxPolicy. The clock that
enforces timeouts is the host's; output is capped on the host; file operations are confined to the
workspace by an unprivileged helper inside the container (see fsops.py).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import json
import posixpath
import secrets
import signal
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import docker.errors
import structlog
from docker.types import DeviceRequest, Ulimit
from docker.utils.socket import frames_iter
from pydantic import BaseModel

from sandbox.engine import client, engine_errors, owner_labels, require_runtime
from sandbox.errors import FileMissing, FileTooLarge, PathRefused, SandboxClosed, SandboxError
from sandbox.policy import SandboxPolicy

log = structlog.get_logger(__name__)

_FSOPS_SOURCE = (Path(__file__).parent / "fsops.py").read_text()
_PYTHON = "/usr/bin/python3"  # the base image's interpreter, root-owned; never the agent's PATH
_KILL_ALL = ["/bin/bash", "-c", "kill -KILL -1"]  # as the exec's user: every process it owns
# Runs an exec's argv, then kills whatever it left behind (daemons, `setsid` escapees) before exiting with its status.
_REAP_WRAPPER = ["/bin/bash", "-c", '"$@"; rc=$?; kill -KILL -1 2>/dev/null; exit $rc', "labrat-exec"]
_STDOUT, _STDERR = 1, 2
_LIVE: weakref.WeakSet[Sandbox] = weakref.WeakSet()
_CLOSER = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="sandbox-close")
_REMOVING: set[concurrent.futures.Future] = set()  # removals close_later() has not finished yet
STREAM_BUFFER_BYTES = 16 * 1024**2  # stdout a spawned process may have waiting on the host
STDERR_TAIL_BYTES = 16 * 1024  # stderr kept of a spawned process (head and tail)


class ExecResult(BaseModel):
    exit_code: int | None  # None when killed before an exit status could be read
    stdout: str
    stderr: str
    timed_out: bool = False
    duration: float
    truncated: bool = False  # at least one stream lost bytes to the output limit
    oom_killed: bool = False  # the kernel's OOM killer ended a process of this exec
    pids_limited: bool = False  # a fork or clone failed at the container's process limit during this exec
    limit: str | None = None  # what stopped it: "timeout", "disk", "memory", or "died" (the container itself)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.limit is None


class FileEntry(BaseModel):
    name: str
    kind: str  # file | dir | symlink | other
    size: int
    mode: int


class _CappedStream:
    """Keeps the first and last `limit // 2` bytes of a stream and counts what was dropped."""

    def __init__(self, limit: int):
        self.half = limit // 2
        self.head = bytearray()
        self.tail = bytearray()
        self.dropped = 0

    def feed(self, chunk: bytes) -> None:
        room = self.half - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if not chunk:
            return
        self.tail += chunk
        if len(self.tail) > self.half:
            self.dropped += len(self.tail) - self.half
            del self.tail[: len(self.tail) - self.half]

    def text(self) -> str:
        head, tail = safe_text(bytes(self.head)), safe_text(bytes(self.tail))
        if self.dropped:
            return f"{head}\n[... labrat: {self.dropped} bytes truncated ...]\n{tail}"
        return head + tail


_CONTROLS = {code: "\ufffd" for code in range(32) if chr(code) not in "\n\t"}


def safe_text(data: bytes) -> str:
    """Decode bytes for display to a model or a terminal: invalid UTF-8 and control characters become U+FFFD."""
    return data.decode("utf-8", errors="replace").translate(_CONTROLS)


def workspace_relpath(path: str, workspace: str) -> str:
    """Lexically confine `path` to the workspace: a relative path below it, or PathRefused.

    Symlinks are the in-container helper's job; this catches `..`, absolute paths elsewhere, NULs.
    """
    if not isinstance(path, str) or not path:
        raise PathRefused("empty path")
    if "\x00" in path:
        raise PathRefused("path contains a NUL byte")
    joined = posixpath.normpath(posixpath.join(workspace, path))
    if joined != workspace and not joined.startswith(workspace.rstrip("/") + "/"):
        raise PathRefused(f"{path!r} is outside the workspace {workspace}")
    return posixpath.relpath(joined, workspace)


class Sandbox:
    """A running hardened container. Use as a context manager, or call close()."""

    def __init__(self, container, policy: SandboxPolicy, session: str, origin: str):
        self.container = container
        self.policy = policy
        self.session = session
        self.origin = origin  # the image (sandbox image or snapshot) this container started from
        self.last_snapshot: str | None = None  # image id of the latest snapshot taken of this sandbox
        self._closed = False
        self._dead_reason: str | None = None  # set when the container died under us (OOM under gVisor, killed)
        self._last_disk_check = float("-inf")
        _LIVE.add(self)

    # -- lifecycle -------------------------------------------------------------------------------

    @classmethod
    def start(cls, policy: SandboxPolicy | None = None, *, session: str = "adhoc", role: str = "work") -> Sandbox:
        policy = policy or SandboxPolicy()
        require_runtime(policy.runtime)
        name = f"labrat-{session}-{role}-{secrets.token_hex(3)}"
        kwargs = dict(
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
            labels=owner_labels(session, role),
            runtime=policy.runtime,
        )
        if policy.ro_mounts:
            kwargs["volumes"] = {source: {"bind": target, "mode": "ro"} for target, source in policy.ro_mounts.items()}
        if policy.cpus:
            kwargs["nano_cpus"] = int(policy.cpus * 1e9)
        if policy.gpus:
            if policy.gpus == "all":
                kwargs["device_requests"] = [DeviceRequest(count=-1, capabilities=[["gpu"]])]
            else:
                kwargs["device_requests"] = [DeviceRequest(device_ids=list(policy.gpus), capabilities=[["gpu"]])]
        try:
            with engine_errors(image=policy.image):
                # create + start, not run: run() would try to pull a missing image from a registry.
                container = client().containers.create(**kwargs)
                container.start()
        except BaseException:
            # A create that failed at start (bad runtime, no GPU driver) leaves a container behind.
            with contextlib.suppress(Exception):
                client().containers.get(name).remove(force=True)
            raise
        log.debug("sandbox.started", name=name, image=policy.image, runtime=policy.runtime)
        return cls(container, policy, session, origin=policy.image)

    def close(self) -> None:
        """Remove the container. Safe to call twice, and when the engine already lost it."""
        if self._closed:
            return
        self._closed = True
        _LIVE.discard(self)
        with contextlib.suppress(docker.errors.NotFound), engine_errors():
            try:
                self.container.remove(force=True)
            except docker.errors.APIError as exc:
                if exc.status_code != 409:  # 409: another caller is already removing it
                    raise
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

    def _check_open(self) -> None:
        if self._closed:
            raise SandboxClosed(f"sandbox {self.name} is closed")
        if self._dead_reason:
            why = "ran out of memory" if self._dead_reason == "memory" else "stopped unexpectedly"
            raise SandboxClosed(f"sandbox {self.name} {why}; restore a snapshot to continue")

    # -- exec --------------------------------------------------------------------------------------

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
        timeout = self.policy.exec_timeout if timeout is None else timeout
        argv = ["/bin/bash", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        if self.policy.kill_leftovers and (user or self.policy.user) != "root":
            argv = _REAP_WRAPPER + argv
        run = self._run(argv, timeout, max_output or self.policy.max_output_bytes, input, user, workdir, env)
        stderr = run.err.text()
        if run.limit:
            stderr += ("\n" if stderr else "") + self._limit_message(run.limit, timeout)
        if run.pids_limited:
            stderr += ("\n" if stderr else "") + (
                f"[labrat: the process limit of {self.policy.pids_limit} was reached: new processes could not start]")
        result = ExecResult(
            exit_code=run.exit_code,
            stdout=run.out.text(),
            stderr=stderr,
            timed_out=run.limit == "timeout",
            duration=run.duration,
            truncated=bool(run.out.dropped or run.err.dropped),
            oom_killed=run.oom_killed,
            pids_limited=run.pids_limited,
            limit=run.limit,
        )
        log.debug("sandbox.exec", name=self.name, exit_code=run.exit_code, limit=run.limit, seconds=round(run.duration, 3))
        return result

    def _run(self, argv, timeout, max_output, input, user, workdir, env, may_write: bool = True) -> _RawRun:
        """exec's engine: start the process, pump its output on a thread, enforce time and disk on the host."""
        self._check_open()
        user = user or self.policy.user
        api = client().api
        oom_before = self._oom_count()
        pids_events = _first_existing(_cgroup_files(self.container.id, "pids.events", "pids.events", "pids"))
        pids_before = _pids_max_events(pids_events)
        pids_limited = False
        started = time.monotonic()
        exec_id, sock = self._start_exec(argv, user, workdir, env, stdin=input is not None)
        raw = getattr(sock, "_sock", sock)
        out, err = _CappedStream(max_output), _CappedStream(max_output)
        if input is not None:
            threading.Thread(target=_send_input, args=(raw, input), daemon=True).start()

        def pump() -> None:
            with contextlib.suppress(Exception):
                for stream, data in frames_iter(sock, tty=False):
                    (err if stream == _STDERR else out).feed(data)

        reader = threading.Thread(target=pump, daemon=True, name=f"exec-{exec_id[:8]}")
        reader.start()
        limit = None
        deadline = started + timeout
        next_disk_check = started + self.policy.disk_poll_seconds
        while reader.is_alive():
            now = time.monotonic()
            if now >= deadline:
                limit = "timeout"
                break
            if now >= next_disk_check:
                next_disk_check = now + self.policy.disk_poll_seconds
                size, running = self._poll()  # covers writes until now, not the rest of the exec
                if not running:
                    limit = self._check_alive()
                    break
                if size > self.policy.disk_bytes:
                    limit = "disk"
                    break
            reader.join(timeout=min(0.05, max(0.0, deadline - now)))
            # Read while it runs: under gVisor a fork bomb ends the whole sandbox, and its cgroup with it.
            pids_limited = pids_limited or _pids_max_events(pids_events) > pids_before
            if self.policy.runtime == "runsc" and reader.is_alive() and self._oom_count() > oom_before:
                # The host's OOM killer hit one of gVisor's own processes (its gofer, say): the sandbox may
                # go on, but the allocating process then waits forever instead of dying. End it now.
                limit = "memory"
                break
        if limit and not self._dead_reason:
            self._kill_user_processes(user)
            reader.join(timeout=10)
        with contextlib.suppress(Exception):
            raw.close()
        duration = time.monotonic() - started
        with engine_errors():
            try:
                info = api.exec_inspect(exec_id)
            except docker.errors.NotFound:
                info = {}  # the engine forgets execs of a container that died
        exit_code = info.get("ExitCode") if info and not info.get("Running") else None
        oom = self._oom_count() > oom_before
        pids_limited = pids_limited or _pids_max_events(pids_events) > pids_before
        if (exit_code is None or exit_code >= 128) and self._check_alive() is not None:
            # The whole container died (under gVisor an OOM kills the sandbox, not one process).
            oom = oom or self._dead_reason == "memory"
            limit = limit or self._dead_reason
            return _RawRun(exit_code, out, err, limit, duration, oom, pids_limited)
        if limit is None and oom:
            limit = "memory"
        if limit is None and may_write and self._disk_check_due() and self._poll()[0] > self.policy.disk_bytes:
            limit = "disk"  # wrote past the limit between two polls and then exited
        return _RawRun(exit_code, out, err, limit, duration, oom, pids_limited)

    def _start_exec(self, argv: list[str], user: str, workdir: str | None, env: dict[str, str] | None,
                    stdin: bool) -> tuple[str, object]:
        """Create and start an exec; (its id, its hijacked socket). A gone or stopped container is SandboxClosed."""
        api = client().api
        with engine_errors():
            try:
                exec_id = api.exec_create(self.container.id, argv, stdout=True, stderr=True, stdin=stdin, user=user,
                                          workdir=workdir or self.policy.workspace, environment=env or None)["Id"]
                return exec_id, api.exec_start(exec_id, socket=True)
            except docker.errors.NotFound as exc:
                raise SandboxClosed(f"sandbox {self.name} is gone (its container was removed)") from exc
            except docker.errors.APIError as exc:
                if "is not running" in str(exc) or "is paused" in str(exc):
                    raise SandboxClosed(f"sandbox {self.name} is not running: {exc.explanation}") from exc
                raise

    def spawn(self, cmd: list[str], *, user: str | None = None, workdir: str | None = None,
              env: dict[str, str] | None = None) -> SandboxProcess:
        """Start `cmd` with live pipes and return at once: its stdin is written and its stdout read while
        it runs (exec() waits for the end). No wall-clock limit here: the caller reads with deadlines and
        close() kills the process and every other process of its user in the container."""
        self._check_open()
        user = user or self.policy.user
        exec_id, sock = self._start_exec(list(cmd), user, workdir, env, stdin=True)
        return SandboxProcess(self, exec_id, sock, user)

    def stream_file(self, path: str, max_bytes: int) -> Iterator[bytes]:
        """The bytes of a workspace file as chunks, never held whole (symlink-safe like read_file). Raises the
        helper's one-line error (FileMissing, PathRefused, FileTooLarge) when it refuses, even after chunks."""
        rel = workspace_relpath(path, self.policy.workspace)
        process = self.spawn([_PYTHON, "-I", "-S", "-c", _FSOPS_SOURCE, "read", self.policy.workspace, rel,
                              str(max_bytes)], workdir="/")
        try:
            process.close_stdin()
            while chunk := process.read(1 << 20, time.monotonic() + self.policy.exec_timeout):
                yield chunk
            exit_code = process.wait(10)
            if exit_code != 0:
                lines = process.stderr_tail().strip().splitlines()
                message = lines[-1] if lines else f"read failed (exit {exit_code})"
                raise {3: PathRefused, 4: FileMissing, 5: FileTooLarge}.get(exit_code, SandboxError)(message)
        finally:
            process.close()

    def _disk_check_due(self) -> bool:
        """At most one end-of-exec size check per poll interval: the engine walks the whole writable
        layer for it (~130 ms at 50,000 files). A burst it skips is caught by the next due check, and
        snapshot() always checks, so an over-limit layer never reaches the store."""
        now = time.monotonic()
        if now - self._last_disk_check < self.policy.disk_poll_seconds:
            return False
        self._last_disk_check = now
        return True

    def is_running(self) -> bool:
        """Whether the container still runs (one engine call); False once it stopped, died or was closed."""
        if self._closed or self._dead_reason:
            return False
        with engine_errors(), contextlib.suppress(docker.errors.NotFound):
            self.container.reload()
            return bool(self.container.attrs.get("State", {}).get("Running"))
        return False

    def _check_alive(self, settle: float = 0.5) -> str | None:
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

    def _limit_message(self, limit: str, timeout: float) -> str:
        if limit == "timeout":
            return f"[labrat: killed after {timeout:g} s wall-clock timeout]"
        if limit == "died":
            return "[labrat: the container stopped unexpectedly; restore a snapshot to continue]"
        if limit == "disk":
            return (
                f"[labrat: stopped: the container's writes exceed the disk limit of {self.policy.disk_bytes} bytes; "
                "delete files to continue]"
            )
        return f"[labrat: out of memory: a process was killed at the {self.policy.memory_bytes}-byte memory limit]"

    def _kill_user_processes(self, user: str) -> None:
        """SIGKILL every process the user owns in the container (PID 1 and root's keep-alive survive)."""
        with contextlib.suppress(Exception), engine_errors():
            exec_id = client().api.exec_create(self.container.id, _KILL_ALL, user=user)["Id"]
            client().api.exec_start(exec_id)

    def _oom_count(self) -> int:
        """The container cgroup's OOM-kill counter (cgroup v1 or v2), read from the host; 0 if unreadable."""
        for path in _cgroup_files(self.container.id, "memory.oom_control", "memory.events"):
            with contextlib.suppress(OSError, ValueError):
                text = Path(path).read_text()
                for line in text.splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        return 0

    def peak_memory_bytes(self) -> int | None:
        """The container's peak memory use so far, read from its cgroup on the host (None if unreadable)."""
        for path in _cgroup_files(self.container.id, "memory.max_usage_in_bytes", "memory.peak"):
            with contextlib.suppress(OSError, ValueError):
                return int(Path(path).read_text().split()[0])
        return None

    def manifest(self, path: str = ".", max_entries: int = 10_000) -> list[dict]:
        """Regular files below a workspace directory: {path, size, sha256} (sha256 None past 1 MiB per file
        or 64 MiB in all). Symlinks are never followed; paths are relative to `path`."""
        return json.loads(self._fsop("manifest", path, max_entries))

    def changes(self, under: str | None = None) -> dict[str, str]:
        """Paths changed in the writable layer since the container's image (`docker diff`):
        path -> "changed" | "added" | "deleted", optionally only below the directory `under`."""
        with engine_errors():
            changes = self.container.diff() or []
        prefix = (under or "/").rstrip("/") + "/"
        kinds = {0: "changed", 1: "added", 2: "deleted"}
        return {c["Path"]: kinds.get(c.get("Kind"), "changed") for c in changes if c["Path"].startswith(prefix)}

    def disk_usage(self) -> int:
        """Bytes in the container's writable layer (what a snapshot would store), as the engine counts them."""
        return self._poll()[0]

    def _poll(self) -> tuple[int, bool]:
        """(writable-layer bytes, running?) in one engine call."""
        with engine_errors():
            rows = client().api.containers(all=True, size=True, filters={"id": self.container.id})
        if not rows:
            raise SandboxClosed(f"sandbox {self.name} is gone (its container was removed)")
        return int(rows[0].get("SizeRw") or 0), rows[0].get("State") == "running"

    # -- files -------------------------------------------------------------------------------------

    def _fsop(self, op: str, path: str, limit: int, data: bytes | None = None) -> bytes:
        """Run one fsops.py operation as the agent's user; returns its raw stdout or raises a one-line error."""
        rel = workspace_relpath(path, self.policy.workspace)
        argv = [_PYTHON, "-I", "-S", "-c", _FSOPS_SOURCE, op, self.policy.workspace, rel, str(limit)]
        # The helper refuses anything over `limit` (bytes, or entries of at most ~600 JSON bytes), and the
        # capped stream keeps half its cap as head: these caps never truncate a legal answer.
        cap = 2 * (limit * 600 if op in ("list", "manifest") else limit) + 65536
        run = self._run(argv, 120, cap, data, None, "/", None, may_write=op in ("write", "delete"))
        if run.exit_code == 0 and run.limit in (None, "disk"):  # over the disk limit, files can still be read
            return bytes(run.out.head) + bytes(run.out.tail)
        message = safe_text(bytes(run.err.head)).strip().splitlines()
        message = message[-1] if message else f"{op} failed ({run.limit or run.exit_code})"
        error = {3: PathRefused, 4: FileMissing, 5: FileTooLarge}.get(run.exit_code, SandboxError)
        raise error(f"{op} {path}: {message}" if error is SandboxError else message)

    def read_file(self, path: str, max_bytes: int | None = None) -> bytes:
        """The bytes of a regular file in the workspace (symlinks followed only within it)."""
        return self._fsop("read", path, max_bytes or self.policy.max_file_bytes)

    def read_text(self, path: str, max_bytes: int | None = None) -> str:
        return self.read_file(path, max_bytes).decode("utf-8", errors="replace")

    def write_file(self, path: str, content: bytes | str) -> None:
        """Atomically create or replace a workspace file as the agent's user (parents created, mode kept)."""
        data = content.encode() if isinstance(content, str) else bytes(content)
        if len(data) > self.policy.max_file_bytes:
            raise FileTooLarge(f"content is {len(data)} bytes, over the {self.policy.max_file_bytes}-byte limit")
        self._fsop("write", path, self.policy.max_file_bytes, data)

    def delete_file(self, path: str) -> None:
        """Remove a workspace file (a symlink is removed itself, never followed); directories are refused."""
        self._fsop("delete", path, 0)

    def list_dir(self, path: str = ".", max_entries: int = 10_000) -> list[FileEntry]:
        return [FileEntry(**entry) for entry in json.loads(self._fsop("list", path, max_entries))]


class SandboxProcess:
    """A process started by Sandbox.spawn: its stdin written as it runs, its stdout read as it comes (at most
    STREAM_BUFFER_BYTES buffered: past that the process waits, so a flood costs the host no memory), its
    stderr drained into a bounded tail. It quacks like trainer.evaluate's Channel."""

    def __init__(self, box: Sandbox, exec_id: str, sock, user: str):
        self.box, self.exec_id, self.user = box, exec_id, user
        self._sock, self._raw = sock, getattr(sock, "_sock", sock)
        self._buffer = bytearray()
        self._ended = False
        self._closed = False
        self._ready = threading.Condition()
        self._err = _CappedStream(STDERR_TAIL_BYTES)
        self._pump = threading.Thread(target=self._read_frames, daemon=True, name=f"spawn-{exec_id[:8]}")
        self._pump.start()

    def _read_frames(self) -> None:
        with contextlib.suppress(Exception):
            for stream, data in frames_iter(self._sock, tty=False):
                if stream == _STDERR:
                    self._err.feed(data)
                    continue
                with self._ready:
                    while len(self._buffer) > STREAM_BUFFER_BYTES and not self._closed:
                        self._ready.wait(0.5)
                    self._buffer += data
                    self._ready.notify_all()
        with self._ready:
            self._ended = True
            self._ready.notify_all()

    def send(self, data: bytes) -> None:
        """Write to the process's stdin; OSError once it is gone."""
        self._raw.sendall(data)

    def close_stdin(self) -> None:
        with contextlib.suppress(OSError):
            self._raw.shutdown(socket.SHUT_WR)

    def read(self, max_bytes: int, deadline: float) -> bytes:
        """Up to max_bytes of stdout as soon as any is there; b"" once it ended; TimeoutError at the deadline."""
        with self._ready:
            while not self._buffer and not self._ended:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no output from the process in {self.box.name}")
                self._ready.wait(remaining)
            data = bytes(self._buffer[:max_bytes])
            del self._buffer[:max_bytes]
            self._ready.notify_all()
            return data

    def read_exact(self, size: int, deadline: float) -> bytes:
        """Exactly `size` bytes of stdout, or fewer if it ended first; TimeoutError at the deadline."""
        parts, got = [], 0
        while got < size and (chunk := self.read(size - got, deadline)):
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def stderr_tail(self) -> str:
        return self._err.text()

    def wait(self, timeout: float) -> int | None:
        """The exit code once the process has ended (None if it has not within `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            with engine_errors():
                info = client().api.exec_inspect(self.exec_id)
            if not info.get("Running"):
                return info.get("ExitCode")
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)

    def close(self) -> None:
        """End the process and everything else its user runs in the container; safe to call twice."""
        if self._closed:
            return
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        self.close_stdin()
        if self.user != "root" and not self.box._closed:
            self.box._kill_user_processes(self.user)
        with contextlib.suppress(Exception):
            self._raw.close()
        self._pump.join(timeout=5)


class _RawRun(NamedTuple):
    exit_code: int | None
    out: _CappedStream
    err: _CappedStream
    limit: str | None
    duration: float
    oom_killed: bool
    pids_limited: bool = False


def _send_input(raw_socket, data: bytes) -> None:
    """Write stdin to an exec's hijacked socket, then half-close it so the process sees EOF."""
    with contextlib.suppress(OSError):
        raw_socket.sendall(data)
        raw_socket.shutdown(socket.SHUT_WR)


def _cgroup_files(container_id: str, v1_name: str, v2_name: str, controller: str = "memory") -> list[str]:
    """Where a container's cgroup file lives: cgroup v1 (cgroupfs or systemd driver), then v2."""
    return [
        f"/sys/fs/cgroup/{controller}/docker/{container_id}/{v1_name}",
        f"/sys/fs/cgroup/{controller}/system.slice/docker-{container_id}.scope/{v1_name}",
        f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/{v2_name}",
        f"/sys/fs/cgroup/docker/{container_id}/{v2_name}",
    ]


def _first_existing(paths: list[str]) -> str | None:
    return next((path for path in paths if Path(path).exists()), None)


def _pids_max_events(path: str | None) -> int:
    """The pids cgroup's count of forks refused at its limit (pids.events "max"); 0 if unreadable or gone."""
    if path is None:
        return 0
    with contextlib.suppress(OSError, ValueError):
        with open(path) as events:
            for line in events:
                key, _, value = line.partition(" ")
                if key == "max":
                    return int(value)
    return 0


def interrupt_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C, so `with Sandbox` blocks and atexit remove their containers."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


@atexit.register
def wait_for_removals(timeout: float = 60) -> None:
    """Block until the removals close_later() started have finished (before removing their images)."""
    concurrent.futures.wait(list(_REMOVING), timeout=timeout)


def close_all() -> None:
    """Remove every sandbox this process still holds (normal exit, or an exception that reached the top)."""
    for sandbox in list(_LIVE):
        with contextlib.suppress(Exception):
            sandbox.close()
