"""Plain-text views of the ledger, shared by the agent's history tools and the CLI."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from harness.ledger import Experiment, Ledger
from harness.noise import Noise, Runs, lab_noise, runs_of, surprise
from harness.text import clip, printable

DIFF_CONTEXT = 3


def unified_diff(old: dict[str, str], new: dict[str, str], old_label: str, new_label: str) -> str:
    """A unified diff over every source file of two workspace states (added and removed files included)."""
    chunks = []
    for path in sorted(set(old) | set(new)):
        a, b = old.get(path), new.get(path)
        if a == b:
            continue
        # A file name is one header line: a newline in it must not start a line of its own (a forged hunk).
        name = path.replace("\n", "\\n").replace("\t", "\\t")
        lines = difflib.unified_diff(
            (a or "").splitlines(keepends=True), (b or "").splitlines(keepends=True),
            fromfile=f"{old_label}/{name}" if a is not None else "/dev/null",
            tofile=f"{new_label}/{name}" if b is not None else "/dev/null", n=DIFF_CONTEXT,
        )
        chunks.append("".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in lines))
    return printable("".join(chunks))


def metric_text(value: float | None) -> str:
    return f"{value:.6f}" if value is not None else "-"


def summary_line(e: Experiment) -> str:
    parent = f"#{e.parent_id}" if e.parent_id else "base"
    gap = f" gap {e.floor_gap:.4f}" if e.floor_gap is not None else ""
    lane = f", lane {e.lane}" if e.lane else ""
    return (f"#{e.id} (from {parent}{lane}) {e.status:8s} val_bpb {metric_text(e.metric)}{gap} "
            f"{e.seconds or 0:.0f}s  {printable(' '.join(e.description.split()))[:120]}")


def experiment_list(experiments: list[Experiment], limit: int) -> str:
    shown = experiments[-limit:]
    if not shown:
        return "no experiments yet"
    header = f"{len(experiments)} experiments" + (f", the latest {len(shown)}:" if len(shown) < len(experiments) else ":")
    return "\n".join([header, *(summary_line(e) for e in shown)])


@dataclass(frozen=True)
class Standing:
    """What an experiment's result means: its parent, its runs and the parent's, the lab's noise."""

    parent: Experiment | None
    runs: Runs
    parent_runs: Runs | None
    noise: Noise

    @classmethod
    def of(cls, ledger: Ledger, e: Experiment, config: dict, noise: Noise | None = None) -> Standing:
        """`config`: the training setup whose noise applies (the session's that ran it); `noise`: that setup's
        noise when the caller has it already (a view of many rows computes it once)."""
        parent = ledger.experiment(e.parent_id) if e.parent_id else None
        return cls(parent, runs_of(ledger, e), runs_of(ledger, parent) if parent else None,
                   noise if noise is not None else lab_noise(ledger, config))

    @property
    def delta_se(self) -> float | None:
        """The standard error of `delta` under the lab's noise (None: no estimate of the noise)."""
        if self.delta is None or self.noise.sd is None:
            return None
        return self.noise.se_of_difference(self.runs.n, self.parent_runs.n)

    @property
    def delta(self) -> float | None:
        """The change of val_bpb against the parent, mean of runs against mean of runs (negative: better)."""
        if not self.runs.n or self.parent_runs is None or not self.parent_runs.n:
            return None
        return self.runs.mean - self.parent_runs.mean

    def surprise(self, e: Experiment) -> str | None:
        return surprise(e.expected_delta, self.delta, self.noise, self.runs.n, self.parent_runs.n if self.parent_runs else 0)


def effect_text(e: Experiment, standing: Standing | None) -> str | None:
    """The agent's stated hypothesis and expectation next to the measured effect and the noise (None: it stated
    neither)."""
    if e.hypothesis is None and e.expected_delta is None:
        return None
    delta = standing.delta if standing else None
    expected = f"expected Δ {e.expected_delta:+.4f}" if e.expected_delta is not None else "no expected Δ"
    measured = f"measured Δ {delta:+.4f}" if delta is not None else "no measured Δ"
    noise = f"; noise {standing.noise.text()}" if standing else ""
    marked = f": {surprising}" if standing and (surprising := standing.surprise(e)) else ""
    return (f"hypothesis: {printable(e.hypothesis or '-')}\n{expected}, {measured} (val_bpb against "
            f"#{e.parent_id or '-'}{noise}){marked}")


def experiment_detail(e: Experiment, max_diff_chars: int = 6000, standing: Standing | None = None) -> str:
    lines = [summary_line(e), f"snapshot: {printable(e.snapshot or '-')}"]
    if e.replicate_of:
        lines.append(f"replicate of #{e.replicate_of} (seed {e.seed})")
    elif standing and standing.runs.n > 1:
        lines.append(f"runs: {standing.runs.text()}; noise {standing.noise.text()}")
    if e.decision:
        lines.append(f"keep rule: {printable(e.decision)}")
    if effect := effect_text(e, standing):
        lines.append(effect)
    if e.memory_bytes:
        lines.append(f"peak memory: {e.memory_bytes / 1024**3:.2f} GB; training {e.train_seconds or 0:.1f} s")
    if e.tokens_in or e.tokens_out:
        lines.append(f"agent tokens: {e.tokens_in} in / {e.tokens_out} out, ${e.cost_usd:.4f}")
    diff = printable(e.diff or "")  # rows come from bundles too: what is shown is made safe where it is shown
    lines.append("diff against its parent:" if diff else "diff against its parent: (none)")
    if diff:
        lines.append(clip(diff, max_diff_chars))
    if e.log_tail and e.status in ("crash", "timeout"):
        lines += ["log tail:", printable(e.log_tail)]
    return "\n".join(lines)
