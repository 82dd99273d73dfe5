"""One experiment as a unit of work: snapshot -> train -> evaluate -> verdict -> record.

`ExperimentJob` does not know where it runs: an `Executor` snapshots, trains and evaluates, and the one
implementation today is the local Docker engine (harness/runner.py's LocalExecutor). The job's record
is one ledger transaction (the verdict and, for a keep, the session's new base together).

What does not depend on training (reading the sources for the diff, starting the evaluation workers and
both possible next working containers) runs on threads while training runs, so the harness adds little
to each experiment's wall time (bench/session.py measures it).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import structlog

from harness import failpoints, history
from harness.config import LabConfig
from harness.ledger import Experiment, Verdict
from harness.runner import EvalWorkers, EvaluationResult, Phase, TrainingResult, timed
from harness.session import Session
from harness.text import printable
from harness.workbench import Workbench
from sandbox.errors import EngineUnavailable, SandboxError
from sandbox.sandbox import Sandbox
from sandbox.snapshots import Snapshot

log = structlog.get_logger(__name__)


class Executor(Protocol):
    """Where an experiment's containers run. It snapshots the working container, trains a snapshot in a fresh
    container and scores the result with the protected evaluation."""

    def snapshot(self, box: Sandbox, name: str, labels: dict[str, str]) -> Snapshot: ...
    def train(self, snapshot: Snapshot, phase: Phase, timings: dict[str, float],
              on_start: Callable[[], None]) -> TrainingResult: ...
    def start_eval_workers(self) -> EvalWorkers: ...
    def evaluate(self, trained: TrainingResult, phase: Phase, timings: dict[str, float],
                 workers: EvalWorkers | None) -> EvaluationResult: ...
    def provenance(self) -> dict[str, str]:
        """Labels every snapshot carries: what a faithful reproduction must match (data, evaluator, config)."""
        ...


def verdict(metric: float, base: Experiment | None, config: LabConfig) -> Verdict:
    """keep when the metric beats the base's (by `min_improvement` under the better_by rule), else discard."""
    if base is None or base.metric is None:
        return "keep"  # the first result of a lab is its baseline
    margin = config.min_improvement if config.keep_rule == "better_by" else 0.0
    return "keep" if metric < base.metric - margin else "discard"


class _Standby:
    """Containers started ahead of need on threads; the ones not taken are removed on exit."""

    def __init__(self):
        self.futures: dict[str, Future] = {}

    def add(self, name: str, future: Future) -> None:
        self.futures[name] = future

    def take(self, name: str):
        """The started container (or workers), or None if it was never requested."""
        future = self.futures.pop(name, None)
        return future.result() if future else None

    def __enter__(self) -> _Standby:
        return self

    def __exit__(self, *exc) -> None:
        for future in self.futures.values():
            future.add_done_callback(lambda f: f.exception() is None and f.result().close_later())
        self.futures.clear()


class ExperimentJob:
    """Run one experiment of the session's working container; `run()` returns its recorded ledger row."""

    def __init__(self, session: Session, workbench: Workbench, executor: Executor, description: str,
                 hypothesis: str | None = None, expected_delta: float | None = None):
        self.session, self.workbench, self.executor = session, workbench, executor
        self.description = " ".join(printable(description).split())[:500]  # one line, in tables and the live view
        self.hypothesis = " ".join(printable(hypothesis).split())[:1000] if hypothesis else None
        self.expected_delta = expected_delta
        self.timings: dict[str, float] = {}  # {phase: seconds}, recorded with the row
        self.fields: dict = {}

    def run(self) -> Experiment:
        session, base = self.session, self.session.base
        parent_sources = session.sources(base.id) if base else session.root_sources()
        experiment_id = session.begin_experiment(self.description, base, self.hypothesis, self.expected_delta)
        started = time.monotonic()
        self.fields = session.take_usage()
        with ThreadPoolExecutor(4, thread_name_prefix="experiment") as pool, _Standby() as standby:
            try:
                snapshot = self._snapshot(experiment_id, base)
                sources = pool.submit(self.workbench.read_sources, parent_sources)

                def while_training() -> None:
                    standby.add("eval", pool.submit(self.executor.start_eval_workers))
                    standby.add("keep", pool.submit(self.workbench.start_next, snapshot))
                    standby.add("discard", pool.submit(self.workbench.start_next, base.snapshot if base else None))

                status = self._train_and_evaluate(snapshot, base, standby, while_training)
                with timed(self.timings, "sources_wait"):
                    self.fields.update(sources_json=json.dumps(sources.result()),
                                       diff=history.unified_diff(parent_sources, sources.result(),
                                                                 f"#{base.id}" if base else "base", f"#{experiment_id}"))
                failpoints.reach("experiment.sources_read")
            except SandboxError as exc:
                self._record(experiment_id, "crash", started, log_tail=f"labrat: {exc}")
                if isinstance(exc, EngineUnavailable):
                    log.warning("experiment.engine_lost", experiment=experiment_id, error=str(exc))
                    self.workbench.restore()  # the engine restarted: the session goes on once it is back
                else:
                    with contextlib.suppress(SandboxError):
                        self.workbench.start()
                return session.ledger.experiment(experiment_id)
            except BaseException:
                self._record(experiment_id, "crash", started, log_tail="labrat: interrupted")
                raise
            experiment = self._record(experiment_id, status, started)
            with timed(self.timings, "reset"):
                try:
                    next_box = standby.take("keep" if status == "keep" else "discard")
                except SandboxError:
                    next_box = None
                self.workbench.adopt(next_box)
            failpoints.reach("experiment.box_swapped")
        return experiment

    def _snapshot(self, experiment_id: int, base: Experiment | None) -> Snapshot:
        session = self.session
        with timed(self.timings, "snapshot"):
            snapshot = self.executor.snapshot(self.workbench.box, name=f"{session.lab_id}-e{experiment_id:05d}", labels={
                "lab": session.lab_id, "session": session.session_id, "experiment": str(experiment_id),
                "parent": str(base.id if base else ""), **self.executor.provenance()})
        self.fields.update(snapshot=snapshot.name, snapshot_image_id=snapshot.image_id)
        failpoints.reach("experiment.snapshot_taken")
        return snapshot

    def _train_and_evaluate(self, snapshot: Snapshot, base: Experiment | None, standby: _Standby,
                            while_training: Callable[[], None]) -> Verdict:
        phase, fields = self.session.progress.phase, self.fields
        with self.executor.train(snapshot, phase=phase, timings=self.timings, on_start=while_training) as trained:
            fields.update(train_seconds=trained.seconds, memory_bytes=trained.peak_memory_bytes,
                          log_tail=trained.log_tail, compile_cache=trained.compile_cache)
            if trained.status != "ok":
                fields["log_tail"] = f"{trained.reason}\n{trained.log_tail}"
                return trained.status
            with timed(self.timings, "eval_start"):
                workers = standby.take("eval")  # None if training failed before they started: evaluate() starts them
            evaluated = self.executor.evaluate(trained, phase=phase, timings=self.timings, workers=workers)
            summary = trained.summary  # parsed once: the property waits for the read and parses it
            fields["summary_json"] = json.dumps(summary) if summary else None
        failpoints.reach("eval.finished")
        fields["eval_json"] = json.dumps(evaluated.result) if evaluated.result else None
        if not evaluated.ok:
            fields["log_tail"] = f"evaluation: {evaluated.reason}\n{trained.log_tail}"
            return "crash"
        fields.update(metric=evaluated.metric, floor_gap=evaluated.floor_gap)
        return verdict(evaluated.metric, base, self.session.config)

    def _record(self, experiment_id: int, status: Verdict, started: float, **extra) -> Experiment:
        return self.session.finish_experiment(experiment_id, status, seconds=round(time.monotonic() - started, 3),
                                              timings_json=json.dumps(self.timings), **{**self.fields, **extra})
