"""The composition root: `LabRun` wires one lab's session, executor, working container, tools and agent view.

    with LabRun(lab, config, agent="offline") as run:      # lock, recovery, image, data, the working box
        failure = run.run_agent(make_agent(config, program))  # closes the session (resumable on failure)

Everything below is built here and handed down: nothing lower reaches back up for it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

from harness import failpoints
from harness.agents import Agent, AgentFailed
from harness.agents.claude import ClaudeAgent
from harness.agents.offline import OfflineAgent
from harness.config import ConfigError, LabConfig
from harness.data import ensure_data
from harness.experiment import ExperimentJob
from harness.image import build_image
from harness.lab import lab_compile_cache
from harness.ledger import Experiment
from harness.noise import Runs
from harness.runner import LocalExecutor
from harness.session import LabView, Session, closing_reason
from harness.tools import Toolbox
from harness.workbench import Workbench
from sandbox.snapshots import SnapshotStore


def make_agent(config: LabConfig, program: str) -> Agent:
    """The lab's agent: claude (the Anthropic API) or offline (a seeded search, no key)."""
    if config.agent == "claude":
        return ClaudeAgent(config, program)
    return OfflineAgent(config)


class LabRun:
    def __init__(self, lab: Path, config: LabConfig, agent: str, model: str | None = None, new_session: bool = False,
                 on_step: Callable[[str], None] = lambda line: None):
        self.lab, self.config = Path(lab), config
        self.on_step = on_step  # one line per preparation step (the CLI's spinner)
        self.store = SnapshotStore()
        self.session = Session(self.lab, config, self.store, agent=agent, model=model, new_session=new_session)
        self.workbench: Workbench | None = None
        self.last_timings: dict[str, float] | None = None  # of the latest experiment, its reset included
        self._closed = False

    # -- opening and closing -----------------------------------------------------------------------
    def __enter__(self) -> LabRun:
        try:
            self._open()
        except BaseException:
            if self.workbench is not None:
                with contextlib.suppress(Exception):
                    self.workbench.close()
            self.session.release()
            raise
        return self

    def _open(self) -> None:
        session = self.session
        session.open()
        self.on_step("building the sandbox image (first run only)")
        self.image = build_image(gpu=bool(self.config.gpus), on_step=self.on_step)
        self.data = ensure_data(self.lab, self.config, on_step=self.on_step)
        session.start_row()
        self.executor = LocalExecutor(self.config, self.image, self.data, self.store, session.session_id,
                                      compile_cache=lab_compile_cache(self.lab))
        self.workbench = Workbench(self.executor.start_work_box, session.session_id,
                                   base=lambda: base.snapshot if (base := session.base) else None)
        self.workbench.start()
        failpoints.reach("session.box_started")
        if session.row.root_sources_json is None:
            base_id = session.base_id
            session.set_root_sources(session.sources(base_id) if base_id else self.workbench.read_sources({}))
        self.toolbox = Toolbox(session, self.workbench, self.run_experiment)
        self.view = LabView(session, self.data.floor_bpb)

    def close(self, reason: str, resumable: bool) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self.workbench.close()
        self.session.close(reason, resumable)

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(*closing_reason(exc, self.session.stop))

    # -- what the session is for -------------------------------------------------------------------
    def run_experiment(self, description: str, hypothesis: str | None = None,
                       expected_delta: float | None = None) -> Experiment:
        job = ExperimentJob(self.session, self.workbench, self.executor, description, hypothesis, expected_delta)
        experiment = job.run()
        self.last_timings = job.timings  # the reset happens after the row is written; benchmarks read it here
        return experiment

    def measure_noise(self, experiment: Experiment, count: int) -> Runs:
        """Re-run an experiment's snapshot `count` times with fresh harness seeds; its runs, these included."""
        if experiment.snapshot is None or experiment.metric is None:
            raise ConfigError(f"experiment #{experiment.id} has no scored snapshot to re-run ({experiment.status})")
        snapshot = self.store.get(experiment.snapshot)  # SnapshotMissing, one line, if it was garbage-collected
        job = ExperimentJob(self.session, self.workbench, self.executor, f"noise of #{experiment.id}")
        job.replicate(experiment, snapshot, count)
        return self.session.runs(experiment)

    def run_agent(self, agent: Agent) -> str | None:
        """Let the agent work until the session must stop, then close the session: resumable when the agent
        failed (the API kept failing) or an exception escaped. Returns the agent's failure, or None."""
        try:
            self.session.stop = agent.run(self.toolbox, self.view)
        except AgentFailed as exc:
            self.close(f"agent stopped: {exc}", resumable=True)
            return str(exc)
        except BaseException as exc:
            self.close(*closing_reason(exc, self.session.stop))
            raise
        self.close(*closing_reason(None, self.session.stop))
        return None

    # -- shortcuts for callers that hold a run -----------------------------------------------------
    @property
    def lab_id(self) -> str:
        return self.session.lab_id

    @property
    def session_id(self) -> str:
        return self.session.session_id
