"""What runs in a sandbox: exec (run and wait, within limits) and spawn (live pipes), and what they return.

The clock that enforces timeouts is the host's and output is capped on the host: nothing the process does
can stretch either. While an exec runs, the container's side (sandbox.py: its liveness, its disk use) is
polled through the `box`, the Sandbox the process runs in, that every function here takes.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import NamedTuple

import docker.errors
import structlog
from docker.utils.socket import frames_iter
from pydantic import BaseModel

from sandbox.cgroups import oom_kills, pids_events_file, refused_forks
from sandbox.engine import engine_errors
from sandbox.errors import SandboxClosed
from sandbox.policy import SandboxPolicy

log = structlog.get_logger(__name__)

_KILL_ALL = ["/bin/bash", "-c", "kill -KILL -1"]  # as the exec's user: every process it owns
# Runs an exec's argv, then kills whatever it left behind (daemons, `setsid` escapees) before exiting with its status.
_REAP_WRAPPER = ["/bin/bash", "-c", '"$@"; rc=$?; kill -KILL -1 2>/dev/null; exit $rc', "labrat-exec"]
_STDERR = 2
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


class CappedStream:
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


class RawRun(NamedTuple):
    """One finished run, before exec() turns it into an ExecResult (file operations read its bytes)."""

    exit_code: int | None
    out: CappedStream
    err: CappedStream
    limit: str | None
    duration: float
    oom_killed: bool
    pids_limited: bool = False


# -- exec ------------------------------------------------------------------------------------------


def execute(box, cmd: str | list[str], *, timeout: float | None, max_output: int | None, input: bytes | None,
            user: str | None, workdir: str | None, env: dict[str, str] | None) -> ExecResult:
    """Sandbox.exec: run `cmd` (a bash script if a string), wait at most `timeout` seconds, say what stopped it."""
    policy = box.policy
    timeout = policy.exec_timeout if timeout is None else timeout
    argv = ["/bin/bash", "-c", cmd] if isinstance(cmd, str) else list(cmd)
    if policy.kill_leftovers and (user or policy.user) != "root":
        argv = _REAP_WRAPPER + argv
    run = run_raw(box, argv, timeout, max_output or policy.max_output_bytes, input, user, workdir, env)
    stderr = run.err.text()
    if run.limit:
        stderr += ("\n" if stderr else "") + _limit_message(policy, run.limit, timeout)
    if run.pids_limited:
        stderr += ("\n" if stderr else "") + (
            f"[labrat: the process limit of {policy.pids_limit} was reached: new processes could not start]")
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
    log.debug("sandbox.exec", name=box.name, exit_code=run.exit_code, limit=run.limit,
              seconds=round(run.duration, 3))
    return result


def run_raw(box, argv: list[str], timeout: float, max_output: int, input: bytes | None, user: str | None,
            workdir: str | None, env: dict[str, str] | None, may_write: bool = True) -> RawRun:
    """exec's engine: start the process, pump its output on a thread, enforce time and disk on the host."""
    box.ensure_open()
    user = user or box.policy.user
    counters = _KernelCounters(box.container.id)
    started = time.monotonic()
    exec_id, sock = start_exec(box, argv, user, workdir, env, stdin=input is not None)
    out, err = CappedStream(max_output), CappedStream(max_output)
    reader = _pump_output(sock, exec_id, out, err, input)
    limit = _watch(box, reader, started, timeout, counters)
    if limit and not box.dead_reason:
        kill_user_processes(box, user)
        reader.join(timeout=10)
    with contextlib.suppress(Exception):
        _raw_socket(sock).close()
    duration = time.monotonic() - started
    exit_code = _exit_code(box, exec_id)
    oom = counters.oom_killed()
    pids_limited = counters.forks_refused()
    if (exit_code is None or exit_code >= 128) and box.check_alive() is not None:
        # The whole container died (under gVisor an OOM kills the sandbox, not one process).
        oom = oom or box.dead_reason == "memory"
        limit = limit or box.dead_reason
    elif limit is None and oom:
        limit = "memory"
    elif limit is None and may_write and box.disk_check_due() and box.poll_usage()[0] > box.policy.disk_bytes:
        limit = "disk"  # wrote past the limit between two polls and then exited
    return RawRun(exit_code, out, err, limit, duration, oom, pids_limited)


class _KernelCounters:
    """The container's OOM kills and refused forks since an exec began, as its cgroups count them."""

    def __init__(self, container_id: str):
        self.container_id = container_id
        self.oom_before = oom_kills(container_id)
        self.pids_events = pids_events_file(container_id)
        self.refused_before = refused_forks(self.pids_events)
        self.refused = False

    def oom_killed(self) -> bool:
        return oom_kills(self.container_id) > self.oom_before

    def forks_refused(self) -> bool:
        """Whether a fork was refused since the start; read while the exec runs, because under gVisor a fork
        bomb ends the whole sandbox, and its cgroup with it."""
        self.refused = self.refused or refused_forks(self.pids_events) > self.refused_before
        return self.refused


def _pump_output(sock, exec_id: str, out: CappedStream, err: CappedStream, input: bytes | None) -> threading.Thread:
    """Write stdin (if any) and feed stdout and stderr into their capped streams, each on a thread of its
    own; the reader thread (returned) ends when the process's output does."""
    if input is not None:
        threading.Thread(target=_send_input, args=(_raw_socket(sock), input), daemon=True).start()

    def pump() -> None:
        with contextlib.suppress(Exception):
            for stream, data in frames_iter(sock, tty=False):
                (err if stream == _STDERR else out).feed(data)

    reader = threading.Thread(target=pump, daemon=True, name=f"exec-{exec_id[:8]}")
    reader.start()
    return reader


def _watch(box, reader: threading.Thread, started: float, timeout: float, counters: _KernelCounters) -> str | None:
    """Wait for the output to end; the limit that stopped the process first, or None if it ended by itself.
    Every `disk_poll_seconds` the engine is asked whether the container still runs and how much it wrote."""
    policy = box.policy
    deadline = started + timeout
    next_disk_check = started + policy.disk_poll_seconds
    while reader.is_alive():
        now = time.monotonic()
        if now >= deadline:
            return "timeout"
        if now >= next_disk_check:
            next_disk_check = now + policy.disk_poll_seconds
            size, running = box.poll_usage()  # covers writes until now, not the rest of the exec
            if not running:
                return box.check_alive()
            if size > policy.disk_bytes:
                return "disk"
        reader.join(timeout=min(0.05, max(0.0, deadline - now)))
        counters.forks_refused()
        if policy.runtime == "runsc" and reader.is_alive() and counters.oom_killed():
            # The host's OOM killer hit one of gVisor's own processes (its gofer, say): the sandbox may
            # go on, but the allocating process then waits forever instead of dying. End it now.
            return "memory"
    return None


def _exit_code(box, exec_id: str) -> int | None:
    """The exec's exit status; None while it still runs, or when the engine forgot it (its container died)."""
    with engine_errors():
        try:
            info = box.client.api.exec_inspect(exec_id)
        except docker.errors.NotFound:
            return None
    return info.get("ExitCode") if info and not info.get("Running") else None


def _limit_message(policy: SandboxPolicy, limit: str, timeout: float) -> str:
    if limit == "timeout":
        return f"[labrat: killed after {timeout:g} s wall-clock timeout]"
    if limit == "died":
        return "[labrat: the container stopped unexpectedly; restore a snapshot to continue]"
    if limit == "disk":
        return (
            f"[labrat: stopped: the container's writes exceed the disk limit of {policy.disk_bytes} bytes; "
            "delete files to continue]"
        )
    return f"[labrat: out of memory: a process was killed at the {policy.memory_bytes}-byte memory limit]"


def start_exec(box, argv: list[str], user: str, workdir: str | None, env: dict[str, str] | None,
               stdin: bool) -> tuple[str, object]:
    """Create and start an exec; (its id, its hijacked socket). A gone or stopped container is SandboxClosed."""
    api = box.client.api
    with engine_errors():
        try:
            exec_id = api.exec_create(box.container.id, argv, stdout=True, stderr=True, stdin=stdin, user=user,
                                      workdir=workdir or box.policy.workspace, environment=env or None)["Id"]
            return exec_id, api.exec_start(exec_id, socket=True)
        except docker.errors.NotFound as exc:
            raise SandboxClosed(f"sandbox {box.name} is gone (its container was removed)") from exc
        except docker.errors.APIError as exc:
            if "is not running" in str(exc) or "is paused" in str(exc):
                raise SandboxClosed(f"sandbox {box.name} is not running: {exc.explanation}") from exc
            raise


def kill_user_processes(box, user: str) -> None:
    """SIGKILL every process the user owns in the container (PID 1 and root's keep-alive survive)."""
    with contextlib.suppress(Exception), engine_errors():
        exec_id = box.client.api.exec_create(box.container.id, _KILL_ALL, user=user)["Id"]
        box.client.api.exec_start(exec_id)


def _raw_socket(sock):
    """The OS socket under docker-py's hijacked one (wrapped as `_sock` on a unix socket)."""
    return getattr(sock, "_sock", sock)


def _send_input(raw_socket, data: bytes) -> None:
    """Write stdin to an exec's hijacked socket, then half-close it so the process sees EOF."""
    with contextlib.suppress(OSError):
        raw_socket.sendall(data)
        raw_socket.shutdown(socket.SHUT_WR)


# -- spawn -----------------------------------------------------------------------------------------


class SandboxProcess:
    """A process started by Sandbox.spawn: its stdin written as it runs, its stdout read as it comes (at most
    STREAM_BUFFER_BYTES buffered: past that the process waits, so a flood costs the host no memory), its
    stderr drained into a bounded tail. It quacks like trainer.evaluate's Channel."""

    def __init__(self, box, exec_id: str, sock, user: str):
        self.box, self.exec_id, self.user = box, exec_id, user
        self._sock, self._raw = sock, _raw_socket(sock)
        self._buffer = bytearray()
        self._ended = False
        self._closed = False
        self._ready = threading.Condition()
        self._err = CappedStream(STDERR_TAIL_BYTES)
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
                info = self.box.client.api.exec_inspect(self.exec_id)
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
        if self.user != "root" and not self.box.closed:
            kill_user_processes(self.box, self.user)
        with contextlib.suppress(Exception):
            self._raw.close()
        self._pump.join(timeout=5)
