"""The host's side of the workspace's file operations: paths checked, fsops.py run in the container, answers read.

Every operation runs fsops.py inside the container as the agent's user (sent as source, so it always
matches this version and no file the agent could replace is involved); the helper does the symlink-safe
walk, this side confines paths lexically, caps what comes back, and turns the helper's refusals into
one-line errors. Functions take the Sandbox they work in as `box`.
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from pydantic import BaseModel

from sandbox.errors import FileMissing, FileTooLarge, PathRefused, SandboxError
from sandbox.process import run_raw, safe_text

_FSOPS_SOURCE = (Path(__file__).parent / "fsops.py").read_text()
_PYTHON = "/usr/bin/python3"  # the base image's interpreter, root-owned; never the agent's PATH
# The helper's exit codes for a refusal; any other failure is a plain SandboxError.
_REFUSALS = {3: PathRefused, 4: FileMissing, 5: FileTooLarge}


class FileEntry(BaseModel):
    name: str
    kind: str  # file | dir | symlink | other
    size: int
    mode: int


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


def _helper_argv(box, op: str, path: str, limit: int) -> list[str]:
    rel = workspace_relpath(path, box.policy.workspace)
    return [_PYTHON, "-I", "-S", "-c", _FSOPS_SOURCE, op, box.policy.workspace, rel, str(limit)]


def fsop(box, op: str, path: str, limit: int, data: bytes | None = None) -> bytes:
    """Run one fsops.py operation as the agent's user; returns its raw stdout or raises a one-line error."""
    argv = _helper_argv(box, op, path, limit)
    # The helper refuses anything over `limit` (bytes, or entries of at most ~600 JSON bytes), and the
    # capped stream keeps half its cap as head: these caps never truncate a legal answer.
    cap = 2 * (limit * 600 if op in ("list", "manifest") else limit) + 65536
    run = run_raw(box, argv, 120, cap, data, None, "/", None, may_write=op in ("write", "delete"))
    if run.exit_code == 0 and run.limit in (None, "disk"):  # over the disk limit, files can still be read
        return bytes(run.out.head) + bytes(run.out.tail)
    message = safe_text(bytes(run.err.head)).strip().splitlines()
    message = message[-1] if message else f"{op} failed ({run.limit or run.exit_code})"
    error = _REFUSALS.get(run.exit_code, SandboxError)
    raise error(f"{op} {path}: {message}" if error is SandboxError else message)


def read_chunks(box, path: str, max_bytes: int, op: str = "read") -> Iterator[bytes]:
    """Sandbox.stream_file (and pack_dir, with op "pack"): the helper spawned, its stdout passed on as it comes."""
    process = box.spawn(_helper_argv(box, op, path, max_bytes), workdir="/")
    try:
        process.close_stdin()
        while chunk := process.read(1 << 20, time.monotonic() + box.policy.exec_timeout):
            yield chunk
        _check_exit(process, op)
    finally:
        process.close()


def write_chunks(box, path: str, chunks: Iterable[bytes], max_bytes: int, op: str = "unpack") -> bytes:
    """Sandbox.unpack_dir: the helper spawned, `chunks` sent to its stdin as they come; returns its answer."""
    process = box.spawn(_helper_argv(box, op, path, max_bytes), workdir="/")
    try:
        try:
            for chunk in chunks:
                process.send(chunk)
        except OSError:  # it stopped reading: it refused the input, and says why below
            pass
        process.close_stdin()
        answer = b""
        while chunk := process.read(1 << 20, time.monotonic() + box.policy.exec_timeout):
            answer += chunk[: 65536 - len(answer)]
        _check_exit(process, op)
        return answer
    finally:
        process.close()


def _check_exit(process, op: str) -> None:
    exit_code = process.wait(10)
    if exit_code != 0:
        lines = process.stderr_tail().strip().splitlines()
        message = lines[-1] if lines else f"{op} failed (exit {exit_code})"
        raise _REFUSALS.get(exit_code, SandboxError)(message)
