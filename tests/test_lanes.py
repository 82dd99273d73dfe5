"""Lanes: several agents at work in one lab, each with its own working container, lineage and cores.

The real ones run `labrat run --parallel 2` on this 2-core machine (one core a lane) with the offline agent:
both lanes start from one baseline, their experiments overlap in time, each lane keeps against its own
base, the budget counts both, every container of a lane is pinned to its own core, and a harness killed
with two experiments in flight resumes with nothing lost.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from harness.config import ConfigError, LabConfig
from harness.lanes import plan_lanes
from harness.ledger import Ledger
from sandbox.engine import LABEL_OWNER_PID, client
from sandbox.snapshots import SnapshotStore
from tests.conftest import LABRAT, make_lab

ENV = {**os.environ, "LABRAT_LOG_LEVEL": "warning"}


def test_each_lane_gets_its_own_gpu_or_cores_and_a_short_machine_is_refused_in_one_line():
    one = plan_lanes(LabConfig(cpus=1.5), cores=[0, 1])
    assert [(r.gpus, r.cpuset, r.cpus) for r in one] == [(None, None, 1.5)]  # one lane: as configured
    two = plan_lanes(LabConfig(parallel=2), cores=[0, 1, 2, 3, 5])
    assert [r.cpuset for r in two] == ["0,1", "2,3"] and [r.cpus for r in two] == [2.0, 2.0]
    assert [r.gpus for r in plan_lanes(LabConfig(parallel=3, gpus="4,5,6,7"), cores=[0])] == ["4", "5", "6"]
    assert [r.gpus for r in plan_lanes(LabConfig(parallel=2, gpus="all"), cores=[0], gpus=["0", "1"])] == ["0", "1"]
    with pytest.raises(ConfigError, match=r"parallel = 3 needs 3 CPU cores.*may use 2"):
        plan_lanes(LabConfig(parallel=3), cores=[0, 1])
    with pytest.raises(ConfigError, match=r"parallel = 3 needs 3 GPUs, one a lane; gpus = '0,1' gives 2"):
        plan_lanes(LabConfig(parallel=3, gpus="0,1"), cores=[0, 1])
    with pytest.raises(ConfigError, match="nvidia-smi found no GPU"):
        plan_lanes(LabConfig(parallel=2, gpus="all"), cores=[0, 1], gpus=[])


def test_a_keep_moves_its_own_lanes_base_only(tmp_path):
    with Ledger(tmp_path / "ledger.db") as ledger:
        ledger.start_session("s", agent="offline", model=None, config={})
        base = ledger.begin_experiment("s", None, "baseline")
        ledger.finish_experiment(base, "keep", metric=2.0)
        assert ledger.lane_base("s", 1) == base  # a lane starts from the session's base
        one = ledger.begin_experiment("s", base, "lane 1's change", lane=1)
        zero = ledger.begin_experiment("s", base, "lane 0's change", lane=0)
        assert ledger.running_experiment_id("s", 1) == one and ledger.running_experiment_id("s", 0) == zero
        ledger.finish_experiment(one, "keep", metric=1.9)
        assert ledger.lane_base("s", 1) == one and ledger.lane_base("s", 0) == base
        ledger.finish_experiment(zero, "discard", metric=2.1)
        assert ledger.lane_bases("s") == {0: base, 1: one}
        header, *rows = ledger.results_tsv().splitlines()
        assert header.endswith("\tdescription\tlane") and rows[1].endswith("\t1") and rows[2].endswith("\t0")


def _lab(tmp_path: Path, **settings) -> Path:
    return make_lab(tmp_path / "lab", parallel=2, **settings)


def _rows(lab: Path):
    with Ledger(lab / "ledger.db") as ledger:
        return ledger.experiments(), ledger.sessions()


def _stamp(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


def _cleanup(lab: Path) -> None:
    if (lab / "ledger.db").exists():
        with Ledger(lab / "ledger.db") as ledger:
            lab_id = ledger.meta("lab_id")
        SnapshotStore().gc(keep=[], name_prefix=f"{lab_id}-")


def test_two_lanes_work_at_once_on_their_own_cores_and_lineages(tmp_path):
    lab = _lab(tmp_path, max_experiments=5)
    try:
        done = subprocess.run([LABRAT, "run", "--lab", str(lab)], capture_output=True, text=True, timeout=900,
                              env=ENV)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "2 lanes: CPU 0, CPU 1" in done.stderr
        experiments, sessions = _rows(lab)
        candidates = [e for e in experiments if e.replicate_of is None]
        assert len(candidates) == 5  # the budget counts both lanes' experiments, with none past it
        baseline = candidates[0]
        assert baseline.lane == 0 and baseline.parent_id is None and baseline.status == "keep"
        assert sum(e.parent_id is None for e in candidates) == 1  # one baseline, shared by both lanes
        by_lane = {lane: [e for e in candidates[1:] if e.lane == lane] for lane in (0, 1)}
        assert by_lane[0] and by_lane[1]
        # Overlap: some experiment of lane 1 started before one of lane 0 had finished, and the other way.
        assert any(_stamp(a.started_at) < _stamp(b.finished_at) and _stamp(b.started_at) < _stamp(a.finished_at)
                   for a in by_lane[0] for b in by_lane[1])
        # Each lane's experiments start from its own base: the baseline, its own keeps, or an adopted best.
        kept = {e.id for e in experiments if e.status == "keep"}
        for e in candidates[1:]:
            assert e.parent_id in kept
        # Different seeds: the lanes' first moves differ.
        assert by_lane[0][0].description != by_lane[1][0].description
        status = subprocess.run([LABRAT, "status", "--lab", str(lab)], capture_output=True, text=True, env=ENV)
        assert "lanes: lane 0 from #" in status.stdout and "lane 1 from #" in status.stdout
        tsv = (lab / "results.tsv").read_text().splitlines()
        assert tsv[0].endswith("\tlane") and {line.rsplit("\t", 1)[1] for line in tsv[1:]} == {"0", "1"}
        log = subprocess.run([LABRAT, "log", "--lab", str(lab)], capture_output=True, text=True, env=ENV)
        assert "lane" in log.stdout.splitlines()[2]
    finally:
        _cleanup(lab)


def test_every_container_of_a_lane_runs_on_the_lanes_cores_only(tmp_path):
    from harness.config import load_config
    from harness.run import LabRun

    lab = _lab(tmp_path, max_experiments=1)
    config = load_config(lab)
    try:
        with LabRun(lab, config, agent="test") as run:
            cpusets = [client().api.inspect_container(lane.workbench.box.container.id)["HostConfig"]["CpusetCpus"]
                       for lane in run.lanes]
            assert cpusets == ["0", "1"]
            nproc = [lane.workbench.box.exec("nproc").stdout.strip() for lane in run.lanes]
            assert nproc == ["1", "1"]
            assert [lane.executor.work_policy.cpuset for lane in run.lanes] == ["0", "1"]
            assert [lane.executor.eval_policy.cpuset for lane in run.lanes] == ["0", "1"]  # evaluation too
            run.close("test", resumable=False)
    finally:
        _cleanup(lab)


def test_killed_with_two_experiments_in_flight_the_next_run_resumes_and_loses_nothing(tmp_path):
    lab = _lab(tmp_path, max_experiments=6, deterministic_steps=40)
    process = subprocess.Popen([LABRAT, "run", "--lab", str(lab)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=ENV)
    try:
        deadline = time.monotonic() + 600
        in_flight: list[int] = []
        while time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.5)
            try:
                experiments, _ = _rows(lab)
            except sqlite3.Error:
                continue
            in_flight = [e.id for e in experiments if e.status == "running" and e.replicate_of is None]
            if len(in_flight) == 2:
                break
        assert len(in_flight) == 2, "never two experiments in flight: " + (
            process.stderr.read()[-2000:] if process.poll() is not None else "")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        at_kill, _ = _rows(lab)
        in_flight = [e.id for e in at_kill if e.status == "running" and e.replicate_of is None]
        assert len(in_flight) == 2  # still both, as the kill found them
        before = {e.id: e for e in at_kill if e.status != "running"}

        resumed = subprocess.run([LABRAT, "run", "--lab", str(lab)], capture_output=True, text=True, timeout=900,
                                 env=ENV)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resumed" in resumed.stderr
        experiments, sessions = _rows(lab)
        by_id = {e.id: e for e in experiments}
        assert len(sessions) == 1  # the same session, both lanes
        for experiment_id in in_flight:  # the two in flight are crashes with the reason, not lost rows
            assert by_id[experiment_id].status == "crash" and "harness stopped" in by_id[experiment_id].log_tail
        for experiment_id, row in before.items():  # nothing finished before the kill changed
            assert by_id[experiment_id].status == row.status and by_id[experiment_id].metric == row.metric
        assert not any(e.status == "running" for e in experiments)
        assert len([e for e in experiments if e.replicate_of is None]) == 6
        leftovers = client().api.containers(all=True, filters={"label": f"{LABEL_OWNER_PID}={process.pid}"})
        assert not leftovers, [c["Names"] for c in leftovers]
    finally:
        if process.poll() is None:
            process.kill()
        _cleanup(lab)
