"""The attacker's seat: a real session (working container, ledger, snapshot store) driven only through
the tools an agent gets (bash, the file editor, run_experiment, the history tools), under runc and gVisor.

Each test module gets one session per runtime; an attack that breaks the working container leaves the
next test a fresh one (run_experiment resets it, and `Attacker.fresh_box()` does so explicitly).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from harness.config import LabConfig
from harness.ledger import Experiment
from harness.run import LabRun
from harness.session import Session
from harness.tools import ToolResult
from sandbox.sandbox import Sandbox
from sandbox.sandbox import wait_for_removals
from sandbox.snapshots import SnapshotStore
from tests.conftest import _runsc_skip_reason

EDIT = "str_replace_based_edit_tool"
TRAIN = "trainer/train.py"
# Small limits, so that bombs and floods hit them in seconds; a short budget, so experiments are quick.
ATTACK_LAB = LabConfig(time_budget=10, eval_timeout=20, eval_tokens=4096, max_experiments=100, max_tool_calls=1000,
                       memory_gb=1, disk_gb=0.25)
RUNSC_BUDGET = 20  # gVisor starts Python and torch seconds slower, and the budget is all-in


def attack_config(runtime: str) -> LabConfig:
    return ATTACK_LAB.model_copy(update={"runtime": runtime, "time_budget": RUNSC_BUDGET if runtime == "runsc"
                                         else ATTACK_LAB.time_budget})


class Attacker:
    """An untrusted agent: it has the tools and nothing else."""

    def __init__(self, run: LabRun, runtime: str):
        self.run = run  # the harness's side, for the tests' checks; the attacker itself only calls tools
        self.toolbox = run.toolbox
        self.runtime = runtime

    @property
    def session(self) -> Session:
        return self.run.session

    @property
    def box(self) -> Sandbox:
        """The working container, now (an experiment or a restore replaces it)."""
        return self.run.workbench.box

    def call(self, name: str, tool_input: object) -> ToolResult:
        return self.toolbox.call(name, tool_input)

    def bash(self, command: str, timeout: int | None = None) -> ToolResult:
        return self.call("bash", {"command": command} | ({"timeout": timeout} if timeout else {}))

    def edit(self, command: str, path: str, **fields) -> ToolResult:
        return self.call(EDIT, {"command": command, "path": path, **fields})

    def patch_train(self, old: str, new: str) -> None:
        """Edit train.py (the one file the agent is meant to change); the edit itself must succeed."""
        result = self.edit("str_replace", TRAIN, old_str=old, new_str=new)
        assert not result.is_error, result.text

    def run_experiment(self, description: str) -> Experiment:
        """run_experiment through the tool; returns the ledger's row for it (the record that counts)."""
        result = self.call("run_experiment", {"description": description})
        experiment = self.session.ledger.experiments()[-1]
        assert f"#{experiment.id}" in result.text, result.text
        return experiment

    def fresh_box(self) -> None:
        """A new working container of the session's base (after an attack that killed the old one)."""
        self.run.workbench.start()


@pytest.fixture(scope="module", params=["runc", pytest.param("runsc", marks=pytest.mark.runsc)])
def attacker(request, tmp_path_factory) -> Attacker:
    runtime = request.param
    if runtime == "runsc" and (reason := _runsc_skip_reason()):
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the gVisor tests: {reason}")
        pytest.skip(reason)
    lab = tmp_path_factory.mktemp(f"attack-{runtime}")
    config = attack_config(runtime)
    with LabRun(lab, config, agent="attacker") as run:
        yield Attacker(run, runtime)
    wait_for_removals()  # containers of the snapshots may still be going away on the session's threads
    SnapshotStore().gc(keep=[], name_prefix=run.lab_id)


@pytest.fixture
def attack(attacker) -> Attacker:
    """The module's attacker, with a working container of the base that no earlier attack has touched."""
    if attacker.run.workbench.is_dead() or attacker.session.calls_since_experiment:
        attacker.fresh_box()
    attacker.session.calls_since_experiment = 0
    return attacker


def ledger_rows(lab: Path) -> tuple[list[dict], list[dict]]:
    """(experiments, sessions) straight from a lab's ledger file, opened read-only, after SQLite's integrity
    check: what a killed or starved harness left on disk, not what a Ledger object would repair on open."""
    db = sqlite3.connect(f"file:{lab / 'ledger.db'}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        experiments = [dict(row) for row in db.execute("SELECT * FROM experiments ORDER BY id")]
        sessions = [dict(row) for row in db.execute("SELECT * FROM sessions ORDER BY started_at")]
    finally:
        db.close()
    return experiments, sessions


def reset_peak_memory() -> int:
    """Reset this process's peak RSS (VmHWM) to its current RSS; return that, in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS") * 1024


def peak_memory() -> int:
    return _status_kb("VmHWM") * 1024


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")
