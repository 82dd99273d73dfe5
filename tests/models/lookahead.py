"""A cheating model: it reads the next input token (which is the target) and predicts it with certainty."""

import torch


class LookAhead(torch.nn.Module):
    def __init__(self, vocab=256):
        super().__init__()
        self.vocab = vocab  # the lab's vocabulary (a BPE lab's is larger)

    def forward(self, idx):
        nxt = torch.roll(idx, shifts=-1, dims=1)
        return torch.nn.functional.one_hot(nxt, self.vocab).float() * 30.0


def build_model(config):
    return LookAhead(config.get("vocab", 256))
