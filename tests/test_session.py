"""`labrat run` end to end on the real engine: the offline agent, keep/discard, the ledger, resume after SIGKILL."""

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from harness.ledger import Ledger
from sandbox.engine import LABEL_OWNER_PID, client, reap_orphans
from sandbox.snapshots import SnapshotStore
from tests.conftest import LABRAT, make_lab

def labrat(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([LABRAT, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "LABRAT_LOG_LEVEL": "warning"})


@pytest.fixture
def cleanup_snapshots():
    labs: list[Path] = []
    yield labs
    reap_orphans()  # a test that failed before its resume leaves a killed harness's containers
    for lab in labs:
        if (lab / "ledger.db").exists():
            ledger = Ledger(lab / "ledger.db")
            lab_id = ledger.meta("lab_id")
            ledger.close()
            if lab_id:
                SnapshotStore().gc(keep=[], name_prefix=lab_id)


def containers_of(pid: int) -> list[dict]:
    """The containers a process started, as one engine call (the harness removes containers on threads)."""
    return client().api.containers(all=True, filters={"label": f"{LABEL_OWNER_PID}={pid}"})


def test_offline_session_keeps_and_discards(tmp_path, cleanup_snapshots):
    lab = make_lab(tmp_path / "lab", deterministic_steps=30, eval_tokens=4096, max_experiments=5)
    cleanup_snapshots.append(lab)
    run = labrat("run", "--lab", str(lab))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "max_experiments (5) reached" in run.stdout

    ledger = Ledger(lab / "ledger.db")
    experiments = ledger.experiments()
    assert [e.status for e in experiments].count("running") == 0
    assert len(experiments) == 5
    statuses = [e.status for e in experiments]
    assert statuses[0] == "keep" and experiments[0].parent_id is None  # the baseline
    assert "keep" in statuses[1:] and "discard" in statuses[1:], statuses
    # Keep/discard follow the measured metric: a keep beats its parent, a discard does not.
    by_id = {e.id: e for e in experiments}
    for e in experiments[1:]:
        parent = by_id[e.parent_id]
        assert (e.metric < parent.metric) == (e.status == "keep")
        # The metric is the protected evaluation's number, recorded verbatim.
        assert json.loads(e.eval_json)["val_bpb"] == e.metric and json.loads(e.eval_json)["causal"]
        assert e.diff and "trainer/train.py" in e.diff and e.description.split(":")[0] in e.diff
    # After a discard the next experiment starts from the same base (the workspace was reset).
    for before, after in zip(experiments, experiments[1:]):
        expected_parent = before.id if before.status == "keep" else before.parent_id
        assert after.parent_id == expected_parent
    # Every experiment has a restorable snapshot whose train.py is the one it trained.
    store = SnapshotStore()
    last = experiments[-1]
    with store.restore(last.snapshot, session=f"pytest{os.getpid()}") as box:
        assert box.read_text("trainer/train.py") == json.loads(last.sources_json)["trainer/train.py"]
    assert store.get(last.snapshot).labels["experiment"] == str(last.id)

    tsv = (lab / "results.tsv").read_text().splitlines()
    assert tsv[0] == "commit\tval_bpb\tmemory_gb\tstatus\tdescription" and len(tsv) == 6
    log_lines = [json.loads(line) for line in (lab / "logs" / "labrat.log").read_text().splitlines()]
    assert sum(1 for line in log_lines if line["event"] == "experiment.finished") == 5
    assert not client().api.containers(all=True, filters={"label": f"labrat.session={ledger.last_session().id}"})

    # The CLI views read the same ledger.
    best = ledger.best()
    status = labrat("status", "--lab", str(lab))
    assert f"best: #{best.id} val_bpb {best.metric:.6f}" in status.stdout
    shown = labrat("show", str(experiments[1].id), "--lab", str(lab))
    assert experiments[1].description in shown.stdout and "+++ #" in shown.stdout
    diff = labrat("diff", str(experiments[0].id), str(best.id), "--lab", str(lab))
    assert diff.returncode == 0 and (best.id == experiments[0].id or "@@" in diff.stdout)
    missing = labrat("show", "999", "--lab", str(lab))
    assert missing.returncode == 2 and "no experiment #999" in missing.stderr and "Traceback" not in missing.stderr
    ledger.close()


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_resume_after_the_harness_is_killed_mid_training(tmp_path, cleanup_snapshots):
    lab = make_lab(tmp_path / "lab", deterministic_steps=30, eval_tokens=4096, max_experiments=3)
    cleanup_snapshots.append(lab)
    proc = subprocess.Popen([LABRAT, "run", "--lab", str(lab)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "LABRAT_LOG_LEVEL": "warning"})
    try:
        # Kill it while the second experiment's training container runs (the first is complete by then).
        def training_second():
            roles = [c["Labels"].get("labrat.role") for c in containers_of(proc.pid)]
            if "train" not in roles or not (lab / "ledger.db").exists():
                return False
            db = sqlite3.connect(lab / "ledger.db")
            done = db.execute("SELECT count(*) FROM experiments WHERE status != 'running'").fetchone()[0]
            running = db.execute("SELECT count(*) FROM experiments WHERE status = 'running'").fetchone()[0]
            db.close()
            # The first experiment's training container outlives its training (the checkpoint streams from it)
            # and is removed in the background: a running second experiment tells them apart.
            return done >= 1 and running == 1

        _wait_for(training_second, 600, "the second experiment's training")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert containers_of(proc.pid), "the killed harness should have left its containers behind"
    db = Ledger(lab / "ledger.db")
    killed_session = db.last_session()
    running = [e for e in db.experiments() if e.status == "running"]
    completed = [e for e in db.experiments() if e.status != "running"]
    db.close()
    assert len(running) == 1 and killed_session.ended_at is None

    again = labrat("run", "--lab", str(lab))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed" in again.stderr
    assert not containers_of(proc.pid), "orphaned containers must be reaped on resume"
    ledger = Ledger(lab / "ledger.db")
    experiments = ledger.experiments()
    assert ledger.last_session().id == killed_session.id and len(ledger.sessions()) == 1
    assert all(e.status != "running" for e in experiments)
    interrupted = ledger.experiment(running[0].id)
    assert interrupted.status == "crash" and "harness stopped" in interrupted.log_tail
    for e in completed:  # nothing that had finished was lost or changed
        assert ledger.experiment(e.id) == e
    assert len(experiments) == 3  # max_experiments counts the crashed one
    ledger.close()


def test_a_second_run_in_the_same_lab_is_refused(tmp_path):
    from harness.lab import LOCK_FILE

    import fcntl

    lab = make_lab(tmp_path / "lab", deterministic_steps=30, eval_tokens=4096, max_experiments=1)
    with open(lab / LOCK_FILE, "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        holder.write("12345")
        holder.flush()
        refused = labrat("run", "--lab", str(lab), timeout=120)
    assert refused.returncode == 2
    assert "another labrat process (pid 12345)" in refused.stderr and "Traceback" not in refused.stderr


def test_bad_command_line_value_names_the_option(tmp_path):
    lab = make_lab(tmp_path / "lab", deterministic_steps=30, eval_tokens=4096, max_experiments=1)
    bad = labrat("run", "--lab", str(lab), "--budget", "-3", timeout=120)
    assert bad.returncode == 2 and "--time-budget" in bad.stderr and "greater than 0" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("runtime", [pytest.param("runsc", marks=pytest.mark.runsc)], indirect=True)
def test_a_session_under_gvisor(tmp_path, runtime, cleanup_snapshots):
    """Training, the read-only data mount and the root/agent evaluation split all work under runsc."""
    from harness.agents.offline import OfflineAgent
    from harness.config import LabConfig
    from harness.run import LabRun

    lab = tmp_path / "lab"
    cleanup_snapshots.append(lab)
    config = LabConfig(time_budget=20, eval_tokens=4096, max_experiments=1, runtime=runtime)  # gVisor starts slower
    with LabRun(lab, config, agent="offline") as run:
        assert client().api.inspect_container(run.workbench.box.container.id)["HostConfig"]["Runtime"] == "runsc"
        assert run.workbench.box.exec("cat /data/train.bin | wc -c").stdout.strip() == str(run.data.meta["train_tokens"])
        OfflineAgent(config).run(run.toolbox, run.view)
        [baseline] = run.session.session_experiments()
    assert baseline.status == "keep" and baseline.metric > run.data.floor_bpb
    assert json.loads(baseline.eval_json)["causal"]


def test_a_bpe_lab_trains_evaluates_and_reproduces_in_containers(tmp_path, cleanup_snapshots):
    """tokenizer = "bpe": the tokenizer is trained on the host with the data, train.py reads the vocabulary
    and uint16 ids from /data, the workers answer over the whole vocabulary, and a rerun from the snapshot
    scores the same, bit for bit."""
    from harness.agents.offline import OfflineAgent
    from harness.config import LabConfig
    from harness.reproduce import reproduce
    from harness.run import LabRun

    lab = tmp_path / "lab"
    cleanup_snapshots.append(lab)
    config = LabConfig(tokenizer="bpe", vocab_size=512, deterministic_steps=5, time_budget=60, eval_tokens=2048,
                       max_experiments=1)
    make_lab(lab, tokenizer="bpe", vocab_size=512, deterministic_steps=5, eval_tokens=2048, max_experiments=1)
    with LabRun(lab, config, agent="offline") as run:
        meta = run.data.meta
        assert meta["tokenizer"] == "bpe" and 256 < meta["vocab_size"] <= 512
        assert run.workbench.box.exec("wc -c < /data/train.bin").stdout.strip() == str(2 * meta["train_tokens"])
        assert run.workbench.box.exec("test -s /data/tokenizer.json && echo yes").stdout.strip() == "yes"
        OfflineAgent(config).run(run.toolbox, run.view)
        [baseline] = run.session.session_experiments()
    result = json.loads(baseline.eval_json)
    assert baseline.status == "keep" and result["causal"], baseline.log_tail
    assert result["bytes_evaluated"] > 2 * result["tokens_evaluated"]  # a token covers several bytes
    assert run.data.floor_bpb < baseline.metric < meta["unigram_bpb"] + 1.0
    again = reproduce(lab, baseline.id)
    assert again.ok and again.reproduced == baseline.metric, again
