"""structlog setup: human-readable on a TTY, JSON lines otherwise (CI, files, pipes).

With `file=`, every event at info and above is also appended to that file as a JSON line (a lab
keeps its own log at logs/labrat.log), whatever the console's level.
"""

import json as jsonlib
import logging
import os
import sys
from pathlib import Path

import structlog

FILE_LEVEL = logging.INFO


class _FileTee:
    """Writes each event to a JSON-lines file, then drops it for the console if below the console's level."""

    def __init__(self, path: Path, console_level: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives as long as the process
        self.console_level = console_level
        self.failed = False

    def __call__(self, logger, method_name, event_dict):
        if not self.failed:
            try:
                self.file.write(jsonlib.dumps(event_dict, default=str) + "\n")
            except OSError as exc:  # a full disk must not turn every log call into a crash
                self.failed = True
                print(f"labrat: warning: cannot write {self.file.name}: {exc.strerror}; file logging stopped",
                      file=sys.stderr)
        if logging.getLevelNamesMapping().get(method_name.upper(), logging.INFO) < self.console_level:
            raise structlog.DropEvent
        return event_dict


def configure(level: str | None = None, json: bool | None = None, file: Path | None = None) -> None:
    level_name = (level or os.environ.get("LABRAT_LOG_LEVEL", "info")).upper()
    console_level = getattr(logging, level_name, logging.INFO)
    json = (not sys.stderr.isatty()) if json is None else json
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if file is not None:
        processors.append(_FileTee(Path(file), console_level))
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(min(console_level, FILE_LEVEL) if file else console_level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
