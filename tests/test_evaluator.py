"""The evaluator against models written to beat it, run for real (driver here, workers as subprocesses).

Each cheat in tests/models is first shown to beat the evaluator labrat had before this work
(tests/legacy/evaluate_v1.py: the threat is real), then to be refused by trainer/evaluate.py with a
one-line reason. The same cheats go through the harness's own path in
tests/adversarial/test_metric_integrity.py.
"""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.legacy import evaluate_v1 as legacy
from trainer import contract, prepare
from trainer import evaluate as ev
from trainer import train as tr

ROOT = Path(__file__).parent.parent
MODELS = Path(__file__).parent / "models"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    prepare.prepare(out, "synthetic", seed=7, train_bytes=300_000, val_bytes=60_000)
    return out


@pytest.fixture(scope="module")
def val(data) -> np.ndarray:
    return prepare.load_tokens(data / "val.bin")


@pytest.fixture(scope="module")
def attainable(data) -> tuple[float, float]:
    return ev.attainable_for(prepare.load_meta(data), contract.EVAL_SEQ_LEN)


def checkpoint(tmp_path: Path, model: str, config: dict | None = None) -> Path:
    """A checkpoint as train.py writes one, with a test model's source in place of train.py's."""
    source = MODELS / f"{model}.py"
    module = {}
    exec(compile(source.read_text(), str(source), "exec"), module)
    state = module["build_model"](config or {}).state_dict()
    path = tmp_path / f"{model}.pt"
    torch.save({"source": source.read_text(), "source_name": source.name, "config": config or {}, "model": state}, path)
    return path


# ---- each cheat class: real against the old evaluator, refused by this one ---------------------------
@pytest.mark.parametrize("model, eval_tokens, reason", [
    ("replay", 4096, "looks ahead"),  # state between calls: replays its earlier answer to a probe
    ("extreme", 4096, "log-probabilities are not finite"),  # ±3e38: NaN differences read as no leak
    ("seeded", 4096, "looks ahead"),  # a predictable probe: honest exactly where it will be checked
    ("cross_row", 8192, "looks ahead"),  # reads the next row, whose first byte was its last target
])
def test_a_cheat_that_beat_the_old_evaluator_is_refused(model, eval_tokens, reason, val, tmp_path):
    ckpt = checkpoint(tmp_path, model)
    old = legacy.evaluate(ckpt, val, eval_tokens=eval_tokens)
    honest_uniform = 8.0  # each of these models knows nothing honestly: uniform over 256 bytes
    assert old["causal"] and old["val_bpb"] < honest_uniform - 0.05, old  # the old evaluator fell for it
    with pytest.raises(ev.EvaluationError, match=reason) as refused:
        ev.evaluate(ckpt, val, eval_tokens=eval_tokens)
    assert "\n" not in str(refused.value) and len(str(refused.value)) < 400


def test_a_model_that_knows_when_it_is_judged_is_still_caught(val, tmp_path):
    """The judge's inputs need not look like the scorer's: even a model told its role (honest whenever it is
    judged, cheating whenever it is scored) cannot match answers it gave with a token the judge never sends."""
    spawn = ev.local_worker()

    def told(role: str) -> ev.Channel:
        os.environ["LABRAT_TEST_ROLE"] = role  # inherited by the worker started now, nothing else reads it
        try:
            return spawn(role)
        finally:
            del os.environ["LABRAT_TEST_ROLE"]

    with pytest.raises(ev.EvaluationError, match="looks ahead"):
        ev.evaluate(checkpoint(tmp_path, "role_aware"), val, eval_tokens=4096, spawn=told)


def test_a_model_that_reads_the_held_out_file_is_refused_as_impossible(data, val, attainable, tmp_path):
    """Causal, so no causality check can see it; only its score gives it away: below what any model can attain."""
    ckpt = checkpoint(tmp_path, "peeker", {"val_path": str(data / "val.bin")})
    peeked = ev.evaluate(ckpt, val, eval_tokens=4096)  # no floor given: the threat is real
    assert peeked["causal"] and peeked["val_bpb"] < attainable[0] - 0.2
    with pytest.raises(ev.EvaluationError, match="impossible result refused: val_bpb .* below the attainable"):
        ev.evaluate(ckpt, val, eval_tokens=4096, attainable=attainable)


def test_the_strongest_honest_model_is_not_refused(data, val, attainable, tmp_path):
    """The Bayes-optimal predictor of the synthetic source scores at the attainable floor, within noise."""
    ckpt = checkpoint(tmp_path, "bayes", {"seed": prepare.load_meta(data)["seed"]})
    result = ev.evaluate(ckpt, val, eval_tokens=16_384, attainable=attainable)
    assert result["causal"] and result["causality_max_delta"] <= ev.CAUSALITY_TOLERANCE
    assert abs(result["val_bpb"] - attainable[0]) < 4 * np.hypot(result["val_bpb_se"], attainable[1]), result
    assert result["attainable_gap_bpb"] == pytest.approx(result["val_bpb"] - attainable[0])


# ---- the protocol: the model's own output and misbehaviour ----------------------------------------
@pytest.mark.parametrize("fault", ["print", "stderr_flood"])
def test_the_models_output_never_reaches_the_protocol(fault, val, tmp_path):
    result = ev.evaluate(checkpoint(tmp_path, "faults", {"fault": fault}), val, eval_tokens=4096)
    assert result["val_bpb"] == pytest.approx(8.0) and result["causal"]
    assert result["parameters"] == 1  # the checkpoint's one weight, counted before the model's code ran


@pytest.mark.parametrize("fault, reason", [
    ("dtype", "returned torch.int64 logits, expected a floating-point tensor"),
    ("shape", r"returned logits of shape \(32, 128, 255\), expected \(32, 128, 256\)"),
    ("not_tensor", "returned list, expected a tensor of logits"),
    ("exit", "the model crashed during evaluation: the model is leaving now"),
    ("hang", r"did not answer \(batch 1 of 1\) within 3 s"),
    ("channel", "was malformed .* it wrote to the evaluation's channel"),
    # It claims one weight (max_params) once its code runs: the worker's own count has gone out already.
    ("forge_count", r"answer to loading was malformed \(b'PARM'"),
])
def test_a_misbehaving_model_gets_one_line(fault, reason, val, tmp_path):
    with pytest.raises(ev.EvaluationError, match=reason) as refused:
        ev.evaluate(checkpoint(tmp_path, "faults", {"fault": fault}), val, eval_tokens=4096, answer_timeout=3)
    assert "\n" not in str(refused.value)


def test_non_finite_logits_are_refused(val, tmp_path):
    source = tmp_path / "nan.py"
    source.write_text("import torch\nclass M(torch.nn.Module):\n    def forward(self, idx):\n"
                      "        out = torch.zeros(*idx.shape, 256)\n        out[0, 3, 7] = float('nan')\n        return out\n"
                      "def build_model(config):\n    return M()\n")
    path = tmp_path / "nan.pt"
    torch.save({"source": source.read_text(), "config": {}, "model": {}}, path)
    with pytest.raises(ev.EvaluationError, match="non-finite logits"):
        ev.evaluate(path, val, eval_tokens=4096)


def test_an_oversized_or_missing_checkpoint_is_one_line(val, tmp_path):
    with pytest.raises(ev.EvaluationError, match="no usable checkpoint"):
        ev.evaluate(tmp_path / "absent.pt", val, eval_tokens=4096)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(ev.EvaluationError, match="could not be loaded"):
        ev.evaluate(garbage, val, eval_tokens=4096)


# ---- what the verdict covers ---------------------------------------------------------------------
def test_rows_are_disjoint_and_every_row_is_judged():
    plan = ev.Plan(n_tokens=60_000, eval_tokens=16_384, seq_len=128, batch_tokens=ev.BATCH_TOKENS, seed=5)
    rows = np.arange(plan.rows)
    inputs = plan.inputs(np.arange(60_000), rows)
    targets = plan.targets(np.arange(60_000), rows)
    assert not set(targets[:, -1].tolist()) & set(inputs.ravel().tolist())  # no row's last target is an input
    assert sorted(np.concatenate(plan.score_batches).tolist()) == rows.tolist()  # scored once each
    assert sorted(np.concatenate(plan.judge_batches).tolist()) == rows.tolist()  # judged once each
    assert plan.pool_start >= int(targets.max()) + 1  # what fills a cut row is never scored
    assert ((plan.cuts >= 1) & (plan.cuts <= 128)).all() and (plan.cuts == 128).any() and (plan.cuts < 128).any()


def test_draws_are_secret_per_evaluation_and_replayable(val, tmp_path):
    ckpt = checkpoint(tmp_path, "faults", {"fault": "none"})
    first, second = (ev.evaluate(ckpt, val, eval_tokens=4096) for _ in range(2))
    assert first["probe_seed"] != second["probe_seed"]
    again = ev.evaluate(ckpt, val, eval_tokens=4096, seed=int(first["probe_seed"], 16))
    drop = ("seconds", "phase_seconds")
    assert {k: v for k, v in again.items() if k not in drop} == {k: v for k, v in first.items() if k not in drop}


def test_the_shipped_train_py_scores_as_it_did_under_the_old_evaluator(data, val, tmp_path):
    """Positive control: a real trained model is causal here and its val_bpb is the old evaluator's within noise."""
    summary = tr.train(dict(tr.CONFIGS["cpu-tiny"]), prepare.load_tokens(data / "train.bin"), tmp_path, "cpu",
                       steps=150)
    assert summary["steps"] == 150
    new = ev.evaluate(tmp_path / "ckpt.pt", val, eval_tokens=32_768)
    old = legacy.evaluate(tmp_path / "ckpt.pt", val, eval_tokens=32_768)
    assert new["causal"] and new["causality_max_delta"] < 1e-4
    assert abs(new["val_bpb"] - old["val_bpb"]) < 4 * new["val_bpb_se"], (new, old)


def test_the_cli_prints_one_result_line(data, tmp_path):
    import subprocess

    ckpt = checkpoint(tmp_path, "faults", {"fault": "none"})
    done = subprocess.run([sys.executable, "-m", "trainer.evaluate", "--checkpoint", str(ckpt), "--data", str(data),
                           "--eval-tokens", "4096"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert '"val_bpb": 8.0' in done.stdout.strip().splitlines()[-1] and '"attainable_bpb"' in done.stdout
