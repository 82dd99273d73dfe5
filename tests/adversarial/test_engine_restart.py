"""The Docker daemon restarted for real in the middle of an experiment: that experiment is recorded as a
crash, the session waits for the engine, starts a fresh working container and goes on, and nothing of
the dead engine's containers is left behind."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from harness.ledger import Ledger
from sandbox.engine import LABEL_OWNER_PID, LABEL_ROLE, client, wait_for_engine
from sandbox.snapshots import SnapshotStore
from tests.conftest import LABRAT, make_lab

REPO = Path(__file__).resolve().parents[2]


def restart_engine() -> None:
    """Stop dockerd (its containers die with it: no live-restore) and start it again the way setup does."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI must run as root to restart the Docker engine")
        pytest.skip("restarting the Docker engine needs root")
    if Path("/run/systemd/system").is_dir():
        subprocess.run(["systemctl", "restart", "docker"], check=True, timeout=180)
        return
    pids = subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True, text=True).stdout.split()
    assert pids, "no dockerd process to restart"
    subprocess.run(["kill", "-TERM", *pids], check=True)
    deadline = time.monotonic() + 90
    while subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "dockerd did not stop in 90 s"
        time.sleep(0.5)
    subprocess.run(["bash", str(REPO / "scripts" / "setup-host.sh")], check=True, timeout=180,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_daemon_restart_mid_training_is_a_crash_and_the_session_goes_on(tmp_path):
    lab = tmp_path / "lab"
    lab.mkdir()
    make_lab(lab, deterministic_steps=None, time_budget=8, eval_tokens=4096, max_experiments=2)
    process = subprocess.Popen([LABRAT, "run", "--lab", str(lab)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "LABRAT_LOG_LEVEL": "warning"})
    training = {"label": [f"{LABEL_OWNER_PID}={process.pid}", f"{LABEL_ROLE}=train"]}
    try:
        deadline = time.monotonic() + 300
        while not client().api.containers(filters=training):
            assert process.poll() is None, process.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.2)
        time.sleep(2)  # well inside the 8 s budget: the kill lands mid-training
        restart_engine()
        stdout, stderr = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
        wait_for_engine(120)
    assert process.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "max_experiments (2) reached" in stdout

    ledger = Ledger(lab / "ledger.db")
    try:
        first, second = ledger.experiments()
        assert first.status == "crash" and first.metric is None
        assert "stopped unexpectedly" in first.log_tail or "not reachable" in first.log_tail, first.log_tail
        # The session went on: the next experiment ran in fresh containers of the restarted engine.
        assert second.status == "keep" and second.metric is not None and second.session_id == first.session_id
        assert json.loads(second.eval_json)["causal"]
        assert not ledger.last_session().resumable
        lab_id = ledger.meta("lab_id")
    finally:
        ledger.close()
    leftovers = client().api.containers(all=True, filters={"label": f"{LABEL_OWNER_PID}={process.pid}"})
    assert not leftovers, [c["Names"] for c in leftovers]
    SnapshotStore().gc(keep=[], name_prefix=lab_id)
