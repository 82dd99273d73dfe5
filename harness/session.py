"""A research session: the lab's lock, crash recovery, the session's row, its budgets and its bookkeeping.

The session's *base* is the last kept experiment (or the sandbox image at the start of a lab); it only
ever moves inside the ledger transaction that records a keep. A harness killed at any point leaves the
ledger consistent: the experiment it was running is marked `crash` at the next start, containers of the
dead process are reaped, and the session resumes from its base.

What the session does not do: start containers (harness/workbench.py owns the working one) or run
experiments (harness/experiment.py). Agents see it through the read-only `LabView`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import secrets
import sqlite3
import time
from pathlib import Path

import structlog

from harness import failpoints
from harness.config import LabConfig
from harness.lab import LEDGER_FILE, lock_lab, write_atomically
from harness.ledger import Experiment, Ledger, SessionRow, Status
from harness.noise import Noise, Runs, lab_noise, runs_of
from harness.text import one_line
from sandbox.engine import reap_orphans
from sandbox.errors import SandboxError
from sandbox.snapshots import SnapshotStore

log = structlog.get_logger(__name__)

RESULTS_FILE = "results.tsv"


class Progress:
    """What the session reports while it works; the CLI's live view overrides these."""

    def phase(self, name: str, seconds: float | None = None) -> None: ...
    def experiment_started(self, experiment_id: int, description: str) -> None: ...
    def experiment_finished(self, experiment: Experiment) -> None: ...
    def tool_call(self, name: str, is_error: bool) -> None: ...
    def usage(self, tokens_in: int, tokens_out: int, cost_usd: float) -> None: ...


class Session:
    """`open()` takes the lab's lock, recovers what a killed harness left, and starts or resumes the
    session's row; `close(reason, resumable)` ends it and releases the lock."""

    def __init__(self, lab: Path, config: LabConfig, store: SnapshotStore, agent: str, model: str | None = None,
                 new_session: bool = False):
        self.lab = Path(lab)
        self.config = config
        self.store = store
        self.agent, self.model = agent, model
        self.new_session = new_session
        self.progress = Progress()
        self.started = time.monotonic()
        self.experiments_run = 0  # by this process
        self.calls_since_experiment = 0
        self._usage = [0, 0, 0.0]  # agent tokens in/out and cost since the last experiment
        self.stop: str | None = None
        self.resumed = False
        self._lock_fd: int | None = None
        self.ledger: Ledger | None = None
        self.row: SessionRow | None = None

    # -- opening and closing -----------------------------------------------------------------------
    def open(self) -> None:
        self._lock_fd = lock_lab(self.lab)
        failpoints.reach("session.locked")
        self.ledger = Ledger(self.lab / LEDGER_FILE)
        self.lab_id = self.ledger.meta("lab_id") or self._new_lab_id()
        reap_orphans()
        if crashed := self.ledger.recover_interrupted():
            log.warning("session.recovered", crashed=crashed)
            self._adopt_snapshots(crashed)
        write_atomically(self.lab / RESULTS_FILE, self.ledger.results_tsv())  # a kill may have beaten its rewrite
        failpoints.reach("session.recovered")

    def start_row(self) -> None:
        """Resume the last session if it can be resumed, else start one from the best experiment (or from the
        target of `labrat rollback`)."""
        ledger = self.ledger
        last = ledger.last_session()
        if last and last.resumable and not self.new_session:
            self.row, self.resumed = ledger.reopen_session(last.id), True
            log.info("session.resumed", session=last.id, base=self.row.base_experiment_id)
        else:
            if last and last.ended_at is None:
                ledger.end_session(last.id, "superseded by a new session", resumable=False)
            best = ledger.best()
            if rolled_back := ledger.meta("next_base"):
                best = ledger.experiment(int(rolled_back))
                ledger.delete_meta("next_base")
            session_id = f"{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
            self.row = ledger.start_session(session_id, self.agent, self.model, self.config.model_dump(),
                                            base_experiment_id=best.id if best else None)
            log.info("session.started", session=session_id, base=best.id if best else None)
        failpoints.reach("session.opened")

    def set_root_sources(self, sources: dict[str, str]) -> None:
        self.row = self.ledger.set_root_sources(self.session_id, sources)

    def _adopt_snapshots(self, crashed: list[int]) -> None:
        """A harness killed between committing a candidate and recording it leaves a snapshot the ledger
        does not name: record it on the crashed row, so it can be inspected and is not leaked in the store."""
        for experiment_id in crashed:
            with contextlib.suppress(SandboxError, KeyError):
                snapshot = self.store.get(f"{self.lab_id}-e{experiment_id:05d}")
                self.ledger.set_snapshot(experiment_id, snapshot.name, snapshot.image_id)

    def _new_lab_id(self) -> str:
        lab_id = f"lab{secrets.token_hex(4)}"
        self.ledger.set_meta("lab_id", lab_id)
        return lab_id

    def close(self, reason: str, resumable: bool) -> None:
        try:
            if self.row is not None:
                failpoints.reach("session.closing")
                if any(self._usage):  # tokens spent after the last experiment: kept, never attributed to one
                    self.ledger.record_event(self.session_id, "unattributed_usage", tokens_in=self._usage[0],
                                             tokens_out=self._usage[1], cost_usd=self._usage[2])
                self.ledger.recover_interrupted(f"harness stopped during the experiment: {reason}")
                self.ledger.end_session(self.session_id, reason, resumable=resumable)
                self.ledger.record_event(self.session_id, "session_end", reason=reason, resumable=resumable)
        except (sqlite3.Error, OSError) as exc:
            # A full disk: each write above is one transaction, so the ledger holds what committed; the next
            # start marks a left-over running experiment crash and resumes the session (it stays open).
            log.error("session.close_failed", error=str(exc))
        finally:
            self.release()

    def release(self) -> None:
        """Close the ledger and give the lab's lock back, leaving the session's row as it is."""
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- state -------------------------------------------------------------------------------------
    @property
    def session_id(self) -> str:
        return self.row.id

    @property
    def base_id(self) -> int | None:
        return self.ledger.session(self.session_id).base_experiment_id

    @property
    def base(self) -> Experiment | None:
        base_id = self.base_id
        return self.ledger.experiment(base_id) if base_id else None

    def root_sources(self) -> dict[str, str]:
        """The workspace this session started from."""
        return self.ledger.root_sources(self.session_id)

    def sources(self, experiment_id: int) -> dict[str, str]:
        """{path: text} of an experiment's workspace sources (0: the lab's starting point); KeyError if unknown."""
        return self.ledger.sources(experiment_id)

    def session_experiments(self) -> list[Experiment]:
        return self.ledger.experiments(self.session_id)

    # -- noise ---------------------------------------------------------------------------------------
    def runs(self, experiment: Experiment) -> Runs:
        """The experiment's scored runs: its own and its replicates'."""
        return runs_of(self.ledger, experiment)

    def noise(self) -> Noise:
        """The noise of one run, pooled over the lab's replicated variants trained under this session's setup."""
        return lab_noise(self.ledger, self.config.model_dump())

    # -- budgets -----------------------------------------------------------------------------------
    def stop_reason(self) -> str | None:
        """Why the session must stop now, or None."""
        if self.stop:
            return self.stop
        # Replicates (the noise floor, confirmations) are not the agent's experiments: max_hours bounds their time.
        done = len([e for e in self.session_experiments() if e.status != "running" and e.replicate_of is None])
        if self.config.max_experiments is not None and done >= self.config.max_experiments:
            self.stop = f"max_experiments ({self.config.max_experiments}) reached"
        elif self.config.max_hours is not None and time.monotonic() - self.started >= self.config.max_hours * 3600:
            self.stop = f"max_hours ({self.config.max_hours:g}) reached"
        return self.stop

    def tool_budget_refusal(self) -> str | None:
        self.calls_since_experiment += 1
        if self.calls_since_experiment > 2 * self.config.max_tool_calls:
            self.stop = f"the agent made {self.calls_since_experiment} tool calls without running an experiment"
        if self.calls_since_experiment > self.config.max_tool_calls:
            return (f"tool-call limit reached: {self.config.max_tool_calls} calls since the last experiment; "
                    "call run_experiment now")
        return None

    # -- bookkeeping -------------------------------------------------------------------------------
    def add_usage(self, tokens_in: int, tokens_out: int, cost_usd: float) -> None:
        self._usage[0] += tokens_in
        self._usage[1] += tokens_out
        self._usage[2] += cost_usd
        self.progress.usage(tokens_in, tokens_out, cost_usd)

    def take_usage(self) -> dict:
        """The agent's spend since the last experiment, as the next experiment's fields; the count restarts."""
        tokens_in, tokens_out, cost = self._usage
        self._usage = [0, 0, 0.0]
        return dict(tokens_in=tokens_in, tokens_out=tokens_out, cost_usd=cost)

    def record_tool_call(self, name: str, tool_input: dict, text: str, is_error: bool, seconds: float) -> None:
        self.ledger.record_tool_call(self.session_id, self.ledger.running_experiment_id(self.session_id), name,
                                     tool_input, text, is_error, seconds)
        self.progress.tool_call(name, is_error)

    def begin_experiment(self, description: str, base: Experiment | None, hypothesis: str | None = None,
                         expected_delta: float | None = None, replicate_of: int | None = None) -> int:
        """A `running` row for an experiment of the session's `base` (the caller has just read it), or for a
        replicate of experiment `replicate_of`."""
        experiment_id = self.ledger.begin_experiment(self.session_id, base.id if base else None, description,
                                                     hypothesis, expected_delta, replicate_of)
        failpoints.reach("experiment.begun")
        self.calls_since_experiment = 0
        self.progress.experiment_started(experiment_id, description)
        log.info("experiment.started", id=experiment_id, parent=base.id if base else None, description=description)
        return experiment_id

    def finish_experiment(self, experiment_id: int, status: Status, **fields) -> Experiment:
        """Record an experiment's verdict (a keep moves the base in the same transaction); rewrite results.tsv."""
        experiment = self.ledger.finish_experiment(experiment_id, status, **fields)
        self.experiments_run += 1
        failpoints.reach("experiment.recorded")
        write_atomically(self.lab / RESULTS_FILE, self.ledger.results_tsv())
        failpoints.reach("experiment.results_written")
        log.info("experiment.finished", id=experiment_id, status=status, metric=experiment.metric,
                 seconds=experiment.seconds)
        self.progress.experiment_finished(experiment)
        return experiment


class LabView:
    """What an agent may read of the lab while it works: the budgets' verdict, the experiments, the base."""

    def __init__(self, session: Session, floor_bpb: float | None):
        self._session = session
        self.config = session.config
        self.floor_bpb = floor_bpb

    def stop_reason(self) -> str | None:
        return self._session.stop_reason()

    @property
    def resumed(self) -> bool:
        return self._session.resumed

    @property
    def experiments_run(self) -> int:
        return self._session.experiments_run

    @property
    def base_id(self) -> int | None:
        return self._session.base_id

    @property
    def base(self) -> Experiment | None:
        return self._session.base

    def experiments(self) -> list[Experiment]:
        return self._session.ledger.experiments()

    def session_experiments(self) -> list[Experiment]:
        return self._session.session_experiments()

    def best(self) -> Experiment | None:
        return self._session.ledger.best()


def closing_reason(exc: BaseException | None, stop: str | None) -> tuple[str, bool]:
    """How a session ends after `exc` (None: it finished, for `stop` if it had to): (reason, resumable)."""
    if exc is None:
        return stop or "finished", False
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", True
    return f"error: {one_line(exc, 200)}", True
