"""The training core, run for real on the CPU: data, learning, exact evaluation, causality, determinism."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer import contract, prepare, synthetic
from trainer import evaluate as ev
from trainer import train as tr

ROOT = Path(__file__).parent.parent
MODELS = Path(__file__).parent / "models"
TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32, "seq_len": 16, "mlp_ratio": 2}  # train.py's model, small


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    prepare.prepare(out, "synthetic", seed=7, train_bytes=1_000_000, val_bytes=200_000)
    return out


def _checkpoint(path: Path, model_file: Path, config: dict, state: dict | None = None) -> Path:
    torch.save({"source": model_file.read_text(), "source_name": model_file.name, "config": config,
                "model": state or {}}, path)
    return path


def test_synthetic_source_is_deterministic_and_has_a_floor(tmp_path):
    a = prepare.prepare(tmp_path / "a", seed=3, train_bytes=50_000, val_bytes=10_000)
    b = prepare.prepare(tmp_path / "b", seed=3, train_bytes=50_000, val_bytes=10_000)
    c = prepare.prepare(tmp_path / "c", seed=4, train_bytes=50_000, val_bytes=10_000)
    assert a["train_sha256"] == b["train_sha256"] and a["val_sha256"] == b["val_sha256"]
    assert a["train_sha256"] != c["train_sha256"]
    assert a["train_sha256"] != a["val_sha256"]
    assert 0 < a["floor_bpb"] < a["unigram_bpb"] < 8
    text = (tmp_path / "a" / "train.bin").read_bytes()
    assert set(text) <= set(b"abcdefghijklmnopqrstuvwxyz ")


def test_evaluation_is_exact_on_the_true_distribution(data, tmp_path):
    """The oracle scores what a direct computation of the true log-probabilities says, and nears the floor."""
    meta = prepare.load_meta(data)
    source = synthetic.MarkovWordSource.from_seed(meta["seed"])
    config = {"words": [w.decode() for w in source.words], "transition": source.transition.tolist(),
              "stationary": source.stationary.tolist()}
    ckpt = _checkpoint(tmp_path / "oracle.pt", MODELS / "oracle.py", config)
    val = prepare.load_tokens(data / "val.bin")
    seq_len, n_tokens = 4096, 65_536
    result = ev.evaluate(ckpt, val, eval_tokens=n_tokens, seq_len=seq_len, batch_tokens=2 * seq_len)
    # Direct: run the same oracle in-process on the same rows (disjoint windows of seq_len + 1), in float64.
    oracle = contract.load_model(ckpt)
    windows = n_tokens // seq_len
    rows = np.asarray(val[: windows * (seq_len + 1)], dtype=np.int64).reshape(windows, seq_len + 1)
    x, y = torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:])
    log_p = torch.log_softmax(oracle(x).double(), -1).gather(-1, y.unsqueeze(-1))
    direct = float(-log_p.sum() / np.log(2) / y.numel())
    assert result["tokens_evaluated"] == n_tokens
    assert result["val_bpb"] == pytest.approx(direct, rel=1e-5)
    assert result["causal"]
    # Long windows leave only the few resynchronising bytes per window above the floor.
    assert meta["floor_bpb"] <= result["val_bpb"] < meta["floor_bpb"] * 1.06
    assert result["val_bpb"] < meta["unigram_bpb"] / 4


def test_a_look_ahead_model_is_rejected(data, tmp_path):
    ckpt = _checkpoint(tmp_path / "cheat.pt", MODELS / "lookahead.py", {})
    with pytest.raises(ev.EvaluationError, match="looks ahead"):
        ev.evaluate(ckpt, prepare.load_tokens(data / "val.bin"), eval_tokens=8192)


def test_a_crashing_model_is_reported_not_raised_through(data, tmp_path):
    ckpt = _checkpoint(tmp_path / "broken.pt", MODELS / "crashing.py", {})
    with pytest.raises(ev.EvaluationError, match="kaboom in forward"):
        ev.evaluate(ckpt, prepare.load_tokens(data / "val.bin"), eval_tokens=4096)


def test_tiny_run_learns_below_the_unigram_baseline(data, tmp_path):
    # A fixed number of steps, not seconds: on a loaded machine a time budget buys fewer steps.
    cfg = dict(tr.CONFIGS["cpu-tiny"])
    summary = tr.train(cfg, prepare.load_tokens(data / "train.bin"), tmp_path, "cpu", steps=200)
    assert summary["steps"] > 5 and summary["tokens_per_s"] > 0 and summary["peak_memory_bytes"] > 0
    result = ev.evaluate(tmp_path / "ckpt.pt", prepare.load_tokens(data / "val.bin"), eval_tokens=32_768)
    meta = prepare.load_meta(data)
    assert result["causal"]
    assert result["val_bpb"] < meta["unigram_bpb"] - 0.5, (result, meta["unigram_bpb"])


def test_deterministic_mode_is_bit_identical(data, tmp_path):
    results = []
    for run in ("a", "b"):
        out = tmp_path / run
        done = subprocess.run(
            [sys.executable, "-m", "trainer.train", "--config", "cpu-tiny", "--data", str(data), "--out", str(out),
             "--deterministic", "--steps", "8"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        state = torch.load(out / "ckpt.pt", weights_only=True)["model"]
        digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in state.values())).hexdigest()
        metric = ev.evaluate(out / "ckpt.pt", prepare.load_tokens(data / "val.bin"), eval_tokens=8192)["val_bpb"]
        results.append((digest, metric, json.loads((out / "summary.json").read_text())["final_train_loss"]))
    assert results[0] == results[1]


def test_the_model_is_causal_by_construction():
    model = tr.build_model(dict(TINY)).eval()
    torch.manual_seed(0)
    for p in model.parameters():  # the shipped init zeroes the head and the residual projections
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randint(0, 256, (2, 16))
    y = x.clone()
    y[:, 9:] = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(x)[:, :9], model(y)[:, :9])
        assert not torch.equal(model(x)[:, 9:], model(y)[:, 9:])


# ---- the contract between train.py and the evaluator ---------------------------------------------
@pytest.mark.parametrize("shape", [(128, 384), (512, 128)])  # wide and tall: the iteration runs on the short side
def test_train_pys_muon_is_torchs_rule_in_float32(shape):
    """train.py carries its own Muon because torch.optim.Muon orthogonalizes in bfloat16 even on a CPU (slow
    there); the rule must stay torch's, so after a few steps the two differ only by bfloat16 rounding."""
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(shape))
    reference = torch.nn.Parameter(ours.detach().clone())
    steppers = (tr.Muon([ours], lr=0.02),
                torch.optim.Muon([reference], lr=0.02, momentum=tr.MUON_MOMENTUM, weight_decay=0.0,
                                 adjust_lr_fn="original"))
    start = ours.detach().clone()
    for _ in range(3):
        grad = torch.randn(shape)
        ours.grad, reference.grad = grad.clone(), grad.clone()
        for stepper in steppers:
            stepper.step()
    moved = (reference - start).abs().max().item()
    assert moved > 0.001  # the comparison means something: both moved
    assert (ours - reference).abs().max().item() < 0.02 * moved
    assert tr.orthogonalize(torch.randn(shape)).dtype == torch.float32


def test_a_checkpoint_saved_by_the_contract_loads_as_the_same_model(tmp_path):
    model = tr.build_model(dict(TINY)).eval()
    path = contract.save_checkpoint(tmp_path / "out", model, dict(TINY), source_file=ROOT / "trainer" / "train.py")
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pt"]
    state = torch.load(path, weights_only=True)
    assert set(state) == {"source", "source_name", "config", "model"} and state["source_name"] == "train.py"
    x = torch.randint(0, contract.VOCAB_SIZE, (2, contract.EVAL_SEQ_LENS["gpu"]))  # longer than it trained at
    with torch.no_grad():
        assert torch.equal(contract.load_model(path)(x), model(x))


class Unsaveable:
    def __reduce__(self):
        raise RuntimeError("cannot be saved")


def test_a_save_that_fails_leaves_no_checkpoint(tmp_path):
    with pytest.raises(RuntimeError, match="cannot be saved"):  # after torch.save has created its file
        contract.save_checkpoint(tmp_path, tr.build_model(dict(TINY)), {"config": Unsaveable()},
                                 source_file=ROOT / "trainer" / "train.py")
    assert not (tmp_path / contract.CHECKPOINT_FILE).exists()


def test_the_checkpoints_source_runs_as_an_ordinary_module(tmp_path):
    """nanoGPT's style, a dataclass config under `from __future__ import annotations`, needs the module to be
    registered by name, as an import would; a source without the entry point says so."""
    source = tmp_path / "dataclass_train.py"
    source.write_text("from __future__ import annotations\nfrom dataclasses import dataclass\nimport torch\n\n"
                      "@dataclass\nclass Config:\n    width: int = 3\n\n"
                      "def build_model(config):\n    return torch.nn.Linear(Config(**config).width, 1)\n")
    path = _checkpoint(tmp_path / "dc.pt", source, {"width": 5}, torch.nn.Linear(5, 1).state_dict())
    assert contract.load_model(path).in_features == 5
    (tmp_path / "no_entry.py").write_text("import torch\n")
    with pytest.raises(TypeError, match="no_entry.py defines no build_model"):
        contract.load_model(_checkpoint(tmp_path / "none.pt", tmp_path / "no_entry.py", {}))


def test_the_host_side_imports_no_torch():
    """The evaluation driver and what the harness imports from trainer/ run in the harness's process: numpy only."""
    probe = ("import sys, harness.runner, trainer.contract, trainer.evaluate, trainer.prepare\n"
             "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


# ---- bad data: one clear error naming the file --------------------------------------------------
def test_missing_and_corrupt_data(tmp_path, data):
    with pytest.raises(prepare.DataError, match="not found: .*nope.bin"):
        prepare.load_tokens(tmp_path / "nope.bin")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(prepare.DataError, match="empty: .*empty.bin"):
        prepare.load_tokens(tmp_path / "empty.bin")
    altered = tmp_path / "val.bin"
    altered.write_bytes((data / "val.bin").read_bytes()[:-1] + b"!")
    with pytest.raises(prepare.DataError, match="does not match its checksum"):
        prepare.load_tokens(altered, prepare.load_meta(data)["val_sha256"])
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(prepare.DataError, match="meta.json is corrupt"):
        prepare.load_meta(tmp_path)


def test_local_text_data(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("hello world. " * 200)
    (corpus / "b.md").write_text("# notes\n" * 100)
    (corpus / "skip.bin").write_bytes(b"\x00\x01")
    meta = prepare.prepare(tmp_path / "out", str(corpus))
    assert meta["floor_bpb"] is None and meta["train_tokens"] + meta["val_tokens"] > 3000
    (corpus / "c.txt").write_bytes(b"text\x00with nul")
    with pytest.raises(prepare.DataError, match="c.txt looks binary"):
        prepare.prepare(tmp_path / "out2", str(corpus))
    with pytest.raises(prepare.DataError, match="not found: .*missing-dir"):
        prepare.prepare(tmp_path / "out3", str(tmp_path / "missing-dir"))


def test_train_cli_errors_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "trainer.train", "--data", str(tmp_path), "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "train.bin is missing" in done.stderr
    done = subprocess.run([sys.executable, "-m", "trainer.prepare", "--out", str(tmp_path / "o"), "--data",
                           str(tmp_path / "absent")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "prepare: error: data path not found" in done.stderr
