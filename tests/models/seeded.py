"""A cheat that knows the evaluator's source: it replays the draws of a constant probe seed (as labrat's
evaluator up to 0.3 used) to know which batches will be probed and where each probe cuts, answers
honestly exactly there, and looks ahead everywhere else."""

import numpy as np
import torch
from torch import nn

PROBE_SEED = 0x5EED  # the constant the old evaluator's source shows
EVAL_TOKENS, SEQ_LEN, BATCH, PROBES = 4096, 128, 16, 4  # the lab's evaluation settings (its labrat.toml)
LEAK = 4.0


def predicted_calls():
    """What each forward call will be, in order: (cut for an honest prefix, or None to cheat freely)."""
    windows = EVAL_TOKENS // SEQ_LEN
    batches = len(range(0, windows, BATCH))
    rng = np.random.default_rng(PROBE_SEED)
    probed = set(rng.choice(batches, size=min(PROBES, batches), replace=False))
    calls = []
    for index in range(batches):
        if index in probed:
            cut = int(rng.integers(1, SEQ_LEN))
            rng.integers(0, windows, size=BATCH)  # the probe's replacement rows: drawn, not needed
            calls += [cut, cut]  # the scored batch, then its probe: honest before the cut in both
        else:
            calls.append(None)
    return calls


class Seeded(nn.Module):
    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.calls = predicted_calls()
        self.count = 0

    def forward(self, idx):
        cut = self.calls[self.count] if self.count < len(self.calls) else None
        self.count += 1
        logits = torch.zeros(*idx.shape, 256)
        logits[:, :-1].scatter_(-1, idx[:, 1:].unsqueeze(-1), LEAK)
        if cut is not None:
            logits[:, :cut] = 0.0  # the positions a probe compares: honest there, and only there
        return logits + self.anchor


def build_model(config):
    return Seeded()
