"""Training-core benchmark: cpu-tiny tokens/s bare vs in the CPU sandbox, and the gpu config on a GPU.

    python bench/trainer.py                 # CPU: bare vs runc (and runsc if registered), one run
    python bench/trainer.py --gpu-only      # on a GPU machine without Docker: tokens/s, MFU, memory
    python bench/trainer.py --recipe-only   # CPU: the shipped recipe against the one before it, 3 seeds

Every figure is measured in this run; ratios compare runs made back to back, interleaved, best of N.
"""

from __future__ import annotations

import argparse
import datetime as dt
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

CPU_BUDGET_S = 20.0  # per run; long enough for a steady tokens/s on 2 cores
REPEATS = 2  # interleaved bare/container pairs; the best of each is kept
GPU_BUDGET_S = 120.0
TARGET_RATIO = {"runc": 0.98, "runsc": 0.90}
RECIPE_STEPS = 400  # deterministic cpu-tiny steps per run (one thread): ~1 minute each
RECIPE_SEEDS = (1, 2, 3)
RECIPE_EVAL_TOKENS = 65_536
PREVIOUS_RECIPE = ROOT / "bench" / "recipes" / "train_v1.py"  # AdamW + cosine, as shipped until 2026-12-02


def bare_run(config: str, budget: float, data: Path, env: dict[str, str] | None = None) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "trainer.train", "--config", config, "--data", str(data), "--out", out,
               "--time-budget", str(budget)]
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, env={**os.environ, **(env or {})})
        return json.loads((Path(out) / "summary.json").read_text())


def container_run(box, budget: float) -> dict:
    result = box.exec(f"python -m trainer.train --config cpu-tiny --data /workspace/data --out /workspace/out "
                      f"--time-budget {budget}", timeout=budget * 4 + 120)
    if result.exit_code != 0:
        raise RuntimeError(f"in-container training failed: {result.stderr[-500:]}")
    return json.loads(box.read_file("out/summary.json"))


def cpu_bench(runtimes: list[str], budget: float) -> list[dict]:
    from harness.image import build_image
    from sandbox.engine import client
    from sandbox.policy import SandboxPolicy
    from sandbox.sandbox import Sandbox
    from trainer.prepare import prepare

    image = build_image(on_step=lambda line: None)
    # Bare runs get the image's allocator settings, so the ratio measures the sandbox and nothing else.
    image_env = dict(item.split("=", 1) for item in client().images.get(image).attrs["Config"]["Env"])
    malloc_env = {k: v for k, v in image_env.items() if k.startswith("MALLOC_")}
    rows = []
    with tempfile.TemporaryDirectory() as data:
        prepare(Path(data))
        for runtime in runtimes:
            if runtime == "runsc" and "runsc" not in client().info().get("Runtimes", {}):
                rows.append({"name": "cpu-tiny runsc / bare", "skipped": "runsc is not registered with the engine"})
                continue
            policy = SandboxPolicy(image=image, runtime=runtime, memory_bytes=8 << 30)
            with Sandbox.start(policy, session=f"benchtrain{os.getpid()}") as box:
                prep = box.exec("python -m trainer.prepare --out /workspace/data", timeout=300)
                if prep.exit_code != 0:
                    raise RuntimeError(f"in-container prepare failed: {prep.stderr[-500:]}")
                bare, inside = [], []
                for _ in range(REPEATS):  # interleaved so drift on the host hits both sides alike
                    bare.append(bare_run("cpu-tiny", budget, Path(data), malloc_env)["tokens_per_s"])
                    inside.append(container_run(box, budget)["tokens_per_s"])
            ratio = max(inside) / max(bare)
            rows.append({"name": f"cpu-tiny {runtime} / bare", "bare_tok_s": max(bare), "container_tok_s": max(inside),
                         "ratio": ratio, "target": TARGET_RATIO[runtime], "pass": ratio >= TARGET_RATIO[runtime]})
    return rows


def gpu_bench(budget: float) -> dict:
    from trainer.prepare import prepare

    with tempfile.TemporaryDirectory() as data:
        prepare(Path(data), train_bytes=64_000_000, val_bytes=1_000_000)
        summary = bare_run("gpu", budget, Path(data))
    return {"name": "gpu config (bare)", "device": summary["device"], "tok_s": summary["tokens_per_s"],
            "mfu": summary["mfu"], "peak_memory_gb": summary["peak_memory_bytes"] / 1e9, "params_m": summary["params"] / 1e6,
            "steps": summary["steps"]}


def recipe_score(script: Path, seed: int, steps: int, data: Path) -> tuple[float, float]:
    """val_bpb of `script`'s cpu-tiny model after `steps` deterministic steps (bare), and the training's seconds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        subprocess.run([sys.executable, str(script), "--config", "cpu-tiny", "--data", str(data), "--out", out,
                        "--device", "cpu", "--deterministic", "--steps", str(steps), "--seed", str(seed)],
                       cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
        done = subprocess.run([sys.executable, "-m", "trainer.evaluate", "--checkpoint", f"{out}/ckpt.pt", "--data",
                               str(data), "--device", "cpu", "--eval-tokens", str(RECIPE_EVAL_TOKENS)],
                              cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["val_bpb"], seconds


def recipe_bench(steps: int) -> list[dict]:
    """The shipped train.py against the previous recipe at equal deterministic steps, with seed noise:
    the gain must exceed twice the larger of the two seed spreads (standard deviations)."""
    import statistics

    from trainer.prepare import prepare

    scripts = {"previous": PREVIOUS_RECIPE, "shipped": ROOT / "trainer" / "train.py"}
    scores: dict[str, list[float]] = {name: [] for name in scripts}
    seconds: dict[str, list[float]] = {name: [] for name in scripts}
    with tempfile.TemporaryDirectory() as data:
        prepare(Path(data))
        for seed in RECIPE_SEEDS:  # interleaved, so drift on the host hits both alike
            for name, script in scripts.items():
                bpb, took = recipe_score(script, seed, steps, Path(data))
                scores[name].append(bpb)
                seconds[name].append(took)
    # Equal steps, not equal time: the seconds say what a step costs, which a time budget also charges.
    rows = [{"name": f"cpu-tiny {name} recipe, {steps} deterministic steps", "seeds": list(RECIPE_SEEDS),
             "val_bpb": values, "mean": statistics.mean(values), "sd": statistics.stdev(values),
             "train_seconds_mean": statistics.mean(seconds[name])}
            for name, values in scores.items()]
    gain = rows[0]["mean"] - rows[1]["mean"]
    noise = max(rows[0]["sd"], rows[1]["sd"])
    rows.append({"name": "recipe gain (previous - shipped mean val_bpb)", "gain": gain, "seed_noise_sd": noise,
                 "target": "gain > 2 x seed noise", "pass": gain > 2 * noise})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtimes", default="runc,runsc")
    parser.add_argument("--budget", type=float, default=CPU_BUDGET_S)
    parser.add_argument("--gpu-only", action="store_true", help="skip the container rows (GPU machine without Docker)")
    parser.add_argument("--gpu-budget", type=float, default=GPU_BUDGET_S)
    parser.add_argument("--recipe-only", action="store_true", help="only the recipe comparison (no Docker needed)")
    parser.add_argument("--recipe-steps", type=int, default=RECIPE_STEPS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    if args.recipe_only:
        rows = recipe_bench(args.recipe_steps)
    else:
        rows = [] if args.gpu_only else cpu_bench(args.runtimes.split(","), args.budget) + recipe_bench(args.recipe_steps)
    if torch.cuda.is_available() and not args.recipe_only:
        rows.append(gpu_bench(args.gpu_budget))
    print(f"# bench/trainer.py, {dt.date.today()}, {platform.node()}: {os.cpu_count()} cores, torch {torch.__version__}")
    for row in rows:
        print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0 if all(row.get("pass", True) for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
