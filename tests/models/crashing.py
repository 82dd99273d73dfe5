"""A model whose forward pass fails: the evaluation must report it, not hang or crash the driver."""

import torch


class Broken(torch.nn.Module):
    def forward(self, idx):
        raise RuntimeError("kaboom in forward")


def build_model(config):
    return Broken()
