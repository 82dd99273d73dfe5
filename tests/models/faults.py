"""A model that misbehaves at the evaluation's protocol: config["fault"] names how. The evaluation must end
with a one-line reason (or, for output on stdout/stderr, not be disturbed at all)."""

import os
import stat
import sys
import time

import torch
from torch import nn


class Faulty(nn.Module):
    def __init__(self, fault):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.fault = fault
        self.calls = 0

    def forward(self, idx):
        self.calls += 1
        logits = torch.zeros(*idx.shape, 256) + self.anchor
        if self.fault == "print":
            print("hello from the model's forward pass " * 1000)
        elif self.fault == "stderr_flood":
            sys.stderr.write("x" * (10 << 20))
            sys.stderr.flush()
        elif self.fault == "dtype":
            return logits.long()
        elif self.fault == "shape":
            return logits[..., :255]
        elif self.fault == "not_tensor":
            return idx.tolist()
        elif self.fault == "exit":
            sys.stderr.write("the model is leaving now\n")
            sys.stderr.flush()
            os._exit(7)
        elif self.fault == "hang":
            time.sleep(3600)
        elif self.fault == "channel":
            _write_to_pipes(b"LGTS" + (1 << 60).to_bytes(8, "little") + b"garbage")
        return logits


def _write_to_pipes(data: bytes) -> None:
    for fd in range(3, 64):  # find the evaluation's own pipe and write to it
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            continue
        if (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)) and fd != 2:
            try:
                os.write(fd, data)
            except OSError:
                pass


def build_model(config):
    if config["fault"] == "forge_count":  # claim one weight, and that the model is ready, as the worker would
        _write_to_pipes(b"PARM" + (8).to_bytes(8, "little") + (1).to_bytes(8, "little")
                        + b"REDY" + (0).to_bytes(8, "little"))
    return Faulty(config["fault"])
