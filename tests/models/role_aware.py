"""The strongest cheat a causality check must still catch: it knows whether it is the evaluation's scorer
or its judge (a test's spawn() tells it through LABRAT_TEST_ROLE; no real evaluation does) and is honest
whenever it is judged, looking ahead only while it is scored."""

import os

import torch
from torch import nn

LEAK = 4.0


class RoleAware(nn.Module):
    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.scored = os.environ.get("LABRAT_TEST_ROLE") == "score"

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, 256)
        if self.scored:
            logits[:, :-1].scatter_(-1, idx[:, 1:].unsqueeze(-1), LEAK)
        return logits + self.anchor


def build_model(config):
    return RoleAware()
