"""A model that hunts its worker's file system for the held-out split: any file whose name looks like it,
read and used as peeker.py does (the row's position found from its prefix, the next byte read off)."""

import os

import numpy as np
import torch
from torch import nn

SKIP = ("/proc", "/sys", "/dev", "/usr", "/opt", "/lib", "/var/lib/dpkg")
NAMES = ("val", "heldout", ".bin", "meta.json")


def hunt() -> list[str]:
    found = []
    for root, dirs, files in os.walk("/"):
        dirs[:] = [d for d in dirs if not os.path.join(root, d).startswith(SKIP)]
        found += [os.path.join(root, f) for f in files if any(n in f for n in NAMES)]
    return found


class Hunter(nn.Module):
    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.found = hunt()
        print("hunter found:", self.found, flush=True)
        readable = []
        for path in self.found:
            try:
                readable.append(np.fromfile(path, dtype=np.uint8))
            except OSError:
                pass
        self.data = np.concatenate(readable) if readable else np.zeros(0, dtype=np.uint8)

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, 256) + self.anchor
        n = len(self.data)
        for b, row in enumerate(idx.tolist()):
            candidates = np.arange(max(n - 1, 0))
            for t, byte in enumerate(row):
                candidates = candidates[candidates + t < n - 1]
                candidates = candidates[self.data[candidates + t] == byte]
                if len(candidates):
                    counts = np.bincount(self.data[candidates + t + 1], minlength=256)
                    logits[b, t] = torch.from_numpy(np.log(counts + 1e-6)).float()
        return logits


def build_model(config):
    return Hunter()
