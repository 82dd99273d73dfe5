"""A research session: the lab's lock, crash recovery, the session's row, its budgets and its bookkeeping.

`LabSession` is the lab's side (the lock, recovery, the row, the budgets shared by every lane); `Session` is
one lane's (its base, usage and records). A lab runs one lane unless `parallel` asks for more.

A lane's *base* is its last kept experiment (or the sandbox image at the start of a lab; lane 0's is the
session's); it moves inside the ledger transaction that records a keep, or when the lane adopts the lab's
best. A harness killed at any point leaves the ledger consistent: the experiments it was running are marked
`crash` at the next start, containers of the dead process are reaped, and the session resumes, each lane
from its base.

What the session does not do: start containers (harness/workbench.py owns the working one) or run
experiments (harness/experiment.py). Agents see it through the read-only `LabView`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import secrets
import sqlite3
import threading
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
    """What the session reports while it works; the CLI's live view overrides these. `lane`: which lane."""

    def phase(self, name: str, seconds: float | None = None, lane: int = 0) -> None: ...
    def experiment_started(self, experiment_id: int, description: str, lane: int = 0) -> None: ...
    def experiment_finished(self, experiment: Experiment) -> None: ...
    def tool_call(self, name: str, is_error: bool, lane: int = 0) -> None: ...
    def usage(self, tokens_in: int, tokens_out: int, cost_usd: float) -> None: ...


class LaneProgress:
    """A lane's view of the session's progress: the same calls, with the lane filled in."""

    def __init__(self, lab: LabSession, lane: int):
        self._lab, self.lane = lab, lane

    def phase(self, name: str, seconds: float | None = None) -> None:
        self._lab.progress.phase(name, seconds, lane=self.lane)

    def experiment_started(self, experiment_id: int, description: str) -> None:
        self._lab.progress.experiment_started(experiment_id, description, lane=self.lane)

    def experiment_finished(self, experiment: Experiment) -> None:
        self._lab.progress.experiment_finished(experiment)

    def tool_call(self, name: str, is_error: bool) -> None:
        self._lab.progress.tool_call(name, is_error, lane=self.lane)

    def usage(self, tokens_in: int, tokens_out: int, cost_usd: float) -> None:
        self._lab.progress.usage(tokens_in, tokens_out, cost_usd)


class LabSession:
    """The lab's side of a session, shared by its lanes. `open()` takes the lab's lock, recovers what a killed
    harness left, and `start_row()` starts or resumes the session's row; `close(reason, resumable)` ends it and
    releases the lock. `lane(k)` is lane k's `Session`."""

    def __init__(self, lab: Path, config: LabConfig, store: SnapshotStore, agent: str, model: str | None = None,
                 new_session: bool = False):
        self.lab = Path(lab)
        self.config = config
        self.store = store
        self.agent, self.model = agent, model
        self.new_session = new_session
        self.progress = Progress()
        self.started = time.monotonic()
        self.stop: str | None = None  # every lane stops (a budget, an interrupt)
        self.resumed = False
        self._lock_fd: int | None = None
        self.ledger: Ledger | None = None
        self.row: SessionRow | None = None
        self._lanes: list[Session] = []
        self.results_lock = threading.Lock()  # results.tsv is rewritten by every lane

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
                for lane in self._lanes:
                    if any(lane._usage):  # tokens spent after the last experiment: kept, never attributed to one
                        self.ledger.record_event(self.session_id, "unattributed_usage", lane=lane.lane,
                                                 tokens_in=lane._usage[0], tokens_out=lane._usage[1],
                                                 cost_usd=lane._usage[2])
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
        for lane in self._lanes:
            if lane.ledger is not self.ledger:
                with contextlib.suppress(sqlite3.Error):
                    lane.ledger.close()
        self._lanes = []
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
        """Lane 0's base: the session's."""
        return self.ledger.session(self.session_id).base_experiment_id

    def sources(self, experiment_id: int) -> dict[str, str]:
        return self.ledger.sources(experiment_id)

    def lane(self, index: int, own_connection: bool = False) -> Session:
        """Lane `index`'s session. `own_connection`: a ledger connection of its own, for a lane that works on a
        thread of its own (SQLite connections are not shared between threads)."""
        ledger = Ledger(self.ledger.path, threads=True) if own_connection else self.ledger
        lane = Session(self, index, ledger)
        self._lanes.append(lane)
        return lane

    def stop_reason(self, ledger: Ledger) -> str | None:
        """Why every lane must stop now, or None. `ledger`: the caller's connection."""
        if self.stop:
            return self.stop
        # Replicates (the noise floor, confirmations) are not the agent's experiments: max_hours bounds their time.
        # Other lanes' experiments in flight count: N lanes must not start N - 1 experiments past the budget.
        done = len([e for e in ledger.experiments(self.session_id) if e.replicate_of is None])
        if self.config.max_experiments is not None and done >= self.config.max_experiments:
            self.stop = f"max_experiments ({self.config.max_experiments}) reached"
        elif self.config.max_hours is not None and time.monotonic() - self.started >= self.config.max_hours * 3600:
            self.stop = f"max_hours ({self.config.max_hours:g}) reached"
        return self.stop


class Session:
    """One lane's session: its base, its bookkeeping and its share of the budgets, over the lab's session
    (`LabSession`). With one lane (the default) it is the whole session."""

    def __init__(self, lab_session: LabSession, lane: int, ledger: Ledger):
        self.lab_session = lab_session
        self.lane = lane
        self.ledger = ledger
        self.lab, self.config, self.store = lab_session.lab, lab_session.config, lab_session.store
        self.progress = LaneProgress(lab_session, lane)
        self.experiments_run = 0  # by this process
        self.calls_since_experiment = 0
        self._usage = [0, 0, 0.0]  # agent tokens in/out and cost since the last experiment
        self._stop: str | None = None  # this lane stops (its agent is stuck)

    @property
    def stop(self) -> str | None:
        return self._stop or self.lab_session.stop

    @stop.setter
    def stop(self, reason: str | None) -> None:
        self._stop = reason

    @property
    def lab_id(self) -> str:
        return self.lab_session.lab_id

    @property
    def resumed(self) -> bool:
        return self.lab_session.resumed

    @property
    def session_id(self) -> str:
        return self.lab_session.session_id

    @property
    def base_id(self) -> int | None:
        return self.ledger.lane_base(self.session_id, self.lane)

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

    def adopt_lab_best(self) -> Experiment | None:
        """With adopt_best: move this lane to the lab's best when another lane's keep beats this lane's base (by
        the mean of runs); the adopted experiment, or None."""
        best, base = self.ledger.best(), self.base
        if not self.config.adopt_best or best is None or base is None or best.id == base.id or best.lane == self.lane:
            return None
        best_runs, base_runs = self.runs(best), self.runs(base)
        if best_runs.mean is None or base_runs.mean is None or best_runs.mean >= base_runs.mean:
            return None
        self.ledger.set_base(self.session_id, best.id, self.lane)
        self.ledger.record_event(self.session_id, "lane_adopted", lane=self.lane, experiment=best.id, old_base=base.id)
        log.info("lane.adopted", lane=self.lane, experiment=best.id, from_lane=best.lane, old_base=base.id)
        return best

    # -- noise ---------------------------------------------------------------------------------------
    def runs(self, experiment: Experiment) -> Runs:
        """The experiment's scored runs: its own and its replicates'."""
        return runs_of(self.ledger, experiment)

    def noise(self) -> Noise:
        """The noise of one run, pooled over the lab's replicated variants trained under this session's setup."""
        return lab_noise(self.ledger, self.config.model_dump())

    # -- budgets -----------------------------------------------------------------------------------
    def stop_reason(self) -> str | None:
        """Why this lane must stop now, or None."""
        return self._stop or self.lab_session.stop_reason(self.ledger)

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
        self.ledger.record_tool_call(self.session_id, self.ledger.running_experiment_id(self.session_id, self.lane),
                                     name, tool_input, text, is_error, seconds)
        self.progress.tool_call(name, is_error)

    def begin_experiment(self, description: str, base: Experiment | None, hypothesis: str | None = None,
                         expected_delta: float | None = None, replicate_of: int | None = None) -> int:
        """A `running` row for an experiment of the session's `base` (the caller has just read it), or for a
        replicate of experiment `replicate_of`."""
        experiment_id = self.ledger.begin_experiment(self.session_id, base.id if base else None, description,
                                                     hypothesis, expected_delta, replicate_of, lane=self.lane)
        failpoints.reach("experiment.begun")
        self.calls_since_experiment = 0
        self.progress.experiment_started(experiment_id, description)
        log.info("experiment.started", id=experiment_id, parent=base.id if base else None, description=description,
                 **({"lane": self.lane} if self.lane else {}))
        return experiment_id

    def finish_experiment(self, experiment_id: int, status: Status, **fields) -> Experiment:
        """Record an experiment's verdict (a keep moves the base in the same transaction); rewrite results.tsv."""
        experiment = self.ledger.finish_experiment(experiment_id, status, **fields)
        self.experiments_run += 1
        failpoints.reach("experiment.recorded")
        with self.lab_session.results_lock:
            write_atomically(self.lab / RESULTS_FILE, self.ledger.results_tsv())
        failpoints.reach("experiment.results_written")
        log.info("experiment.finished", id=experiment_id, status=status, metric=experiment.metric,
                 seconds=experiment.seconds, **({"lane": self.lane} if self.lane else {}))
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
