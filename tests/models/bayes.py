"""The Bayes-optimal causal model of the synthetic source (for testing the evaluator's attainable floor).

Loaded by trainer/evaluate.py's worker from a checkpoint's source, like any train.py: it defines
build_model(config), config = {"seed": the data seed}. It rebuilds the source and runs its exact
forward filter over (word, position): unlike tests/models/oracle.py it also uses the bytes before a
window's first space, so no honest model of any context length scores better in expectation.
"""

import torch

from trainer.synthetic import MarkovWordSource


class Bayes(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        self.source = MarkovWordSource.from_seed(seed)

    def forward(self, idx):
        log_probs = self.source.next_byte_log_probs(idx.cpu().numpy())
        return torch.from_numpy(log_probs).to(idx.device)


def build_model(config):
    return Bayes(config["seed"])
