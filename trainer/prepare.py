"""Data and tokenizer for labrat's training core. Fixed: the agent may read this file, never change it.

    python -m trainer.prepare --out data/                  # embedded synthetic corpus (default)
    python -m trainer.prepare --out data/ --data notes/    # local text files or a directory
    python -m trainer.prepare --out data/ --data https://host/shard.parquet --sha256 HEX

Writes `train.bin` and `val.bin` (uint8 byte tokens) and `meta.json` (sizes, checksums, and for
the synthetic source the exact entropy floor and the unigram baseline in bits per byte).

The synthetic source is a Markov chain over a random vocabulary of words, written out as
space-separated text. Because the words are uniquely decodable from the bytes, the byte stream's
entropy rate is the chain's entropy rate per word divided by the mean bytes per word: the best
val_bpb any model can reach is known exactly, and every result is reported as a gap to it.

That floor assumes an unbounded context. The evaluation scores windows that start at arbitrary
byte offsets, so every model first has to find the word boundaries; the Bayes-optimal predictor
(an exact forward filter over (word, position) states) gives the attainable floor per context
length, `attainable_bpb` in meta.json: a score below it is evidence the model saw the answers.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np

from trainer.contract import EVAL_SEQ_LENS, VOCAB_SIZE

# ---- knobs -------------------------------------------------------------------------------------
SYNTH_WORDS = 384  # distinct words in the synthetic vocabulary
SYNTH_SUCCESSORS = 6  # likely successors per word (the learnable structure)
SYNTH_BACKGROUND = 0.08  # probability mass spread over all words (keeps the chain ergodic)
SYNTH_CHAIN_WORDS = 8192  # words per independently sampled chain (chains are concatenated)
SYNTH_TRAIN_BYTES = 4_000_000
SYNTH_VAL_BYTES = 262_144
REAL_VAL_FRACTION = 0.05  # of a real corpus, the tail held out for validation
TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".tex", ".csv", ".json", ".html"}
PARQUET_TEXT_COLUMN = "text"  # the column read from .parquet shards (FineWeb-style)
DOWNLOAD_CHUNK = 1 << 20
TRAIN_DEADLINE_ENV = "LABRAT_DEADLINE"  # unix time (host clock) by which a training run must have exited
SPACE = 32  # the byte that ends every synthetic word
EPSILON = 1e-12  # floor on a byte's probability (as tests/models/oracle.py): impossible bytes stay finite in log space
ATTAINABLE_SEQ_LENS = tuple(EVAL_SEQ_LENS.values())  # meta.json reports the floor at each evaluation context length
ATTAINABLE_WINDOWS = 4096  # Monte-Carlo windows (any length costs the same, see attainable_bpb): ~0.3 s each
ATTAINABLE_SPREAD = 4  # the stream the windows are cut from is this many times their total size, so few overlap
FILTER_ROWS = 128  # windows filtered at once: keeps the (rows, J, W) belief small enough to stay in cache


class DataError(Exception):
    """Missing, empty, corrupt or mismatched data; the message names the file."""


# ---- tokenizer: byte-level, token id == byte value (trainer/contract.py) -----------------------
def encode(text: str | bytes) -> np.ndarray:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return np.frombuffer(data, dtype=np.uint8).copy()


def decode(tokens) -> str:
    return bytes(np.asarray(tokens, dtype=np.uint8)).decode("utf-8", errors="replace")


# ---- the synthetic source ----------------------------------------------------------------------
class FilterState(NamedTuple):
    """The Bayes-optimal predictor's knowledge of N windows (MarkovWordSource's forward filter).

    The hidden state is (word w, position k), k = 0..len(w): it emits w[k], or the space at k = len(w),
    after which the chain picks the next word. Positions are stored relative to `offset`, the bytes seen
    since the window's last space: weight[n, j, w] is proportional to P(state = (w, offset[n] + j) | the
    bytes so far). Before its first space a window may be at any position (J = longest word + 1); after
    it, only j = 0, so a filter step costs O(N W) and a matmul with the (W, W) chain only at spaces.
    """

    weight: np.ndarray  # (N, J, W)
    total: np.ndarray  # (N,) weight summed over (j, w)
    offset: np.ndarray  # (N,) int


@dataclass
class MarkovWordSource:
    """A word-level Markov chain with an exactly computable byte entropy rate."""

    words: list[bytes]
    transition: np.ndarray  # (W, W) row-stochastic
    stationary: np.ndarray  # (W,)

    @classmethod
    def from_seed(cls, seed: int) -> MarkovWordSource:
        rng = np.random.default_rng(seed)
        letters = np.frombuffer(b"etaoinshrdlucmfwypvbgkqjxz", dtype=np.uint8)
        letter_p = 1.0 / np.arange(1, 27) ** 0.8
        letter_p /= letter_p.sum()
        words: set[bytes] = set()
        while len(words) < SYNTH_WORDS:
            length = int(rng.integers(1, 9))
            words.add(bytes(rng.choice(letters, size=length, p=letter_p)))
        words_list = sorted(words)
        n = len(words_list)
        popularity = 1.0 / np.arange(1, n + 1) ** 1.1  # Zipf-like unigram background
        popularity = rng.permutation(popularity / popularity.sum())
        transition = np.zeros((n, n))
        for i in range(n):
            successors = rng.choice(n, size=SYNTH_SUCCESSORS, replace=False)
            transition[i, successors] = rng.dirichlet(np.full(SYNTH_SUCCESSORS, 0.7))
        transition = (1 - SYNTH_BACKGROUND) * transition + SYNTH_BACKGROUND * popularity[None, :]
        stationary = np.full(n, 1.0 / n)
        for _ in range(2000):  # power iteration; the background mass makes it converge fast
            stationary = stationary @ transition
        return cls(words_list, transition, stationary / stationary.sum())

    @property
    def floor_bpb(self) -> float:
        """Entropy rate in bits per byte: H(next word | word) / E[bytes per word incl. the space]."""
        p = self.transition
        row_entropy = -(p * np.log2(np.where(p > 0, p, 1))).sum(axis=1)
        bits_per_word = float(self.stationary @ row_entropy)
        lengths = np.array([len(w) + 1 for w in self.words])
        bytes_per_word = float(self.stationary @ (p @ lengths))
        return bits_per_word / bytes_per_word

    def sample(self, n_bytes: int, seed: int) -> np.ndarray:
        """`n_bytes` of text: independent chains sampled in parallel, each started from the stationary law."""
        rng = np.random.default_rng(seed)
        lengths = np.array([len(w) + 1 for w in self.words])
        mean_len = float(self.stationary @ lengths)
        n_words = int(n_bytes / mean_len * 1.1) + SYNTH_CHAIN_WORDS
        n_chains = max(1, n_words // SYNTH_CHAIN_WORDS)
        cumulative = np.cumsum(self.transition, axis=1)
        cumulative[:, -1] = 1.0
        state = rng.choice(len(self.words), size=n_chains, p=self.stationary)
        ids = np.empty((n_chains, SYNTH_CHAIN_WORDS), dtype=np.int64)
        for t in range(SYNTH_CHAIN_WORDS):
            ids[:, t] = state
            u = rng.random(n_chains)
            state = (cumulative[state] < u[:, None]).sum(axis=1)
        table = [w + b" " for w in self.words]
        text = b"".join(table[i] for i in ids.reshape(-1))
        if len(text) < n_bytes:
            raise DataError("synthetic sampler produced too little text (internal error)")
        return np.frombuffer(text[:n_bytes], dtype=np.uint8).copy()

    # ---- the Bayes-optimal predictor: an exact forward filter over (word, position) -------------
    @cached_property
    def _spelling(self) -> np.ndarray:
        """(2K+1, W) int16, K the longest word: the byte word w emits at position k, a space at k = len(w), -1
        past its end. Offsets and j (see FilterState) are both at most K, so offset + j always indexes a row."""
        longest = max(len(w) for w in self.words)
        spelling = np.full((2 * longest + 1, len(self.words)), -1, dtype=np.int16)
        for i, word in enumerate(self.words):
            spelling[: len(word), i] = np.frombuffer(word, dtype=np.uint8)
            spelling[len(word), i] = SPACE
        return spelling

    @cached_property
    def _window_start_law(self) -> np.ndarray:
        """(K+1, W): the law of the state at an arbitrary byte of the stream. The word covering it is size-biased
        (stationary probability times its bytes, space included); each of its positions is equally likely."""
        lengths = np.array([len(w) for w in self.words])
        covered = np.arange(lengths.max() + 1)[:, None] <= lengths[None, :]
        return covered * (self.stationary / (self.stationary @ (lengths + 1)))[None, :]

    def _filter_start(self, n: int) -> FilterState:
        return FilterState(np.repeat(self._window_start_law[None], n, axis=0), np.ones(n), np.zeros(n, dtype=np.int64))

    def _filter_step(self, state: FilterState, byte: np.ndarray) -> tuple[np.ndarray, FilterState]:
        """Condition on the observed `byte` (N,) and move one byte on: returns P(byte | the window's earlier
        bytes) (N,) and the state for the next byte.

        Inside a word the next position is certain, so a letter only zeroes the words that do not match and
        moves the offset. A space sends the word just finished through the chain: a row lookup when that
        word is certain (after a window's first space, always), a matmul otherwise; the weights are
        renormalised there, so they cannot underflow within a word. A window whose bytes are impossible
        under the source restarts from the window-start law.
        """
        weight, total, offset = state
        emitted = self._spelling[offset[:, None] + np.arange(weight.shape[1])]  # (N, J, W)
        weight = weight * (emitted == byte.astype(emitted.dtype)[:, None, None])
        seen = weight.sum(axis=(1, 2))
        mass = seen / total
        offset = np.where(byte == SPACE, 0, offset + 1)
        at_space = np.flatnonzero((byte == SPACE) & (seen > 0))
        if at_space.size:
            finished = weight[at_space].sum(axis=1) / seen[at_space, None]  # (n, W): the word just ended
            certain = np.count_nonzero(finished, axis=1) == 1
            next_word = np.empty_like(finished)
            next_word[certain] = self.transition[finished[certain].argmax(axis=1)]
            next_word[~certain] = finished[~certain] @ self.transition
            weight[at_space] = 0.0
            weight[at_space, 0] = next_word
            seen[at_space] = 1.0
        lost = np.flatnonzero(seen == 0)
        if lost.size:
            start = self._window_start_law
            weight = np.concatenate([weight, np.zeros((len(weight), len(start) - weight.shape[1], weight.shape[2]))], 1)
            weight[lost], seen[lost], offset[lost] = start, 1.0, 0
        live = weight.shape[1]  # drop the positions no window can be at any more (all but j = 0 once synchronised)
        while live > 1 and not weight[:, live - 1].any():
            live -= 1
        weight = weight[:, :live]
        return mass, FilterState(weight, seen, offset)

    def next_byte_log_probs(self, inputs: np.ndarray) -> np.ndarray:
        """(N, L) bytes -> (N, L, 256) float32: the Bayes-optimal log-probability (nats) of each next byte,
        position t given inputs[:, :t+1], each row a window starting at an unknown offset of the stream: a
        model's forward pass (tests/models/bayes.py). Impossible bytes get about log(EPSILON), never -inf."""
        inputs = np.asarray(inputs, dtype=np.int64)
        n, length = inputs.shape
        out = np.empty((n, length, VOCAB_SIZE), dtype=np.float32)
        state = self._filter_start(n)
        for t in range(length):
            _, state = self._filter_step(state, inputs[:, t])
            emitted = self._spelling[state.offset[:, None] + np.arange(state.weight.shape[1])]
            live = emitted >= 0
            slots = (np.arange(n)[:, None, None] * VOCAB_SIZE + emitted)[live]
            weights = (state.weight / state.total[:, None, None])[live]
            out[:, t] = _floored_log(np.bincount(slots, weights, minlength=n * VOCAB_SIZE).reshape(n, VOCAB_SIZE))
        return out

    def window_bpb(self, tokens: np.ndarray) -> np.ndarray:
        """(N, L+1) bytes -> (N,): the Bayes-optimal bits per byte on each window's L targets tokens[:, 1:]
        (the score next_byte_log_probs(tokens[:, :-1]) gets), without building the (N, L, 256) distributions."""
        tokens = np.asarray(tokens, dtype=np.int64)
        nats = np.zeros(len(tokens))
        for rows in range(0, len(tokens), FILTER_ROWS):
            chunk = tokens[rows : rows + FILTER_ROWS]
            _, state = self._filter_step(self._filter_start(len(chunk)), chunk[:, 0])
            for t in range(1, tokens.shape[1]):
                mass, state = self._filter_step(state, chunk[:, t])
                nats[rows : rows + FILTER_ROWS] -= _floored_log(mass)
        return nats / np.log(2) / (tokens.shape[1] - 1)

    @property
    def sync_horizon(self) -> int:
        """How many of a window's first predictions can differ from the ones made knowing the whole past:
        2K+1, K the longest word. Any K+1 consecutive bytes hold a space, so bytes 0..2K+1 hold two; the word
        between them is then certain and the chain is Markov in words, so from prediction 2K+1 on the
        filter makes the infinite-past prediction, whose expected loss at a random byte is exactly floor_bpb."""
        return 2 * max(len(w) for w in self.words) + 1

    def sample_windows(self, seq_len: int, windows: int, seed: int) -> np.ndarray:
        """(windows, seq_len + 1) bytes at uniformly random offsets of a fresh stream sampled with `seed`."""
        stream = self.sample(windows * (seq_len + 1) * ATTAINABLE_SPREAD, seed)
        offsets = np.random.default_rng((seed, 1)).integers(0, len(stream) - seq_len, size=windows)
        return stream[offsets[:, None] + np.arange(seq_len + 1)]

    def attainable_bpb(self, seq_len: int, windows: int, seed: int) -> tuple[float, float]:
        """The best expected val_bpb over windows of seq_len scored predictions starting at random offsets:
        the Bayes-optimal predictor's, as (Monte-Carlo mean, its standard error across `windows` windows).

        Only the first sync_horizon predictions of a window differ from the infinite-past ones, so each
        window is filtered that far and the expected floor_bpb per byte stands in for the rest: the same
        expectation as filtering whole windows, at a cost independent of seq_len and with the variance of the
        rest of the text (most of it) gone. Above floor_bpb by the bits spent finding the word boundaries and
        the previous word, spread over the window: (mean - floor_bpb) * seq_len is the same for every length.
        """
        horizon = min(seq_len, self.sync_horizon)
        bits = self.window_bpb(self.sample_windows(horizon, windows, seed)) * horizon
        bpb = (bits + (seq_len - horizon) * self.floor_bpb) / seq_len
        return float(bpb.mean()), float(bpb.std(ddof=1) / np.sqrt(windows))


def _floored_log(probs: np.ndarray) -> np.ndarray:
    """log of byte probabilities (from distributions over the 256 bytes summing to 1) after flooring each at
    EPSILON and renormalising; the one formula both consumers of the filter use, so their scores agree."""
    return np.log((probs + EPSILON) / (1.0 + VOCAB_SIZE * EPSILON))


def unigram_bpb(train: np.ndarray, val: np.ndarray) -> float:
    """Cross-entropy of `val` under the byte frequencies of `train` (add-one smoothed): the baseline to beat."""
    counts = np.bincount(train, minlength=VOCAB_SIZE).astype(np.float64) + 1.0
    log_p = np.log2(counts / counts.sum())
    return float(-log_p[val].mean())


# ---- real data ---------------------------------------------------------------------------------
def read_text_source(path: Path) -> bytes:
    """The bytes of a text file, or of every text file below a directory (sorted, so splits are stable)."""
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    suffixes = TEXT_SUFFIXES | {".parquet"}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
    if not files:
        raise DataError(f"no text or parquet files ({', '.join(sorted(suffixes))}) under {path}")
    chunks = []
    for file in files:
        data = read_parquet_text(file) if file.suffix == ".parquet" else file.read_bytes()
        if b"\x00" in data[:65536]:
            raise DataError(f"{file} looks binary (NUL bytes), not text")
        if not data.strip():
            raise DataError(f"{file} is empty")
        chunks.append(data)
    return b"\n".join(chunks)


def read_parquet_text(path: Path) -> bytes:
    """The `text` column of a parquet shard, documents joined by newlines (needs pyarrow)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path} is parquet: install pyarrow (pip install pyarrow) to read it") from None
    try:
        table = pq.read_table(path, columns=[PARQUET_TEXT_COLUMN])
    except Exception as exc:  # pyarrow raises several types for a corrupt file or a missing column
        raise DataError(f"{path} is not a readable parquet shard with a {PARQUET_TEXT_COLUMN!r} column: {exc}") from None
    return "\n".join(str(doc) for doc in table.column(PARQUET_TEXT_COLUMN).to_pylist()).encode("utf-8")


def download(url: str, dest: Path, sha256: str | None, timeout: float = 60.0) -> Path:
    """Fetch `url` into `dest`, resuming a partial download (HTTP Range), verifying the checksum."""
    partial = dest.with_name(dest.name + ".partial")
    if dest.exists() and (sha256 is None or _sha256(dest) == sha256):
        return dest
    have = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            resumed = response.status == 206
            length = response.headers.get("Content-Length")
            expected = (have if resumed else 0) + int(length) if length else None
            with open(partial, "ab" if resumed else "wb") as out:
                while chunk := response.read(DOWNLOAD_CHUNK):
                    out.write(chunk)
        got = partial.stat().st_size
        if expected is not None and got < expected:
            raise DataError(f"downloading {url} failed: connection dropped after {got} of {expected} bytes (rerun to resume)")
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # already complete
            pass
        else:
            raise DataError(f"downloading {url} failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise DataError(f"downloading {url} failed: {getattr(exc, 'reason', exc)} (rerun to resume)") from None
    if sha256 is not None:
        actual = _sha256(partial)
        if actual != sha256:
            partial.unlink()
            raise DataError(f"checksum mismatch for {url}: expected {sha256}, got {actual}; the partial file was removed")
    partial.rename(dest)
    return dest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(DOWNLOAD_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ---- the prepared directory --------------------------------------------------------------------
def prepare(out: Path, data: str = "synthetic", seed: int = 1337, sha256: str | None = None,
            train_bytes: int = SYNTH_TRAIN_BYTES, val_bytes: int = SYNTH_VAL_BYTES) -> dict:
    """Write train.bin, val.bin and meta.json into `out`; returns the meta dict."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    meta: dict = {"vocab_size": VOCAB_SIZE, "tokenizer": "bytes", "seed": seed}
    if data == "synthetic":
        source = MarkovWordSource.from_seed(seed)
        train = source.sample(train_bytes, seed=seed + 1)
        val = source.sample(val_bytes, seed=seed + 2)  # an independent stream, never seen in training
        attainable = {str(n): list(source.attainable_bpb(n, ATTAINABLE_WINDOWS, seed=seed + 3))
                      for n in ATTAINABLE_SEQ_LENS}  # a third stream, independent of train and val
        meta.update(source="synthetic", floor_bpb=source.floor_bpb, attainable_bpb=attainable)
    else:
        if data.startswith(("http://", "https://")):
            path = download(data, out / Path(data.split("?")[0]).name, sha256)
        else:
            path = Path(data)
        corpus = read_text_source(path)
        n_val = max(1, int(len(corpus) * REAL_VAL_FRACTION))
        if len(corpus) < 1024:
            raise DataError(f"{path} holds only {len(corpus)} bytes; at least 1024 are needed")
        train, val = encode(corpus[:-n_val]), encode(corpus[-n_val:])
        meta.update(source=str(data), floor_bpb=None, attainable_bpb=None)
    meta.update(unigram_bpb=unigram_bpb(train, val), train_tokens=int(train.size), val_tokens=int(val.size))
    for name, tokens in (("train", train), ("val", val)):
        (out / f"{name}.bin").write_bytes(tokens.tobytes())
        meta[f"{name}_sha256"] = hashlib.sha256(tokens.tobytes()).hexdigest()
    meta["seconds"] = round(time.perf_counter() - started, 3)
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def load_tokens(path: Path, expected_sha256: str | None = None) -> np.ndarray:
    """A prepared split as uint8 tokens; a missing, empty or altered file is one clear error."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path} (run `python -m trainer.prepare --out {path.parent}`)")
    data = path.read_bytes()
    if not data:
        raise DataError(f"data file is empty: {path}")
    if expected_sha256 and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise DataError(f"data file {path} does not match its checksum in meta.json (corrupt or altered)")
    return np.frombuffer(data, dtype=np.uint8)


def load_meta(directory: Path) -> dict:
    path = Path(directory) / "meta.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} not found (run `python -m trainer.prepare --out {directory}`)") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is corrupt: {exc}") from None


# ---- the training budget -----------------------------------------------------------------------
def training_deadline(time_budget: float) -> float:
    """When this training run must have exited, in time.time() seconds: the harness's deadline when it set
    one (it kills the run there: the budget is all-in and the same for every experiment), else
    `time_budget` seconds from now (a bare run)."""
    if value := os.environ.get(TRAIN_DEADLINE_ENV):
        return float(value)
    return time.time() + time_budget


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", default=os.environ.get("LABRAT_DATA", "synthetic"))
    parser.add_argument("--sha256", default=None, help="expected checksum of a downloaded file")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--train-bytes", type=int, default=SYNTH_TRAIN_BYTES)
    parser.add_argument("--val-bytes", type=int, default=SYNTH_VAL_BYTES)
    args = parser.parse_args(argv)
    try:
        meta = prepare(args.out, args.data, args.seed, args.sha256, args.train_bytes, args.val_bytes)
    except DataError as exc:
        print(f"prepare: error: {exc}", file=sys.stderr)
        return 2
    floor = f", floor {meta['floor_bpb']:.4f} bpb" if meta["floor_bpb"] is not None else ""
    print(f"prepared {meta['train_tokens']} train / {meta['val_tokens']} val tokens in {meta['seconds']} s: "
          f"unigram {meta['unigram_bpb']:.4f} bpb{floor}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
