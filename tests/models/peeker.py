"""A cheating model: it reads the validation file from disk and predicts the true next byte.

It knows the evaluation protocol (windows of 128 bytes cut from the validation stream) and at
position t uses only tokens 0..t to find its window: it is causal, so the causality probe cannot
catch it. Only keeping the file out of its reach can.
"""

import torch

WINDOW = 128


class Peeker(torch.nn.Module):
    def __init__(self, val_path):
        super().__init__()
        try:
            with open(val_path, "rb") as f:
                self.val = f.read()
        except OSError:
            self.val = None  # could not peek: fall back to knowing nothing

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, 256)
        if self.val is None:
            return logits
        starts = range(0, len(self.val) - WINDOW, WINDOW)
        for b, row in enumerate(idx.tolist()):
            candidates = list(starts)
            for t, byte in enumerate(row):
                candidates = [s for s in candidates if self.val[s + t] == byte]  # windows agreeing on 0..t
                if candidates and candidates[0] + t + 1 < len(self.val):
                    logits[b, t, self.val[candidates[0] + t + 1]] = 50.0
        return logits


def build_model(config):
    return Peeker(config["val_path"])
