"""Fail points: named places in the harness where a test makes the process SIGKILL itself.

They prove the promise of `session.py`: a harness killed at any point of an experiment loses no
completed experiment, leaves the ledger consistent and no container behind
(tests/adversarial/test_kill_points.py walks every point). Like etcd's gofail, they are inert unless
the environment names one: `LABRAT_FAILPOINT=train.running` kills at the first pass,
`LABRAT_FAILPOINT=tool.before:3` at the third. A point marked "(after N s)" in POINTS fires on a
timer once reached, so the kill lands while the engine is working (mid-training, mid-evaluation).
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter

ENV = "LABRAT_FAILPOINT"

# In the order an experiment meets them; the value says where the kill lands.
POINTS = {
    "session.locked": "lab locked, ledger not yet opened",
    "session.recovered": "the previous run's interrupted experiment just marked crash",
    "session.opened": "session row written, no working container yet",
    "session.box_started": "working container of the base started",
    "tool.before": "an agent tool call received, not yet executed",
    "tool.recorded": "a tool call executed and recorded",
    "experiment.begun": "experiment row inserted as running",
    "experiment.snapshot_taken": "candidate committed to the snapshot store, not yet in the ledger",
    "train.container_started": "training container started from the snapshot",
    "train.running": "(after 1.5 s) training in progress, standby containers starting",
    "train.finished": "training exited, checkpoint still in its container",
    "train.checkpoint_copied": "checkpoint streamed into both evaluation workers, scoring about to start",
    "eval.started": "evaluation about to start (its workers running, the checkpoint not yet sent)",
    "eval.running": "evaluation in progress: scored, not yet judged",
    "eval.finished": "evaluation done, metric parsed, nothing recorded",
    "experiment.sources_read": "sources and diff read, row not yet written",
    "ledger.before_commit": "inside the transaction that records the verdict (and moves the base on a keep)",
    "experiment.recorded": "verdict committed, results.tsv not yet rewritten",
    "experiment.results_written": "results.tsv rewritten, working container not yet replaced",
    "experiment.box_swapped": "next working container in place",
    "session.closing": "session ending, its row not yet closed",
}
_DELAYED = {"train.running": 1.5}
_passes: Counter[str] = Counter()


def reach(name: str) -> None:
    """Mark that the harness reached fail point `name` (a no-op unless LABRAT_FAILPOINT names it)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    if name not in POINTS:
        raise KeyError(f"unknown fail point {name!r}")
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _passes[name] += 1
    if _passes[name] != int(nth or 1):
        return
    if name in _DELAYED:
        threading.Timer(_DELAYED[name], _kill).start()
    else:
        _kill()


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
