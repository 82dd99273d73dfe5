"""labrat's train.py as shipped until 2026-12-02 (AdamW, cosine schedule), kept to measure the new recipe against.

All of this file is the agent's to change; the rest of trainer/ is fixed (contract.py says what evaluation needs).

    python -m trainer.train --config cpu-tiny --data data/ --out out/
    python -m trainer.train --config gpu --data data/ --out out/ --time-budget 300
    python -m trainer.train --config cpu-tiny --deterministic --steps 50    # bit-identical reruns

Reads only the training split. Writes out/ckpt.pt through the contract's save_checkpoint (this
file's source, build_model's config and the weights: the evaluator rebuilds the model from them by
calling build_model) and out/summary.json. The metric is not computed here: trainer/evaluate.py
scores the checkpoint on held-out data.

The time budget is all-in wall clock: under labrat the harness passes its deadline (host clock) and
kills the run there, so start-up, data loading, compilation and saving all come out of the budget;
training stops SAVE_RESERVE_SECONDS before the deadline to leave time to save and exit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.contract import EVAL_SEQ_LENS, VOCAB_SIZE, save_checkpoint
from trainer.prepare import training_deadline

# ---- knobs (the agent's search space) ----------------------------------------------------------
CONFIGS = {
    # Learns visibly in 30-60 s on 2 CPU cores.
    "cpu-tiny": dict(
        n_layer=2, n_head=4, n_embd=128, seq_len=128, batch_size=16, mlp_ratio=4,
        lr=5e-3, weight_decay=0.1, warmup_frac=0.02, final_lr_frac=0.1, grad_clip=1.0,
        dtype="float32", compile=False, time_budget=45.0,
    ),
    # autoresearch's size class (~50 M parameters) for one H100: bf16, torch.compile, flash SDPA.
    "gpu": dict(
        n_layer=8, n_head=8, n_embd=768, seq_len=2048, batch_size=64, mlp_ratio=4,
        lr=2e-3, weight_decay=0.1, warmup_frac=0.02, final_lr_frac=0.05, grad_clip=1.0,
        dtype="bfloat16", compile=True, time_budget=300.0,
    ),
}
SAVE_RESERVE_SECONDS = 2.0  # stop training this long before the deadline: saving and exiting must fit
ADAM_BETAS = (0.9, 0.95)
ROPE_MIN_POSITIONS = max(EVAL_SEQ_LENS.values())  # the evaluator may use a longer context than training did
LOG_EVERY_SECONDS = 5.0
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, for MFU


# ---- model -------------------------------------------------------------------------------------
def rope_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, D); rotate the two halves of each head dimension by a position-dependent angle.
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[: x.shape[2]].to(x.dtype), sin[: x.shape[2]].to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = F.rms_norm(q, (q.shape[-1],)), F.rms_norm(k, (k.shape[-1],))  # QK-norm keeps logits tame
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, n_embd: int, ratio: int):
        super().__init__()
        self.up = nn.Linear(n_embd, ratio * n_embd, bias=False)
        self.down = nn.Linear(ratio * n_embd, n_embd, bias=False)

    def forward(self, x):
        return self.down(F.relu(self.up(x)).square())  # ReLU², as in modded-nanogpt / nanochat


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, mlp_ratio: int):
        super().__init__()
        self.attn = Attention(n_embd, n_head)
        self.mlp = MLP(n_embd, mlp_ratio)

    def forward(self, x, cos, sin):
        x = x + self.attn(F.rms_norm(x, (x.shape[-1],)), cos, sin)
        return x + self.mlp(F.rms_norm(x, (x.shape[-1],)))


class GPT(nn.Module):
    def __init__(self, n_layer: int, n_head: int, n_embd: int, seq_len: int, mlp_ratio: int = 4, **_):
        super().__init__()
        self.embed = nn.Embedding(VOCAB_SIZE, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, mlp_ratio) for _ in range(n_layer))
        self.head = nn.Linear(n_embd, VOCAB_SIZE, bias=False)
        cos, sin = rope_tables(max(seq_len, ROPE_MIN_POSITIONS), n_embd // n_head)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("proj.weight", "down.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, VOCAB_SIZE) for next-token prediction; position t sees tokens 0..t only."""
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, self.cos, self.sin)
        return self.head(F.rms_norm(x, (x.shape[-1],))).float()


def build_model(config: dict) -> GPT:
    """The entry point the evaluator rebuilds the model through, with the config saved in the checkpoint
    (what it must return: trainer/contract.py)."""
    return GPT(**config)


# ---- training ----------------------------------------------------------------------------------
def batches(tokens: np.ndarray, batch_size: int, seq_len: int, generator: torch.Generator, device: str):
    """Endless random windows of the training split: (inputs, targets) shifted by one token."""
    data = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    while True:
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
        window = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])
        yield window[:, :-1].to(device, non_blocking=True), window[:, 1:].to(device, non_blocking=True)


def lr_at(progress: float, cfg: dict) -> float:
    """Linear warm-up, then cosine decay to final_lr_frac; progress is the fraction of the budget used."""
    if progress < cfg["warmup_frac"]:
        return cfg["lr"] * progress / cfg["warmup_frac"]
    t = (progress - cfg["warmup_frac"]) / max(1e-9, 1 - cfg["warmup_frac"])
    return cfg["lr"] * (cfg["final_lr_frac"] + (1 - cfg["final_lr_frac"]) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def make_optimizer(model: nn.Module, cfg: dict, fused: bool) -> torch.optim.Optimizer:
    # Weight decay on the matrices only: not on the embedding table (a lookup, not a projection).
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("embed")]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or n.startswith("embed")]
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=ADAM_BETAS, fused=fused)


def flops_per_token(model: GPT, cfg: dict) -> float:
    """Training FLOPs per token: 6 per weight (forward + backward) plus attention's 12·L·T·d."""
    n_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("embed"))
    return 6 * n_params + 12 * cfg["n_layer"] * cfg["seq_len"] * cfg["n_embd"]


def peak_memory_bytes(device: str) -> int:
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def train(cfg: dict, train_tokens: np.ndarray, out: Path, device: str, steps: int | None = None,
          seed: int = 1337, deterministic: bool = False, deadline: float | None = None) -> dict:
    """Train until `deadline` (time.time() seconds; default: the config's budget from now) less the save
    reserve, or for `steps`; write the checkpoint and the summary."""
    deadline = time.time() + cfg["time_budget"] if deadline is None else deadline
    torch.manual_seed(seed)
    if deterministic:
        # One thread fixes the order of floating-point reductions, so reruns are bit-identical.
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
    model_cfg = {k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "seq_len", "mlp_ratio")}
    model = build_model(model_cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = make_optimizer(model, cfg, fused=device == "cuda")
    step_fn = torch.compile(model) if cfg["compile"] and device == "cuda" and not deterministic else model
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cfg["dtype"] == "bfloat16")
    data = batches(train_tokens, cfg["batch_size"], cfg["seq_len"], torch.Generator().manual_seed(seed), device)
    tokens_per_step = cfg["batch_size"] * cfg["seq_len"]
    loop_start = time.time()
    stop_at = deadline - SAVE_RESERVE_SECONDS
    print(f"train: {n_params / 1e6:.2f} M parameters, {tokens_per_step} tokens/step, "
          f"{'%d steps' % steps if steps else '%.1f s left of the budget' % (stop_at - loop_start)} on {device}",
          flush=True)

    step, train_seconds, loss_value, last_log, step_seconds = 0, 0.0, float("nan"), 0.0, 0.0
    warm_steps = 2 if cfg["compile"] and device == "cuda" else 0  # compile steps are left out of tokens/s
    while True:
        now = time.time()
        progress = step / steps if steps else (now - loop_start) / max(stop_at - loop_start, 1e-9)
        if progress >= 1.0 or (not steps and now + step_seconds > stop_at):  # the next step would not fit
            break
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(progress, cfg)
        inputs, targets = next(data)
        with autocast:
            logits = step_fn(inputs)
        loss = F.cross_entropy(logits.view(-1, VOCAB_SIZE), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        step += 1
        step_seconds = time.perf_counter() - started
        if step > warm_steps:
            train_seconds += step_seconds
        if not math.isfinite(loss_value := loss.item()):
            raise FloatingPointError(f"loss became {loss_value} at step {step}")
        if train_seconds - last_log >= LOG_EVERY_SECONDS:
            last_log = train_seconds
            print(f"step {step:6d} | loss {loss_value:.4f} | lr {lr_at(progress, cfg):.2e} | "
                  f"{(step - warm_steps) * tokens_per_step / max(train_seconds, 1e-9):,.0f} tok/s", flush=True)

    timed_tokens = max(step - warm_steps, 0) * tokens_per_step
    tokens_per_s = timed_tokens / train_seconds if train_seconds else 0.0
    summary = {
        "steps": step,
        "tokens": step * tokens_per_step,
        "train_seconds": round(train_seconds, 3),
        "tokens_per_s": round(tokens_per_s, 1),
        "final_train_loss": loss_value,
        "params": n_params,
        "peak_memory_bytes": peak_memory_bytes(device),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "mfu": None,
        "config": cfg,
        "seed": seed,
        "deterministic": deterministic,
    }
    if device == "cuda":
        peak = next((v for k, v in GPU_PEAK_FLOPS.items() if k in summary["device"]), None)
        summary["mfu"] = tokens_per_s * flops_per_token(model, cfg) / peak if peak else None
    save_checkpoint(out, model, model_cfg, source_file=__file__)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"train: done, {step} steps, {tokens_per_s:,.0f} tok/s, summary in {out / 'summary.json'}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train a small byte-level GPT for a fixed wall-clock budget.")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu-tiny")
    parser.add_argument("--data", type=Path, default=Path("data"), help="prepared data directory (train.bin)")
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--time-budget", type=float, default=None,
                        help="all-in seconds from now (default: the config's; labrat passes its deadline instead)")
    parser.add_argument("--steps", type=int, default=None, help="train a fixed number of steps instead")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--deterministic", action="store_true", help="fixed steps, seeds, algorithms: bit-identical")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    cfg = dict(CONFIGS[args.config])
    if args.time_budget is not None:
        cfg["time_budget"] = args.time_budget
    elif os.environ.get("LABRAT_TIME_BUDGET"):
        cfg["time_budget"] = float(os.environ["LABRAT_TIME_BUDGET"])
    if args.deterministic and not args.steps:
        parser.error("--deterministic needs --steps (a wall-clock budget is not reproducible)")
    train_file = args.data / "train.bin"
    if not train_file.exists() or train_file.stat().st_size <= cfg["seq_len"] + 1:
        print(f"train: error: {train_file} is missing or too small (run `python -m trainer.prepare --out {args.data}`)",
              file=sys.stderr)
        return 2
    tokens = np.fromfile(train_file, dtype=np.uint8)
    train(cfg, tokens, args.out, args.device, args.steps, args.seed, args.deterministic,
          deadline=training_deadline(cfg["time_budget"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
