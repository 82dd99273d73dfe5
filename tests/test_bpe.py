"""The optional BPE tokenizer (trainer/prepare.py): trained on the training split, lossless, and an exact
bits-per-byte metric; the evaluator's cheats are refused on BPE data as on bytes (driver here, workers as
subprocesses; the lab's path through containers is tests/test_lifecycle.py's)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from trainer import contract, prepare
from trainer import evaluate as ev
from trainer import train as tr

MODELS = Path(__file__).parent / "models"
VOCAB = 1024
TEXT = ("Grüße aus Köln — naïve café, 東京 and emoji 🐀🧪; " * 40 + "plain ascii words follow here. " * 60) * 12


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bpe")
    prepare.prepare(out, "synthetic", seed=11, train_bytes=400_000, val_bytes=120_000, tokenizer="bpe",
                    vocab_size=VOCAB)
    return out


@pytest.fixture(scope="module")
def meta(data) -> dict:
    return prepare.load_meta(data)


@pytest.fixture(scope="module")
def val(data, meta) -> np.ndarray:
    return prepare.load_tokens(data / "val.bin", meta["val_sha256"], meta["token_dtype"])


def checkpoint(tmp_path: Path, model: str, config: dict) -> Path:
    source = (MODELS / f"{model}.py").read_text()
    module = {}
    exec(compile(source, model, "exec"), module)
    path = tmp_path / f"{model}.pt"
    torch.save({"source": source, "source_name": f"{model}.py", "config": config,
                "model": module["build_model"](config).state_dict()}, path)
    return path


def uniform(tmp_path: Path, vocab: int, max_rows: int = 1 << 30) -> Path:
    """A checkpoint of a model that predicts every id alike (and refuses calls of more than max_rows rows)."""
    source = ("import torch\nclass Uniform(torch.nn.Module):\n    def __init__(self, vocab, max_rows):\n"
              "        super().__init__()\n        self.vocab, self.max_rows = vocab, max_rows\n"
              "    def forward(self, idx):\n        if idx.shape[0] > self.max_rows:\n"
              "            raise ValueError(f'more than {self.max_rows} rows')\n"
              "        return torch.zeros(*idx.shape, self.vocab)\n"
              "def build_model(config):\n    return Uniform(config['vocab'], config['max_rows'])\n")
    path = tmp_path / f"uniform-{vocab}-{max_rows}.pt"
    torch.save({"source": source, "config": {"vocab": vocab, "max_rows": max_rows}, "model": {}}, path)
    return path


def test_the_tokenizer_is_lossless_and_its_byte_lengths_exact(tmp_path):
    corpus = tmp_path / "notes.txt"
    corpus.write_text(TEXT)
    meta = prepare.prepare(tmp_path / "out", str(corpus), tokenizer="bpe", vocab_size=600)
    assert meta["tokenizer"] == "bpe" and meta["token_dtype"] == "uint16" and 256 < meta["vocab_size"] <= 600
    tokenizer = Tokenizer.from_file(str(tmp_path / "out" / prepare.TOKENIZER_FILE))
    lengths = prepare.token_bytes_of(meta)
    raw = TEXT.encode()
    n_val = max(1, int(len(raw) * prepare.REAL_VAL_FRACTION))
    for name, expected in (("train", raw[:-n_val]), ("val", raw[-n_val:])):
        tokens = prepare.load_tokens(tmp_path / "out" / f"{name}.bin", meta[f"{name}_sha256"], "uint16")
        assert tokenizer.decode(tokens.tolist()).encode() == expected  # lossless, multi-byte characters included
        assert int(lengths[tokens].sum()) == len(expected) == meta[f"{name}_bytes"]
    assert len(tokens) < len(expected) / 2  # it merges: fewer tokens than bytes


def test_the_tokenizer_is_learnt_from_the_training_split_only(tmp_path):
    """Held-out text that the training split never shows costs bytes, not merges: nothing was learnt from it."""
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(b"alpha beta gamma delta " * 3000 + b"zyxwvq " * 200)  # the tail, 5 %, is held out
    meta = prepare.prepare(tmp_path / "out", str(corpus), tokenizer="bpe", vocab_size=400)
    tokenizer = Tokenizer.from_file(str(tmp_path / "out" / prepare.TOKENIZER_FILE))
    assert "zyxwvq" not in tokenizer.get_vocab() and "Ġgamma" in tokenizer.get_vocab()
    assert meta["val_tokens"] > meta["val_bytes"] / 3


def test_bad_bpe_input_is_one_line(tmp_path):
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9 ".encode("latin-1") * 2000)
    with pytest.raises(prepare.DataError, match=r"not UTF-8 text \(byte 3\): BPE needs text"):
        prepare.prepare(tmp_path / "out", str(binary), tokenizer="bpe", vocab_size=400)
    with pytest.raises(prepare.DataError, match="more than 256 and at most 65536"):
        prepare.prepare(tmp_path / "out", "synthetic", tokenizer="bpe", vocab_size=100_000)
    with pytest.raises(prepare.DataError, match="unknown tokenizer 'words'"):
        prepare.prepare(tmp_path / "out", "synthetic", tokenizer="words")


def test_bits_per_byte_is_token_bits_over_the_bytes_they_cover(meta, val, tmp_path):
    """A model uniform over the vocabulary spends log2(V) bits a token; per byte, that is divided by the bytes
    its targets cover, which the driver counts from meta.json (never from anything the model says)."""
    flat = ev.evaluate(uniform(tmp_path, meta["vocab_size"]), val, eval_tokens=4096, **ev.tokenization(meta))
    ratio = flat["tokens_evaluated"] / flat["bytes_evaluated"]
    assert flat["causal"] and 0.1 < ratio < 0.5  # synthetic words: a few bytes a token
    assert flat["val_bpb"] == pytest.approx(math.log2(meta["vocab_size"]) * ratio, rel=1e-6)  # float32 log-softmax
    as_bytes = ev.evaluate(uniform(tmp_path, meta["vocab_size"]), val, eval_tokens=4096, vocab_size=meta["vocab_size"])
    assert as_bytes["val_bpb"] == pytest.approx(math.log2(meta["vocab_size"]), rel=1e-6)  # what ignoring lengths gives


def test_a_model_with_the_byte_vocabulary_is_refused_in_a_bpe_lab(meta, val, tmp_path):
    with pytest.raises(ev.EvaluationError, match=rf"returned logits of shape .*256\), expected .*{meta['vocab_size']}\)"):
        ev.evaluate(uniform(tmp_path, contract.VOCAB_SIZE), val, eval_tokens=4096, **ev.tokenization(meta))


@pytest.mark.parametrize("model", ["lookahead", "replay", "cross_row"])
def test_the_cheats_are_refused_on_bpe_tokens(model, meta, val, tmp_path):
    with pytest.raises(ev.EvaluationError, match="looks ahead"):
        ev.evaluate(checkpoint(tmp_path, model, {"vocab": meta["vocab_size"]}), val, eval_tokens=8192,
                    **ev.tokenization(meta), attainable=ev.attainable_for(meta, contract.EVAL_SEQ_LEN))


def test_a_large_vocabulary_gets_fewer_rows_per_answer(meta, val, tmp_path, monkeypatch):
    """Answers stay within ANSWER_LIMIT: under a limit of one row's logits, every call gets one row."""
    one_row = uniform(tmp_path, meta["vocab_size"], max_rows=1)
    with pytest.raises(ev.EvaluationError, match="more than 1 rows"):
        ev.evaluate(one_row, val, eval_tokens=4096, **ev.tokenization(meta))
    monkeypatch.setattr(ev, "ANSWER_LIMIT", contract.EVAL_SEQ_LEN * meta["vocab_size"] * 4)
    result = ev.evaluate(one_row, val, eval_tokens=4096, **ev.tokenization(meta))
    assert result["rows"] == 32 and result["causal"]


def test_train_py_learns_bpe_tokens_and_stays_above_the_floor(data, meta, val, tmp_path):
    cfg = dict(tr.CONFIGS["cpu-tiny"], vocab_size=meta["vocab_size"])
    tokens = prepare.load_tokens(data / "train.bin", meta["train_sha256"], meta["token_dtype"])
    summary = tr.train(cfg, tokens, tmp_path, "cpu", steps=40, deterministic=True)
    assert summary["steps"] == 40
    result = ev.evaluate(tmp_path / "ckpt.pt", val, eval_tokens=8192, **ev.tokenization(meta),
                         attainable=ev.attainable_for(meta, contract.EVAL_SEQ_LEN))
    assert result["causal"]
    assert meta["floor_bpb"] < result["val_bpb"] < meta["unigram_bpb"]  # it learnt, and nothing impossible
    assert result["attainable_bpb"] == meta["floor_bpb"] and result["attainable_bpb_se"] == 0.0
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 40


def test_a_parquet_shard_gets_bpe_tokens_too(tmp_path):
    import pyarrow as pa  # a test dependency (`make setup` installs it)
    import pyarrow.parquet as pq

    documents = [f"document {i}: {TEXT[i % 50 : i % 50 + 400]}" for i in range(60)]
    pq.write_table(pa.table({"text": documents}), tmp_path / "shard.parquet")
    meta = prepare.prepare(tmp_path / "out", str(tmp_path / "shard.parquet"), tokenizer="bpe", vocab_size=500)
    raw = "\n".join(documents).encode()
    assert meta["train_bytes"] + meta["val_bytes"] == len(raw)
    tokenizer = Tokenizer.from_file(str(tmp_path / "out" / prepare.TOKENIZER_FILE))
    val = prepare.load_tokens(tmp_path / "out" / "val.bin", meta["val_sha256"], "uint16")
    assert tokenizer.decode(val.tolist()).encode() == raw[meta["train_bytes"]:]
