"""`labrat plot` (autoresearch's progress chart as a PNG) and `labrat report` (a Markdown summary)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from harness.history import unified_diff
from harness.lab import open_ledger
from harness.ledger import Experiment
from harness.noise import lab_noise, runs_of


class PlotSeries(BaseModel):
    """The data drawn, returned so callers (and tests) can check the chart's content."""

    ids: list[int]
    metrics: list[float]  # every experiment with a metric
    kept_ids: list[int]
    kept_metrics: list[float]
    running_best: list[float]  # best kept metric so far, at each experiment of `ids`
    floor_bpb: float | None


def plot_series(experiments: list[Experiment], floor_bpb: float | None) -> PlotSeries:
    scored = [e for e in experiments if e.metric is not None]
    best, running = float("inf"), []
    for e in scored:
        if e.status == "keep":
            best = min(best, e.metric)
        running.append(best if best != float("inf") else e.metric)
    kept = [e for e in scored if e.status == "keep"]
    return PlotSeries(ids=[e.id for e in scored], metrics=[e.metric for e in scored], kept_ids=[e.id for e in kept],
                      kept_metrics=[e.metric for e in kept], running_best=running, floor_bpb=floor_bpb)


def plot(lab: Path, out: Path) -> PlotSeries:
    """val_bpb per experiment (discarded grey, kept green), the running best, the data's entropy floor."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    with open_ledger(lab) as ledger:
        experiments = ledger.experiments()
    floor = _floor(experiments)
    series = plot_series(experiments, floor)
    fig, ax = plt.subplots(figsize=(10, 5), dpi=120)
    ax.scatter(series.ids, series.metrics, s=18, color="#b0b0b0", label="experiment", zorder=2)
    ax.scatter(series.kept_ids, series.kept_metrics, s=30, color="#2ca02c", label="kept", zorder=3)
    ax.step(series.ids, series.running_best, where="post", color="#1f77b4", label="running best", zorder=4)
    if floor is not None:
        ax.axhline(floor, color="#d62728", linestyle="--", linewidth=1, label=f"entropy floor {floor:.3f}")
    ax.set_xlabel("experiment")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.set_title(f"labrat: {len(series.ids)} experiments, {len(series.kept_ids)} kept")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)
    return series


def _floor(experiments: list[Experiment]) -> float | None:
    for e in reversed(experiments):
        if e.eval_json and (floor := json.loads(e.eval_json).get("floor_bpb")) is not None:
            return floor
    return None


def report(lab: Path) -> str:
    """Markdown: the best variant, its diff against the baseline, the lineage of kept changes, totals."""
    with open_ledger(lab) as ledger:
        experiments = ledger.experiments()
        best = ledger.best()
        sessions = ledger.sessions()
        chain = ledger.lineage(best.id) if best else []
        if best:
            diff = unified_diff(ledger.sources(chain[0].id), ledger.sources(best.id), f"#{chain[0].id}", f"#{best.id}")
            runs = {e.id: runs_of(ledger, e) for e in chain}
        noise = lab_noise(ledger, sessions[-1].config) if sessions else None
    counts = {status: sum(e.status == status for e in experiments)
              for status in ("keep", "discard", "crash", "timeout", "replicate")}
    lines = [f"# labrat report: {Path(lab).resolve().name}", "",
             f"{len(experiments)} experiments in {len(sessions)} session(s): "
             + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".", ""]
    hours = sum(e.seconds or 0 for e in experiments) / 3600
    tokens_in, tokens_out = sum(e.tokens_in for e in experiments), sum(e.tokens_out for e in experiments)
    lines += [f"- experiment time: {hours:.2f} h", f"- agent tokens: {tokens_in:,} in / {tokens_out:,} out",
              f"- agent cost: ${sum(e.cost_usd for e in experiments):.4f}",
              f"- noise of one run: {noise.text() if noise else 'not measured'}", ""]
    if best is None:
        return "\n".join(lines + ["No experiment has been kept yet."]) + "\n"
    gap = f" (gap to the entropy floor {best.floor_gap:.4f})" if best.floor_gap is not None else ""
    lines += ["## Best variant", "", f"#{best.id}: val_bpb **{best.metric:.6f}**{gap}, {best.description}",
              f"snapshot `{best.snapshot}`; reproduce with `labrat reproduce {best.id}`.", "",
              "## Lineage of kept changes", "", "| # | val_bpb | runs | keep rule | change |", "|---|---|---|---|---|"]
    lines += [f"| {e.id} | {e.metric:.6f} | {runs[e.id].text()} | {' '.join((e.decision or '-').split())} | "
              f"{' '.join(e.description.split())} |" for e in chain]
    root = chain[0]
    lines += ["", f"## Diff of the best variant against the baseline (#{root.id})", "", "```diff",
              diff.rstrip("\n") or "(no change)", "```"]
    return "\n".join(lines) + "\n"
