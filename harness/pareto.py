"""Pareto fronts from the ledger: val_bpb against a cost (weights, peak memory) or a speed (throughput).

A point is one variant: an experiment that is not a replicate, with its val_bpb as the mean of its runs
(the experiment's own and its replicates'). A variant is on the front when no other variant is at least as
good on both axes and strictly better on one. Where each axis comes from:
- parameters: the checkpoint's weights, counted by the evaluation worker before the model's code runs;
- peak memory: the training container's cgroup peak, read by the harness;
- throughput: tokens per second as train.py reports it in summary.json (the agent's code: only as honest as
  that code, which is why no keep decision rests on it unless the program sets min_tokens_per_second).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from harness.ledger import Experiment, Ledger
from harness.noise import runs_of


@dataclass(frozen=True)
class Axis:
    name: str  # the CLI's --axis value
    label: str
    lower_is_better: bool

    def value(self, e: Experiment) -> float | None:
        if self.name == "parameters":
            value = json.loads(e.eval_json or "{}").get("parameters")
        elif self.name == "memory":
            value = e.memory_bytes / 1024**3 if e.memory_bytes else None
        else:
            value = json.loads(e.summary_json or "{}").get("tokens_per_s")
        # summary.json is the agent's: anything but a finite positive number is no value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            return None
        return float(value)


AXES = {axis.name: axis for axis in (
    Axis("parameters", "parameters (checkpoint weights)", True),
    Axis("memory", "peak memory (GB)", True),
    Axis("throughput", "training throughput (tokens/s, as train.py reports)", False),
)}


@dataclass(frozen=True)
class Point:
    experiment_id: int
    status: str
    description: str
    metric: float  # the mean of the variant's runs
    runs: int
    value: float  # on the axis


@dataclass(frozen=True)
class Front:
    axis: Axis
    points: list[Point]  # every variant with a metric and a value on this axis
    front: list[Point]  # the non-dominated ones, in order along the axis (best value first)

    @property
    def front_ids(self) -> list[int]:
        return [p.experiment_id for p in self.front]


def variants(ledger: Ledger) -> list[tuple[Experiment, float, int]]:
    """Every scored variant: (its experiment, the mean of its runs, how many runs)."""
    found = []
    for e in ledger.experiments():
        if e.replicate_of is not None or e.metric is None or e.status == "running":
            continue
        runs = runs_of(ledger, e)
        found.append((e, runs.mean, runs.n))
    return found


def front_of(axis: Axis, points: list[Point]) -> list[Point]:
    """The non-dominated points: sorted best value first (ties: better metric first), each kept when its metric
    beats every point before it."""
    sign = 1 if axis.lower_is_better else -1
    ordered = sorted(points, key=lambda p: (sign * p.value, p.metric, p.experiment_id))
    front, best = [], math.inf
    for p in ordered:
        if p.metric < best:
            front.append(p)
            best = p.metric
    return front


def fronts(ledger: Ledger, axes: list[str] | None = None) -> list[Front]:
    scored = variants(ledger)
    found = []
    for name in axes or list(AXES):
        axis = AXES[name]
        points = [Point(e.id, e.status, " ".join(e.description.split()), mean, n, value)
                  for e, mean, n in scored if (value := axis.value(e)) is not None]
        found.append(Front(axis, points, front_of(axis, points)))
    return found


def value_text(axis: Axis, value: float) -> str:
    return f"{value:.2f}" if axis.name == "memory" else f"{value:,.0f}"


def plot_fronts(found: list[Front], out) -> None:
    """One panel per axis: every variant grey, kept ones green, the front joined and ringed in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, panels = plt.subplots(1, len(found), figsize=(5.2 * len(found), 4.6), dpi=110, squeeze=False)
    for ax, front in zip(panels[0], found):
        others = [p for p in front.points if p.status != "keep"]
        kept = [p for p in front.points if p.status == "keep"]
        ax.scatter([p.value for p in others], [p.metric for p in others], s=14, color="#b0b0b0", label="variant")
        ax.scatter([p.value for p in kept], [p.metric for p in kept], s=24, color="#2ca02c", label="kept")
        if front.front:
            ax.plot([p.value for p in front.front], [p.metric for p in front.front], drawstyle="steps-post",
                    color="#d62728", linewidth=1.2, label="Pareto front")
            ax.scatter([p.value for p in front.front], [p.metric for p in front.front], s=60, facecolors="none",
                       edgecolors="#d62728", linewidths=1.4)
            for p in front.front[:12]:
                ax.annotate(f"#{p.experiment_id}", (p.value, p.metric), textcoords="offset points", xytext=(4, 4),
                            fontsize=7)
        else:
            ax.text(0.5, 0.5, "no variant has this measure", transform=ax.transAxes, ha="center", color="#777777")
        if front.axis.name == "parameters" and front.points:
            ax.set_xscale("log")
        ax.set_xlabel(front.axis.label + ("" if front.axis.lower_is_better else "  →  faster"))
        ax.set_ylabel("val_bpb (mean of runs, lower is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle("labrat: Pareto fronts")
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)
