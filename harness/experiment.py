"""One experiment as a unit of work: snapshot -> train -> evaluate -> verdict -> record.

The verdict may need more runs of the same snapshot with fresh seeds: the lab's baseline is run
`noise_seeds` times (the noise floor), and under the `significant` rule a candidate that passes the screen
is confirmed (harness/noise.py). Each such run is a `replicate` row of its own, linked to the experiment,
recorded before the experiment's verdict.

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
from harness.ledger import Experiment, Status, Verdict
from harness.noise import Runs, run_seed, screen, significance_test
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
              on_start: Callable[[], None], seed: int | None) -> TrainingResult: ...
    def start_eval_workers(self) -> EvalWorkers: ...
    def evaluate(self, trained: TrainingResult, phase: Phase, timings: dict[str, float],
                 workers: EvalWorkers | None) -> EvaluationResult: ...
    def provenance(self) -> dict[str, str]:
        """Labels every snapshot carries: what a faithful reproduction must match (data, evaluator, config)."""
        ...


def verdict(metric: float, base: Experiment | None, config: LabConfig) -> Verdict:
    """The greedy rules: keep when the metric beats the base's (by `min_improvement` under better_by)."""
    if base is None or base.metric is None:
        return "keep"  # the first result of a lab is its baseline
    margin = config.min_improvement if config.keep_rule == "better_by" else 0.0
    return "keep" if metric < base.metric - margin else "discard"


def frame_broken(config: LabConfig, fields: dict) -> str | None:
    """The first constraint of the research program (labrat.toml) a scored run broke, else None. `fields`:
    the run's row as recorded (eval_json from the evaluation, memory_bytes from the cgroup, summary_json)."""
    parameters = json.loads(fields.get("eval_json") or "{}").get("parameters")
    if config.max_params is not None and parameters is not None and parameters > config.max_params:
        return f"broke max_params: {parameters:,} weights > {config.max_params:,}"
    peak = fields.get("memory_bytes")
    if config.max_memory_gb is not None and peak is not None and peak > config.max_memory_gb * 1024**3:
        return f"broke max_memory_gb: peak {peak / 1024**3:.2f} GB > {config.max_memory_gb:g} GB"
    if config.min_tokens_per_second is not None:
        rate = json.loads(fields.get("summary_json") or "{}").get("tokens_per_s")
        reported = isinstance(rate, (int, float)) and not isinstance(rate, bool)
        if not reported or not rate >= config.min_tokens_per_second:  # NaN fails too
            return (f"broke min_tokens_per_second: {f'{rate:,.0f}' if reported else 'no'} tokens/s reported "
                    f"< {config.min_tokens_per_second:g}")
    return None


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
        self.fields["seed"] = run_seed(session.config.seed, experiment_id)
        with ThreadPoolExecutor(4, thread_name_prefix="experiment") as pool, _Standby() as standby:
            try:
                snapshot = self._snapshot(experiment_id, base)
                sources = pool.submit(self.workbench.read_sources, parent_sources)

                def while_training() -> None:
                    standby.add("eval", pool.submit(self.executor.start_eval_workers))
                    standby.add("keep", pool.submit(self.workbench.start_next, snapshot))
                    standby.add("discard", pool.submit(self.workbench.start_next, base.snapshot if base else None))

                scored = self._train_and_score(snapshot, self.fields, self.timings, on_start=while_training,
                                               workers=lambda: standby.take("eval"))
                with timed(self.timings, "sources_wait"):
                    self.fields.update(sources_json=json.dumps(sources.result()),
                                       diff=history.unified_diff(parent_sources, sources.result(),
                                                                 f"#{base.id}" if base else "base", f"#{experiment_id}"))
                failpoints.reach("experiment.sources_read")
                if scored == "ok" and (broken := frame_broken(session.config, self.fields)):
                    self.fields["decision"] = broken
                    status = "discard"
                else:
                    status = self._decide(experiment_id, snapshot, base) if scored == "ok" else scored
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

    def _train_and_score(self, snapshot: Snapshot, fields: dict, timings: dict[str, float],
                         on_start: Callable[[], None] = lambda: None,
                         workers: Callable[[], EvalWorkers | None] = lambda: None) -> Status:
        """Train the snapshot with `fields["seed"]` and evaluate it, putting the row's results in `fields`:
        "ok" when it was scored, else how it failed. `workers`: the evaluation's, if started ahead."""
        phase = self.session.progress.phase
        with self.executor.train(snapshot, phase=phase, timings=timings, on_start=on_start,
                                 seed=fields["seed"]) as trained:
            fields.update(train_seconds=trained.seconds, memory_bytes=trained.peak_memory_bytes,
                          log_tail=trained.log_tail, compile_cache=trained.compile_cache)
            if trained.status != "ok":
                fields["log_tail"] = f"{trained.reason}\n{trained.log_tail}"
                return trained.status
            with timed(timings, "eval_start"):
                ready = workers()  # None if training failed before they started: evaluate() starts them
            evaluated = self.executor.evaluate(trained, phase=phase, timings=timings, workers=ready)
            summary = trained.summary  # parsed once: the property waits for the read and parses it
            fields["summary_json"] = json.dumps(summary) if summary else None
        failpoints.reach("eval.finished")
        fields["eval_json"] = json.dumps(evaluated.result) if evaluated.result else None
        if not evaluated.ok:
            fields["log_tail"] = f"evaluation: {evaluated.reason}\n{trained.log_tail}"
            return "crash"
        fields.update(metric=evaluated.metric, floor_gap=evaluated.floor_gap)
        return "ok"

    # -- the verdict -------------------------------------------------------------------------------
    def _decide(self, experiment_id: int, snapshot: Snapshot, base: Experiment | None) -> Verdict:
        session, config = self.session, self.session.config
        baseline = base is None or base.metric is None  # the lab's first result: its runs are the noise floor
        if baseline and config.noise_seeds == 1:
            return "keep"
        if not baseline and config.keep_rule != "significant":
            return verdict(self.fields["metric"], base, config)
        candidate = session.ledger.experiment(experiment_id).model_copy(  # still running: this run's metric and seed
            update={"metric": self.fields["metric"], "seed": self.fields["seed"]})
        if baseline:
            runs = Runs.of(candidate, self._replicates(experiment_id, snapshot, base, config.noise_seeds - 1,
                                                       "noise floor"))
            ignores = " (train.py ignores the seed: every run scored the same)" if runs.ignores_seed else ""
            self.fields["decision"] = f"baseline; noise floor: {runs.text()}{ignores}"
            if runs.ignores_seed:
                log.warning("noise.ignores_seed", experiment=experiment_id, runs=runs.n)
            return "keep"
        base_runs, noise = session.runs(base), session.noise()
        if rejected := screen(self.fields["metric"], base_runs, noise):
            self.fields["decision"] = rejected.reason
            return "discard"
        runs = Runs.of(candidate, self._replicates(experiment_id, snapshot, base, config.noise_seeds - 1,
                                                   "confirmation"))
        decision = significance_test(runs, base_runs, noise.with_runs(runs), config.significance)
        self.fields["decision"] = decision.reason
        return "keep" if decision.keep else "discard"

    def replicate(self, experiment: Experiment, snapshot: Snapshot, count: int) -> list[Experiment]:
        """`count` more runs of a finished experiment's snapshot with fresh seeds (`labrat noise`)."""
        self.fields = {"sources_json": experiment.sources_json}
        parent = self.session.ledger.experiment(experiment.parent_id) if experiment.parent_id else None
        return self._replicates(experiment.id, snapshot, parent, count, "noise")

    def _replicates(self, experiment_id: int, snapshot: Snapshot, base: Experiment | None, count: int,
                    why: str) -> list[Experiment]:
        """Train and score the snapshot `count` more times, each with a fresh seed, as `replicate` rows."""
        return [self._replicate(experiment_id, snapshot, base, f"{why} {i}/{count} of #{experiment_id}")
                for i in range(1, count + 1)]

    def _replicate(self, experiment_id: int, snapshot: Snapshot, base: Experiment | None, description: str) -> Experiment:
        session = self.session
        replicate_id = session.begin_experiment(description, base, replicate_of=experiment_id)
        started, timings = time.monotonic(), {}
        fields = {"seed": run_seed(session.config.seed, replicate_id), "sources_json": self.fields.get("sources_json")}
        try:
            status = self._train_and_score(snapshot, fields, timings)
        except SandboxError as exc:
            fields["log_tail"] = f"labrat: {exc}"
            self._finish(replicate_id, "crash", started, timings, fields)
            if isinstance(exc, EngineUnavailable):
                raise  # the experiment ends as a crash too, and the session restores its working container
            return session.ledger.experiment(replicate_id)
        except BaseException:
            self._finish(replicate_id, "crash", started, timings, {**fields, "log_tail": "labrat: interrupted"})
            raise
        return self._finish(replicate_id, "replicate" if status == "ok" else status, started, timings, fields)

    def _finish(self, experiment_id: int, status: Status, started: float, timings: dict, fields: dict) -> Experiment:
        return self.session.finish_experiment(experiment_id, status, seconds=round(time.monotonic() - started, 3),
                                              timings_json=json.dumps(timings), **fields)

    def _record(self, experiment_id: int, status: Verdict, started: float, **extra) -> Experiment:
        return self._finish(experiment_id, status, started, self.timings, {**self.fields, **extra})
