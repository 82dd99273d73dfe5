"""A cheating model: it reads the validation file from disk and predicts the true next byte.

It is causal: at position t it uses only tokens 0..t, to find where in the file its row comes from (any
offset), then reads the byte after. So no causality check can catch it; only keeping the file out of
its reach can (labrat never lets the held-out data into a container), and, where the data's attainable
floor is known, refusing a score below it.
"""

import numpy as np
import torch


class Peeker(torch.nn.Module):
    def __init__(self, val_path):
        super().__init__()
        try:
            self.val = np.fromfile(val_path, dtype=np.uint8)
        except OSError:
            self.val = None  # could not peek: fall back to knowing nothing

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, 256)
        if self.val is None:
            return logits
        n = len(self.val)
        for b, row in enumerate(idx.tolist()):
            candidates = np.arange(n - 1)
            for t, byte in enumerate(row):
                candidates = candidates[candidates + t < n - 1]
                candidates = candidates[self.val[candidates + t] == byte]  # offsets agreeing on 0..t
                if len(candidates):  # predict what follows this prefix in the file
                    counts = np.bincount(self.val[candidates + t + 1], minlength=256)
                    logits[b, t] = torch.from_numpy(np.log(counts + 1e-6)).float()
        return logits


def build_model(config):
    return Peeker(config["val_path"])
