"""What the evaluator needs from train.py, in one place. Fixed: the agent may read this file, never change it.

Everything in train.py is the agent's to change, as long as this holds. The evaluation never runs
train.py itself: it runs the source saved in the checkpoint, in a fresh container of the pristine
sandbox image, and relies on exactly this:

* **Tokens.** The lab's data say which (meta.json's `tokenizer` and `vocab_size`; trainer/prepare.py
  encodes them): bytes, token id == byte value, VOCAB_SIZE = 256 (the default); or byte-level BPE ids,
  0 <= id < meta.json's vocab_size (at most 65536), the tokenizer trained on the training split.
* **Context.** The evaluation scores windows of EVAL_SEQ_LENS[size class] tokens (the lab's
  `trainer_config`); a bare `python -m trainer.evaluate` uses EVAL_SEQ_LEN unless given `--seq-len`.
* **The checkpoint.** `<out>/ckpt.pt`, written by save_checkpoint (atomically), at most
  CHECKPOINT_LIMIT bytes, loadable by `torch.load(weights_only=True)`:
  {"source": the training script's text, "source_name": its file name, "config": build_model's
  argument, "model": the weights (state_dict)}.
* **The entry point: `build_model(config) -> torch.nn.Module`**, defined by that source.
  - The source runs as a fresh module named MODEL_MODULE, not "__main__" (its CLI does not start).
    Where it runs there is the pristine image (Python, torch, numpy, this `trainer` package) and
    nothing else the agent wrote: no other workspace file, no data, no network. It must be one
    self-contained file.
  - `config` is the checkpoint's "config", as saved: plain Python values (dict, list, str, int, float,
    bool, None), since the checkpoint is loaded with `weights_only=True`.
  - The module it returns must accept the checkpoint's "model" in `load_state_dict` (strict: the same
    parameter and persistent buffer names and shapes). It is then moved to the evaluation's device
    (cpu, or cuda in a GPU lab) and put in `eval()` mode.
  - `model(idx)` is called under `torch.no_grad()` with `idx` an int64 tensor of shape (B, T) on that
    device, values in [0, vocab_size), B >= 1 rows, 1 <= T <= the evaluation's context length, which
    may be longer than the context the model trained at. The rows come in a secret order and grouping,
    some cut short and refilled, and any B and T in that range may come.
  - It must return a floating-point tensor of logits of shape (B, T, vocab_size): unnormalised scores
    for the token after each position (the evaluator takes their float32 log-softmax itself, which
    must stay finite), and causal: logits[b, t] may depend on idx[b, :t + 1] only, not on later tokens, other rows or
    earlier calls. A model that breaks any of this is rejected with a one-line reason.

How the harness runs train.py (keep these working when rewriting it):
`python -m trainer.train --config {cpu-tiny|gpu} --data DIR --out DIR --device {cpu|cuda} --seed N
[--deterministic --steps N]`, from /workspace, with the deadline in the environment
(trainer.prepare.training_deadline reads it). The run is killed at the deadline; the experiment
needs `<out>/ckpt.pt` when it exits 0. `<out>/summary.json` (the run's own numbers) is informational.

**Training sees train.py and nothing else of the workspace.** It runs in a fresh container of the
pristine image into which the harness copies the candidate's `trainer/train.py` (a regular file of at
most TRAIN_SOURCE_LIMIT bytes) and nothing else the agent wrote: no other file, no home directory,
no weights. Like the evaluation, training needs one self-contained file. This bounds what a run can
bring from outside its budget (say, weights trained in the working container) to that file's bytes.

Importing this module does not import torch: the evaluation driver runs in the harness's process,
which has none. save_checkpoint and load_model import it when called.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

VOCAB_SIZE = 256  # byte tokens
EVAL_SEQ_LENS = {"cpu-tiny": 128, "gpu": 2048}  # per size class, fixed so that a lab's results stay comparable
EVAL_SEQ_LEN = EVAL_SEQ_LENS["cpu-tiny"]  # the default of a bare evaluation
CHECKPOINT_FILE = "ckpt.pt"
CHECKPOINT_LIMIT = 2 * 1024**3  # bytes; the sandbox's per-file limit (RLIMIT_FSIZE) in training is the same
TRAIN_SOURCE = "trainer/train.py"  # the one file of the workspace a training run receives
TRAIN_SOURCE_LIMIT = 64 * 1024  # bytes: ~1,500 lines of code, and not a model's weights
ENTRY_POINT = "build_model"
MODEL_MODULE = "labrat_model"  # the module name the checkpoint's source runs under


def save_checkpoint(out_dir: Path, model: nn.Module, config: dict, source_file: str | Path) -> Path:
    """Write `out_dir`/ckpt.pt: the source of `source_file` (the training script, which defines
    build_model), `config` (build_model's argument) and the model's weights. Written to ckpt.pt.partial
    and renamed when complete, so a run killed while saving leaves no ckpt.pt. Returns its path."""
    import torch

    source_file, out_dir = Path(source_file), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / CHECKPOINT_FILE
    partial = path.with_name(path.name + ".partial")
    torch.save({"source": source_file.read_text(), "source_name": source_file.name, "config": config,
                "model": model.state_dict()}, partial)
    partial.replace(path)
    return path


def read_checkpoint(checkpoint: Path, device: str = "cpu") -> dict:
    """The checkpoint's contents, tensors and plain data only (weights_only: no code runs)."""
    import torch

    return torch.load(checkpoint, map_location=device, weights_only=True)


def checkpoint_parameters(state: dict) -> int:
    """The weights a checkpoint holds: the elements of its state dict's tensors (what `max_params` bounds;
    counted before the agent's code runs, so nothing the model does can change the count)."""
    import torch

    weights = state.get("model") if isinstance(state, dict) else None
    if not isinstance(weights, dict):
        raise TypeError("the checkpoint has no state dict under 'model'")
    return sum(t.numel() for t in weights.values() if isinstance(t, torch.Tensor))


def load_model(checkpoint: Path | dict, device: str = "cpu") -> nn.Module:
    """The evaluator's side: run the checkpoint's source as a fresh module, call its build_model(config),
    load the weights and return the model on `device` in eval mode. This runs the agent's code: only an
    evaluation worker (or a test) calls it. `checkpoint`: a file, or what read_checkpoint returned."""
    state = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint, device)
    source_name = state.get("source_name", "train.py")
    module = types.ModuleType(MODEL_MODULE)
    # Registered, as an import would be: dataclasses and typing.get_type_hints look a class's module up by name.
    sys.modules[MODEL_MODULE] = module
    exec(compile(state["source"], source_name, "exec"), module.__dict__)
    build_model = getattr(module, ENTRY_POINT, None)
    if not callable(build_model):
        raise TypeError(f"{source_name} defines no {ENTRY_POINT}(config)")
    model = build_model(state["config"])
    model.load_state_dict(state["model"])
    return model.to(device).eval()
