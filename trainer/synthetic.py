"""The synthetic corpus: a word-level Markov chain whose entropy floor is known exactly. Fixed: the agent
may read this file, never change it (trainer/prepare.py writes the corpus; the evaluator's hash covers both).

The chain runs over a random vocabulary of words, written out as space-separated text. Because the words
are uniquely decodable from the bytes, the byte stream's entropy rate is the chain's entropy rate per word
divided by the mean bytes per word: the best val_bpb any model can reach, `floor_bpb`.

That floor assumes an unbounded context. The evaluation scores windows that start at arbitrary byte
offsets, so every model first has to find the word boundaries; the Bayes-optimal predictor (an exact
forward filter over (word, position) states) gives the attainable floor per context length,
`attainable_bpb`: a score below it is evidence the model saw the answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np

from trainer.contract import VOCAB_SIZE

# ---- knobs -------------------------------------------------------------------------------------
SYNTH_WORDS = 384  # distinct words in the synthetic vocabulary
SYNTH_SUCCESSORS = 6  # likely successors per word (the learnable structure)
SYNTH_BACKGROUND = 0.08  # probability mass spread over all words (keeps the chain ergodic)
SYNTH_CHAIN_WORDS = 8192  # words per independently sampled chain (chains are concatenated)
SPACE = 32  # the byte that ends every synthetic word
EPSILON = 1e-12  # floor on a byte's probability (as tests/models/oracle.py): impossible bytes stay finite in log space
ATTAINABLE_WINDOWS = 4096  # Monte-Carlo windows (any length costs the same, see attainable_bpb): ~0.3 s each
ATTAINABLE_SPREAD = 4  # the stream the windows are cut from is this many times their total size, so few overlap
SPELL_CHUNK_WORDS = 1 << 22  # words written out at once (a (chunk, longest word) byte table: ~40 MB)
FILTER_ROWS = 128  # windows filtered at once: keeps the (rows, J, W) belief small enough to stay in cache


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
        # Row r of the chain's CDF shifted by r, as one sorted array: each chain's next word is then one binary
        # search (the count of row entries below its uniform draw), not a comparison with the whole row.
        n_words_vocab = len(self.words)
        shifted = (cumulative + np.arange(n_words_vocab)[:, None]).ravel()
        state = rng.choice(n_words_vocab, size=n_chains, p=self.stationary)
        ids = np.empty((n_chains, SYNTH_CHAIN_WORDS), dtype=np.int16)
        for t in range(SYNTH_CHAIN_WORDS):
            ids[:, t] = state
            u = rng.random(n_chains)
            state = np.maximum(np.searchsorted(shifted, state + u, side="left") - state * n_words_vocab, 0)
        return self._spell(ids.reshape(-1), n_bytes)

    def _spell(self, ids: np.ndarray, n_bytes: int) -> np.ndarray:
        """The first n_bytes of the words `ids` written out, each followed by a space: a padded spelling table
        gathered and masked a chunk at a time (the same bytes as joining the words, at numpy speed)."""
        spellings = [w + b" " for w in self.words]
        width = max(len(s) for s in spellings)
        table = np.zeros((len(spellings), width), dtype=np.uint8)
        for i, spelling in enumerate(spellings):
            table[i, : len(spelling)] = np.frombuffer(spelling, dtype=np.uint8)
        lengths = np.array([len(s) for s in spellings])
        columns = np.arange(width)
        pieces, written = [], 0
        for start in range(0, len(ids), SPELL_CHUNK_WORDS):
            chunk = ids[start : start + SPELL_CHUNK_WORDS]
            pieces.append(table[chunk][columns < lengths[chunk][:, None]])
            written += pieces[-1].size
            if written >= n_bytes:
                return np.concatenate(pieces)[:n_bytes]
        raise RuntimeError("synthetic sampler produced too little text (internal error)")

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
