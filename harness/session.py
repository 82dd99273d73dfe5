"""A research session: the working container, the experiment loop's bookkeeping, resume.

The working container always runs the session's *base* (the last kept experiment, or the sandbox
image at the start of a lab). The agent edits it; `run_experiment` snapshots it as the candidate,
trains and evaluates the candidate in fresh containers (harness/runner.py), writes the ledger row
in one transaction, and then replaces the working container with a fresh one of the new base:
the candidate if it was kept, the old base otherwise.

A harness killed at any point leaves the ledger consistent: the experiment it was running is
marked `crash` at the next start, containers of the dead process are reaped, and the session
resumes from its base (which only ever moves inside the transaction that records a keep).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import structlog

from harness import failpoints, history
from harness.config import LabConfig
from harness.data import ensure_data
from harness.lab import LEDGER_FILE, lock_lab, write_atomically
from harness.ledger import Experiment, Ledger
from harness.runner import Runner, evaluator_sha256, timed
from sandbox.engine import remove_stopped, reap_orphans, wait_for_engine
from sandbox.errors import EngineUnavailable, SandboxError
from sandbox.images import build_image
from sandbox.sandbox import Sandbox, safe_text
from sandbox.snapshots import SnapshotStore

log = structlog.get_logger(__name__)

RESULTS_FILE = "results.tsv"
WORKSPACE = "/workspace"
SOURCE_LIMIT = 256 * 1024  # per file kept in the ledger for diffs
SOURCE_FILES_LIMIT = 50  # changed files read per experiment
IGNORED_PARTS = ("__pycache__", ".labrat-run-", ".cache", ".ipynb_checkpoints")
ENGINE_WAIT_SECONDS = 300  # how long a session waits for a restarted Docker engine before it stops (resumable)


class Progress:
    """What the session reports while it works; the CLI's live view overrides these."""

    def phase(self, name: str, seconds: float | None = None) -> None: ...
    def experiment_started(self, experiment_id: int, description: str) -> None: ...
    def experiment_finished(self, experiment: Experiment) -> None: ...
    def tool_call(self, name: str, is_error: bool) -> None: ...
    def usage(self, tokens_in: int, tokens_out: int, cost_usd: float) -> None: ...


class _Standby:
    """Containers started ahead of need on threads; the ones not taken are removed on exit."""

    def __init__(self):
        self.futures: dict[str, Future] = {}

    def add(self, name: str, future: Future) -> None:
        self.futures[name] = future

    def take(self, name: str) -> Sandbox | None:
        """The started container, or None if it was never requested."""
        future = self.futures.pop(name, None)
        return future.result() if future else None

    def __enter__(self) -> _Standby:
        return self

    def __exit__(self, *exc) -> None:
        for future in self.futures.values():
            future.add_done_callback(lambda f: f.exception() is None and f.result().close_later())
        self.futures.clear()


class Session:
    """Open with `with Session(...) as session:`; the agent works through `Toolbox(session)`."""

    def __init__(self, lab: Path, config: LabConfig, agent: str, model: str | None = None,
                 progress: Progress | None = None, new_session: bool = False,
                 status: Callable[[str], None] = lambda line: None):
        self.lab = Path(lab)
        self.config = config
        self.agent = agent
        self.model = model
        self.progress = progress or Progress()
        self.new_session = new_session
        self.status = status
        self.box: Sandbox | None = None
        self.started = time.monotonic()
        self.experiments_run = 0  # by this process
        self.calls_since_experiment = 0
        self.pending_usage = [0, 0, 0.0]  # agent tokens in/out and cost since the last experiment
        self.stop: str | None = None
        self._lock_fd: int | None = None

    # -- opening and closing -----------------------------------------------------------------------
    def __enter__(self) -> Session:
        try:
            self._open()
        except BaseException:
            self._release()
            raise
        return self

    def _open(self) -> None:
        self._lock()
        failpoints.reach("session.locked")
        self.ledger = Ledger(self.lab / LEDGER_FILE)
        self.lab_id = self.ledger.meta("lab_id") or self._new_lab_id()
        reap_orphans()
        self.store = SnapshotStore()
        if crashed := self.ledger.recover_interrupted():
            log.warning("session.recovered", crashed=crashed)
            self._adopt_snapshots(crashed)
        write_atomically(self.lab / RESULTS_FILE, self.ledger.results_tsv())  # a kill may have beaten its rewrite
        failpoints.reach("session.recovered")
        self.status("building the sandbox image (first run only)")
        self.image = build_image(gpu=bool(self.config.gpus), progress=self.status)
        self.data = ensure_data(self.lab, self.config, progress=self.status)
        last = self.ledger.last_session()
        if last and last.resumable and not self.new_session:
            self.session = self.ledger.reopen_session(last.id)
            self.resumed = True
            log.info("session.resumed", session=last.id, base=self.session.base_experiment_id)
        else:
            if last and last.ended_at is None:
                self.ledger.end_session(last.id, "superseded by a new session", resumable=False)
            best = self.ledger.best()
            if rolled_back := self.ledger.meta("next_base"):  # `labrat rollback` chose the starting point
                best = self.ledger.experiment(int(rolled_back))
                self.ledger.delete_meta("next_base")
            session_id = f"{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
            self.session = self.ledger.start_session(
                session_id, self.agent, self.model, self.config.model_dump(),
                base_experiment_id=best.id if best else None)
            self.resumed = False
            log.info("session.started", session=session_id, base=best.id if best else None)
        failpoints.reach("session.opened")
        self.runner = Runner(self.config, self.image, self.data, self.store, self.session_id)
        self.replace_working_box()
        failpoints.reach("session.box_started")
        if self.session.root_sources_json is None:
            sources = self._read_sources({}) if self.session.base_experiment_id is None else self.sources(
                self.session.base_experiment_id)
            with self.ledger.transaction() as db:
                db.execute("UPDATE sessions SET root_sources_json = ? WHERE id = ?", (json.dumps(sources), self.session_id))
            self.session = self.ledger.session(self.session_id)

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

    def _lock(self) -> None:
        self._lock_fd = lock_lab(self.lab)

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def close(self, reason: str, resumable: bool) -> None:
        with contextlib.suppress(Exception):
            if self.box:
                self.box.close()
        try:
            if hasattr(self, "session"):
                failpoints.reach("session.closing")
                if any(self.pending_usage):  # tokens spent after the last experiment: kept, never attributed to one
                    self.ledger.record_event(self.session_id, "unattributed_usage", tokens_in=self.pending_usage[0],
                                             tokens_out=self.pending_usage[1], cost_usd=self.pending_usage[2])
                self.ledger.recover_interrupted(f"harness stopped during the experiment: {reason}")
                self.ledger.end_session(self.session_id, reason, resumable=resumable)
                self.ledger.record_event(self.session_id, "session_end", reason=reason, resumable=resumable)
        except (sqlite3.Error, OSError) as exc:
            # A full disk: each write above is one transaction, so the ledger holds what committed; the next
            # start marks a left-over running experiment crash and resumes the session (it stays open).
            log.error("session.close_failed", error=str(exc))
        finally:
            if hasattr(self, "ledger"):
                self.ledger.close()
            self._release()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close(self.stop or "finished", resumable=False)
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("interrupted", resumable=True)
        else:
            self.close(f"error: {safe_text(str(exc).encode())[:200]}", resumable=True)

    # -- state -------------------------------------------------------------------------------------
    @property
    def session_id(self) -> str:
        return self.session.id

    @property
    def base_id(self) -> int | None:
        return self.ledger.session(self.session_id).base_experiment_id

    @property
    def base(self) -> Experiment | None:
        base_id = self.base_id
        return self.ledger.experiment(base_id) if base_id else None

    def sources(self, experiment_id: int) -> dict[str, str]:
        """{path: text} of an experiment's workspace sources; 0 is the session's starting point."""
        if experiment_id == 0:
            return json.loads(self.session.root_sources_json or "{}")
        try:
            experiment = self.ledger.experiment(experiment_id)
        except KeyError:
            from harness.tools import ToolError

            raise ToolError(f"no experiment #{experiment_id}") from None
        return history.sources_of(experiment, json.loads(self.session.root_sources_json or "{}"))

    def session_experiments(self) -> list[Experiment]:
        return self.ledger.experiments(self.session_id)

    def stop_reason(self) -> str | None:
        """Why the session must stop now, or None."""
        if self.stop:
            return self.stop
        done = len([e for e in self.session_experiments() if e.status != "running"])
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

    def add_usage(self, tokens_in: int, tokens_out: int, cost_usd: float) -> None:
        self.pending_usage[0] += tokens_in
        self.pending_usage[1] += tokens_out
        self.pending_usage[2] += cost_usd
        self.progress.usage(tokens_in, tokens_out, cost_usd)

    def record_tool_call(self, name: str, tool_input: dict, result, seconds: float) -> None:
        running = self.ledger.db.execute(
            "SELECT id FROM experiments WHERE session_id = ? AND status = 'running'", (self.session_id,)).fetchone()
        self.ledger.record_tool_call(self.session_id, running["id"] if running else None, name, tool_input,
                                     result.text, result.is_error, seconds)
        self.progress.tool_call(name, result.is_error)

    # -- the working container ---------------------------------------------------------------------
    def replace_working_box(self) -> None:
        """A fresh working container of the session's base (the sandbox image before any keep)."""
        if self.box:
            self.box.close()
            self.box = None
        self.box = self._start_box_of(self.base)

    def restore_working_box(self) -> None:
        """After the working container died, or the engine went away (restarted, crashed): wait for the
        engine, remove this session's containers that stopped with it, and start a fresh working container
        of the base. Raises EngineUnavailable if the engine is not back within ENGINE_WAIT_SECONDS."""
        wait_for_engine(ENGINE_WAIT_SECONDS)
        if removed := remove_stopped(self.session_id):
            log.warning("session.removed_stopped_containers", names=removed)
        self.replace_working_box()

    def _start_box_of(self, experiment: Experiment | None) -> Sandbox:
        """A working container of an experiment's snapshot, or of the sandbox image for None."""
        if experiment is None:
            return Sandbox.start(self.runner.work_policy, session=self.session_id, role="work")
        return self.store.restore(experiment.snapshot, self.runner.work_policy, session=self.session_id, role="work")

    def box_is_dead(self) -> bool:
        return self.box is None or self.box._dead_reason is not None

    def _read_sources(self, parent: dict[str, str]) -> dict[str, str]:
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
                    sources[rel] = f"<not recorded: {safe_text(str(exc).encode())[:200]}>\n"
                    continue
                sources[rel] = f"<binary file, {len(data)} bytes>\n" if b"\x00" in data else data.decode("utf-8", "replace")
        return sources

    # -- one experiment ----------------------------------------------------------------------------
    def run_experiment(self, description: str) -> Experiment:
        """Snapshot the working container, train and evaluate the candidate, record it, reset the workspace.

        What does not depend on training (reading the sources for the diff, starting the evaluation
        container and both possible next working containers) runs on threads while training runs, so
        the harness adds little to each experiment's wall time (bench/session.py measures it)."""
        description = " ".join(safe_text(description.encode()).split())[:500]
        base = self.base
        parent_sources = self.sources(base.id) if base else json.loads(self.session.root_sources_json or "{}")
        experiment_id = self.ledger.begin_experiment(self.session_id, base.id if base else None, description)
        failpoints.reach("experiment.begun")
        tokens_in, tokens_out, cost = self.pending_usage
        self.pending_usage = [0, 0, 0.0]
        self.calls_since_experiment = 0
        self.progress.experiment_started(experiment_id, description)
        log.info("experiment.started", id=experiment_id, parent=base.id if base else None, description=description)
        started = time.monotonic()
        fields: dict = dict(tokens_in=tokens_in, tokens_out=tokens_out, cost_usd=cost)
        timings: dict[str, float] = {}
        self._timings = timings
        with ThreadPoolExecutor(4, thread_name_prefix="experiment") as pool, _Standby() as standby:
            try:
                self.progress.phase("snapshot")
                with timed(timings, "snapshot"):
                    snapshot = self.store.snapshot(self.box, name=f"{self.lab_id}-e{experiment_id:05d}", labels={
                        "lab": self.lab_id, "session": self.session_id, "experiment": str(experiment_id),
                        "parent": str(base.id if base else ""), "trainer_config": self.config.trainer_config,
                        "seed": str(self.config.seed), "data_sha256": self.data.meta.get("train_sha256", ""),
                        "heldout_sha256": self.data.meta.get("val_sha256", ""), "evaluator_sha256": evaluator_sha256(),
                        "config": self.config.model_dump_json(),
                    })
                fields.update(snapshot=snapshot.name, snapshot_image_id=snapshot.image_id)
                failpoints.reach("experiment.snapshot_taken")
                sources = pool.submit(self._read_sources, parent_sources)

                def while_training() -> None:
                    standby.add("eval", pool.submit(self.runner.start_eval_workers))
                    standby.add("keep", pool.submit(self.store.restore, snapshot, self.runner.work_policy,
                                                    session=self.session_id, role="work"))
                    standby.add("discard", pool.submit(self._start_box_of, base))

                status, fields = self._train_and_evaluate(snapshot, base, fields, timings, standby, while_training)
                with timed(timings, "sources_wait"):
                    fields.update(sources_json=json.dumps(sources.result()),
                                  diff=history.unified_diff(parent_sources, sources.result(),
                                                            f"#{base.id}" if base else "base", f"#{experiment_id}"))
                failpoints.reach("experiment.sources_read")
            except SandboxError as exc:
                self._finish(experiment_id, "crash", started, {**fields, "log_tail": f"labrat: {exc}"})
                if isinstance(exc, EngineUnavailable):
                    log.warning("session.engine_lost", experiment=experiment_id, error=str(exc))
                    self.restore_working_box()  # the engine restarted: the session goes on once it is back
                else:
                    with contextlib.suppress(SandboxError):
                        self.replace_working_box()
                return self.ledger.experiment(experiment_id)
            except BaseException:
                self._finish(experiment_id, "crash", started, {**fields, "log_tail": "labrat: interrupted"})
                raise
            experiment = self._finish(experiment_id, status, started, fields)
            with timed(timings, "reset"):
                try:
                    next_box = standby.take("keep" if status == "keep" else "discard")
                except SandboxError:
                    next_box = None
                if next_box is None or not next_box.is_running():
                    # Not started, or it stopped since (the engine restarted during training).
                    if next_box is not None:
                        next_box.close_later()
                    self.restore_working_box()
                else:
                    self.box.close_later()
                    self.box = next_box
            failpoints.reach("experiment.box_swapped")
        self.last_timings = timings  # the reset happens after the row is written; benchmarks read it here
        return experiment

    def _train_and_evaluate(self, snapshot, base: Experiment | None, fields: dict,
                            timings: dict[str, float], standby: _Standby,
                            while_training: Callable[[], None]) -> tuple[str, dict]:
        with self.runner.train(snapshot, phase=self.progress.phase, timings=timings, on_start=while_training) as trained:
            fields.update(train_seconds=trained.seconds, memory_bytes=trained.peak_memory_bytes,
                          log_tail=trained.log_tail)
            if trained.status != "ok":
                fields["log_tail"] = f"{trained.reason}\n{trained.log_tail}"
                return trained.status, fields
            with timed(timings, "eval_start"):
                workers = standby.take("eval")  # None if training failed before they started: evaluate() starts them
            evaluated = self.runner.evaluate(trained, phase=self.progress.phase, timings=timings, workers=workers)
            summary = trained.summary  # parsed once: the property waits for the read and parses it
            fields["summary_json"] = json.dumps(summary) if summary else None
        failpoints.reach("eval.finished")
        fields["eval_json"] = json.dumps(evaluated.result) if evaluated.result else None
        if not evaluated.ok:
            fields["log_tail"] = f"evaluation: {evaluated.reason}\n{trained.log_tail}"
            return "crash", fields
        fields.update(metric=evaluated.metric, floor_gap=evaluated.floor_gap)
        return ("keep" if self.is_improvement(evaluated.metric, base) else "discard"), fields

    def is_improvement(self, metric: float, base: Experiment | None) -> bool:
        if base is None or base.metric is None:
            return True  # the first result of a lab is its baseline
        margin = self.config.min_improvement if self.config.keep_rule == "better_by" else 0.0
        return metric < base.metric - margin

    def _finish(self, experiment_id: int, status: str, started: float, fields: dict) -> Experiment:
        timings = getattr(self, "_timings", {})
        experiment = self.ledger.finish_experiment(experiment_id, status, seconds=round(time.monotonic() - started, 3),
                                                   timings_json=json.dumps(timings), **fields)
        self.experiments_run += 1
        failpoints.reach("experiment.recorded")
        write_atomically(self.lab / RESULTS_FILE, self.ledger.results_tsv())
        failpoints.reach("experiment.results_written")
        log.info("experiment.finished", id=experiment_id, status=status, metric=experiment.metric,
                 seconds=experiment.seconds)
        self.progress.experiment_finished(experiment)
        return experiment

    def describe_outcome(self, e: Experiment) -> str:
        """What the agent is told about an experiment it ran."""
        base = self.base
        best = f"#{base.id} at val_bpb {base.metric:.6f}" if base and base.metric is not None else "none yet"
        if e.status in ("crash", "timeout"):
            return (f"experiment #{e.id}: {e.status}. {safe_text((e.log_tail or '').encode())[-2500:]}\n"
                    f"The workspace was reset to the best version ({best}).")
        gap = f", gap to the data's entropy floor {e.floor_gap:.4f}" if e.floor_gap is not None else ""
        with contextlib.suppress(TypeError, ValueError, KeyError):
            gap = f" ± {json.loads(e.eval_json)['val_bpb_se']:.4f} (standard error){gap}"
        memory = f", peak memory {e.memory_bytes / 1024**3:.2f} GB" if e.memory_bytes else ""
        verdict = ("kept: it is the new best; the workspace now holds it" if e.status == "keep"
                   else f"discarded (not better than {best}); the workspace was reset to it")
        return (f"experiment #{e.id}: val_bpb {e.metric:.6f}{gap}; training {e.train_seconds or 0:.1f} s{memory}. "
                f"{verdict}.")


def run_agent(session: Session, agent) -> str | None:
    """Let the agent work until the session must stop, then close the session: resumable when the agent
    failed (the API kept failing) or an exception escaped. Returns the agent's failure, or None."""
    from harness.agents import AgentFailed
    from harness.tools import Toolbox

    failure = None
    try:
        try:
            session.stop = agent.run(Toolbox(session))
        except AgentFailed as exc:
            failure = str(exc)
    except BaseException as exc:
        session.__exit__(type(exc), exc, exc.__traceback__)
        raise
    if failure:
        session.close(f"agent stopped: {failure}", resumable=True)
    else:
        session.__exit__(None, None, None)
    return failure
