"""The composition root: `LabRun` wires one lab's session and, for each lane, its executor, working container,
tools and agent view.

    with LabRun(lab, config, agent="offline") as run:      # lock, recovery, image, data, the working boxes
        failure = run.run_agents(lambda lane: make_agent(config, program, lane))  # closes the session

A lane is one agent at work with its own working container, lineage (base) and resources (a GPU, or a
disjoint set of CPU cores: harness/lanes.py); lanes share the ledger and see each other's results. With
`parallel = 1` there is one lane, run on the caller's thread, as before lanes existed; with more, each lane
runs on a thread of its own with its own ledger connection.

Everything below is built here and handed down: nothing lower reaches back up for it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
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
from harness.lanes import LaneResources, plan_lanes
from harness.ledger import Experiment
from harness.noise import Runs
from harness.runner import LocalExecutor
from harness.session import LabSession, LabView, Session, closing_reason
from harness.text import one_line
from harness.tools import Toolbox
from harness.workbench import Workbench
from sandbox.engine import IN_FLIGHT_ROLES, remove_session_containers
from sandbox.snapshots import SnapshotStore


def make_agent(config: LabConfig, program: str, lane: int = 0) -> Agent:
    """The lab's agent: claude (the Anthropic API) or offline (a seeded search, no key); each lane has its own
    (the offline agent's lanes are hill climbers with different seeds)."""
    if config.agent == "claude":
        return ClaudeAgent(config, program)
    return OfflineAgent(config, lane=lane)


@dataclass
class Lane:
    """One lane's parts: its session (base, bookkeeping), executor (its GPU or cores), working container, tools and
    the agent's read-only view."""

    session: Session
    resources: LaneResources
    executor: LocalExecutor
    workbench: Workbench
    toolbox: Toolbox | None = None
    view: LabView | None = None


class LabRun:
    def __init__(self, lab: Path, config: LabConfig, agent: str, model: str | None = None, new_session: bool = False,
                 on_step: Callable[[str], None] = lambda line: None):
        self.lab, self.config = Path(lab), config
        self.on_step = on_step  # one line per preparation step (the CLI's spinner)
        self.store = SnapshotStore()
        self.lab_session = LabSession(self.lab, config, self.store, agent=agent, model=model, new_session=new_session)
        self.lanes: list[Lane] = []
        self.last_timings: dict[str, float] | None = None  # of the latest experiment, its reset included
        self._closed = False

    # -- opening and closing -----------------------------------------------------------------------
    def __enter__(self) -> LabRun:
        try:
            self._open()
        except BaseException:
            for lane in self.lanes:
                with contextlib.suppress(Exception):
                    lane.workbench.close()
            self.lab_session.release()
            raise
        return self

    def _open(self) -> None:
        lab_session = self.lab_session
        resources = plan_lanes(self.config)  # a one-line error before anything starts when the machine is short
        lab_session.open()
        self.on_step("building the sandbox image (first run only)")
        self.image = build_image(gpu=bool(self.config.gpus), on_step=self.on_step)
        self.data = ensure_data(self.lab, self.config, on_step=self.on_step)
        lab_session.start_row()
        threaded = len(resources) > 1
        for lane_resources in resources:
            self.on_step(f"starting lane {lane_resources.lane} ({lane_resources.describe()})" if threaded
                         else "starting the working container")
            self._open_lane(lane_resources, threaded)
        failpoints.reach("session.box_started")
        if lab_session.row.root_sources_json is None:
            base_id = lab_session.base_id
            lab_session.set_root_sources(lab_session.sources(base_id) if base_id
                                         else self.lanes[0].workbench.read_sources({}))
        for lane in self.lanes:
            lane.toolbox = Toolbox(lane.session, lane.workbench, self._experiment_runner(lane))
            lane.view = LabView(lane.session, self.data.floor_bpb)

    def _open_lane(self, resources: LaneResources, threaded: bool) -> Lane:
        session = self.lab_session.lane(resources.lane, own_connection=threaded)
        config = self.config.model_copy(update={"gpus": resources.gpus, "cpus": resources.cpus})
        executor = LocalExecutor(config, self.image, self.data, self.store, self.lab_session.session_id,
                                 compile_cache=lab_compile_cache(self.lab), cpuset=resources.cpuset)
        workbench = Workbench(executor.start_work_box, self.lab_session.session_id,
                              base=lambda: base.snapshot if (base := session.base) else None)
        lane = Lane(session, resources, executor, workbench)
        self.lanes.append(lane)  # closed by __enter__'s cleanup if the start below fails
        workbench.start()
        return lane

    def close(self, reason: str, resumable: bool) -> None:
        if self._closed:
            return
        self._closed = True
        for lane in self.lanes:
            with contextlib.suppress(Exception):
                lane.workbench.close()
        self.lab_session.close(reason, resumable)

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(*closing_reason(exc, self.lab_session.stop or self.session.stop))

    # -- what the session is for -------------------------------------------------------------------
    def _experiment_runner(self, lane: Lane) -> Callable[..., Experiment]:
        def run_experiment(description: str, hypothesis: str | None = None,
                           expected_delta: float | None = None) -> Experiment:
            job = ExperimentJob(lane.session, lane.workbench, lane.executor, description, hypothesis, expected_delta)
            experiment = job.run()
            self.last_timings = job.timings  # the reset happens after the row is written; benchmarks read it here
            if len(self.lanes) > 1 and lane.session.adopt_lab_best() is not None:
                lane.workbench.start()  # a fresh working container of the adopted base
            return experiment

        return run_experiment

    def run_experiment(self, description: str, hypothesis: str | None = None,
                       expected_delta: float | None = None) -> Experiment:
        """An experiment of lane 0 (the only lane, unless the lab runs lanes)."""
        return self._experiment_runner(self.lanes[0])(description, hypothesis, expected_delta)

    def measure_noise(self, experiment: Experiment, count: int) -> Runs:
        """Re-run an experiment's snapshot `count` times with fresh harness seeds; its runs, these included."""
        if experiment.snapshot is None or experiment.metric is None:
            raise ConfigError(f"experiment #{experiment.id} has no scored snapshot to re-run ({experiment.status})")
        snapshot = self.store.get(experiment.snapshot)  # SnapshotMissing, one line, if it was garbage-collected
        lane = self.lanes[0]
        job = ExperimentJob(lane.session, lane.workbench, lane.executor, f"noise of #{experiment.id}")
        job.replicate(experiment, snapshot, count)
        return lane.session.runs(experiment)

    def run_agent(self, agent: Agent) -> str | None:
        """One agent, on lane 0 (a lab with one lane)."""
        return self.run_agents(lambda lane: agent)

    def run_agents(self, make: Callable[[int], Agent]) -> str | None:
        """Let each lane's agent (`make(lane)`) work until the session must stop, then close the session:
        resumable when an agent failed (the API kept failing) or an exception escaped. Returns the first agent
        failure, or None."""
        try:
            if len(self.lanes) == 1:
                failures = [self._run_lane(self.lanes[0], make(0))]
            else:
                self._baseline_first()
                failures = self._run_threaded([(lane, make(lane.session.lane)) for lane in self.lanes])
        except BaseException as exc:
            self.close(*closing_reason(exc, self.lab_session.stop))
            raise
        failure = next((f for f in failures if f), None)
        if failure:
            self.close(f"agent stopped: {failure}", resumable=True)
            return failure
        stops = sorted({lane.session.stop for lane in self.lanes if lane.session.stop})
        self.close(*closing_reason(None, "; ".join(stops) or None))
        return None

    def _baseline_first(self) -> None:
        """A new lab's lanes all start from one baseline: lane 0 runs train.py as shipped (and its noise floor)
        before any agent starts, and the other lanes' working containers restart from it."""
        first = self.lanes[0].session
        if first.base_id is not None or any(e.metric is not None for e in first.ledger.experiments()):
            return
        self.run_experiment("baseline: train.py as shipped")
        for lane in self.lanes[1:]:
            lane.workbench.start()

    def _run_lane(self, lane: Lane, agent: Agent) -> str | None:
        try:
            lane.session.stop = agent.run(lane.toolbox, lane.view)
        except AgentFailed as exc:
            lane.session.stop = f"agent stopped: {exc}"
            return str(exc)
        except BaseException as exc:
            if len(self.lanes) > 1:  # the harness failed under this lane (the disk, the ledger): every lane stops
                self.lab_session.stop = self.lab_session.stop or f"lane {lane.session.lane} failed: {one_line(exc, 160)}"
            raise
        return None

    def _run_threaded(self, work: list[tuple[Lane, Agent]]) -> list[str | None]:
        """Every lane on a thread of its own. An interrupt (Ctrl-C, SIGTERM: the main thread's) stops every lane:
        the containers in flight are removed, so each lane records its experiment and its agent returns."""
        with ThreadPoolExecutor(len(work), thread_name_prefix="lane") as pool:
            futures = [pool.submit(self._run_lane, lane, agent) for lane, agent in work]
            try:
                wait(futures)  # interruptible: the main thread waits here
            except BaseException:
                self.lab_session.stop = "interrupted"
                remove_session_containers(self.lab_session.session_id, roles=IN_FLIGHT_ROLES)
                wait(futures)
                raise
            errors = [f.exception() for f in futures if f.exception() is not None]
            if errors:  # a lane's harness error (the engine, the disk): _run_lane stopped the others
                raise errors[0]
            return [f.result() for f in futures]

    # -- shortcuts for callers that hold a run -----------------------------------------------------
    @property
    def session(self) -> Session:
        """Lane 0's session (the only one, unless the lab runs lanes)."""
        return self.lanes[0].session

    @property
    def workbench(self) -> Workbench:
        return self.lanes[0].workbench

    @property
    def executor(self) -> LocalExecutor:
        return self.lanes[0].executor

    @property
    def toolbox(self) -> Toolbox:
        return self.lanes[0].toolbox

    @property
    def view(self) -> LabView:
        return self.lanes[0].view

    @property
    def lab_id(self) -> str:
        return self.lab_session.lab_id

    @property
    def session_id(self) -> str:
        return self.lab_session.session_id
