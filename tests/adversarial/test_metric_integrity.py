"""Beating the metric through the agent's own tools: train.py's model is one of tests/models' cheats, and
run_experiment trains, streams and evaluates it in real containers (runc and gVisor). Each must end as a
crash with one line that names the cheat, and be kept never; the evaluator-level versions of these
attacks (and their success against the old evaluator) are in tests/test_evaluator.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.config import LabConfig
from harness.run import LabRun
from sandbox.sandbox import wait_for_removals
from sandbox.snapshots import SnapshotStore
from tests.adversarial.conftest import Attacker, peak_memory, reset_peak_memory
from trainer import contract
from trainer import evaluate as ev

MODELS = Path(__file__).resolve().parents[1] / "models"
MAIN = 'if __name__ == "__main__":'
MB = 1024 * 1024
CHECKPOINT_RSS_LIMIT = 64 * MB  # what streaming any checkpoint may add to the harness's peak memory


def plant(attack: Attacker, model: str, config: dict | None = None) -> None:
    """Make train.py's model the named cheat: its build_model replaces train.py's (the evaluator rebuilds
    the model through it), and training stops at once (the cheat has nothing to learn)."""
    source = (MODELS / f"{model}.py").read_text()
    if config is not None:
        source += f"\n_build_cheat = build_model\n\n\ndef build_model(_config):\n    return _build_cheat({config!r})\n"
    attack.patch_train(MAIN, f"{source}\nSAVE_RESERVE_SECONDS = 1e9  # no training: save at once\n\n\n{MAIN}")


@pytest.mark.parametrize("model, reason", [
    ("replay", "looks ahead"),
    ("extreme", "log-probabilities are not finite"),
    ("seeded", "looks ahead"),
    ("cross_row", "looks ahead"),
    ("lookahead", "looks ahead"),
])
def test_a_cheating_model_is_a_crash_with_its_reason(attack: Attacker, model, reason):
    plant(attack, model)
    cheat = attack.run_experiment(f"the {model} model")
    assert cheat.status == "crash" and cheat.metric is None, cheat.log_tail
    first = cheat.log_tail.splitlines()[0]
    assert first.startswith("evaluation: ") and reason in first, cheat.log_tail
    assert attack.session.ledger.best() is None or attack.session.ledger.best().id != cheat.id


def test_the_shipped_train_py_is_still_kept_and_causal(attack: Attacker):
    honest = attack.run_experiment("the shipped train.py")
    result = json.loads(honest.eval_json)
    assert honest.status in ("keep", "discard") and honest.metric == result["val_bpb"]
    assert result["causal"] and result["causality_max_delta"] <= ev.CAUSALITY_TOLERANCE
    assert result["causality_positions_checked"] > 0 and result["val_bpb_se"] > 0
    assert result["attainable_bpb"] < honest.metric < 8.5  # above what any model attains, and it learned a bit
    assert len(result["probe_seed"]) == 16


def test_an_impossible_result_is_refused_and_never_kept(attack: Attacker):
    """The wiring of the floor check: a lab whose data claim an attainable floor far above what even the shipped
    model reaches (here by rewriting the session's copy of the data's meta) refuses its result."""
    meta = attack.run.data.meta
    saved = meta.get("attainable_bpb")
    meta["attainable_bpb"] = {str(contract.EVAL_SEQ_LEN): [20.0, 0.0]}
    try:
        refused = attack.run_experiment("below a floor of 20 bpb")
    finally:
        meta["attainable_bpb"] = saved
    assert refused.status == "crash" and refused.metric is None
    assert "impossible result refused" in refused.log_tail.splitlines()[0], refused.log_tail


@pytest.mark.parametrize("fault, reason", [
    ("exit", "the model crashed during evaluation: the model is leaving now"),
    ("channel", "it wrote to the evaluation's channel"),
    ("dtype", "expected a floating-point tensor"),
    ("hang", "did not answer (batch 1 of 1) within the evaluation's time limit"),
])
def test_a_model_that_breaks_the_protocol_gets_one_line(attack: Attacker, fault, reason):
    plant(attack, "faults", {"fault": fault})
    broken = attack.run_experiment(f"protocol fault: {fault}")
    assert broken.status == "crash", broken.log_tail
    assert reason in broken.log_tail.splitlines()[0], broken.log_tail


def test_a_model_that_prints_and_floods_stderr_is_evaluated_normally(attack: Attacker):
    plant(attack, "faults", {"fault": "stderr_flood"})
    flooded = attack.run_experiment("10 MB of stderr per forward pass")
    assert flooded.metric == pytest.approx(8.0), flooded.log_tail  # uniform, as its logits say
    plant(attack, "faults", {"fault": "print"})
    printed = attack.run_experiment("print() in forward")
    assert printed.metric == pytest.approx(8.0), printed.log_tail


def test_stretching_the_time_budget_ends_as_timeout(attack: Attacker):
    """train.py gives itself 3x the deadline it was told: the host kills it at the real one. (The kill itself
    takes a few seconds on a loaded machine, under gVisor more: the bound is the time it wanted, halved.)"""
    attack.patch_train("    deadline = time.time() + cfg[\"time_budget\"] if deadline is None else deadline\n",
                       "    deadline = time.time() + cfg[\"time_budget\"] if deadline is None else deadline\n"
                       "    deadline = time.time() + 3 * (deadline - time.time())  # more time than anyone else\n")
    stretched = attack.run_experiment("a longer budget for me")
    config = attack.session.config
    assert stretched.status == "timeout" and "all-in, host clock" in stretched.log_tail, stretched.log_tail
    assert config.time_budget <= stretched.train_seconds < 2 * config.time_budget


def test_weights_made_outside_the_budget_never_reach_training(attack: Attacker):
    """The cheapest way past any budget: train for as long as you like in the working container (bash sees
    the training split), leave the weights in the workspace or the home directory, and have train.py start
    from them. Training receives train.py alone, in a fresh container of the image."""
    stash = attack.bash("python -c \"import torch; torch.save({'w': torch.ones(4)}, '/workspace/weights.pt')\" && "
                        "cp /workspace/weights.pt ~/weights.pt && ls /workspace ~ && ls /data")
    assert not stash.is_error and stash.text.count("weights.pt") == 2 and "train.bin" in stash.text, stash.text
    attack.patch_train("    torch.manual_seed(seed)\n", "    torch.manual_seed(seed)\n    import glob\n"
                       "    print('smuggled:', glob.glob('/workspace/**/*.pt', recursive=True) + glob.glob(os.path.expanduser"
                       "('~/*.pt')), 'workspace:', sorted(os.listdir('/workspace')), flush=True)\n")
    warm = attack.run_experiment("warm start from weights trained outside the budget")
    assert "smuggled: [] workspace: ['trainer']" in warm.log_tail, warm.log_tail
    assert warm.metric is not None  # it trained, from scratch, like everyone else


def test_a_train_py_over_the_source_limit_is_not_trained(attack: Attacker):
    """Weights can ride inside the source too; the source is capped, so what a run brings from outside its
    budget is at most that many bytes."""
    attack.patch_train(MAIN, f"WEIGHTS = '{'A' * contract.TRAIN_SOURCE_LIMIT}'\n\n\n{MAIN}")
    heavy = attack.run_experiment("weights inside the source")
    assert heavy.status == "crash" and heavy.metric is None
    assert f"nothing to train: /workspace/{contract.TRAIN_SOURCE} is" in heavy.log_tail, heavy.log_tail
    assert f"at most {contract.TRAIN_SOURCE_LIMIT} bytes" in heavy.log_tail


def test_a_sparse_checkpoint_at_the_size_limit_streams_in_bounded_memory(tmp_path):
    """A 2 GiB sparse ckpt.pt costs the training container no disk; it must not cost the harness 2 GiB of
    memory on its way to the evaluation either (runc only: the measure is this process's peak RSS)."""
    config = LabConfig(time_budget=20, eval_tokens=4096, max_experiments=10, max_tool_calls=100, disk_gb=3)
    with LabRun(tmp_path / "lab", config, agent="attacker") as run:
        attack = Attacker(run, "runc")
        saved = "    save_checkpoint(out, model, model_cfg, source_file=__file__)\n"
        attack.patch_train(saved, f"{saved}    os.truncate(out / \"ckpt.pt\", {contract.CHECKPOINT_LIMIT})\n")
        before = reset_peak_memory()
        sparse = attack.run_experiment("a 2 GiB sparse checkpoint")
        grown = peak_memory() - before
    wait_for_removals()
    SnapshotStore().gc(keep=[], name_prefix=run.lab_id)
    assert sparse.status == "crash" and "could not be loaded" in sparse.log_tail.splitlines()[0], sparse.log_tail
    assert grown <= CHECKPOINT_RSS_LIMIT, f"the harness's peak RSS grew by {grown / MB:.0f} MiB"
