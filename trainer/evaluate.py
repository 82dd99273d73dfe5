"""Protected evaluation: bits per byte on held-out data, computed by the driver from the model's logits.

    python -m trainer.evaluate --checkpoint out/ckpt.pt --data data/ --out result.json

The *driver* (`evaluate`) holds the validation tokens and computes the metric; it never imports or
unpickles anything the agent wrote. Two *workers* (trainer/eval_worker.py) run the agent's model
(rebuilt from the checkpoint by trainer/contract.py, which also says what the model must do) and only
ever receive input batches, to which they answer with logits. In labrat the driver runs in the harness's own process
and each worker in a fresh container of the sandbox image (no held-out data there); run bare, the
workers are two subprocesses. The model is assumed hostile: it may keep state between calls, know
this file, return any finite numbers, time its answers, and inspect its environment.

* **Scoring.** The *scorer* gets every scored row once, in a secret random order. Rows are disjoint
  windows of seq_len + 1 tokens, so no row's last target is an input anywhere. The driver normalises
  the logits itself (float32 log-softmax) and any non-finite log-probability rejects the model.
* **Causality.** Once the scorer has answered everything and is gone, a second worker, the *judge*,
  which shares no process, file system or memory with it, gets every row again: its true prefix up to
  a secret random cut per row, then tokens from an unscored part of the held-out data, grouped with
  other companions and in another order (a quarter of the rows whole, so that dependence on other rows
  or on the call history is checked at every position, the last included). Before the cut, the
  log-probability of each true target must match the scorer's within CAUSALITY_TOLERANCE. The judge
  never sees the token after a cut and the scorer never learns the cut, so an answer that used a later
  token cannot be matched. The cuts come from a fresh secret seed, recorded in the result.
* **Bits per byte.** A row's bits over the bytes its targets cover: one byte a token with byte tokens;
  with BPE, meta.json's per-id byte lengths (trainer/prepare.py), so the metric stays exact.
* **Impossible results.** Given the data's attainable floor at this context length (the synthetic
  corpus has one), a score below it by more than FLOOR_MARGIN_SE standard errors is refused.
* **Protocol.** Answers have a fixed size known in advance (a malformed one is refused, never parsed);
  the worker's own stdout is moved to stderr before the model loads, stderr is drained into a bounded
  tail, and every answer has a deadline on the driver's clock.
"""

from __future__ import annotations

import argparse
import json
import math
import secrets
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from trainer.contract import CHECKPOINT_LIMIT, EVAL_SEQ_LEN, VOCAB_SIZE
from trainer.eval_worker import (BATCH, CHUNK, CKPT, END, FAIL, HEADER, LOAD, LOGITS, MESSAGE_LIMIT, PARAMS, READY,
                                 TOKEN_WIRE, ProcessChannel, worker)

# ---- knobs -------------------------------------------------------------------------------------
EVAL_TOKENS = 131_072  # validation tokens scored (a fixed number, so runs are comparable)
BATCH_TOKENS = 8192  # tokens per forward call: rows per batch = BATCH_TOKENS // seq_len
ANSWER_LIMIT = 64 * 1024**2  # bytes of logits per answer: a large BPE vocabulary gets fewer rows per call
WHOLE_ROW_PROBES = 0.25  # fraction of judged rows compared at every position (cut = seq_len)
CAUSALITY_TOLERANCE = 1e-3  # max |Δ log-prob of a true target| (float32 CPU differs by ~1e-6 across batchings)
FLOOR_MARGIN_SE = 4.0  # refuse val_bpb < attainable - 4 standard errors (an honest model: ~3e-5 chance)
POOL_MIN_TOKENS = 4096  # unscored held-out tokens kept aside to fill the judge's rows after their cuts
ANSWER_TIMEOUT = 300.0  # seconds a worker may take to answer one batch
LOAD_TIMEOUT = 300.0  # seconds a worker may take to load the model (its torch import included, on a busy machine)


class EvaluationError(Exception):
    """The model could not be evaluated (crashed, non-causal, non-finite, impossible); the reason is the message."""


class Channel(Protocol):
    """A worker's pipes as the driver sees them: a subprocess here, a process in a container in labrat."""

    def send(self, data: bytes) -> None: ...  # raises OSError once the worker is gone
    def read_exact(self, size: int, deadline: float) -> bytes: ...  # fewer bytes: EOF; raises TimeoutError
    def stderr_tail(self) -> str: ...
    def close(self) -> None: ...  # ends the worker and every process it started


# ---- driver: holds the data, computes the metric -----------------------------------------------
class Checkpoint:
    """A checkpoint as a stream of chunks (never held whole: it may be as large as CHECKPOINT_LIMIT)."""

    def __init__(self, chunks: Callable[[], Iterable[bytes]]):
        self.chunks = chunks  # called once: the chunks go to both workers as they come

    @classmethod
    def from_file(cls, path: Path) -> Checkpoint:
        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    yield chunk
        return cls(chunks)


def local_worker(user: str | None = None) -> Callable[[str], Channel]:
    """spawn() for bare use: each worker a fresh subprocess of this module (no container isolation)."""
    root = Path(__file__).resolve().parent.parent
    scratch = tempfile.gettempdir()
    return lambda role: ProcessChannel([sys.executable, "-m", "trainer.evaluate", "--worker", scratch],
                                       cwd=root, user=user)


class _Worker:
    """The driver's side of one worker: sends messages, validates every answer before using it."""

    def __init__(self, channel: Channel, role: str, deadline: float, answer_timeout: float, vocab_size: int):
        self.channel = channel
        self.role = role
        self.deadline = deadline
        self.answer_timeout = answer_timeout
        self.vocab_size = vocab_size

    def send(self, tag: bytes, payload: bytes = b"") -> None:
        try:
            self.channel.send(HEADER.pack(tag, len(payload)) + payload)
        except (OSError, ValueError):
            raise self._gone() from None

    def receive(self, expected: bytes, size: int | None, what: str, timeout: float | None = None) -> bytes:
        started = time.monotonic()
        deadline = min(started + (self.answer_timeout if timeout is None else timeout), self.deadline)
        try:
            header = self.channel.read_exact(HEADER.size, deadline)
            if len(header) < HEADER.size:
                raise self._gone()
            tag, length = HEADER.unpack(header)
            if tag == FAIL and length <= MESSAGE_LIMIT:
                message = self.channel.read_exact(length, deadline).decode("utf-8", "replace")
                raise EvaluationError(_one_line(message))
            if tag != expected or (size is not None and length != size):
                raise EvaluationError(f"the model's {what} was malformed ({tag!r}, {length} bytes; expected "
                                      f"{expected!r}, {size} bytes): it wrote to the evaluation's channel")
            payload = self.channel.read_exact(length, deadline)
        except TimeoutError:
            limit = "the evaluation's time limit" if deadline == self.deadline else f"{deadline - started:.0f} s"
            raise EvaluationError(f"the model did not answer ({what}) within {limit}") from None
        if len(payload) < length:
            raise self._gone()
        return payload

    def _gone(self) -> EvaluationError:
        lines = [line for line in self.channel.stderr_tail().strip().splitlines() if line.strip()]
        return EvaluationError(f"the model crashed during evaluation: {_one_line(lines[-1]) if lines else 'it exited'}")

    def load(self, device: str) -> int:
        """Load the model; the checkpoint's weight count (sent before the agent's code ran)."""
        self.send(LOAD, json.dumps({"device": device, "vocab_size": self.vocab_size}).encode())
        (parameters,) = struct.unpack("<Q", self.receive(PARAMS, 8, "weight count", LOAD_TIMEOUT))
        self.receive(READY, 0, "answer to loading", LOAD_TIMEOUT)
        return parameters

    def target_log_probs(self, batch: np.ndarray, targets: np.ndarray, what: str) -> np.ndarray:
        """log p(target) at each position of `batch` (rows, cols), normalised here from the worker's logits."""
        rows, cols = batch.shape
        self.send(BATCH, struct.pack("<II", rows, cols) + np.ascontiguousarray(batch, dtype=TOKEN_WIRE).tobytes())
        answer = self.receive(LOGITS, rows * cols * self.vocab_size * 4, what)
        logits = np.frombuffer(answer, dtype="<f4").reshape(rows, cols, self.vocab_size)
        if not np.isfinite(logits).all():
            raise EvaluationError("model rejected: it returned non-finite logits (NaN or inf)")
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is the model's, and is refused below
            top = logits.max(axis=-1, keepdims=True)
            log_probs = logits - (top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True)))
        if not np.isfinite(log_probs).all():
            raise EvaluationError(f"model rejected: its log-probabilities are not finite (logits as large as "
                                  f"{float(np.abs(logits).max()):.3g} overflow float32 log-softmax)")
        return np.take_along_axis(log_probs, targets[..., None].astype(np.int64), axis=-1)[..., 0].astype(np.float64)


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(text.split())[:limit]


class Plan:
    """Where the rows come from, the scorer's order, and the judge's cuts: all drawn from one secret seed."""

    def __init__(self, n_tokens: int, eval_tokens: int, seq_len: int, batch_tokens: int, seed: int):
        stride = seq_len + 1
        self.rows = min(eval_tokens // seq_len, max(0, n_tokens - max(POOL_MIN_TOKENS, stride)) // stride)
        if self.rows < 1:
            raise EvaluationError(f"need at least {stride + max(POOL_MIN_TOKENS, stride)} validation tokens, "
                                  f"got {n_tokens}")
        self.seq_len, self.stride, self.seed = seq_len, stride, seed
        self.pool_start = self.rows * stride  # unscored tokens: what the judge sees after a cut
        rng = np.random.default_rng(seed)
        per_batch = max(1, batch_tokens // seq_len)
        order = rng.permutation(self.rows)
        self.score_batches = [order[i : i + per_batch] for i in range(0, self.rows, per_batch)]
        whole = rng.random(self.rows) < WHOLE_ROW_PROBES
        self.cuts = np.where(whole, seq_len, rng.integers(1, seq_len, size=self.rows))  # positions < cut compared
        by_cut = np.lexsort((rng.random(self.rows), self.cuts))  # similar lengths batch together
        judge = [by_cut[i : i + per_batch] for i in range(0, self.rows, per_batch)]
        self.judge_batches = [judge[i] for i in rng.permutation(len(judge))]
        self.pool_offsets = rng.integers(0, 1 << 62, size=self.rows)

    def inputs(self, tokens: np.ndarray, rows: np.ndarray) -> np.ndarray:
        starts = rows[:, None] * self.stride + np.arange(self.seq_len)[None, :]
        return tokens[starts]

    def targets(self, tokens: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return tokens[rows[:, None] * self.stride + 1 + np.arange(self.seq_len)[None, :]]

    def judge_inputs(self, tokens: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Each row's true prefix up to its cut, then unscored held-out tokens, as long as the batch's longest cut."""
        width = int(self.cuts[rows].max())
        batch = self.inputs(tokens, rows)[:, :width].copy()
        pool = tokens[self.pool_start :]
        for i, row in enumerate(rows):
            cut = int(self.cuts[row])
            if cut < width:
                start = int(self.pool_offsets[row] % max(1, len(pool) - width))
                batch[i, cut:] = pool[start : start + width - cut]
        return batch


def evaluate(checkpoint: Checkpoint | Path, val_tokens: np.ndarray, device: str = "auto",
             eval_tokens: int = EVAL_TOKENS, seq_len: int = EVAL_SEQ_LEN, *, batch_tokens: int = BATCH_TOKENS,
             spawn: Callable[[str], Channel] | None = None, attainable: tuple[float, float] | None = None,
             seed: int | None = None, timeout: float = 3600.0, answer_timeout: float = ANSWER_TIMEOUT,
             on_phase: Callable[[str], None] = lambda name: None, vocab_size: int = VOCAB_SIZE,
             token_bytes: np.ndarray | None = None) -> dict:
    """val_bpb of the checkpoint on held-out rows of `val_tokens`, with the causality and floor verdicts.

    `spawn(role)` starts a worker ("score", then "judge"); `seed` replays an earlier evaluation's
    secret draws (reproduction), otherwise a fresh one is drawn. `vocab_size` and `token_bytes` (each id's
    length in bytes; None: one byte a token) come from the data's meta.json (`tokenization`). Raises
    EvaluationError with a one-line reason when the model is rejected."""
    started = time.monotonic()
    checkpoint = Checkpoint.from_file(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    seed = secrets.randbits(63) if seed is None else int(seed)
    tokens = np.asarray(val_tokens)
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise EvaluationError(f"the held-out tokens go up to {int(tokens.max())}, past the vocabulary of {vocab_size}")
    batch_tokens = min(batch_tokens, max(seq_len, ANSWER_LIMIT // (vocab_size * 4)))
    plan = Plan(len(tokens), eval_tokens, seq_len, batch_tokens, seed)
    spawn = spawn or local_worker()
    deadline = started + timeout
    timings: dict[str, float] = {}
    channels: list[Channel] = []
    try:
        channels += [spawn("score"), spawn("judge")]
        scorer, judge = (_Worker(c, role, deadline, answer_timeout, vocab_size)
                         for c, role in zip(channels, ("score", "judge")))
        on_phase("checkpoint")
        _send_checkpoint(checkpoint, (scorer, judge))
        timings["checkpoint"] = time.monotonic() - started
        # Scoring: every row once; keep only the log-probability of each true target.
        on_phase("scoring")
        picked = np.zeros((plan.rows, seq_len), dtype=np.float64)
        parameters = scorer.load(device)
        for index, rows in enumerate(plan.score_batches):
            picked[rows] = scorer.target_log_probs(plan.inputs(tokens, rows), plan.targets(tokens, rows),
                                                   f"batch {index + 1} of {len(plan.score_batches)}")
        channels[0].close()  # gone before the judge's model code starts: no channel, not even timing, between them
        timings["score"] = time.monotonic() - started - sum(timings.values())
        # Judging: every row again, cut, recombined and reordered; earlier targets must not move.
        on_phase("judging")
        judge.load(device)
        max_delta, worst = 0.0, None
        for index, rows in enumerate(plan.judge_batches):
            batch = plan.judge_inputs(tokens, rows)
            judged = judge.target_log_probs(batch, plan.targets(tokens, rows)[:, : batch.shape[1]],
                                            f"probe {index + 1} of {len(plan.judge_batches)}")
            for i, row in enumerate(rows):
                cut = int(plan.cuts[row])
                delta = np.abs(judged[i, :cut] - picked[row, :cut])  # finite: both sides were checked
                if delta.size and (d := float(delta.max())) > max_delta:
                    max_delta, worst = d, (int(row), int(delta.argmax()), cut)
        timings["judge"] = time.monotonic() - started - sum(timings.values())
    finally:
        for channel in channels:
            channel.close()
    bits = -picked / math.log(2)
    if token_bytes is None:  # byte tokens: one token is one byte
        per_row, val_bpb, n_bytes = bits.mean(axis=1), float(bits.mean()), bits.size
    else:  # BPE: the bits of a row's targets over the bytes they cover
        covered = token_bytes[plan.targets(tokens, np.arange(plan.rows))]
        per_row, val_bpb, n_bytes = bits.sum(axis=1) / covered.sum(axis=1), float(bits.sum() / covered.sum()), covered.sum()
    se = float(per_row.std(ddof=1) / math.sqrt(plan.rows)) if plan.rows > 1 else float("inf")
    result = {
        "val_bpb": val_bpb,
        "val_bpb_se": se,
        "tokens_evaluated": int(bits.size),
        "parameters": parameters,  # the checkpoint's weights, counted by the worker before the model's code ran
        "bytes_evaluated": int(n_bytes),
        "rows": plan.rows,
        "seq_len": seq_len,
        "causal": max_delta <= CAUSALITY_TOLERANCE,
        "causality_max_delta": max_delta,
        "causality_positions_checked": int(plan.cuts.sum()),
        "causality_whole_rows": int((plan.cuts == seq_len).sum()),
        "probe_seed": f"{seed:016x}",
        "seconds": round(time.monotonic() - started, 3),
        "phase_seconds": {name: round(value, 3) for name, value in timings.items()},
    }
    if not result["causal"]:
        row, position, cut = worst
        raise EvaluationError(
            f"model rejected: it looks ahead (the log-prob of a true target changed by {max_delta:.3g} when only "
            f"later tokens or other rows changed: row {row}, position {position}, cut {cut}; tolerance "
            f"{CAUSALITY_TOLERANCE})")
    if attainable is not None:
        floor, floor_se = attainable
        margin = FLOOR_MARGIN_SE * math.hypot(se, floor_se)
        result.update(attainable_bpb=floor, attainable_bpb_se=floor_se, attainable_gap_bpb=val_bpb - floor)
        if val_bpb < floor - margin:
            raise EvaluationError(
                f"impossible result refused: val_bpb {val_bpb:.4f} is below the attainable {floor:.4f} at context "
                f"{seq_len} by more than {FLOOR_MARGIN_SE:g} standard errors ({margin:.4f}): the model must see "
                "the held-out targets")
    return result


def _send_checkpoint(checkpoint: Checkpoint, workers: tuple[_Worker, ...]) -> None:
    """Stream the checkpoint to every worker at once, chunk by chunk (the driver never holds it whole)."""
    sent = 0
    try:
        for chunk in checkpoint.chunks():
            sent += len(chunk)
            if sent > CHECKPOINT_LIMIT:
                raise EvaluationError(f"the checkpoint is over the {CHECKPOINT_LIMIT}-byte limit")
            for start in range(0, len(chunk), CHUNK):
                for w in workers:
                    w.send(CKPT, chunk[start : start + CHUNK])
    except OSError as exc:
        raise EvaluationError(f"no usable checkpoint: {exc}") from None
    for w in workers:
        w.send(END)


def attainable_for(meta: dict, seq_len: int) -> tuple[float, float] | None:
    """The data's attainable (mean, standard error) bpb at this context length, if prepare.py knows it; else
    its entropy floor, if known (a BPE lab: the floor holds for any tokenization and context, up to the few
    bits a row's first token tells of its neighbours, which the margin covers)."""
    known = (meta.get("attainable_bpb") or {}).get(str(seq_len))
    if known:
        return float(known[0]), float(known[1])
    return (float(meta["floor_bpb"]), 0.0) if meta.get("floor_bpb") is not None else None


def tokenization(meta: dict) -> dict:
    """evaluate()'s vocab_size and token_bytes for data prepared with this meta.json."""
    from trainer.prepare import token_bytes_of

    return {"vocab_size": int(meta.get("vocab_size", VOCAB_SIZE)), "token_bytes": token_bytes_of(meta)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Protected bits-per-byte evaluation of a checkpoint.")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--data", type=Path, help="prepared data directory (holds val.bin and meta.json)")
    parser.add_argument("--out", type=Path, help="where to write the result JSON")
    parser.add_argument("--device", default="auto", help="the workers' device (auto: cuda when there is one)")
    parser.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS)
    parser.add_argument("--seq-len", type=int, default=EVAL_SEQ_LEN)
    parser.add_argument("--seed", type=lambda text: int(text, 16), default=None, help="replay a recorded probe_seed")
    parser.add_argument("--worker-user", default=None, help="run the model as this user (driver must be root)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # a worker, with this scratch directory
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    from trainer.prepare import DataError, load_meta, load_tokens

    meta = {}
    try:
        meta = load_meta(args.data)
        val = load_tokens(args.data / "val.bin", meta.get("val_sha256"), meta.get("token_dtype", "uint8"))
        result = evaluate(args.checkpoint, val, args.device, args.eval_tokens, args.seq_len, seed=args.seed,
                          spawn=local_worker(user=args.worker_user), attainable=attainable_for(meta, args.seq_len),
                          **tokenization(meta))
    except (DataError, EvaluationError) as exc:
        result = {"error": str(exc)}
        print(f"evaluate: error: {exc}", file=sys.stderr)
    if "val_bpb" in result and meta.get("floor_bpb") is not None:
        result["floor_bpb"] = meta["floor_bpb"]
        result["gap_bpb"] = result["val_bpb"] - meta["floor_bpb"]
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0 if "val_bpb" in result else 2


if __name__ == "__main__":
    sys.exit(main())
