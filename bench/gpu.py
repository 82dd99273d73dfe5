"""GPU device benchmark: the `gpu` config bare on this machine (python3 + torch + CUDA; no Docker needed).

    python bench/gpu.py                   # about 8 minutes on one H100/H200: prints a dated table
    python bench/gpu.py --json out.json   # also every number as JSON
    python bench/gpu.py --device cpu --budget 20 --eval-tokens 8192 --set n_layer=1 --set n_embd=64 \
        --set seq_len=128 --set batch_size=2   # a smoke run of this script's own code path, on a CPU

In one call: prepares a synthetic corpus; trains the gpu config for --budget seconds (all-in, as labrat
counts it) and reports tokens/s, MFU (the exact SKU's dense bf16 peak, trainer/hardware.py), peak
memory, the first step's seconds (compilation) and the steps taken; evaluates the checkpoint on held-out
data (val_bpb, its standard error, and the causality check's largest difference against its
tolerance, which is how the CUDA tolerance is calibrated); then runs deterministic mode twice for
a few steps and says whether the two runs are bit-identical.

If a copy of autoresearch's `train.py` sits in bench/autoresearch/ (never committed), it runs that
too, from that directory with a 10-minute cap, and prints its last lines beside ours; it needs its own
`prepare.py` and data there (autoresearch downloads them; a GPU machine without network must be given them).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BUDGET_S = 240.0  # all-in training seconds: compile plus a steady stretch of steps
TRAIN_BYTES = 256_000_000  # synthetic corpus: ~2 epochs of a 240 s H100 run would need far more; 256 MB is 1 byte/token
EVAL_TOKENS = 1_048_576  # 512 windows of 2,048: standard error ~0.001 bpb
DETERMINISTIC_STEPS = 10
AUTORESEARCH = ROOT / "bench" / "autoresearch" / "train.py"
AUTORESEARCH_TIMEOUT_S = 600


def run(cmd: list[str], timeout: float, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"gpu bench: {' '.join(cmd[:4])} ... failed: {(done.stderr or done.stdout).strip()[-800:]}")
    return done


def train(data: Path, out: Path, args, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "trainer.train", "--config", "gpu", "--data", str(data), "--out", str(out),
           "--device", args.device, *sum((["--set", s] for s in args.set), []), *extra]
    run(cmd, timeout=args.budget + 600)
    return json.loads((out / "summary.json").read_text())


def weights_digest(checkpoint: Path) -> str:
    import torch

    state = torch.load(checkpoint, weights_only=True, map_location="cpu")["model"]
    return hashlib.sha256(b"".join(t.float().numpy().tobytes() for t in state.values())).hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget", type=float, default=BUDGET_S)
    parser.add_argument("--train-bytes", type=int, default=TRAIN_BYTES)
    parser.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS)
    parser.add_argument("--set", action="append", default=[], help="a gpu config knob, as train.py's --set")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    from trainer.contract import EVAL_SEQ_LENS
    from trainer.prepare import prepare

    started = time.monotonic()
    rows: dict[str, object] = {"date": dt.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
                               "torch": torch.__version__, "cuda": torch.version.cuda,
                               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "data", Path(tmp) / "out"
        t0 = time.monotonic()
        prepare(data, train_bytes=args.train_bytes, val_bytes=max(2 * args.eval_tokens, 262_144))
        rows["prepare_s"] = round(time.monotonic() - t0, 1)

        summary = train(data, out, args, "--time-budget", str(args.budget))
        rows.update({k: summary.get(k) for k in ("steps", "tokens_per_s", "mfu", "peak_memory_bytes",
                                                 "first_step_seconds", "train_seconds", "params", "compiled")})
        seq_len = EVAL_SEQ_LENS["gpu"] if not any(s.startswith("seq_len=") for s in args.set) else 128
        evaluated = run([sys.executable, "-m", "trainer.evaluate", "--checkpoint", str(out / "ckpt.pt"), "--data",
                         str(data), "--device", args.device, "--eval-tokens", str(args.eval_tokens),
                         "--seq-len", str(seq_len)], timeout=1200)
        result = json.loads(evaluated.stdout.strip().splitlines()[-1])
        from trainer.evaluate import CAUSALITY_TOLERANCE

        rows.update({"val_bpb": result.get("val_bpb"), "val_bpb_se": result.get("val_bpb_se"),
                     "causal": result.get("causal"), "causality_max_delta": result.get("causality_max_delta"),
                     "causality_tolerance": CAUSALITY_TOLERANCE, "eval_seconds": result.get("seconds")})

        digests, losses = [], []
        for name in ("det-a", "det-b"):
            det = train(data, Path(tmp) / name, args, "--deterministic", "--steps", str(DETERMINISTIC_STEPS))
            digests.append(weights_digest(Path(tmp) / name / "ckpt.pt"))
            losses.append(det["final_train_loss"])
        rows["deterministic_bit_identical"] = digests[0] == digests[1]
        rows["deterministic_loss_delta"] = abs(losses[0] - losses[1])

    if AUTORESEARCH.exists():
        try:
            done = subprocess.run([sys.executable, AUTORESEARCH.name], cwd=AUTORESEARCH.parent, capture_output=True,
                                  text=True, timeout=AUTORESEARCH_TIMEOUT_S)
            rows["autoresearch_tail"] = (done.stdout + done.stderr).strip().splitlines()[-15:]
        except subprocess.TimeoutExpired:
            rows["autoresearch_tail"] = [f"did not finish within {AUTORESEARCH_TIMEOUT_S} s"]
    rows["bench_seconds"] = round(time.monotonic() - started, 1)

    print(f"# bench/gpu.py, {rows['date']}, {rows['host']}: {rows['device']}, torch {rows['torch']} (CUDA {rows['cuda']})")
    print("| measurement | value |\n|---|---|")
    for key, value in rows.items():
        if key not in ("date", "host", "autoresearch_tail"):
            print(f"| {key} | {value} |")
    for line in rows.get("autoresearch_tail", []):
        print(f"autoresearch: {line}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
