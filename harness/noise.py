"""How much of a result is noise: a variant's runs, the lab's noise floor, and the `significant` keep rule.

A *variant* is one snapshot's code. Its *runs* are the experiment itself and its replicates: the same
snapshot trained again with other harness seeds (ledger rows with status `replicate`, linked by
`replicate_of`). At a lab's start the baseline is run `noise_seeds` times: the noise floor. Every
confirmation adds runs too.

The noise of one run (σ) is estimated by pooling the spread of every variant with two or more runs,
recorded under the same training setup (NOISE_KEYS), on the assumption that a code change moves the mean
and not the spread. Its degrees of freedom grow with every confirmation.

The `significant` rule, in two stages:
1. Screen: the candidate's first run must beat the mean of its base's runs by more than σ; otherwise it is
   discarded without spending more runs (with no σ yet, every improvement goes on to stage 2).
2. Confirm: the candidate is trained `noise_seeds - 1` more times with fresh seeds, and kept only when a
   one-sided two-sample t-test of all its runs against all of its base's, with the pooled σ and its degrees
   of freedom, rejects "not better" at level `significance` (default 0.05).
A change that cannot matter is kept with probability at most `significance`: the screen only removes keeps
(tests/test_noise.py measures both rules' false-keep rates by simulation, and a null-change session).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from scipy import stats

from harness.ledger import Experiment, Ledger

# What a run's noise depends on: sessions that agree on these pool their spread.
NOISE_KEYS = ("trainer_config", "time_budget", "deterministic_steps", "runtime", "gpus", "data", "data_sha256",
              "tokenizer", "vocab_size", "seed", "memory_gb", "cpus", "eval_tokens")
SURPRISE_SIGMAS = 3.0  # a measured effect this many standard errors from the stated expectation is surprising


def run_seed(lab_seed: int, experiment_id: int) -> int:
    """The training seed of an experiment's run: the harness's, fresh for every row (a replicate is a row)."""
    return lab_seed + experiment_id


def noise_setup(config: dict) -> tuple:
    return tuple(config.get(key) for key in NOISE_KEYS)


@dataclass(frozen=True)
class Runs:
    """One variant's scored runs: the experiment's own and its replicates'."""

    experiment_id: int
    metrics: tuple[float, ...]
    seeds: tuple[int | None, ...]

    @classmethod
    def of(cls, experiment: Experiment, replicates: Iterable[Experiment]) -> Runs:
        scored = [(experiment.metric, experiment.seed)] if experiment.metric is not None else []
        scored += [(r.metric, r.seed) for r in replicates if r.metric is not None and r.status == "replicate"]
        return cls(experiment.id, tuple(m for m, _ in scored), tuple(s for _, s in scored))

    @property
    def n(self) -> int:
        return len(self.metrics)

    @property
    def mean(self) -> float | None:
        return sum(self.metrics) / self.n if self.metrics else None

    @property
    def sum_of_squares(self) -> float:
        mean = self.mean
        return sum((m - mean) ** 2 for m in self.metrics) if self.metrics else 0.0

    @property
    def sd(self) -> float | None:
        return math.sqrt(self.sum_of_squares / (self.n - 1)) if self.n >= 2 else None

    @property
    def ignores_seed(self) -> bool:
        """Two or more runs with different seeds and exactly one result: train.py does not use the seed."""
        return self.n >= 2 and len(set(self.metrics)) == 1 and len(set(self.seeds)) == self.n

    def text(self) -> str:
        if self.n < 2:
            return f"{self.n} run" + ("s" if self.n != 1 else "")
        return f"{self.n} runs, mean {self.mean:.6f} ± {self.sd:.6f} (sd)"


@dataclass(frozen=True)
class Noise:
    """The pooled standard deviation of one run (None: no variant has two runs yet) and its degrees of freedom."""

    sd: float | None
    df: int

    @classmethod
    def pooled(cls, groups: Iterable[Runs]) -> Noise:
        groups = [g for g in groups if g.n >= 2]
        df = sum(g.n - 1 for g in groups)
        return cls(math.sqrt(sum(g.sum_of_squares for g in groups) / df) if df else None, df)

    def with_runs(self, *groups: Runs) -> Noise:
        """This estimate with more variants' runs pooled in (groups already counted must not be passed again)."""
        extra = [g for g in groups if g.n >= 2]
        df = self.df + sum(g.n - 1 for g in extra)
        squares = (self.sd ** 2 * self.df if self.df else 0.0) + sum(g.sum_of_squares for g in extra)
        return Noise(math.sqrt(squares / df) if df else None, df)

    def text(self) -> str:
        return f"σ {self.sd:.6f} bpb (df {self.df})" if self.sd is not None else "not measured"

    def se_of_difference(self, n_a: int, n_b: int) -> float:
        """The standard error of the difference of two means of n_a and n_b runs (sd must be known)."""
        return self.sd * math.sqrt(1 / n_a + 1 / n_b)


def runs_of(ledger: Ledger, experiment: Experiment) -> Runs:
    """A finished experiment's scored runs, as the ledger holds them."""
    return Runs.of(experiment, ledger.replicates(experiment.id))


def lab_noise(ledger: Ledger, config: dict) -> Noise:
    """The noise of one run under `config`'s training setup, pooled over the lab's replicated variants."""
    setup = noise_setup(config)
    return Noise.pooled(Runs.of(e, replicates) for e, replicates, run_config in ledger.replicated()
                        if noise_setup(run_config) == setup)


@dataclass(frozen=True)
class Decision:
    keep: bool
    reason: str  # one line, recorded with the candidate and told to the agent


def screen(first: float, base: Runs, noise: Noise) -> Decision | None:
    """Stage 1: a discard when the first run does not beat the base's mean by more than σ, else None (go on)."""
    gain = base.mean - first
    if gain <= 0:
        return Decision(False, f"no better than #{base.experiment_id} ({first:.6f} vs {base.mean:.6f}, mean of "
                               f"{base.n} run{'s' if base.n != 1 else ''})")
    if noise.sd is not None and gain <= noise.sd:
        return Decision(False, f"better than #{base.experiment_id} by {gain:.6f}, within the noise "
                               f"({noise.text()}): not confirmed")
    return None


def significance_test(candidate: Runs, base: Runs, noise: Noise, alpha: float) -> Decision:
    """Stage 2: keep when the candidate's mean beats the base's by a one-sided t-test at level alpha."""
    gain = base.mean - candidate.mean
    runs = f"{candidate.n} runs at {candidate.mean:.6f} vs #{base.experiment_id}'s {base.n} at {base.mean:.6f}"
    if noise.sd is None:
        return Decision(False, f"{runs}: no estimate of the noise (no variant has two scored runs)")
    if noise.sd == 0:  # every replicate scored exactly the same: a strict gain is real
        return Decision(gain > 0, f"{runs}: noiseless (every replicate scored the same), gain {gain:+.6f}")
    t = gain / noise.se_of_difference(candidate.n, base.n)
    critical = float(stats.t.ppf(1 - alpha, noise.df))
    verdict = "significant" if t > critical else "not significant"
    return Decision(t > critical, f"{runs}: t = {t:.2f} vs {critical:.2f} (one-sided, α {alpha:g}, "
                                  f"{noise.text()}): {verdict}")


def surprise(expected_delta: float | None, measured_delta: float | None, noise: Noise, n_candidate: int,
             n_base: int) -> str | None:
    """'surprising' when the measured effect lies more than SURPRISE_SIGMAS standard errors from the stated
    expectation (either way), else None; None too without an expectation or an estimate of the noise."""
    if expected_delta is None or measured_delta is None or not noise.sd:
        return None
    se = noise.se_of_difference(max(n_candidate, 1), max(n_base, 1))
    off = (measured_delta - expected_delta) / se
    if abs(off) <= SURPRISE_SIGMAS:
        return None
    return f"surprising: {abs(off):.1f} standard errors {'worse' if off > 0 else 'better'} than expected"
