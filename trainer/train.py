"""Train a small GPT on the lab's tokens (bytes, or BPE ids: data/meta.json says) for a fixed wall-clock budget.

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
import contextlib
import json
import math
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.contract import EVAL_SEQ_LENS, VOCAB_SIZE, save_checkpoint
from trainer.hardware import mfu
from trainer.prepare import load_meta, training_deadline

# ---- knobs (the agent's search space) ----------------------------------------------------------
CONFIGS = {
    # Learns visibly in 30-60 s on 2 CPU cores.
    "cpu-tiny": dict(
        n_layer=2, n_head=4, n_embd=128, seq_len=128, batch_size=16, mlp_ratio=4,
        matrix_lr=0.02, embed_lr=0.3, head_lr=0.008, warmdown_frac=0.5, final_lr_frac=0.0, softcap=15.0,
        dtype="float32", compile=False, time_budget=45.0,
    ),
    # autoresearch's size class (~50 M parameters) for one H100: bf16, torch.compile, flash SDPA.
    "gpu": dict(
        n_layer=8, n_head=8, n_embd=768, seq_len=2048, batch_size=64, mlp_ratio=4,
        matrix_lr=0.02, embed_lr=0.2, head_lr=0.004, warmdown_frac=0.5, final_lr_frac=0.0, softcap=15.0,
        dtype="bfloat16", compile=True, time_budget=300.0,
    ),
}
SAVE_RESERVE_SECONDS = 2.0  # stop training this long before the deadline: saving and exiting must fit
ADAM_BETAS = (0.8, 0.95)  # for the embedding and the head (AdamW); the block matrices use Muon
MUON_MOMENTUM = 0.95
NS_STEPS, NS_COEFFICIENTS = 5, (3.4445, -4.7750, 2.0315)  # Muon's Newton-Schulz iteration (Keller Jordan's tuning)
ROPE_MIN_POSITIONS = max(EVAL_SEQ_LENS.values())  # the evaluator may use a longer context than training did
SYNC_EVERY = {"cuda": 20, "cpu": 1}  # steps between reading the loss (a host-device sync) and checking the clock
LOG_EVERY_SECONDS = 5.0


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
    def __init__(self, n_layer: int, n_head: int, n_embd: int, seq_len: int, mlp_ratio: int = 4,
                 softcap: float | None = None, vocab_size: int = VOCAB_SIZE, **_):
        super().__init__()
        self.softcap = softcap
        self.embed = nn.Embedding(vocab_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, mlp_ratio) for _ in range(n_layer))
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        cos, sin = rope_tables(max(seq_len, ROPE_MIN_POSITIONS), n_embd // n_head)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        # Every residual branch starts as the identity and the head predicts uniformly (modded-nanogpt).
        nn.init.normal_(self.embed.weight, std=1.0)
        for name, p in self.blocks.named_parameters():
            if name.endswith(("proj.weight", "down.weight")):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                nn.init.normal_(p, std=p.shape[1] ** -0.5)
        nn.init.zeros_(self.head.weight)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab_size) for next-token prediction; position t sees tokens 0..t only."""
        x = F.rms_norm(self.embed(idx), (self.embed.embedding_dim,))
        for block in self.blocks:
            x = block(x, self.cos, self.sin)
        logits = self.head(F.rms_norm(x, (x.shape[-1],))).float()
        if self.softcap:  # tanh soft-capping keeps logits bounded early in training (Gemma 2, nanochat)
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits


def build_model(config: dict) -> GPT:
    """The entry point the evaluator rebuilds the model through, with the config saved in the checkpoint
    (what it must return: trainer/contract.py)."""
    return GPT(**config)


# ---- training ----------------------------------------------------------------------------------
class Batches:
    """Endless random windows of the training split, (inputs, targets) shifted by one token. The split stays
    in its stored dtype (uint8 bytes; uint16 BPE ids, held as int16 and unmasked after the gather) and, on a
    GPU, lives on the device: each batch is one gather there, with no host-to-device copy. Window starts
    come from a CPU generator, so a seed gives the same windows on any device."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, device: torch.device):
        self.wide = tokens.dtype == np.uint16
        with warnings.catch_warnings():  # a read-only array is fine: batches gather from it and never write
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            data = torch.from_numpy(tokens.view(np.int16) if self.wide else tokens)
        self.data = data.to(device) if device.type == "cuda" else data
        self.offsets = torch.arange(seq_len + 1, device=self.data.device)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.generator = torch.Generator().manual_seed(seed)
        self.device = device

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.data) - self.seq_len - 1, (self.batch_size, 1), generator=self.generator)
        window = self.data[starts.to(self.data.device) + self.offsets].long()
        if self.wide:
            window &= 0xFFFF
        return window[:, :-1].to(self.device, non_blocking=True), window[:, 1:].to(self.device, non_blocking=True)


def lr_scale(progress: float, cfg: dict) -> float:
    """Constant, then a linear warm-down to final_lr_frac over the last warmdown_frac of the budget."""
    start = 1.0 - cfg["warmdown_frac"]
    if progress <= start:
        return 1.0
    t = min((progress - start) / max(cfg["warmdown_frac"], 1e-9), 1.0)
    return 1.0 + t * (cfg["final_lr_frac"] - 1.0)


def orthogonalize(update: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """The semi-orthogonal matrix nearest `update` (its singular values pushed towards 1), by a quintic
    Newton-Schulz iteration: bfloat16 on a GPU, float32 on a CPU, where bfloat16 matmuls are slow."""
    x = update.to(torch.bfloat16 if update.is_cuda else torch.float32)
    tall = x.size(0) > x.size(1)
    x = x.mT if tall else x
    x = x / (x.norm() + 1e-7)
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(update.dtype)


class Muon(torch.optim.Optimizer):
    """Muon (Keller Jordan, 2024): Nesterov momentum whose update, per matrix, is orthogonalized. The same
    rule as torch.optim.Muon with adjust_lr_fn="original", which runs the iteration in bfloat16 on any
    device: on 2 CPU cores that took 0.37 s of a 0.46 s cpu-tiny step, float32 takes milliseconds."""

    def __init__(self, params, lr: float, momentum: float = MUON_MOMENTUM):
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                velocity = self.state[p].setdefault("momentum", torch.zeros_like(p))
                velocity.lerp_(p.grad, 1 - group["momentum"])
                update = orthogonalize(p.grad.lerp(velocity, group["momentum"]))
                p.add_(update, alpha=-group["lr"] * max(1.0, p.size(0) / p.size(1)) ** 0.5)


def make_optimizers(model: nn.Module, cfg: dict, fused: bool) -> list[torch.optim.Optimizer]:
    """Muon for the blocks' matrices; AdamW for the embedding (a lookup, not a projection), the head and any
    other parameter. Adam's rates scale with 1/sqrt(width) (nanochat), tuned at 768."""
    scale = (getattr(getattr(model, "embed", None), "embedding_dim", 768) / 768) ** -0.5
    named = list(model.named_parameters())
    matrices = [p for n, p in named if p.dim() == 2 and n.startswith("blocks.")]
    embed = [p for n, p in named if n.startswith("embed")]
    rest = [p for n, p in named if not n.startswith("embed") and not (p.dim() == 2 and n.startswith("blocks."))]
    adam_groups = [group for group in ({"params": embed, "lr": cfg["embed_lr"] * scale},
                                       {"params": rest, "lr": cfg["head_lr"] * scale}) if group["params"]]
    optimizers = []
    if matrices:
        optimizers.append(Muon(matrices, lr=cfg["matrix_lr"], momentum=MUON_MOMENTUM))
    if adam_groups:
        optimizers.append(torch.optim.AdamW(adam_groups, betas=ADAM_BETAS, eps=1e-10, weight_decay=0.0, fused=fused))
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def next_token_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The training loss; compiled with the model, so the cross-entropy fuses with the head."""
    logits = model(inputs)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def flops_per_token(model: GPT, cfg: dict) -> float:
    """Training FLOPs per token: 6 per weight (forward + backward) plus attention's 12·L·T·d."""
    n_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("embed"))
    return 6 * n_params + 12 * cfg["n_layer"] * cfg["seq_len"] * cfg["n_embd"]


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def train(cfg: dict, train_tokens: np.ndarray, out: Path, device: str | torch.device, steps: int | None = None,
          seed: int = 1337, deterministic: bool = False, deadline: float | None = None) -> dict:
    """Train until `deadline` (time.time() seconds; default: the config's budget from now) less the save
    reserve, or for `steps`; write the checkpoint and the summary."""
    deadline = time.time() + cfg["time_budget"] if deadline is None else deadline
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    if on_gpu and device.index is not None:
        torch.cuda.set_device(device)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic (read when CUDA starts, i.e. below); on CPU one
        # thread fixes the order of floating-point reductions, so reruns are bit-identical.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        if not on_gpu:
            torch.set_num_threads(1)
    model_cfg = {k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "seq_len", "mlp_ratio", "softcap")}
    model_cfg["vocab_size"] = cfg.get("vocab_size", VOCAB_SIZE)
    model = build_model(model_cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    optimizers = make_optimizers(model, cfg, fused=on_gpu)
    compiled = cfg["compile"] and not deterministic  # inductor's kernels are not bit-reproducible
    loss_fn = torch.compile(next_token_loss) if compiled else next_token_loss
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["dtype"] == "bfloat16")
    attention = (torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH) if deterministic and on_gpu
                 else contextlib.nullcontext())  # the fused attention kernels' backward is not deterministic
    data = Batches(train_tokens, cfg["batch_size"], cfg["seq_len"], seed, device)
    tokens_per_step = cfg["batch_size"] * cfg["seq_len"]
    sync_every = SYNC_EVERY["cuda" if on_gpu else "cpu"]
    loop_start = time.time()
    stop_at = deadline - SAVE_RESERVE_SECONDS
    print(f"train: {n_params / 1e6:.2f} M parameters, {tokens_per_step} tokens/step, "
          f"{'%d steps' % steps if steps else '%.1f s left of the budget' % (stop_at - loop_start)} on {device}"
          f"{' (compiled)' if compiled else ''}", flush=True)

    step, loss_value, last_log = 0, float("nan"), 0.0
    timed_steps, timed_seconds, first_step_seconds, step_seconds = 0, 0.0, 0.0, 0.0
    block_start, block_steps = time.perf_counter(), 0
    while True:
        if (step >= steps) if steps else time.time() >= stop_at:
            break
        progress = step / steps if steps else (time.time() - loop_start) / max(stop_at - loop_start, 1e-9)
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lr_scale(progress, cfg)
        inputs, targets = next(data)
        with autocast, attention:
            loss = loss_fn(model, inputs, targets)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        step += 1
        block_steps += 1
        if step > 1 and block_steps < sync_every and step != steps:
            continue
        # A sync point: the loss is read (the host waits for the device), the clock is exact.
        if not math.isfinite(loss_value := loss.item()):
            raise FloatingPointError(f"loss became {loss_value} at step {step}")
        now = time.perf_counter()
        if step == 1:  # the first step compiles (when compiled): left out of tokens/s
            first_step_seconds = now - block_start
            step_seconds = first_step_seconds
        else:
            timed_steps += block_steps
            timed_seconds += now - block_start
            step_seconds = (now - block_start) / block_steps
        block_start, block_steps = now, 0
        if timed_seconds - last_log >= LOG_EVERY_SECONDS:
            last_log = timed_seconds
            print(f"step {step:6d} | loss {loss_value:.4f} | lr x{lr_scale(progress, cfg):.3f} | "
                  f"{timed_steps * tokens_per_step / max(timed_seconds, 1e-9):,.0f} tok/s", flush=True)
        if not steps and time.time() + sync_every * step_seconds > stop_at:  # the next block would not fit
            break

    tokens_per_s = timed_steps * tokens_per_step / timed_seconds if timed_seconds else 0.0
    device_name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    summary = {
        "steps": step,
        "tokens": step * tokens_per_step,
        "train_seconds": round(timed_seconds + first_step_seconds, 3),
        "first_step_seconds": round(first_step_seconds, 3),  # includes compiling, when compiled
        "tokens_per_s": round(tokens_per_s, 1),
        "final_train_loss": loss_value,
        "params": n_params,
        "peak_memory_bytes": peak_memory_bytes(device),
        "device": device_name,
        "compiled": compiled,
        "mfu": mfu(tokens_per_s, flops_per_token(model, cfg), device_name) if on_gpu else None,
        "config": cfg,
        "seed": seed,
        "deterministic": deterministic,
    }
    save_checkpoint(out, model, model_cfg, source_file=__file__)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"train: done, {step} steps, {tokens_per_s:,.0f} tok/s, summary in {out / 'summary.json'}", flush=True)
    return summary


def parse_setting(text: str, cfg: dict) -> tuple[str, object]:
    """`--set key=value`: a knob of the config, the value read as JSON (1, 0.5, true) or else as text."""
    key, sep, raw = text.partition("=")
    if not sep or key not in cfg:
        raise ValueError(f"--set {text!r}: expected key=value with key one of {', '.join(sorted(cfg))}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train a small GPT for a fixed wall-clock budget.")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu-tiny")
    parser.add_argument("--data", type=Path, default=Path("data"), help="prepared data directory (train.bin)")
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--time-budget", type=float, default=None,
                        help="all-in seconds from now (default: the config's; labrat passes its deadline instead)")
    parser.add_argument("--steps", type=int, default=None, help="train a fixed number of steps instead")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--deterministic", action="store_true", help="fixed steps, seeds, algorithms: bit-identical")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one knob of the config (repeatable), e.g. --set n_layer=4")
    args = parser.parse_args(argv)
    cfg = dict(CONFIGS[args.config])
    try:
        cfg.update(parse_setting(text, cfg) for text in args.set)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        parser.error(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
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
    meta = load_meta(args.data) if (args.data / "meta.json").exists() else {}
    cfg["vocab_size"] = meta.get("vocab_size", VOCAB_SIZE)
    tokens = np.memmap(train_file, dtype=meta.get("token_dtype", "uint8"), mode="c")  # paged in as read (copy-on-write)
    train(cfg, tokens, args.out, device, args.steps, args.seed, args.deterministic,
          deadline=training_deadline(cfg["time_budget"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
