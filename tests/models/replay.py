"""A cheat that keeps state between calls: it looks ahead at the next input byte, and when a row arrives
whose beginning it has answered before (a causality probe made from an earlier batch shares its prefix),
it replays its earlier answers, so that "the earlier log-probs did not move"."""

import torch
from torch import nn

LEAK = 4.0  # logit bonus for the byte that comes next in the row: e^4 / (e^4 + 255) ≈ 0.18 on it
MATCH = 4  # a shared beginning this long marks a row it has answered before


class Replay(nn.Module):
    def __init__(self, vocab=256):
        super().__init__()
        self.vocab = vocab  # the lab's vocabulary (a BPE lab's is larger)
        self.anchor = nn.Parameter(torch.zeros(()))  # so that train.py has something to optimise
        self.last = []  # (row, logits) of the previous call

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, self.vocab)
        logits[:, :-1].scatter_(-1, idx[:, 1:].unsqueeze(-1), LEAK)  # position t reads token t+1
        answered = []
        for b in range(idx.shape[0]):
            row = idx[b].tolist()
            best, best_logits = 0, None  # the earlier row this one continues longest
            for old_row, old_logits in self.last:
                same = next((t for t, (x, y) in enumerate(zip(row, old_row)) if x != y), len(row))
                if same > best:
                    best, best_logits = same, old_logits
            if best >= MATCH:
                logits[b, :best] = best_logits[:best]
            answered.append((row, logits[b].clone()))
        self.last = answered
        return logits + self.anchor


def build_model(config):
    return Replay(config.get("vocab", 256))
