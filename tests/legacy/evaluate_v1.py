"""[labrat <= 0.3, kept for tests: the evaluator before the metric-integrity work, to show that each cheat
in tests/models beats it. Not used by labrat.]

Protected evaluation: bits per byte on held-out data, computed here from the model's logits.

    python -m trainer.evaluate --checkpoint out/ckpt.pt --data data/ --out result.json

Two processes. The *driver* (this module's `evaluate`) holds the validation tokens and computes
the metric; it never imports or unpickles anything the agent wrote. A *worker* subprocess loads
the checkpoint (the agent's model code and weights) and only ever receives input batches, to
which it answers with logits. The driver:

* normalises the logits itself (log-softmax) and takes the targets' log-probabilities: a loss the
  model reports is never used;
* checks causality on batches the worker cannot tell apart from evaluation batches: the same
  validation text with everything after a random cut replaced by other validation text; logits
  before the cut must not change, or the model is rejected as looking ahead;
* rejects non-finite or misshapen logits with a clear reason.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import pwd
import struct
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# ---- knobs -------------------------------------------------------------------------------------
EVAL_TOKENS = 131_072  # validation tokens scored (a fixed number, so runs are comparable)
EVAL_SEQ_LEN = 128  # context of each scored window; the harness passes the lab's (2048 for the gpu config)
EVAL_BATCH = 16
CAUSALITY_PROBES = 4  # probe batches mixed among the evaluation batches
CAUSALITY_TOLERANCE = 1e-3  # max |Δ log-prob| before the cut (float32 CPU is ~1e-6; bf16 GPU more)
PROBE_SEED = 0x5EED


class EvaluationError(Exception):
    """The model could not be evaluated (crashed, non-causal, non-finite output); the reason is the message."""


# ---- wire format: length-prefixed tensors over the worker's stdin/stdout -------------------------
def _send(stream, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    data = buffer.getvalue()
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _receive(stream) -> np.ndarray | None:
    header = stream.read(8)
    if len(header) < 8:
        return None
    (size,) = struct.unpack("<Q", header)
    data = stream.read(size)
    if len(data) < size:
        return None
    return np.load(io.BytesIO(data), allow_pickle=False)


# ---- worker: runs the agent's model, sees only inputs ------------------------------------------
def load_model(checkpoint: Path, device: str = "cpu") -> torch.nn.Module:
    """Rebuild the model from a checkpoint: the training script's source, its config, and the weights."""
    state = torch.load(checkpoint, map_location=device, weights_only=True)
    module = types.ModuleType("labrat_model")
    exec(compile(state["source"], state.get("source_name", "train.py"), "exec"), module.__dict__)
    model = module.build_model(state["config"])
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def worker(checkpoint: Path, device: str) -> int:
    model = load_model(checkpoint, device)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    with torch.no_grad():
        while (batch := _receive(stdin)) is not None:
            logits = model(torch.from_numpy(batch.astype(np.int64)).to(device))
            _send(stdout, logits.float().cpu().numpy())
    return 0


# ---- driver: holds the data, computes the metric -----------------------------------------------
class _Worker:
    def __init__(self, checkpoint: Path, device: str, user: str | None = None):
        # The worker runs the agent's code: it only ever gets inputs. Run as another `user` (the driver
        # must be root, or hold CAP_SETUID/CAP_SETGID), it cannot even read the validation file.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.legacy.evaluate_v1", "--worker", str(Path(checkpoint).resolve()), "--device", device],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=Path(__file__).resolve().parents[2],  # the repository root (this copy lives in tests/legacy)
            user=user, group=pwd.getpwnam(user).pw_gid if user else None, extra_groups=[] if user else None,
        )

    def logits(self, batch: np.ndarray) -> torch.Tensor:
        try:
            _send(self.proc.stdin, batch)
            answer = _receive(self.proc.stdout)
        except (BrokenPipeError, ValueError):
            answer = None
        if answer is None:
            raise EvaluationError(f"the model crashed during evaluation: {self._stderr_tail()}")
        expected = (*batch.shape, 256)
        if answer.shape != expected:
            raise EvaluationError(f"the model returned logits of shape {answer.shape}, expected {expected}")
        logits = torch.from_numpy(np.array(answer, dtype=np.float32))
        if not torch.isfinite(logits).all():
            raise EvaluationError("the model returned non-finite logits (NaN or inf)")
        return F.log_softmax(logits, dim=-1)

    def _stderr_tail(self) -> str:
        self._stop()
        tail = self.proc.stderr.read().decode("utf-8", "replace").strip().splitlines()
        return tail[-1] if tail else f"exit code {self.proc.returncode}"

    def _stop(self) -> None:
        """End the worker: EOF on its stdin ends its loop; SIGKILL only if it does not (needs CAP_KILL
        when the worker runs as another user)."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self._stop()
        for stream in (self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError):
                stream.close()


def evaluate(checkpoint: Path, val_tokens: np.ndarray, device: str = "cpu", eval_tokens: int = EVAL_TOKENS,
             seq_len: int = EVAL_SEQ_LEN, batch_size: int = EVAL_BATCH, worker_user: str | None = None) -> dict:
    """val_bpb of the checkpoint on the first `eval_tokens` predictions of `val_tokens`, plus the causality verdict."""
    started = time.perf_counter()
    windows = min(eval_tokens // seq_len, (len(val_tokens) - 1) // seq_len)
    if windows < 1:
        raise EvaluationError(f"need at least {seq_len + 1} validation tokens, got {len(val_tokens)}")
    tokens = np.asarray(val_tokens[: windows * seq_len + 1], dtype=np.int64)
    inputs = tokens[:-1].reshape(windows, seq_len)
    targets = torch.from_numpy(tokens[1:].reshape(windows, seq_len))
    rng = np.random.default_rng(PROBE_SEED)
    batch_starts = list(range(0, windows, batch_size))
    probe_after = set(rng.choice(len(batch_starts), size=min(CAUSALITY_PROBES, len(batch_starts)), replace=False))
    worker = _Worker(checkpoint, device, worker_user)
    total_bits, scored, max_leak = 0.0, 0, 0.0
    try:
        for index, start in enumerate(batch_starts):
            x = inputs[start : start + batch_size]
            log_probs = worker.logits(x)
            picked = log_probs.gather(-1, targets[start : start + batch_size].unsqueeze(-1)).squeeze(-1)
            total_bits += float(-picked.double().sum()) / math.log(2)
            scored += picked.numel()
            if index in probe_after:
                max_leak = max(max_leak, _causality_probe(worker, x, log_probs, inputs, rng))
    finally:
        worker.close()
    causal = max_leak <= CAUSALITY_TOLERANCE
    result = {
        "val_bpb": total_bits / scored,  # byte-level tokens: one token is one byte
        "tokens_evaluated": scored,
        "causal": causal,
        "causality_max_delta": max_leak,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if not causal:
        raise EvaluationError(
            f"model rejected: it looks ahead (earlier log-probs changed by up to {max_leak:.3g} when later tokens "
            f"changed; tolerance {CAUSALITY_TOLERANCE})"
        )
    return result


def _causality_probe(worker: _Worker, x: np.ndarray, log_probs: torch.Tensor, inputs: np.ndarray, rng) -> float:
    """Replace everything after a random cut with other real validation text; earlier log-probs must not move."""
    cut = int(rng.integers(1, x.shape[1]))
    other = inputs[rng.integers(0, len(inputs), size=x.shape[0])]
    probe = x.copy()
    probe[:, cut:] = other[:, cut:]
    changed = worker.logits(probe)
    return float((changed[:, :cut] - log_probs[:, :cut]).abs().max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Protected bits-per-byte evaluation of a checkpoint.")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--data", type=Path, help="prepared data directory (holds val.bin and meta.json)")
    parser.add_argument("--out", type=Path, help="where to write the result JSON")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS)
    parser.add_argument("--seq-len", type=int, default=EVAL_SEQ_LEN)
    parser.add_argument("--worker-user", default=None, help="run the model as this user (driver must be root)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.device)
    from trainer.prepare import DataError, load_meta, load_tokens

    try:
        meta = load_meta(args.data)
        val = load_tokens(args.data / "val.bin", meta.get("val_sha256"))
        result = evaluate(args.checkpoint, val, args.device, args.eval_tokens, args.seq_len,
                          worker_user=args.worker_user)
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
