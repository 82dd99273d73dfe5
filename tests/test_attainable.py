"""The attainable floor: the synthetic source's Bayes-optimal predictor, exact and consistent (fast, no Docker).

A window of the evaluation starts at an arbitrary byte, so even the best model first has to find the
word boundaries: its expected score per context length, meta.json's attainable_bpb, lies above the
entropy floor. Here: the forward filter against brute-force enumeration on a tiny source, its two
consumers (the per-byte distributions a model returns, the per-window score) against each other, the
shortcut attainable_bpb takes against whole windows, and its place between floor_bpb and the oracle.
"""

import collections
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer import contract, prepare, synthetic

MODELS = Path(__file__).parent / "models"
SEED = 1337  # prepare()'s default source, the one the design doc's reference numbers are for
ORACLE_128, ORACLE_2048 = 0.678, 0.4685  # the design doc's oracle-style scores (uniform until the first space)


@pytest.fixture(scope="module")
def source() -> synthetic.MarkovWordSource:
    return synthetic.MarkovWordSource.from_seed(SEED)


def _tiny_source() -> synthetic.MarkovWordSource:
    """Words that are prefixes and suffixes of each other, and a transition with impossible pairs."""
    words = [b"a", b"ab", b"b", b"bba"]
    rng = np.random.default_rng(0)
    transition = rng.dirichlet(np.full(len(words), 0.7), size=len(words))
    transition[0, 0] = transition[2, 1] = 0.0
    transition /= transition.sum(axis=1, keepdims=True)
    stationary = np.full(len(words), 1.0 / len(words))
    for _ in range(1000):
        stationary = stationary @ transition
    return synthetic.MarkovWordSource(words, transition, stationary / stationary.sum())


def _window_prefix_probs(source: synthetic.MarkovWordSource, length: int) -> dict[bytes, float]:
    """P(a window's first n bytes = s) for every s and n <= length, by enumerating every word sequence from
    every (word, position) a window can start at, weighted by the size-biased stationary law."""
    words, pi, transition = source.words, source.stationary, source.transition
    norm = sum(pi[i] * (len(w) + 1) for i, w in enumerate(words))
    full: dict[bytes, float] = collections.defaultdict(float)

    def extend(text: bytes, p: float, last: int) -> None:
        if len(text) >= length:
            full[text[:length]] += p
            return
        for nxt, word in enumerate(words):
            if transition[last, nxt] > 0:
                extend(text + word + b" ", p * transition[last, nxt], nxt)

    for i, word in enumerate(words):
        for k in range(len(word) + 1):
            extend((word + b" ")[k:], pi[i] / norm, i)
    prefixes: dict[bytes, float] = collections.defaultdict(float)
    for text, p in full.items():
        for n in range(length + 1):
            prefixes[text[:n]] += p
    return prefixes


def _score_bpb(log_probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-window bits per byte of (N, L, 256) log-probabilities on (N, L) targets, as the evaluator scores."""
    log_probs = torch.log_softmax(torch.as_tensor(log_probs, dtype=torch.float64), dim=-1)
    picked = log_probs.gather(-1, torch.as_tensor(targets, dtype=torch.int64).unsqueeze(-1))[..., 0]
    return (-picked.mean(dim=1) / np.log(2)).numpy()


def test_the_filter_is_exact_on_a_tiny_source():
    """Every possible window of 9 bytes: the predicted distributions equal brute-force conditionals."""
    tiny = _tiny_source()
    length = 8
    prefixes = _window_prefix_probs(tiny, length + 1)
    windows = sorted(s for s in prefixes if len(s) == length + 1)
    inputs = np.array([list(s[:length]) for s in windows], dtype=np.uint8)
    predicted = np.exp(tiny.next_byte_log_probs(inputs).astype(np.float64))
    expected = np.zeros_like(predicted)
    for n, s in enumerate(windows):
        for t in range(length):
            context = s[: t + 1]
            for byte in b"ab ":
                expected[n, t, byte] = prefixes.get(context + bytes([byte]), 0.0) / prefixes[context]
    assert len(windows) > 100
    np.testing.assert_allclose(predicted, expected, atol=1e-6)
    # The per-window score consumer of the same filter gets the same numbers.
    bits = -np.log2([prefixes[s] / prefixes[s[:1]] for s in windows]) / length
    np.testing.assert_allclose(tiny.window_bpb(np.array([list(s) for s in windows])), bits, rtol=1e-9)


def test_impossible_bytes_restart_the_filter_without_nan():
    """A byte the source cannot produce there: finite log-probabilities, and the next prediction is that of
    a window starting at the following byte (brute force again, restarted after each impossible byte)."""
    tiny = _tiny_source()
    # No word has x, y, z, "aa", "ba" after a space, "  " or "bab"; "a a" is possible ("bba a").
    rows = [b"xyzab ba", b"aaab ab ", b"ab  bba ", b"bbab a b", b"a a ab b"]
    prefixes = _window_prefix_probs(tiny, len(rows[0]) + 1)
    log_probs = tiny.next_byte_log_probs(np.array([list(r) for r in rows], dtype=np.uint8))
    assert np.isfinite(log_probs).all()
    restarts = []
    for n, row in enumerate(rows):
        begin = 0  # where the window the filter is following began
        for t in range(len(row)):
            context = row[begin : t + 1]
            if prefixes.get(context, 0.0) == 0.0:
                context, begin = b"", t + 1
                restarts.append((n, t))
            expected = np.zeros(256)
            for byte in b"ab ":
                expected[byte] = prefixes.get(context + bytes([byte]), 0.0) / prefixes[context]
            np.testing.assert_allclose(np.exp(log_probs[n, t].astype(np.float64)), expected, atol=1e-6)
    assert restarts == [(0, 0), (0, 1), (0, 2), (0, 7), (1, 1), (2, 3), (3, 3)]
    assert log_probs.min() == pytest.approx(np.log(synthetic.EPSILON), abs=1e-3)


def test_distributions_are_normalised_and_causal(source):
    rng = np.random.default_rng(1)
    inputs = source.sample_windows(96, 6, seed=5)[:, :-1]
    inputs[5] = rng.integers(0, 256, size=96)  # arbitrary bytes, mostly impossible
    log_probs = source.next_byte_log_probs(inputs)
    assert log_probs.shape == (6, 96, 256) and log_probs.dtype == np.float32 and np.isfinite(log_probs).all()
    np.testing.assert_allclose(torch.logsumexp(torch.from_numpy(log_probs).double(), -1).numpy(), 0.0, atol=1e-5)
    for cut in (0, 7, 50):
        changed = inputs.copy()
        changed[:, cut + 1 :] = rng.integers(97, 123, size=(6, 95 - cut))
        again = source.next_byte_log_probs(changed)
        np.testing.assert_allclose(again[:, : cut + 1], log_probs[:, : cut + 1], atol=1e-6)
        assert not np.allclose(again[:, cut + 1 :], log_probs[:, cut + 1 :], atol=1e-3)


def test_window_score_is_the_models_score_and_beats_the_oracle(source, tmp_path):
    """On the same windows: window_bpb is what next_byte_log_probs scores, and below the oracle's score."""
    windows = source.sample_windows(128, 16, seed=11)
    bayes = _score_bpb(source.next_byte_log_probs(windows[:, :-1]), windows[:, 1:])
    np.testing.assert_allclose(source.window_bpb(windows), bayes, rtol=1e-5)
    oracle_ckpt = {"source": (MODELS / "oracle.py").read_text(), "source_name": "oracle.py", "model": {},
                   "config": {"words": [w.decode() for w in source.words], "transition": source.transition.tolist(),
                              "stationary": source.stationary.tolist()}}
    oracle = _load(tmp_path / "oracle.pt", oracle_ckpt)
    with torch.no_grad():
        oracle_bpb = _score_bpb(oracle(torch.from_numpy(windows[:, :-1].astype(np.int64))).numpy(), windows[:, 1:])
    assert bayes.mean() < oracle_bpb.mean() - 0.05
    assert (bayes <= oracle_bpb + 1e-3).mean() > 0.8


def test_after_the_sync_horizon_the_window_knows_the_whole_past(source):
    """The shortcut attainable_bpb takes: from prediction sync_horizon on, a window's predictions equal the
    ones made with a long context before it; before, they differ."""
    burn_in, length = 40, 64
    stream = source.sample(20_000, seed=21)
    starts = np.random.default_rng(2).integers(burn_in, len(stream) - length, size=12)
    long = source.next_byte_log_probs(stream[starts[:, None] + np.arange(-burn_in, length)])[:, burn_in:]
    short = source.next_byte_log_probs(stream[starts[:, None] + np.arange(length)])
    horizon = source.sync_horizon
    assert horizon == 17
    np.testing.assert_allclose(short[:, horizon:], long[:, horizon:], atol=1e-5)
    assert not np.allclose(short[:, 0], long[:, 0], atol=1e-3)


@pytest.mark.parametrize("seq_len, windows", [(128, 384), (2048, 24)])
def test_attainable_bpb_matches_whole_windows(source, seq_len, windows):
    """attainable_bpb's estimate agrees with the Bayes score of whole windows, within their standard errors."""
    mean, se = source.attainable_bpb(seq_len, 4096, seed=31)
    whole = source.window_bpb(source.sample_windows(seq_len, windows, seed=32))
    whole_se = whole.std(ddof=1) / np.sqrt(windows)
    assert abs(whole.mean() - mean) < 4 * np.hypot(se, whole_se)
    assert 0 < se < whole_se / 3  # the shortcut is also the more precise estimate


def test_attainable_lies_between_the_floor_and_the_oracle(source):
    """Above the entropy floor by a fixed number of bits per window, below the design doc's oracle scores."""
    floor = source.floor_bpb
    assert floor == pytest.approx(0.4615, abs=1e-4)
    mean_128, se_128 = source.attainable_bpb(128, 4096, seed=SEED + 3)
    mean_2048, se_2048 = source.attainable_bpb(2048, 4096, seed=SEED + 3)
    assert floor + 10 * se_128 < mean_128 < ORACLE_128
    assert floor + 10 * se_2048 < mean_2048 < ORACLE_2048
    # The same windows' excess bits, spread over 16 times as many bytes.
    assert (mean_2048 - floor) * 2048 == pytest.approx((mean_128 - floor) * 128, rel=1e-9)
    assert se_2048 * 2048 == pytest.approx(se_128 * 128, rel=1e-9)


def test_prepare_writes_the_attainable_floor(tmp_path):
    meta = prepare.prepare(tmp_path / "synth", seed=3, train_bytes=50_000, val_bytes=10_000)
    assert meta == json.loads((tmp_path / "synth" / "meta.json").read_text())
    attainable = meta["attainable_bpb"]
    assert set(attainable) == {str(n) for n in prepare.ATTAINABLE_SEQ_LENS} == {"128", "2048"}
    (mean_128, se_128), (mean_2048, se_2048) = attainable["128"], attainable["2048"]
    assert meta["floor_bpb"] < mean_2048 - 3 * se_2048 < mean_2048 < mean_128 < meta["unigram_bpb"]
    assert 0 < se_2048 < se_128 < 0.002
    corpus = tmp_path / "notes.txt"
    corpus.write_text("hello world. " * 200)
    real = prepare.prepare(tmp_path / "real", str(corpus))
    assert real["floor_bpb"] is None and real["attainable_bpb"] is None


def test_the_bayes_model_file_is_the_filter(source, tmp_path):
    """tests/models/bayes.py, loaded the way the evaluator loads a checkpoint, returns the filter's logits."""
    ckpt = {"source": (MODELS / "bayes.py").read_text(), "source_name": "bayes.py", "config": {"seed": SEED},
            "model": {}}
    model = _load(tmp_path / "bayes.pt", ckpt)
    idx = torch.from_numpy(source.sample_windows(40, 3, seed=41)[:, :-1].astype(np.int64))
    with torch.no_grad():
        logits = model(idx)
    assert logits.shape == (3, 40, 256) and logits.dtype == torch.float32
    np.testing.assert_array_equal(logits.numpy(), source.next_byte_log_probs(idx.numpy()))


def _load(path: Path, checkpoint: dict) -> torch.nn.Module:
    """The model of a checkpoint (model source, config, no weights), rebuilt as the evaluator's worker does."""
    torch.save(checkpoint, path)
    return contract.load_model(path)


def test_the_fast_sampler_writes_the_words_it_drew(source):
    # The sampler spells words with a padded table (numpy speed, for a GPU-sized corpus); the bytes must be
    # exactly those of joining the drawn words, and the stream must still be the chain's.
    ids = np.random.default_rng(0).integers(0, len(source.words), 50_000).astype(np.int16)
    joined = b"".join(source.words[i] + b" " for i in ids)
    assert source._spell(ids, len(joined)).tobytes() == joined
    assert source._spell(ids, 1000).tobytes() == joined[:1000]
    text = source.sample(200_000, seed=9).tobytes()
    words = text.split(b" ")[1:-1]  # whole words only
    assert set(words) <= set(source.words) and len(set(words)) > len(source.words) // 2


def test_the_default_corpus_is_the_one_every_recorded_lab_was_prepared_with(tmp_path):
    # Reproductions compare data checksums: a faster sampler must not change a single byte of the default
    # corpus (these are the checksums of the corpus the first sampler wrote, seed 1337).
    meta = prepare.prepare(tmp_path, seed=1337)
    assert meta["train_sha256"] == "a4c9bbd4045902b092697a91c4482b0dd5f1537fb2a0a58b70a371a3557b289a"
    assert meta["val_sha256"] == "60a8b1b9e56a9731784c3ab05d60a69363f730d4089a373dd4f4d2d64a3280aa"
