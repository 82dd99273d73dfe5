"""`labrat plot` (the progress chart as a PNG) and `labrat report` (Markdown, or one self-contained HTML page).

The report leads with what a researcher reads first after 500 experiments: the wins that survived
confirmation with fresh seeds, the results far from what the agent expected, the Pareto fronts, what each
kept step of the best variant contributed, and the directions that never paid. The best variant's diff and
the totals follow.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from harness.history import Standing, unified_diff
from harness.lab import open_ledger
from harness.ledger import Experiment, Ledger
from harness.noise import Noise, lab_noise, runs_of
from harness.pareto import Front, fronts, plot_fronts, value_text
from harness.text import printable

MAX_LABELS = 24  # kept steps labelled on the progress chart: the largest gains, so 500 experiments stay legible
LABEL_SPACING = 1 / 30  # of the experiment axis, between two labels
MAX_ROWS = 20  # rows of the surprises, fronts and dead ends (every confirmed win is listed)
DEAD_END_MIN_TRIES = 2  # a direction tried at least this often without a keep is a dead end


class PlotSeries(BaseModel):
    """The data drawn, returned so callers (and tests) can check the chart's content."""

    ids: list[int]  # every scored variant (not replicates)
    metrics: list[float]
    kept_ids: list[int]
    kept_metrics: list[float]
    replicate_ids: list[int]  # the experiment each replicate re-ran: replicates are drawn at their variant
    replicate_metrics: list[float]
    running_best: list[float]  # best kept variant so far (mean of its runs), at each experiment of `ids`
    labelled_ids: list[int]  # kept steps whose change is written on the chart
    lanes: dict[int, tuple[list[int], list[float]]] = {}  # with lanes: lane -> its experiments and its running best
    noise_sd: float | None  # the band drawn around the running best
    floor_bpb: float | None
    # Filled by the drawing, to be checked: the experiment ticks, and whether the legend sits beside the data.
    xticks: list[float] = []
    legend_outside: bool | None = None


def _label(e: Experiment) -> str:
    text = printable(" ".join(e.description.split()))
    return f"#{e.id} " + (text[:32] + "…" if len(text) > 33 else text)


def plot_series(ledger: Ledger, experiments: list[Experiment], noise: Noise) -> PlotSeries:
    scored = [e for e in experiments if e.metric is not None and e.replicate_of is None and e.status != "running"]
    replicates = [e for e in experiments if e.metric is not None and e.replicate_of is not None]
    means = {e.id: runs_of(ledger, e).mean for e in scored if e.status == "keep"}
    best, running = float("inf"), []
    for e in scored:
        if e.status == "keep":
            best = min(best, means[e.id])
        running.append(best if best != float("inf") else e.metric)
    kept = [e for e in scored if e.status == "keep"]
    gains = {e.id: (means[e.parent_id] - means[e.id]) if e.parent_id in means else float("inf") for e in kept}
    # The largest gains first, each label at least LABEL_SPACING of the axis from the others: legible at 500.
    spacing = (scored[-1].id - scored[0].id) * LABEL_SPACING if scored else 0
    labelled: list[int] = []
    for experiment_id in sorted(gains, key=lambda i: (-gains[i], i)):
        if len(labelled) < MAX_LABELS and all(abs(experiment_id - other) >= spacing for other in labelled):
            labelled.append(experiment_id)
    labelled.sort()
    lanes: dict[int, tuple[list[int], list[float]]] = {}
    if len({e.lane for e in scored}) > 1:  # each lane's own running best (the shared baseline starts every lane)
        baseline = next((means[e.id] for e in kept if e.parent_id is None), float("inf"))
        for lane in sorted({e.lane for e in scored}):
            lane_best, ids, bests = baseline, [], []
            for e in (e for e in scored if e.lane == lane):
                if e.status == "keep":
                    lane_best = min(lane_best, means[e.id])
                if lane_best != float("inf"):
                    ids.append(e.id)
                    bests.append(lane_best)
            lanes[lane] = (ids, bests)
    return PlotSeries(ids=[e.id for e in scored], metrics=[e.metric for e in scored], kept_ids=[e.id for e in kept],
                      kept_metrics=[e.metric for e in kept], replicate_ids=[e.replicate_of for e in replicates],
                      replicate_metrics=[e.metric for e in replicates], running_best=running, labelled_ids=labelled,
                      noise_sd=noise.sd, floor_bpb=_floor(experiments), lanes=lanes)


def _draw_progress(series: PlotSeries, labels: dict[int, str], out) -> PlotSeries:
    """val_bpb per experiment (discarded grey, kept green, replicates cyan), the running best with ±σ, the floor,
    kept steps labelled with their change; integer experiment ticks; the legend beside the data."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    many = len(series.ids) > 150
    fig, ax = plt.subplots(figsize=(13, 6), dpi=110)
    ax.scatter(series.ids, series.metrics, s=6 if many else 18, color="#b0b0b0", alpha=0.7 if many else 1,
               label="discarded / other", zorder=2)
    if series.replicate_ids:
        ax.scatter(series.replicate_ids, series.replicate_metrics, s=8 if many else 16, marker="x", color="#17becf",
                   label="replicate run (same code, other seed)", zorder=3)
    ax.scatter(series.kept_ids, series.kept_metrics, s=16 if many else 34, color="#2ca02c", edgecolors="black",
               linewidths=0.4, label="kept", zorder=4)
    ax.step(series.ids, series.running_best, where="post", color="#1f77b4", linewidth=1.4, label="running best",
            zorder=5)
    for lane, (ids, bests) in series.lanes.items():
        ax.step(ids, bests, where="post", linewidth=0.9, linestyle=":", color=f"C{(lane + 2) % 10}",
                label=f"lane {lane}'s best", zorder=4)
    if series.noise_sd:
        low = [m - series.noise_sd for m in series.running_best]
        high = [m + series.noise_sd for m in series.running_best]
        ax.fill_between(series.ids, low, high, step="post", color="#1f77b4", alpha=0.15,
                        label=f"± noise of one run (σ {series.noise_sd:.4f})", zorder=1)
    metric_of = dict(zip(series.kept_ids, series.kept_metrics))
    for experiment_id in series.labelled_ids:
        ax.annotate(labels[experiment_id], (experiment_id, metric_of[experiment_id]), textcoords="offset points",
                    xytext=(3, 5), rotation=35, fontsize=7, color="#1a5d1a", zorder=6)
    if series.metrics:  # a diverged variant (bpb 8 against 1.2) must not flatten everything else
        ordered = sorted(series.metrics + series.replicate_metrics)
        top = ordered[int(0.95 * (len(ordered) - 1))] if len(ordered) >= 40 else ordered[-1]  # clip only in a crowd
        bottom = ordered[0]
        span = max(top - bottom, 1e-3)
        if series.floor_bpb is not None and series.floor_bpb > bottom - span:  # the floor, when it is near the data
            bottom = min(bottom, series.floor_bpb)
        ax.set_ylim(bottom - 0.05 * span, top + 0.35 * span)
    if series.floor_bpb is not None:  # drawn, or named in the legend when it lies below the chart
        below = " (below the chart)" if series.floor_bpb < ax.get_ylim()[0] else ""
        ax.axhline(series.floor_bpb, color="#d62728", linestyle="--", linewidth=1,
                   label=f"entropy floor {series.floor_bpb:.3f}{below}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("experiment")
    ax.set_ylabel("val_bpb (lower is better)")
    hidden = sum(m > ax.get_ylim()[1] for m in series.metrics)
    ax.set_title(f"labrat: {len(series.ids)} experiments, {len(series.kept_ids)} kept"
                 + (f" ({hidden} above the chart)" if hidden else ""))
    ax.grid(alpha=0.3)
    legend = ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(out, format="png")
    low, high = ax.get_xlim()
    drawn = series.model_copy(update={
        "xticks": [float(t) for t in ax.get_xticks() if low <= t <= high],
        "legend_outside": bool(legend.get_window_extent().x0 >= ax.get_window_extent().x1)})
    plt.close(fig)
    return drawn


def _noise_of(ledger: Ledger) -> Noise:
    sessions = ledger.sessions()
    return lab_noise(ledger, sessions[-1].config) if sessions else Noise(None, 0)


def _progress(ledger: Ledger) -> tuple[PlotSeries, dict[int, str]]:
    """The progress chart's data and the labels of its labelled steps."""
    experiments = ledger.experiments()
    series = plot_series(ledger, experiments, _noise_of(ledger))
    labelled = set(series.labelled_ids)
    return series, {e.id: _label(e) for e in experiments if e.id in labelled}


def plot(lab: Path, out: Path) -> PlotSeries:
    with open_ledger(lab) as ledger:
        series, labels = _progress(ledger)
    return _draw_progress(series, labels, out)


def plot_pareto(lab: Path, out: Path):
    with open_ledger(lab) as ledger:
        found = fronts(ledger)
    plot_fronts(found, out)
    return found


def _floor(experiments: list[Experiment]) -> float | None:
    for e in reversed(experiments):
        if e.eval_json and (floor := json.loads(e.eval_json).get("floor_bpb")) is not None:
            return floor
    return None


# -- the report ------------------------------------------------------------------------------------------


_MARKUP = re.compile(r"([\\`\[\]|])")


def _cell(text: str | None, limit: int = 90) -> str:
    """Text the agent wrote (a description, a hypothesis), made inert for Markdown and the HTML page: one
    printable line, clipped; "<" escaped; backslash, backtick, brackets and pipes escaped, so that it can
    make no tag, link, image (nothing fetched) or table cell of its own."""
    text = printable(" ".join((text or "-").split()))
    text = text[:limit] + "…" if len(text) > limit + 1 else text
    return _MARKUP.sub(r"\\\1", text.replace("<", "&lt;"))  # no tag opens without "<"


def _fenced(code: str, language: str) -> str:
    """A fenced block that no line of `code` can close: the fence is longer than any run of backticks in it."""
    longest = max((len(run) for run in re.findall(r"`+", code)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{code}\n{fence}"


def _delta_text(standing: Standing) -> str:
    if standing.delta is None:
        return "-"
    se = standing.delta_se
    return f"{standing.delta:+.4f}" + (f" ± {se:.4f}" if se is not None else "")


def surprises(ledger: Ledger, experiments: list[Experiment]) -> list[tuple[Experiment, Standing, str]]:
    """The experiments whose measured effect lies far from the agent's stated expectation, either way, the most
    surprising first."""
    noises: dict[str, Noise] = {}
    found = []
    for e in experiments:
        if e.expected_delta is None or e.replicate_of is not None or e.metric is None:
            continue
        session = ledger.session(e.session_id)
        if session.id not in noises:
            noises[session.id] = lab_noise(ledger, session.config)
        standing = Standing.of(ledger, e, session.config, noises[session.id])
        if verdict := standing.surprise(e):
            found.append((e, standing, verdict))
    # The most surprising first: standard errors between the measured and the expected effect.
    return sorted(found, key=lambda f: -abs(f[1].delta - f[0].expected_delta) / f[1].delta_se)


# A knob is a name set to a value on a line: `LR = 0.01` (autoresearch's constants), `embed_lr=0.3` (a config
# dict's keyword), `"lr": 0.1`.
_SETTING = re.compile(r"""\b([A-Za-z_][A-Za-z0-9_]*)["']?\s*(?<![=!<>])[=:](?!=)\s*([^,;)\n#]+)""")


def knobs_changed(diff: str) -> list[str]:
    """The names a diff sets to another value (added, removed or changed settings)."""
    before: dict[str, str] = {}
    after: dict[str, str] = {}
    for line in diff.splitlines():
        if line.startswith(("---", "+++")) or not line.startswith(("-", "+")):
            continue
        side = before if line[0] == "-" else after
        for name, value in _SETTING.findall(line[1:]):
            side[name] = value.strip()
    return sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))


def direction(e: Experiment) -> str:
    """What an experiment tried, to group it with others: the knobs its diff set, else its hypothesis, else its
    description."""
    knobs = knobs_changed(e.diff or "")
    if knobs:
        return "knob " + ", ".join(knobs[:4]) + (" …" if len(knobs) > 4 else "")
    text = " ".join((e.hypothesis or e.description).split()).lower()
    return ("hypothesis: " if e.hypothesis else "") + text[:80]


@dataclass
class DeadEnd:
    direction: str
    ids: list[int]
    outcomes: dict[str, int]
    best_delta: float | None  # the best measured change against a parent (negative: better)


def dead_ends(candidates: list[Experiment], standing: dict[int, Standing]) -> list[DeadEnd]:
    """`standing`: the scored candidates' (the report's, computed once)."""
    groups: dict[str, list[Experiment]] = {}
    for e in candidates:
        if e.parent_id is not None:  # the baseline tried nothing
            groups.setdefault(direction(e), []).append(e)
    found = []
    for name, tried in groups.items():
        if len(tried) < DEAD_END_MIN_TRIES or any(e.status == "keep" for e in tried):
            continue
        deltas = [d for e in tried if e.id in standing and (d := standing[e.id].delta) is not None]
        outcomes: dict[str, int] = {}
        for e in tried:
            outcomes[e.status] = outcomes.get(e.status, 0) + 1
        found.append(DeadEnd(name, [e.id for e in tried], outcomes, min(deltas) if deltas else None))
    return sorted(found, key=lambda d: (-len(d.ids), d.direction))


def _ids(ids: list[int], limit: int = 8) -> str:
    shown = ", ".join(f"#{i}" for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def _more(count: int, where: str) -> list[str]:
    return ["", f"… and {count - MAX_ROWS} more ({where})."] if count > MAX_ROWS else []


def report_sections(ledger: Ledger, lab: Path, found_fronts: list[Front]) -> list[tuple[str, str]]:
    """The report as (key, Markdown) sections, in reading order; `report` joins them, `report_html` embeds the
    plots after the wins and the surprises. `found_fronts`: the lab's Pareto fronts (the HTML draws them too)."""
    experiments = ledger.experiments()
    sessions = ledger.sessions()
    noise = _noise_of(ledger)
    best = ledger.best()
    candidates = [e for e in experiments if e.replicate_of is None and e.status != "running"]
    standing = {e.id: Standing.of(ledger, e, {}, noise) for e in candidates if e.metric is not None}
    replicas = {e.id: [r.id for r in ledger.replicates(e.id) if r.status == "replicate"] for e in candidates}
    surprising = surprises(ledger, candidates)
    ends = dead_ends(candidates, standing)
    chain = ledger.lineage(best.id) if best else []
    diff = unified_diff(ledger.sources(chain[0].id), ledger.sources(best.id), f"#{chain[0].id}",
                        f"#{best.id}") if best else ""
    runs = {e.id: runs_of(ledger, e) for e in chain}
    sections = []

    counts = {status: sum(e.status == status for e in experiments)
              for status in ("keep", "discard", "crash", "timeout", "replicate")}
    hours = sum(e.seconds or 0 for e in experiments) / 3600
    rules = sorted({s.config.get("keep_rule", "better") for s in sessions})
    head = [f"# labrat report: {_cell(Path(lab).resolve().name)}", "",
            f"{len(candidates)} experiments and {counts['replicate']} replicate runs in {len(sessions)} session(s): "
            + ", ".join(f"{n} {s}" for s, n in counts.items() if s != "replicate") + ".", "",
            f"- noise of one run: {noise.text()}", f"- keep rule: {', '.join(rules) or '-'}"]
    if best:
        gap = f", gap to the entropy floor {best.floor_gap:.4f}" if best.floor_gap is not None else ""
        head.append(f"- best: #{best.id}, val_bpb {runs[best.id].mean:.6f} (mean of {runs[best.id].n} runs{gap}): "
                    f"{_cell(best.description)}")
    sections.append(("summary", "\n".join(head)))

    wins = [e for e in candidates if e.status == "keep" and e.parent_id is not None and replicas[e.id]]
    lines = ["## Significant wins", ""]
    if wins:
        lines += ["Kept changes confirmed with fresh seeds (Δ: mean of its runs against its parent's, ± one "
                  "standard error).", "", "| # | change | Δ val_bpb | runs | confirmations | keep rule |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {e.id} | {_cell(e.description)} | {_delta_text(standing[e.id])} | {standing[e.id].runs.n} | "
                  f"{_ids(replicas[e.id])} | {_cell(e.decision, 120)} |" for e in wins]
    else:
        lines.append("No kept change has been confirmed with fresh seeds"
                     + (" (keep rule `better` keeps on one run: set keep_rule = \"significant\")." if "significant"
                        not in rules else "."))
    sections.append(("wins", "\n".join(lines)))

    lines = ["## Surprising results", ""]
    if surprising:
        lines += ["The measured effect lies more than 3 standard errors from what the agent expected.", "",
                  "| # | hypothesis | expected Δ | measured Δ | status | verdict |", "|---|---|---|---|---|---|"]
        lines += [f"| {e.id} | {_cell(e.hypothesis or e.description)} | {e.expected_delta:+.4f} | "
                  f"{_delta_text(s)} | {e.status} | {_cell(verdict)} |" for e, s, verdict in surprising[:MAX_ROWS]]
        lines += _more(len(surprising), "`labrat log` marks them all")
    else:
        lines.append("None: every stated expectation was within 3 standard errors of its measurement"
                     if any(e.expected_delta is not None for e in candidates) else
                     "None stated: no experiment recorded an expected effect.")
    sections.append(("surprising", "\n".join(lines)))

    lines = ["## Pareto fronts", "", "Variants no other variant beats on both val_bpb (mean of runs) and the measure."]
    for front in found_fronts:
        lines += ["", f"**val_bpb against {front.axis.label}**", ""]
        if not front.front:
            lines.append("No variant recorded this measure.")
            continue
        lines += ["| # | " + front.axis.name + " | val_bpb | runs | status | change |", "|---|---|---|---|---|---|"]
        lines += [f"| {p.experiment_id} | {value_text(front.axis, p.value)} | {p.metric:.6f} | {p.runs} | {p.status} | "
                  f"{_cell(p.description)} |" for p in front.front[:MAX_ROWS]]
        lines += _more(len(front.front), f"`labrat pareto --axis {front.axis.name}` lists them all")
    sections.append(("pareto", "\n".join(lines)))

    lines = ["## What each kept step contributed", ""]
    if len(chain) > 1:
        lines += [f"The best variant's lineage, #{chain[0].id} to #{best.id}; Δ is each step's mean of runs against "
                  "its parent's, ± one standard error.", "", "| # | change | val_bpb (mean) | runs | Δ val_bpb |",
                  "|---|---|---|---|---|"]
        for e in chain:
            step = standing.get(e.id)
            lines.append(f"| {e.id} | {_cell(e.description)} | {runs[e.id].mean:.6f} | {runs[e.id].n} | "
                         f"{_delta_text(step) if step and e is not chain[0] else 'baseline'} |")
        lines += ["", f"In all: {runs[best.id].mean - runs[chain[0].id].mean:+.4f} bpb over {len(chain) - 1} step(s)."]
    else:
        lines.append("No kept step yet beyond the baseline." if best else "No experiment has been kept yet.")
    sections.append(("contributions", "\n".join(lines)))

    lines = ["## Dead ends", ""]
    if ends:
        lines += [f"Directions tried {DEAD_END_MIN_TRIES} or more times and never kept (grouped by the knob the "
                  "diff set, else by hypothesis).", "", "| direction | tries | outcomes | best Δ | experiments |",
                  "|---|---|---|---|---|"]
        lines += [f"| {_cell(d.direction)} | {len(d.ids)} | {', '.join(f'{n} {s}' for s, n in d.outcomes.items())} | "
                  f"{f'{d.best_delta:+.4f}' if d.best_delta is not None else '-'} | {_ids(d.ids)} |"
                  for d in ends[:MAX_ROWS]]
        lines += _more(len(ends), "the least tried are left out")
    else:
        lines.append("None yet: no direction has been tried twice without a keep.")
    sections.append(("dead_ends", "\n".join(lines)))

    tokens_in, tokens_out = sum(e.tokens_in for e in experiments), sum(e.tokens_out for e in experiments)
    lines = ["## Totals", "", f"- experiment time: {hours:.2f} h", f"- agent tokens: {tokens_in:,} in / {tokens_out:,} out",
             f"- agent cost: ${sum(e.cost_usd for e in experiments):.4f}"]
    sections.append(("totals", "\n".join(lines)))
    if best is None:
        return sections
    gap = f" (gap to the entropy floor {best.floor_gap:.4f})" if best.floor_gap is not None else ""
    lines = ["## Best variant", "", f"#{best.id}: val_bpb **{best.metric:.6f}**{gap}, {_cell(best.description, 300)}",
             "", f"snapshot `{best.snapshot}`; reproduce with `labrat reproduce {best.id}`.", "",
             "## Lineage of kept changes", "", "| # | val_bpb | runs | keep rule | change |", "|---|---|---|---|---|"]
    lines += [f"| {e.id} | {e.metric:.6f} | {runs[e.id].text()} | {_cell(e.decision, 160)} | {_cell(e.description)} |"
              for e in chain]
    lines += ["", f"## Diff of the best variant against the baseline (#{chain[0].id})", "",
              _fenced(diff.rstrip("\n") or "(no change)", "diff")]
    sections.append(("best", "\n".join(lines)))
    return sections


def report(lab: Path) -> str:
    """The Markdown report."""
    with open_ledger(lab) as ledger:
        sections = report_sections(ledger, lab, fronts(ledger))
    return "\n\n".join(text for _, text in sections) + "\n"


STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1180px; margin: 2em auto;
       padding: 0 1.2em; color: #1d1d1f; }
h1 { font-size: 1.6em; border-bottom: 2px solid #1f77b4; padding-bottom: .2em; }
h2 { font-size: 1.2em; margin-top: 1.6em; color: #1f4f7b; }
table { border-collapse: collapse; margin: .6em 0; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f6f9; }
tr:nth-child(even) td { background: #fafbfc; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; font-size: 12px; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #e1e4e8; }
figcaption { font-size: 12px; color: #57606a; }
"""


def _figure(render: Callable[[io.BytesIO], object], caption: str) -> str:
    buffer = io.BytesIO()
    render(buffer)
    data = base64.b64encode(buffer.getvalue()).decode()
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def report_html(lab: Path) -> str:
    """One self-contained HTML page: the report with the progress chart and the Pareto fronts embedded (PNG data
    URIs, inline CSS, no script, nothing fetched)."""
    import markdown

    with open_ledger(lab) as ledger:
        found = fronts(ledger)
        sections = report_sections(ledger, lab, found)
        series, labels = _progress(ledger)
    figures = (_figure(lambda out: _draw_progress(series, labels, out), "val_bpb per experiment: kept steps "
                       "labelled, the running best with the noise of one run")
               + _figure(lambda out: plot_fronts(found, out), "Pareto fronts: val_bpb against parameters, peak "
                                                              "memory and throughput"))
    body = []
    for key, text in sections:
        # The Markdown's text cells are escaped already (_cell); the fenced diff is escaped by the extension.
        body.append(markdown.markdown(text, extensions=["tables", "fenced_code"]))
        if key == "surprising":  # the charts after what to examine first
            body.append(figures)
    title = html.escape(f"labrat report: {Path(lab).resolve().name}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>'
            f"<body>\n" + "\n".join(body) + "\n</body></html>\n")
