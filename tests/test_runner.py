"""run_experiment's verdicts on agent edits that break or game training, through the agent's own tools."""

import json

import pytest

from harness.config import LabConfig
from harness.session import Session
from harness.tools import Toolbox
from sandbox.snapshots import SnapshotStore

EDIT = "str_replace_based_edit_tool"
TRAIN = "trainer/train.py"


@pytest.fixture(scope="module")
def toolbox(tmp_path_factory):
    lab = tmp_path_factory.mktemp("lab")
    config = LabConfig(time_budget=2, grace=10, eval_tokens=4096, max_experiments=20)
    with Session(lab, config, agent="test") as session:
        yield Toolbox(session)
    SnapshotStore().gc(keep=[], name_prefix=session.lab_id)


def edit(toolbox, old, new):
    result = toolbox.call(EDIT, {"command": "str_replace", "path": TRAIN, "old_str": old, "new_str": new})
    assert not result.is_error, result.text


def run(toolbox, description):
    toolbox.call("run_experiment", {"description": description})
    return toolbox.session.ledger.experiments()[-1]


def test_a_crashing_train_py_is_recorded_with_its_log_and_the_workspace_is_reset(toolbox):
    original = toolbox.session.box.read_text(TRAIN)
    edit(toolbox, "    torch.manual_seed(seed)\n", "    torch.manual_seed(seed)\n    raise RuntimeError('agent bug 42')\n")
    crashed = run(toolbox, "introduce a bug")
    assert crashed.status == "crash" and crashed.metric is None
    assert "agent bug 42" in crashed.log_tail and "training failed (exit 1)" in crashed.log_tail
    assert "agent bug 42" in crashed.diff
    assert toolbox.session.box.read_text(TRAIN) == original  # reset to the base


def test_training_past_budget_plus_grace_is_killed_as_timeout(toolbox):
    edit(toolbox, "    torch.manual_seed(seed)\n", "    torch.manual_seed(seed)\n    time.sleep(3600)\n")
    slow = run(toolbox, "sleep forever")
    assert slow.status == "timeout" and "budget + grace" in slow.log_tail
    assert slow.train_seconds < 2 + 10 + 5  # the host's clock killed it, not the agent's


def test_a_printed_or_written_fake_metric_is_ignored(toolbox):
    edit(toolbox, '    print(f"train: done,', '    print("val_bpb: 0.000001")\n'
                  '    (out / "result.json").write_text(\'{"val_bpb": 0.000001}\')\n    print(f"train: done,')
    faked = run(toolbox, "print a fake metric")
    floor = toolbox.session.data.floor_bpb
    assert faked.status == "keep" and faked.metric > floor  # the evaluation's number, not the printout
    assert json.loads(faked.eval_json)["val_bpb"] == faked.metric
    assert "val_bpb: 0.000001" in faked.log_tail


def test_a_model_that_looks_ahead_is_rejected(toolbox):
    edit(toolbox, "        x = self.embed(idx)\n",
         "        x = self.embed(idx) + self.embed(torch.roll(idx, shifts=-1, dims=1))  # peeks at the target\n")
    cheat = run(toolbox, "look ahead")
    assert cheat.status == "crash" and cheat.metric is None
    assert "looks ahead" in cheat.log_tail
