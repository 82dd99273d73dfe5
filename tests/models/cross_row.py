"""A cheat across rows: it predicts each row's last target from the first byte of the next row in the
batch. Where scored windows are contiguous, that byte *is* the target, and no in-row probe checks it."""

import torch
from torch import nn

LEAK = 8.0


class CrossRow(nn.Module):
    def __init__(self, vocab=256):
        super().__init__()
        self.vocab = vocab  # the lab's vocabulary (a BPE lab's is larger)
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, self.vocab)
        if idx.shape[0] > 1:
            logits[:-1, -1].scatter_(-1, idx[1:, :1], LEAK)  # row b's last position reads row b+1's first byte
        return logits + self.anchor


def build_model(config):
    return CrossRow(config.get("vocab", 256))
