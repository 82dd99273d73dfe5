"""The `labrat` command line. Errors the user can act on are printed as one line, never a traceback."""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from harness import logs
from harness.config import ConfigError
from harness.lab import experiment_or_error, open_ledger
from sandbox.errors import SandboxError
from trainer.prepare import DataError
from sandbox.sandbox import interrupt_on_sigterm

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Run ML research agents in hardened, snapshotted containers.")
image_app = typer.Typer(no_args_is_help=True, help="Build the sandbox images (offline).")
app.add_typer(image_app, name="image")
# Off a terminal (CI logs, pipes), rich would wrap at 80 columns; diffs and tables read better unwrapped.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
out = Console(width=None if sys.stdout.isatty() else 200)


@contextlib.contextmanager
def _spinner(message: str):
    """A rich spinner whose text follows the steps of a long job."""
    with console.status(message) as status:
        def update(line: str) -> None:
            status.update(line[:120])
            if not console.is_terminal:  # no spinner in a log file or CI: keep each step as a line
                console.log(line[:160], highlight=False)
        yield update


@image_app.command("build")
def image_build(
    gpu: Annotated[bool, typer.Option("--gpu", help="Build Dockerfile.gpu (CUDA base) instead of the CPU image.")] = False,
    base: Annotated[str | None, typer.Option(help="Base image (default: a debootstrap'd Debian for CPU, a CUDA PyTorch image for GPU).")] = None,
    tag: Annotated[str | None, typer.Option(help="Tag of the built image.")] = None,
) -> None:
    """Build labrat-sandbox:cpu (or :gpu); skipped when an identical build exists."""
    from harness.image import build_image

    with _spinner("building image") as update:
        name = build_image(gpu=gpu, base=base, tag=tag, on_step=update)
    out.print(f"image ready: {name}")


@app.command()
def init(path: Annotated[Path, typer.Argument(help="Directory of the new lab.")]) -> None:
    """Create a lab: labrat.toml (validated settings), program.md (the agent's instructions), the ledger."""
    from harness.lab import init_lab

    config_file = init_lab(path)
    out.print(f"lab ready: {config_file} (edit it and {path / 'program.md'}, then `labrat run`)")


@app.command()
def run(
    lab: Annotated[Path, typer.Option("--lab", help="The lab directory (made by `labrat init`; created with defaults if missing).")] = Path("."),
    agent: Annotated[str | None, typer.Option(help="offline (no key needed) or claude (ANTHROPIC_API_KEY).")] = None,
    model: Annotated[str | None, typer.Option(help="Claude model name.")] = None,
    budget: Annotated[float | None, typer.Option(help="Training seconds per experiment.")] = None,
    max_experiments: Annotated[int | None, typer.Option("--max-experiments", help="Stop after this many experiments in the session.")] = None,
    hours: Annotated[float | None, typer.Option(help="Stop after this many hours.")] = None,
    gpus: Annotated[str | None, typer.Option(help='"all" or device ids like "0,1".')] = None,
    runtime: Annotated[str | None, typer.Option(help="runc, or runsc for gVisor.")] = None,
    new: Annotated[bool, typer.Option("--new", help="Start a new session even if the last one can be resumed.")] = False,
    parallel: Annotated[int | None, typer.Option(help="Agents at work at once (lanes): one GPU each from --gpus, or "
                                                      "a disjoint share of the CPU cores.")] = None,
) -> None:
    """Start a research session, or resume the last one if it was interrupted."""
    from harness.config import apply_overrides, load_config
    from harness.lab import ensure_lab, read_program
    from harness.progress import LiveView, results_table
    from harness.run import LabRun, make_agent

    ensure_lab(lab)
    config = apply_overrides(load_config(lab), agent=agent, model=model, time_budget=budget,
                             max_experiments=max_experiments, max_hours=hours, gpus=gpus, runtime=runtime,
                             parallel=parallel)
    # On a terminal the live view is the display: log lines (all still in the lab's log file) would tear it.
    quiet = console.is_terminal and "LABRAT_LOG_LEVEL" not in os.environ
    logs.configure(file=lab / "logs" / "labrat.log", level="warning" if quiet else None)
    program = read_program(lab)
    researcher = make_agent(config, program)
    with _spinner("starting the session") as update:
        lab_run = LabRun(lab, config, agent=config.agent, model=researcher.model, new_session=new, on_step=update)
        lab_run.__enter__()  # closed by run_agents, whatever happens
    session = lab_run.session
    view = LiveView(console, config.max_experiments, lab_run.data.floor_bpb, lanes=len(lab_run.lanes))
    lab_run.lab_session.progress = view
    action = "resumed" if session.resumed else "started"
    lanes = (f", {len(lab_run.lanes)} lanes: " + ", ".join(lane.resources.describe() for lane in lab_run.lanes)
             if len(lab_run.lanes) > 1 else "")
    console.print(f"session {session.session_id} {action} in {lab} ({config.agent} agent, {config.runtime}, "
                  f"{'GPUs ' + config.gpus if config.gpus else 'CPU'}, {config.time_budget:g} s budget{lanes})",
                  highlight=False)
    with view:
        failure = lab_run.run_agents(lambda lane: researcher if lane == 0 else make_agent(config, program, lane))
    with open_ledger(lab) as ledger:
        experiments = ledger.experiments(session.session_id)
    out.print(results_table(experiments, title=f"session {session.session_id}"))
    out.print(f"results: {lab / 'results.tsv'}; stop: {failure or session.stop}", highlight=False)
    if failure:
        console.print(f"[bold red]labrat: error:[/] {escape(failure)} (state saved: `labrat run` resumes)", highlight=False)
        raise typer.Exit(3)


LabOption = Annotated[Path, typer.Option("--lab", help="The lab directory.")]


@app.command()
def status(lab: LabOption = Path(".")) -> None:
    """The lab at a glance: sessions, experiments by status, the best result, what is running."""
    from collections import Counter

    from harness.noise import lab_noise, runs_of

    with open_ledger(lab) as ledger:
        experiments = ledger.experiments()
        session = ledger.last_session()
        best = ledger.best()
        noise = lab_noise(ledger, session.config) if session else None
        best_runs = runs_of(ledger, best) if best else None
        baseline = next((e for e in experiments if e.replicate_of is None and e.metric is not None), None)
        baseline_runs = runs_of(ledger, baseline) if baseline else None
        lane_bases = ledger.lane_bases(session.id) if session else {}
    counts = Counter(e.status for e in experiments)
    out.print(f"lab: {lab.resolve()}")
    if session is None:
        out.print("no session yet: `labrat run` starts one")
        return
    state = ("running or killed" if session.ended_at is None else
             f"ended ({session.stop_reason})" + ("; `labrat run` resumes it" if session.resumable else ""))
    out.print(f"last session: {session.id}, {session.agent} agent, {state}", highlight=False)
    out.print(f"experiments: {len(experiments)} (" + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ")",
              highlight=False)
    if best:
        gap = f", gap to floor {best.floor_gap:.4f}" if best.floor_gap is not None else ""
        out.print(f"best: #{best.id} val_bpb {best.metric:.6f}{gap}: {best.description}", highlight=False, markup=False)
        if best_runs.n > 1:
            out.print(f"best's runs: {best_runs.text()}", highlight=False)
    if noise is not None:
        floor = f"; baseline #{baseline.id}: {baseline_runs.text()}" if baseline_runs and baseline_runs.n > 1 else ""
        seedless = " (train.py ignores the seed)" if baseline_runs and baseline_runs.ignores_seed else ""
        out.print(f"noise of one run: {noise.text()}{floor}{seedless}", highlight=False)
    if len(lane_bases) > 1:
        out.print("lanes: " + ", ".join(f"lane {lane} from #{base or '-'}" for lane, base in lane_bases.items()),
                  highlight=False)
    for e in (e for e in experiments if e.status == "running"):
        lane = f" (lane {e.lane})" if len(lane_bases) > 1 else ""
        out.print(f"running: #{e.id}{lane} {e.description}", highlight=False, markup=False)
    tokens = sum(e.tokens_in + e.tokens_out for e in experiments)
    if tokens:
        out.print(f"agent: {tokens:,} tokens, ${sum(e.cost_usd for e in experiments):.4f}", highlight=False)


@app.command("log")
def log_command(
    lab: LabOption = Path("."),
    limit: Annotated[int, typer.Option(help="Show the latest N experiments.")] = 50,
    tsv: Annotated[bool, typer.Option("--tsv", help="Print results.tsv (autoresearch's columns) instead.")] = False,
) -> None:
    """The experiments of the lab, latest last."""
    from harness.progress import results_table
    from harness.reports import surprises

    with open_ledger(lab) as ledger:
        tsv_text, experiments = ledger.results_tsv(), ledger.experiments()
        shown = experiments[-limit:]
        marks = {e.id: verdict for e, _, verdict in surprises(ledger, shown)}
    if tsv:
        out.print(tsv_text, end="", highlight=False, markup=False)
        return
    out.print(results_table(shown, title=f"{len(experiments)} experiments", marks=marks))


@app.command()
def show(
    experiment_id: Annotated[int, typer.Argument(metavar="ID", help="Experiment id.")],
    lab: LabOption = Path("."),
) -> None:
    """One experiment: status, metric, snapshot, tokens, its diff against its parent, the log tail."""
    from harness.history import Standing, experiment_detail
    from harness.text import printable

    with open_ledger(lab) as ledger:
        e = experiment_or_error(ledger, experiment_id)
        standing = Standing.of(ledger, e, ledger.session(e.session_id).config)
    out.print(experiment_detail(e, max_diff_chars=200_000, standing=standing), highlight=False, markup=False)
    if e.log_tail and e.status not in ("crash", "timeout"):
        out.print("log tail:\n" + printable(e.log_tail), highlight=False, markup=False)


@app.command()
def diff(
    a: Annotated[int, typer.Argument(help="Experiment id (0: the first session's starting point).")],
    b: Annotated[int, typer.Argument(help="Experiment id.")],
    lab: LabOption = Path("."),
) -> None:
    """Unified diff of the workspace sources between two experiments."""
    from harness.history import unified_diff

    with open_ledger(lab) as ledger:
        for experiment_id in (a, b):
            if experiment_id:
                experiment_or_error(ledger, experiment_id)
        old, new = ledger.sources(a), ledger.sources(b)
    text = unified_diff(old, new, f"#{a}", f"#{b}")
    out.print(text or f"#{a} and #{b} have the same sources", end="" if text else "\n", highlight=False, markup=False)


@app.command()
def noise(
    lab: LabOption = Path("."),
    experiment_id: Annotated[int | None, typer.Option("--experiment", help="The experiment to re-run (default: the "
                                                      "session's base, else the best).")] = None,
    seeds: Annotated[int | None, typer.Option(min=1, max=20, help="Runs to add (default: the lab's noise_seeds, "
                                              "at least 2).")] = None,
) -> None:
    """Measure the noise floor now: re-run an experiment with fresh harness seeds; print its spread and the lab's."""
    from harness.config import load_config
    from harness.progress import LiveView
    from harness.run import LabRun

    config = load_config(lab)
    logs.configure(file=lab / "logs" / "labrat.log", level="warning" if console.is_terminal else None)
    with _spinner("starting") as update, LabRun(lab, config, agent="labrat noise", on_step=update) as lab_run:
        session = lab_run.session
        target = experiment_or_error(session.ledger, experiment_id) if experiment_id else (session.base or session.ledger.best())
        if target is None:
            raise ConfigError("no experiment to re-run yet: `labrat run` first")
        count = seeds or max(config.noise_seeds, 2)
        lab_run.lab_session.progress = LiveView(console, None, lab_run.data.floor_bpb)
        update(f"re-running #{target.id} {count} times")
        runs = lab_run.measure_noise(target, count)
        noise_now = session.noise()
        # A resumed session goes on at the next `labrat run`; a session opened for this ends here.
        lab_run.close("noise measured", resumable=session.resumed)
    seedless = " (train.py ignores the seed: every run scored the same)" if runs.ignores_seed else ""
    out.print(f"#{target.id}: {runs.text()}{seedless}", highlight=False)
    out.print(f"noise of one run in this lab: {noise_now.text()}", highlight=False)


@app.command()
def rollback(
    experiment_id: Annotated[int, typer.Argument(metavar="ID", help="The experiment to continue from.")],
    lab: LabOption = Path("."),
) -> None:
    """Make the lab's next experiments start from ID's snapshot (recorded in the ledger)."""
    from harness.lab import rollback as roll_back

    out.print(f"rolled back: {roll_back(lab, experiment_id)}", highlight=False)


@app.command()
def reproduce(
    experiment_id: Annotated[int, typer.Argument(metavar="ID", help="The experiment to re-run.")],
    lab: LabOption = Path("."),
    tolerance: Annotated[float | None, typer.Option(help="Allowed |reproduced - recorded| in bpb (default: 0 in "
                                                          "deterministic mode, else 0.05).")] = None,
) -> None:
    """Re-run ID's training and evaluation from its snapshot; compare with the recorded metric (exit 1 if off)."""
    from harness.reproduce import reproduce as run_reproduction

    with _spinner(f"reproducing #{experiment_id}") as update:
        result = run_reproduction(lab, experiment_id, tolerance, on_step=update)
    reproduced = f"{result.reproduced:.6f}" if result.reproduced is not None else "-"
    out.print(f"#{experiment_id} {result.description}: recorded {result.recorded:.6f}, reproduced {reproduced}: "
              f"{'OK' if result.ok else 'MISMATCH'}, {result.reason}", highlight=False)
    if not result.ok:
        raise typer.Exit(1)


@app.command()
def regress(
    experiment_id: Annotated[int | None, typer.Argument(metavar="[ID]", help="The experiment (default: the best).")] = None,
    best: Annotated[bool, typer.Option("--best", help="Regress the lab's best kept experiment (the default).")] = False,
    baseline: Annotated[float | None, typer.Option(help="Fail if the reproduced val_bpb is above this.")] = None,
    tolerance: Annotated[float | None, typer.Option(help="Allowed worsening in bpb (default: 0 deterministic, else 0.05).")] = None,
    junit: Annotated[Path | None, typer.Option(help="Write a JUnit XML report here.")] = None,
    lab: LabOption = Path("."),
) -> None:
    """CI: re-run the best (or ID) from its snapshot; exit 1 on a regression or a missed baseline."""
    from harness.reproduce import junit_xml
    from harness.reproduce import regress as run_regress

    if best and experiment_id is not None:
        raise ConfigError("give an experiment ID or --best, not both")
    started = time.monotonic()
    with _spinner("regression check") as update:
        result, failures = run_regress(lab, experiment_id, baseline, tolerance, on_step=update)
    if junit:
        junit.write_text(junit_xml(result, failures, time.monotonic() - started))
    reproduced = f"{result.reproduced:.6f}" if result.reproduced is not None else "-"
    out.print(f"#{result.experiment_id} {result.description}: recorded {result.recorded:.6f}, reproduced {reproduced} "
              f"({result.reason})", highlight=False)
    for failure in failures:
        console.print(f"[bold red]FAIL[/] {escape(failure)}", highlight=False)
    if failures:
        raise typer.Exit(1)
    out.print("PASS", highlight=False)


@app.command("export")
def export_command(
    experiment_id: Annotated[int, typer.Argument(metavar="ID")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The bundle file to write.")],
    lineage: Annotated[bool, typer.Option("--lineage", help="Also export every ancestor of ID.")] = False,
    lab: LabOption = Path("."),
) -> None:
    """Write ID as one self-contained bundle: snapshot image(s), ledger rows, config, checksums."""
    from harness.share import export_experiment

    with _spinner(f"exporting #{experiment_id}"):
        chain = export_experiment(lab, experiment_id, output, lineage)
    out.print(f"exported {', '.join(f'#{e.id}' for e in chain)} to {output} ({output.stat().st_size / 1e6:.1f} MB)",
              highlight=False)


@app.command("import")
def import_command(
    bundle: Annotated[Path, typer.Argument(help="A file written by `labrat export`.")],
    lab: LabOption = Path("."),
) -> None:
    """Verify a bundle's checksums, load its snapshots and add its experiments to the lab's ledger."""
    from harness.share import import_bundle

    with _spinner(f"importing {bundle}"):
        imported = import_bundle(lab, bundle)
    for item in imported:
        state = "as" if item.new else "already here as"
        out.print(f"imported #{item.original_id} {state} #{item.id}: {item.description}", highlight=False)


@app.command()
def gc(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what would be removed.")] = False,
    lab: LabOption = Path("."),
) -> None:
    """Remove snapshots of discarded and crashed experiments; kept ones, bases and their ancestors stay."""
    from harness.lab import gc_lab

    report = gc_lab(lab, dry_run)
    verb = "would remove" if dry_run else "removed"
    out.print(f"{verb} {len(report.removed)} snapshot(s), {report.bytes_freed / 1e6:.2f} MB; "
              f"kept {len(report.kept)}", highlight=False)
    for name in report.removed:
        out.print(f"  {name}", highlight=False)


@app.command("plot")
def plot_command(
    output: Annotated[Path, typer.Option("-o", "--output", help="PNG file.")] = Path("progress.png"),
    pareto: Annotated[bool, typer.Option("--pareto", help="Draw the Pareto fronts (val_bpb against parameters, "
                                                          "peak memory, throughput) instead.")] = False,
    lab: LabOption = Path("."),
) -> None:
    """The progress chart: val_bpb per experiment, kept steps labelled, running best with the noise band, floor."""
    from harness.reports import plot, plot_pareto

    if pareto:
        found = plot_pareto(lab, output)
        out.print(f"wrote {output}: " + ", ".join(f"{f.axis.name} front {len(f.front)} of {len(f.points)}"
                                                  for f in found), highlight=False)
        return
    series = plot(lab, output)
    out.print(f"wrote {output}: {len(series.ids)} experiments, {len(series.kept_ids)} kept", highlight=False)


@app.command("pareto")
def pareto_command(
    axis: Annotated[list[str] | None, typer.Option(help="parameters, memory or throughput (repeatable; default: "
                                                        "all three).")] = None,
    lab: LabOption = Path("."),
) -> None:
    """The Pareto fronts: variants no other beats on both val_bpb (mean of runs) and a cost or a speed."""
    from harness.pareto import AXES, fronts, value_text

    unknown = [name for name in axis or [] if name not in AXES]
    if unknown:
        raise ConfigError(f"unknown axis {unknown[0]!r}: choose from {', '.join(AXES)}")
    with open_ledger(lab) as ledger:
        found = fronts(ledger, axis)
    for front in found:
        table = Table(title=f"val_bpb against {front.axis.label}: {len(front.front)} on the front of "
                            f"{len(front.points)} variants")
        for column in ("#", front.axis.name, "val_bpb", "runs", "status", "description"):
            table.add_column(column, justify="left" if column in ("status", "description") else "right")
        for p in front.front:
            table.add_row(str(p.experiment_id), value_text(front.axis, p.value), f"{p.metric:.6f}", str(p.runs),
                          p.status, escape(p.description[:80]))
        out.print(table)


@app.command("report")
def report_command(
    output: Annotated[Path | None, typer.Option("-o", "--output", help="File (default: stdout).")] = None,
    html: Annotated[bool, typer.Option("--html", help="One self-contained HTML page, the plots embedded.")] = False,
    lab: LabOption = Path("."),
) -> None:
    """What is worth examining: significant wins, surprising results, Pareto fronts, each kept step's contribution,
    dead ends; then the best variant, its lineage and diff. Markdown, or HTML with --html."""
    from harness.reports import report, report_html

    text = report_html(lab) if html else report(lab)
    if output:
        output.write_text(text)
        out.print(f"wrote {output}", highlight=False)
    else:
        out.print(text, end="", highlight=False, markup=False)


@app.command()
def doctor(
    lab: Annotated[Path | None, typer.Option("--lab", help="Also check this lab: its disk, and its runtime and GPU "
                                                           "settings.")] = None,
) -> None:
    """Check this machine: engine, gVisor, GPUs, free disk, snapshot layers, insecure setups, a hardened sandbox."""
    from harness.doctor import Level, run_checks

    styles = {Level.OK: "green", Level.INFO: "cyan", Level.WARN: "yellow", Level.ERROR: "bold red"}
    failed = False
    for finding in run_checks(lab):
        level = finding.level
        out.print(f"[{styles[level]}]{level.value:<6}[/]{escape(finding.check)}: {escape(finding.message)}",
                  highlight=False, soft_wrap=True)
        failed = failed or level is Level.ERROR
    if failed:
        raise typer.Exit(1)


@app.command()
def smoke(
    runtime: Annotated[str, typer.Option(help="runc, or runsc for gVisor.")] = "runc",
) -> None:
    """A smoke test of the sandbox alone: exec, edit, snapshot, restore, all in a hardened container."""
    from harness.smoke import run_smoke

    with _spinner("preparing the sandbox image") as update:
        rows = run_smoke(runtime, on_step=update)
    table = Table(title=f"labrat sandbox smoke test ({runtime})")
    for column in ("step", "result", "seconds"):
        table.add_column(column)
    for name, result, seconds in rows:
        table.add_row(name, escape(result), f"{seconds:.3f}")
    out.print(table)


def main() -> None:
    """Entry point: structured logs, SIGTERM handled like Ctrl-C, one-line errors."""
    logs.configure()
    interrupt_on_sigterm()
    try:
        app()
    except (SandboxError, ConfigError, DataError) as exc:
        console.print(f"[bold red]labrat: error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("labrat: interrupted; containers removed", highlight=False)
        sys.exit(130)
    except (OSError, sqlite3.Error) as exc:
        if not _is_disk_full(exc):
            raise
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        console.print(f"[bold red]labrat: error:[/] the disk is full{where}: {escape(str(exc))}; free space and run "
                      "again (the ledger keeps every finished experiment; `labrat run` resumes)",
                      highlight=False, soft_wrap=True)
        sys.exit(2)


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL" or "disk is full" in str(exc)


if __name__ == "__main__":
    main()
