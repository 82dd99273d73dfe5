"""The working container: the one the agent edits, always a fresh copy of the session's base.

The workbench is its only owner. It starts it, replaces it after every experiment (with the candidate
if it was kept, the old base otherwise), restores it after it died or the engine restarted, and says
whether it is alive.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import structlog

from harness.text import one_line
from sandbox.engine import remove_stopped, wait_for_engine
from sandbox.errors import SandboxError
from sandbox.sandbox import Sandbox
from sandbox.snapshots import Snapshot

log = structlog.get_logger(__name__)

ENGINE_WAIT_SECONDS = 300  # how long a session waits for a restarted Docker engine before it stops (resumable)
SOURCE_LIMIT = 256 * 1024  # per file kept in the ledger for diffs
SOURCE_FILES_LIMIT = 50  # changed files read per experiment
IGNORED_PARTS = ("__pycache__", ".labrat-run-", ".cache", ".ipynb_checkpoints")

StartBox = Callable[[Snapshot | str | None], Sandbox]  # a working container of a snapshot (None: the sandbox image)


class Workbench:
    def __init__(self, start_box: StartBox, session_id: str, base: Callable[[], Snapshot | str | None]):
        self._start_box = start_box
        self.session_id = session_id
        self._base = base  # the session's base snapshot, asked for each time: a keep moves it
        self.box: Sandbox | None = None

    def start(self) -> None:
        """A fresh working container of the session's base (the sandbox image before any keep)."""
        self.close()
        self.box = self._start_box(self._base())

    def start_next(self, snapshot: Snapshot | str | None) -> Sandbox:
        """A working container of `snapshot`, started ahead of need (while an experiment trains)."""
        return self._start_box(snapshot)

    def adopt(self, box: Sandbox | None) -> None:
        """Make a container started with start_next the working one; restore instead when it is not running
        (it was never started, or the engine restarted since)."""
        if box is None or not box.is_running():
            if box is not None:
                box.close_later()
            self.restore()
            return
        if self.box is not None:
            self.box.close_later()
        self.box = box

    def restore(self) -> None:
        """After the working container died or the engine went away (restarted, crashed): wait for the engine,
        remove this session's containers that stopped with it, and start a fresh working container of the base.
        Raises EngineUnavailable if the engine is not back within ENGINE_WAIT_SECONDS."""
        wait_for_engine(ENGINE_WAIT_SECONDS)
        if removed := remove_stopped(self.session_id):
            log.warning("workbench.removed_stopped_containers", names=removed)
        self.start()

    def is_dead(self) -> bool:
        return self.box is None or not self.box.is_alive()

    def close(self) -> None:
        if self.box is not None:
            self.box.close()
            self.box = None

    def read_sources(self, parent: dict[str, str]) -> dict[str, str]:
        """{path: text} of every source file in /workspace: the parent's text where the content hash is
        unchanged, read from the container otherwise (one manifest exec plus one read per changed file)."""
        parent_hashes = {path: hashlib.sha256(text.encode()).hexdigest() for path, text in parent.items()}
        sources: dict[str, str] = {}
        read = 0
        for entry in self.box.manifest("."):
            rel, size, digest = entry["path"], entry["size"], entry["sha256"]
            if any(part in rel for part in IGNORED_PARTS):
                continue
            if digest is not None and parent_hashes.get(rel) == digest:
                sources[rel] = parent[rel]
            elif digest is None or size > SOURCE_LIMIT:
                sources[rel] = f"<not recorded: {size} bytes>\n"
            elif read >= SOURCE_FILES_LIMIT:
                sources[rel] = f"<not recorded: more than {SOURCE_FILES_LIMIT} files changed>\n"
            else:
                read += 1
                try:
                    data = self.box.read_file(rel, max_bytes=SOURCE_LIMIT)
                except SandboxError as exc:  # replaced by a symlink or a directory since the manifest
                    sources[rel] = f"<not recorded: {one_line(exc, 200)}>\n"
                    continue
                sources[rel] = f"<binary file, {len(data)} bytes>\n" if b"\x00" in data else data.decode("utf-8", "replace")
        return sources
