"""A cheat that returns extreme finite logits: +3e38 on the next input byte (which is the target), -3e38
everywhere else. float32 log-softmax turns them into -inf, and -inf - (-inf) is NaN, which a max over
differences silently ignores."""

import torch
from torch import nn

EXTREME = 3e38


class Extreme(nn.Module):
    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, idx):
        logits = torch.full((*idx.shape, 256), -EXTREME)
        logits[:, :-1].scatter_(-1, idx[:, 1:].unsqueeze(-1), EXTREME)
        logits[:, -1] = 0.0
        return logits + self.anchor * 0


def build_model(config):
    return Extreme()
