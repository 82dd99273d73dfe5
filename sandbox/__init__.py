"""labrat's sandbox: hardened Docker containers, snapshots and images. Knows nothing of ML.

    from sandbox import Sandbox, SandboxPolicy, SnapshotStore
"""

import logging
import sys

import structlog

if not structlog.is_configured():
    # Used as a library (no harness.logs.configure() call): info and up, on stderr, never stdout.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )

from sandbox.errors import SandboxError  # noqa: E402
from sandbox.policy import SandboxPolicy  # noqa: E402
from sandbox.process import ExecResult  # noqa: E402
from sandbox.sandbox import Sandbox  # noqa: E402
from sandbox.snapshots import Snapshot, SnapshotStore  # noqa: E402

__all__ = ["ExecResult", "Sandbox", "SandboxError", "SandboxPolicy", "Snapshot", "SnapshotStore"]
