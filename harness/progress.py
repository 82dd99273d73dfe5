"""The live view of a session: rich on a terminal, one log line per event elsewhere."""

from __future__ import annotations

import time

import structlog
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from harness.history import metric_text
from harness.ledger import Experiment
from harness.session import Progress

log = structlog.get_logger(__name__)
RECENT_ROWS = 8
STATUS_STYLE = {"keep": "green", "discard": "yellow", "crash": "red", "timeout": "red", "replicate": "cyan"}


class LiveView(Progress):
    """experiment n/max, phase and its elapsed/allowed time, best so far, gap to floor, rate, tokens, cost."""

    def __init__(self, console: Console, max_experiments: int | None, floor_bpb: float | None = None, lanes: int = 1):
        self.console = console
        self.max_experiments = max_experiments
        self.floor_bpb = floor_bpb
        self.lanes = lanes
        self.started = time.monotonic()
        self.running: dict[int, tuple[int, str]] = {}  # lane -> (experiment id, description) in flight
        self.phases: dict[int, tuple[str, float, float | None]] = {}  # lane -> (phase, since, seconds allowed)
        self.finished: list[Experiment] = []
        self.best: Experiment | None = None
        self.tokens_in = self.tokens_out = self.tool_calls = 0
        self.cost = 0.0
        self.live = Live(console=console, refresh_per_second=2, get_renderable=self.render, transient=False) \
            if console.is_terminal else None

    def __enter__(self) -> LiveView:
        if self.live:
            self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            self.live.stop()

    # -- Progress ----------------------------------------------------------------------------------
    def phase(self, name: str, seconds: float | None = None, lane: int = 0) -> None:
        self.phases[lane] = (name, time.monotonic(), seconds)

    def experiment_started(self, experiment_id: int, description: str, lane: int = 0) -> None:
        self.running[lane] = (experiment_id, description)

    def experiment_finished(self, experiment: Experiment) -> None:
        if self.running.get(experiment.lane, (None,))[0] == experiment.id:
            del self.running[experiment.lane]
        self.phase("agent", lane=experiment.lane)
        self.finished.append(experiment)
        if experiment.status == "keep" and experiment.metric is not None and (
                self.best is None or experiment.metric < (self.best.metric or float("inf"))):
            self.best = experiment
        if not self.live:
            self.console.print(self._line(experiment), highlight=False)

    def tool_call(self, name: str, is_error: bool, lane: int = 0) -> None:
        self.tool_calls += 1
        if name != "run_experiment":
            self.phase(f"agent: {name}", lane=lane)

    def usage(self, tokens_in: int, tokens_out: int, cost_usd: float) -> None:
        self.tokens_in += tokens_in
        self.tokens_out += tokens_out
        self.cost += cost_usd

    # -- rendering ---------------------------------------------------------------------------------
    def _line(self, e: Experiment) -> str:
        gap = f" (gap {e.floor_gap:.4f})" if e.floor_gap is not None else ""
        lane = f"lane {e.lane}  " if self.lanes > 1 else ""
        return (f"#{e.id:<4} {lane}{e.status:8} val_bpb {metric_text(e.metric)}{gap}  {e.seconds or 0:5.1f}s  "
                f"{escape(e.description[:70])}")

    def _phase_text(self, lane: int) -> str:
        name, since, seconds = self.phases.get(lane, ("starting", self.started, None))
        return f"{name}  {time.monotonic() - since:.0f}s" + (f" / {seconds:.0f}s" if seconds else "")

    def render(self):
        elapsed = time.monotonic() - self.started
        done = sum(e.replicate_of is None for e in self.finished)  # max_experiments counts candidates, not replicates
        rate = done / elapsed * 3600 if elapsed > 0 and done else 0.0
        header = Table.grid(padding=(0, 2))
        header.add_column(style="bold")
        header.add_column()
        counter = f"{done}" + (f" / {self.max_experiments}" if self.max_experiments else "")
        if self.lanes == 1 and 0 in self.running:
            counter += f"   running #{self.running[0][0]}: {escape(self.running[0][1][:60])}"
        header.add_row("experiments", counter)
        if self.lanes == 1:
            header.add_row("now", self._phase_text(0))
        for lane in range(self.lanes if self.lanes > 1 else 0):
            current = f"#{self.running[lane][0]} {escape(self.running[lane][1][:50])}: " if lane in self.running else ""
            header.add_row(f"lane {lane}", current + self._phase_text(lane))
        best = "-"
        if self.best:
            best = f"#{self.best.id}  val_bpb {metric_text(self.best.metric)}"
            if self.best.floor_gap is not None:
                best += f"  (gap to floor {self.best.floor_gap:.4f})"
        header.add_row("best", best)
        header.add_row("elapsed", f"{elapsed / 60:.1f} min, {rate:.1f} experiments/hour")
        header.add_row("agent", f"{self.tool_calls} tool calls, {self.tokens_in:,} tokens in / {self.tokens_out:,} out, "
                                f"${self.cost:.4f}")
        recent = Table(box=None, padding=(0, 1))
        for column in ("#", "status", "val_bpb", "gap", "s", "description"):
            recent.add_column(column)
        for e in self.finished[-RECENT_ROWS:]:
            recent.add_row(str(e.id), f"[{STATUS_STYLE.get(e.status, '')}]{e.status}[/]", metric_text(e.metric),
                           f"{e.floor_gap:.4f}" if e.floor_gap is not None else "-", f"{e.seconds or 0:.0f}",
                           escape(e.description[:60]))
        return Panel(Group(header, recent), title="labrat run", border_style="blue")


def results_table(experiments: list[Experiment], title: str = "experiments",
                  marks: dict[int, str] | None = None) -> Table:
    """The table `labrat run` prints at the end and `labrat log` shows; `marks`: a note per experiment id
    (the surprising results), shown after its description."""
    marks = marks or {}
    lanes = any(e.lane for e in experiments)
    table = Table(title=title)
    for column in ("#", *(("lane",) if lanes else ()), "parent", "status", "val_bpb", "gap", "memory GB", "seconds",
                   "tokens", "cost $", "description"):
        table.add_column(column, justify="right" if column not in ("status", "description") else "left")
    for e in experiments:
        table.add_row(
            str(e.id), *((str(e.lane),) if lanes else ()), str(e.parent_id or "-"),
            f"[{STATUS_STYLE.get(e.status, '')}]{e.status}[/]", metric_text(e.metric),
            f"{e.floor_gap:.4f}" if e.floor_gap is not None else "-",
            f"{e.memory_bytes / 1024**3:.2f}" if e.memory_bytes else "-", f"{e.seconds or 0:.1f}",
            f"{e.tokens_in + e.tokens_out:,}" if e.tokens_in or e.tokens_out else "-",
            f"{e.cost_usd:.4f}" if e.cost_usd else "-",
            escape(e.description[:80] + (f" (expects {e.expected_delta:+.4f})" if e.expected_delta is not None else ""))
            + (f" [bold magenta]{escape(marks[e.id])}[/]" if e.id in marks else ""),
        )
    return table
