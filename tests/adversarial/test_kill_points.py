"""The harness SIGKILLed at every fail point of a session (harness/failpoints.py), then restarted.

One lab, one `labrat run` per fail point, each killed for real (`kill -9` of itself at that point).
After every kill: the ledger passes SQLite's integrity check, every experiment completed before is
unchanged, at most one row is left `running`, and the session's base is a kept experiment. The next
run resumes the same session. At the end one clean run finishes it: no row is `running`, results.tsv
matches the ledger, no container of any killed process is left, and every snapshot the store holds
for the lab is named by a ledger row (a candidate committed just before a kill is adopted, not leaked).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from harness.failpoints import ENV, POINTS
from harness.ledger import Ledger
from sandbox.engine import LABEL_OWNER_PID, client
from sandbox.snapshots import SnapshotStore
from tests.adversarial.conftest import ledger_rows
from tests.conftest import LABRAT, make_lab



def run_labrat(lab: Path, max_experiments: int,
               failpoint: str | None = None) -> tuple[subprocess.CompletedProcess, int]:
    """One `labrat run`, killed at `failpoint` if given: (its result, its pid, to look for its containers)."""
    env = {**os.environ, "LABRAT_LOG_LEVEL": "warning"}
    env.pop(ENV, None)
    if failpoint:
        env[ENV] = failpoint
    process = subprocess.Popen([LABRAT, "run", "--lab", str(lab), "--max-experiments", str(max_experiments)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), process.pid


def test_killed_at_every_fail_point_the_next_run_resumes_and_loses_nothing(tmp_path):
    lab = tmp_path / "lab"
    lab.mkdir()
    make_lab(lab, max_experiments=1000)
    killed_pids: list[int] = []
    completed: dict[int, dict] = {}  # experiments finished so far, as the ledger recorded them
    try:
        for point in POINTS:
            experiments, sessions = ledger_rows(lab) if (lab / "ledger.db").exists() else ([], [])
            # The run resumes the lab's one session: its next experiment is the one the fail point interrupts.
            run, pid = run_labrat(lab, max_experiments=len(experiments) + 1, failpoint=point)
            assert run.returncode == -9, f"{point}: not killed (exit {run.returncode}): {run.stderr[-1500:]}"
            killed_pids.append(pid)

            if not (lab / "ledger.db").exists():
                continue  # killed before the ledger was created
            experiments, sessions = ledger_rows(lab)
            by_id = {e["id"]: e for e in experiments}
            for experiment_id, before in completed.items():  # nothing completed is lost or rewritten
                assert by_id[experiment_id] == before, f"{point}: experiment #{experiment_id} changed"
            assert sum(e["status"] == "running" for e in experiments) <= 1, point
            assert len(sessions) <= 1, f"{point}: the run did not resume the session"
            base = sessions[-1]["base_experiment_id"] if sessions else None
            assert base is None or by_id[base]["status"] == "keep", f"{point}: base #{base} is not a kept experiment"
            completed.update({e["id"]: e for e in experiments if e["status"] != "running"})

        # A clean run finishes the session from wherever the last kill left it.
        experiments, _ = ledger_rows(lab)
        final, _ = run_labrat(lab, max_experiments=len(experiments) + 1)
        assert final.returncode == 0, final.stderr[-2000:]
        assert "Traceback" not in final.stderr
    finally:
        leftovers = [c for pid in killed_pids
                     for c in client().api.containers(all=True, filters={"label": f"{LABEL_OWNER_PID}={pid}"})]
        for container in leftovers:
            client().api.remove_container(container["Id"], force=True)
    assert not leftovers, f"containers of killed harnesses were not reaped: {[c['Names'] for c in leftovers]}"

    experiments, sessions = ledger_rows(lab)
    by_id = {e["id"]: e for e in experiments}
    for experiment_id, before in completed.items():
        assert by_id[experiment_id]["status"] == before["status"] and by_id[experiment_id]["metric"] == before["metric"]
    assert not [e for e in experiments if e["status"] == "running"]
    assert sessions[-1]["ended_at"] and not sessions[-1]["resumable"]
    crashed = [e for e in experiments if e["status"] == "crash"]
    assert crashed and all("harness stopped" in e["log_tail"] for e in crashed)
    assert any(e["status"] in ("keep", "discard") for e in experiments)  # kills after the verdict kept it

    ledger = Ledger(lab / "ledger.db")
    try:
        assert (lab / "results.tsv").read_text() == ledger.results_tsv()
        lab_id = ledger.meta("lab_id")
    finally:
        ledger.close()
    store = SnapshotStore()
    try:
        named = {e["snapshot"] for e in experiments if e["snapshot"]}
        stored = {s.name for s in store.list() if s.name.startswith(f"{lab_id}-")}
        assert stored <= named, f"snapshots no ledger row names: {sorted(stored - named)}"
        # The candidate committed right before the kill at experiment.snapshot_taken was adopted by its row.
        assert any(e["status"] == "crash" and e["snapshot"] for e in crashed)
    finally:
        store.gc(keep=[], name_prefix=lab_id)
