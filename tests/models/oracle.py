"""A model that outputs the synthetic source's true next-byte distribution (for testing the evaluator).

Loaded by trainer/evaluate.py's worker from a checkpoint's source, like any train.py: it defines
build_model(config). It knows nothing at a window's start, so it predicts uniformly until the first
word boundary, then the stationary law for the first word, then the chain's transitions.
"""

import numpy as np
import torch

EPSILON = 1e-12  # keeps impossible bytes finite in log space


class Oracle(torch.nn.Module):
    def __init__(self, words, transition, stationary):
        super().__init__()
        self.words = [w.encode() if isinstance(w, str) else bytes(w) for w in words]
        self.index = {w: i for i, w in enumerate(self.words)}
        self.transition = np.asarray(transition, dtype=np.float64)
        self.stationary = np.asarray(stationary, dtype=np.float64)
        # For each prefix of each word: which words continue it, and with which next byte (32 = end).
        self.continuations = {}
        for i, word in enumerate(self.words):
            for cut in range(len(word) + 1):
                prefix = word[:cut]
                nxt = word[cut] if cut < len(word) else 32
                self.continuations.setdefault(prefix, ([], []))
                self.continuations[prefix][0].append(i)
                self.continuations[prefix][1].append(nxt)
        self.continuations = {k: (np.array(a), np.array(b)) for k, (a, b) in self.continuations.items()}

    def _next_byte(self, prefix, q):
        probs = np.full(256, EPSILON)
        if prefix in self.continuations:
            ids, nxt = self.continuations[prefix]
            weights = q[ids]
            probs += np.bincount(nxt, weights=weights / weights.sum(), minlength=256)
        else:
            probs[:] = 1.0 / 256
        return np.log(probs / probs.sum())

    def forward(self, idx):
        out = np.empty((*idx.shape, 256), dtype=np.float32)
        uniform = np.full(256, -np.log(256.0))
        for b, row in enumerate(idx.tolist()):
            synced, prev, prefix = False, None, b""
            for t, byte in enumerate(row):
                if not synced:
                    if byte == 32:
                        synced = True
                    else:
                        out[b, t] = uniform
                        continue
                else:
                    if byte == 32:
                        prev, prefix = self.index.get(prefix), b""
                    else:
                        prefix += bytes([byte])
                q = self.stationary if prev is None else self.transition[prev]
                out[b, t] = self._next_byte(prefix, q)
        return torch.from_numpy(out)


def build_model(config):
    return Oracle(config["words"], config["transition"], config["stationary"])
