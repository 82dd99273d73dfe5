"""Session benchmark: labrat's harness overhead, evaluation cost and training fraction, against a bare loop.

    python bench/session.py                  # 60 s budget, 5 experiments per loop (~15 minutes)
    python bench/session.py --quick          # smoke run: 10 s budget, 3 experiments, 16,384 eval tokens
    python bench/session.py --markdown       # also print a dated markdown snippet for docs/benchmarks.md

Two loops run one after the other in this invocation (never concurrently: they would share the cores),
on the same trainer config, data, budget, evaluation size and code:

* labrat: a real session in a temporary lab (labrat.toml, offline agent), opened in-process exactly as
  `labrat run` opens it (Session + Toolbox + OfflineAgent). Each run_experiment tool call is timed from
  the agent's call until the tool returns (the next working container swapped in included).
* bare: an autoresearch-style loop on the host in a temporary git repository: write the experiment's
  train.py (the very file labrat's experiment trained, from its ledger row), `git commit -am`, run
  `python -m trainer.train` and `python -m trainer.evaluate` as plain processes, parse the metric,
  `git reset --hard HEAD~1` unless it improved.

The training budget is all-in (harness/runner.py): both loops give train.py the same deadline
(LABRAT_DEADLINE, the budget from the moment the training process starts), so the training phase is
the budget on both sides. Training fraction = experiments x budget / the loop's wall time: the share
of the loop's wall clock that was budgeted training (target >= 0.85 at a 60 s budget).

Harness overhead per experiment = the experiment's wall time minus its training process's time minus its
evaluation process's time (the ledger's `train` and `eval` phases for labrat, the two subprocesses' wall
times for the bare loop). experiments/hour = experiments x 3600 / the loop's wall time from the start
of the first experiment to the end of the last (agent edits between experiments included on both sides).
"max load" is the highest 1-minute load average seen at the end of an experiment: a loop alone keeps it
near 2 on a 2-core machine (training uses both cores); more means something else competed for the CPU.
Every figure is measured in this run. The lab's snapshots (named after its lab id) and the temporary
directories are removed at the end, also on an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness import logs  # noqa: E402

# The store logs every snapshot at info level: it would bury the progress display.
logs.configure(level=os.environ.get("LABRAT_LOG_LEVEL", "warning"))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from harness import logs  # noqa: E402
from harness.agents.offline import TRAIN_FILE, OfflineAgent  # noqa: E402
from harness.config import load_config  # noqa: E402
from harness.lab import LEDGER_FILE, init_lab  # noqa: E402
from harness.ledger import Experiment, Ledger  # noqa: E402
from trainer.contract import EVAL_SEQ_LENS  # noqa: E402
from harness.run import LabRun  # noqa: E402
from harness.session import Progress  # noqa: E402
from harness.tools import Toolbox, ToolResult  # noqa: E402
from sandbox.engine import client  # noqa: E402
from sandbox.sandbox import interrupt_on_sigterm  # noqa: E402
from sandbox.snapshots import SnapshotStore  # noqa: E402
from trainer.prepare import TRAIN_DEADLINE_ENV  # noqa: E402

# -- constants ---------------------------------------------------------------------------------------

VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
TRAINER_CONFIG = "cpu-tiny"
SEED = 1337
DEFAULTS = dict(budget=60.0, experiments=5, eval_tokens=131_072)
QUICK = dict(budget=10.0, experiments=3, eval_tokens=16_384)

# Targets (the issues': at a 60 s budget).
OVERHEAD_TARGET_S = 0.5
RATE_TARGET = 0.95
EVAL_TARGET_S = 9.3  # the evaluation before its hardening (one in-container driver and worker), per experiment
TRAIN_FRACTION_TARGET = 0.85

# labrat's per-experiment phases outside training and evaluation (harness/session.py, harness/runner.py).
OVERHEAD_PHASES = ("snapshot", "train_start", "eval_start", "sources_wait", "reset")
PHASE_NOTES = {
    "snapshot": "docker commit of the working container (the candidate)",
    "train_start": "restore the candidate into a fresh training container",
    "eval_start": "take the two evaluation workers started during training",
    "sources_wait": "wait for the source manifest read during training; diff",
    "reset": "swap in the next working container (started during training)",
    "other": "the rest: ledger writes, results.tsv, peak memory, tool bookkeeping",
}

# Wide enough for the tables when the output goes to a file or a pipe (rich falls back to 80 columns there).
console = Console(width=None if sys.stdout.isatty() else 200)


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def load() -> str:
    """The load average (1, 5, 15 min): another process on a 2-core machine disturbs every figure here."""
    return "{:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())


# -- labrat: a real session, timed per run_experiment call ---------------------------------------------

class TimedToolbox(Toolbox):
    """The session's toolbox, timing every run_experiment call from the agent's call to the tool's return."""

    def __init__(self, lab_run: LabRun):
        super().__init__(lab_run.session, lab_run.workbench, lab_run.run_experiment)
        self.lab_run = lab_run
        self.runs: list[dict] = []

    def call(self, name: str, raw_input: object) -> ToolResult:
        if name != "run_experiment":
            return super().call(name, raw_input)
        self.lab_run.last_timings = None
        started = time.monotonic()
        result = super().call(name, raw_input)
        ended = time.monotonic()
        self.runs.append({"started": started, "ended": ended, "timings": self.lab_run.last_timings})
        return result


class Report(Progress):
    """One line per finished experiment, so a 15-minute run shows that it is alive."""

    def __init__(self, label: str, loads: list[float]):
        self.label = label
        self.loads = loads

    def experiment_finished(self, experiment: Experiment) -> None:
        self.loads.append(os.getloadavg()[0])
        metric = f"{experiment.metric:.4f}" if experiment.metric is not None else "-"
        console.print(f"  [dim]{self.label} #{experiment.id} {experiment.status:7} val_bpb {metric}  "
                      f"{experiment.seconds or 0:.1f} s  {experiment.description}[/]", highlight=False)


def write_lab(lab: Path, budget: float, experiments: int, eval_tokens: int, runtime: str) -> None:
    init_lab(lab)
    # Every key is optional: only what this benchmark fixes, everything else at labrat's defaults.
    (lab / "labrat.toml").write_text(
        f'agent = "offline"\ntrainer_config = "{TRAINER_CONFIG}"\ntime_budget = {budget}\n'
        f"eval_tokens = {eval_tokens}\nmax_experiments = {experiments}\nruntime = \"{runtime}\"\nseed = {SEED}\n")


def run_labrat(lab: Path, state: dict) -> dict:
    config = load_config(lab)
    logs.configure(level="warning", file=lab / "logs" / "labrat.log")  # as `labrat run` does
    opened = time.monotonic()
    loads: list[float] = []
    lab_run = LabRun(lab, config, agent="offline", new_session=True).__enter__()  # as `labrat run` opens it
    lab_run.lab_session.progress = Report("labrat", loads)
    state["lab_id"] = lab_run.lab_id
    state["session_id"] = lab_run.session_id
    ready = time.monotonic()
    toolbox = lab_run.toolbox = TimedToolbox(lab_run)
    session_id, data = lab_run.session_id, lab_run.data
    failure = lab_run.run_agent(OfflineAgent(config))  # closes the session
    closed = time.monotonic()
    if failure:
        raise RuntimeError(f"the offline agent failed: {failure}")
    with Ledger(lab / LEDGER_FILE) as ledger:
        experiments = ledger.experiments(session_id)
        trained_source = {e.id: ledger.sources(e.id)[TRAIN_FILE] for e in experiments}
    if len(toolbox.runs) != len(experiments):
        raise RuntimeError(f"{len(toolbox.runs)} run_experiment calls but {len(experiments)} experiments in the ledger")
    rows = []
    for run, experiment in zip(toolbox.runs, experiments, strict=True):
        timings = run["timings"] or json.loads(experiment.timings_json or "{}")  # crash paths set no last_timings
        wall = run["ended"] - run["started"]
        train, evaluation = timings.get("train", 0.0), timings.get("eval", 0.0)
        summary = json.loads(experiment.summary_json) if experiment.summary_json else {}
        rows.append({
            "id": experiment.id, "description": experiment.description, "status": experiment.status,
            "metric": experiment.metric, "wall": wall, "train": train, "eval": evaluation,
            "overhead": wall - train - evaluation, "ledger_seconds": experiment.seconds, "timings": timings,
            "tok_s": summary.get("tokens_per_s"), "loop_s": summary.get("train_seconds"),
            "source": trained_source[experiment.id],
        })
    gaps = [b["started"] - a["ended"] for a, b in zip(toolbox.runs, toolbox.runs[1:])]
    return {
        "rows": rows, "gaps": gaps, "loop_wall": toolbox.runs[-1]["ended"] - toolbox.runs[0]["started"],
        "open_s": ready - opened, "close_s": closed - toolbox.runs[-1]["ended"], "session_wall": closed - opened,
        "train_sha256": data.meta.get("train_sha256"), "val_sha256": data.meta.get("val_sha256"),
        "loads": loads, "train_dir": data.train_dir, "heldout_dir": data.heldout_dir, "image": lab_run.image,
    }


def wait_for_removals(session_id: str, timeout: float = 60.0) -> None:
    """Containers are removed on background threads: let that finish before the bare loop's clock starts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # The low-level list: the high-level one inspects each container and races with their removal.
        if not client().api.containers(all=True, filters={"name": f"labrat-{session_id}-"}):
            return
        time.sleep(0.2)


# -- bare: an autoresearch-style loop on the host ---------------------------------------------------------

def image_malloc_env(image: str) -> dict[str, str]:
    """The image's allocator settings (as bench/trainer.py): the two loops differ by the harness only."""
    env = dict(item.split("=", 1) for item in client().images.get(image).attrs["Config"]["Env"])
    return {k: v for k, v in env.items() if k.startswith("MALLOC_")}


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run that stays interruptible: a SIGTERM delivered to another thread of this process
    would not wake a blocking wait, so the wait polls; the child is killed when the loop is interrupted."""
    stdout = kwargs.pop("stdout", subprocess.PIPE)
    with tempfile.TemporaryFile() as captured:
        proc = subprocess.Popen(cmd, stdout=captured if stdout is subprocess.PIPE else stdout,
                                stderr=kwargs.pop("stderr", subprocess.DEVNULL), **kwargs)
        # The wait runs on a thread; joining it returns the moment the child exits (no polling delay in
        # the measured times) and still lets the main thread take a signal every half second.
        waiter = threading.Thread(target=proc.wait, daemon=True)
        waiter.start()
        try:
            while waiter.is_alive():
                waiter.join(0.5)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        captured.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, captured.read().decode("utf-8", "replace"), None)


def git(repo: Path, *args: str) -> None:
    done = run(["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", *args], cwd=repo)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed (exit {done.returncode})")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_bare(root: Path, sources: list[tuple[str, str]], budget: float, eval_tokens: int, labrat: dict,
             env: dict[str, str]) -> dict:
    python = str(VENV_PYTHON if VENV_PYTHON.exists() else sys.executable)
    repo, data, runs = root / "repo", root / "data", root / "runs"
    shutil.copytree(ROOT / "trainer", repo / "trainer", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (repo / ".gitignore").write_text("__pycache__/\n")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "trainer as shipped")
    setup = time.monotonic()
    if run([python, "-m", "trainer.prepare", "--out", str(data), "--seed", str(SEED)], cwd=repo, env=env).returncode:
        raise RuntimeError("python -m trainer.prepare failed on the host")
    prepare_s = time.monotonic() - setup
    # The same tokens the lab trained and evaluated on (trainer/prepare.py is deterministic in its seed).
    if sha256(data / "train.bin") != sha256(labrat["train_dir"] / "train.bin") or \
            sha256(data / "val.bin") != sha256(labrat["heldout_dir"] / "val.bin"):
        raise RuntimeError("the host's prepared data differs from the lab's: the loops would not be comparable")
    seq_len = EVAL_SEQ_LENS[TRAINER_CONFIG]
    best, rows, marks, loads = None, [], [], []
    for i, (description, source) in enumerate(sources, 1):
        out = runs / f"{i:03d}"
        out.mkdir(parents=True)
        started = time.monotonic()
        (repo / TRAIN_FILE).write_text(source)  # the agent's edit
        git(repo, "commit", "-qam", description, "--allow-empty")
        t0 = time.monotonic()
        with open(out / "run.log", "wb") as log_file:  # the same all-in deadline labrat gives its training
            trained = run([python, "-m", "trainer.train", "--config", TRAINER_CONFIG, "--data", str(data),
                           "--out", str(out), "--device", "cpu", "--seed", str(SEED)],
                          cwd=repo, stdout=log_file, stderr=subprocess.STDOUT,
                          env={**env, TRAIN_DEADLINE_ENV: f"{time.time() + budget:.3f}"})
        train_s = time.monotonic() - t0
        metric, eval_s = None, 0.0
        if trained.returncode == 0:
            t0 = time.monotonic()
            evaluated = run([python, "-m", "trainer.evaluate", "--checkpoint", str(out / "ckpt.pt"), "--data",
                             str(data), "--eval-tokens", str(eval_tokens), "--seq-len", str(seq_len), "--device", "cpu"],
                            cwd=repo, env=env)
            eval_s = time.monotonic() - t0
            with contextlib.suppress(ValueError, IndexError, AttributeError):
                metric = json.loads(evaluated.stdout.strip().splitlines()[-1]).get("val_bpb")
        if metric is not None and (best is None or metric < best):
            best, status = metric, "keep"
        else:
            status = "discard" if metric is not None else "crash"
            git(repo, "reset", "-q", "--hard", "HEAD~1")  # autoresearch's revert
        ended = time.monotonic()
        marks.append((started, ended))
        loads.append(os.getloadavg()[0])
        summary = {}
        with contextlib.suppress(OSError, ValueError):
            summary = json.loads((out / "summary.json").read_text())
        rows.append({"id": i, "description": description, "status": status, "metric": metric, "wall": ended - started,
                     "train": train_s, "eval": eval_s, "overhead": ended - started - train_s - eval_s,
                     "tok_s": summary.get("tokens_per_s"), "loop_s": summary.get("train_seconds")})
        shutil.rmtree(out, ignore_errors=True)
        value = f"{metric:.4f}" if metric is not None else "-"
        console.print(f"  [dim]bare   #{i} {status:7} val_bpb {value}  {ended - started:.1f} s  {description}[/]",
                      highlight=False)
    gaps = [b[0] - a[1] for a, b in zip(marks, marks[1:])]
    return {"rows": rows, "gaps": gaps, "loop_wall": marks[-1][1] - marks[0][0], "prepare_s": prepare_s,
            "loads": loads}


# -- results ----------------------------------------------------------------------------------------------

def loop_summary(name: str, result: dict, budget: float) -> dict:
    rows = result["rows"]
    loops = [r["loop_s"] for r in rows if r.get("loop_s") is not None]
    n, wall = len(rows), result["loop_wall"]
    overheads = [r["overhead"] for r in rows]
    tok = [r["tok_s"] for r in rows if r["tok_s"]]
    return {
        "loop": name, "experiments": n, "loop_wall_s": wall, "wall_per_experiment_s": wall / n,
        "experiment_wall_s": mean([r["wall"] for r in rows]), "train_s": mean([r["train"] for r in rows]),
        "eval_s": mean([r["eval"] for r in rows]), "overhead_mean_s": mean(overheads), "overhead_max_s": max(overheads),
        "between_s": mean(result["gaps"]),
        # Everything but training and evaluation: harness overhead, agent edits, loop bookkeeping.
        "outside_s": (wall - sum(r["train"] for r in rows) - sum(r["eval"] for r in rows)) / n, "tok_s": mean(tok) if tok else None, "per_hour": n * 3600 / wall,
        "statuses": [r["status"] for r in rows], "load_max": max(result["loads"], default=float("nan")),
        "train_fraction": n * budget / wall,
        # Of the budget, the seconds train.py's own loop ran steps (the rest: start-up, data, the save reserve).
        "stepping_fraction": mean(loops) / budget if loops else None,
    }


def phase_breakdown(rows: list[dict]) -> list[dict]:
    out = []
    for phase in (*OVERHEAD_PHASES, "other"):
        if phase == "other":
            values = [r["overhead"] - sum(r["timings"].get(p, 0.0) for p in OVERHEAD_PHASES) for r in rows]
        else:
            values = [r["timings"].get(phase, 0.0) for r in rows]
        out.append({"phase": phase, "mean_s": mean(values), "max_s": max(values), "note": PHASE_NOTES[phase]})
    return out


def verdicts(labrat: dict, bare: dict) -> list[dict]:
    ratio = labrat["per_hour"] / bare["per_hour"]
    bare_cycle = bare["wall_per_experiment_s"]
    equal = bare_cycle / (bare_cycle - bare["outside_s"] + labrat["outside_s"])
    return [
        {"name": "labrat harness overhead per experiment (mean)", "value": f"{labrat['overhead_mean_s']:.3f} s",
         "target": f"<= {OVERHEAD_TARGET_S} s", "pass": labrat["overhead_mean_s"] <= OVERHEAD_TARGET_S},
        {"name": "labrat harness overhead per experiment (max)", "value": f"{labrat['overhead_max_s']:.3f} s",
         "target": f"<= {OVERHEAD_TARGET_S} s", "pass": labrat["overhead_max_s"] <= OVERHEAD_TARGET_S},
        {"name": "labrat evaluation per experiment (mean)", "value": f"{labrat['eval_s']:.2f} s",
         "target": f"<= {EVAL_TARGET_S} s", "pass": labrat["eval_s"] <= EVAL_TARGET_S},
        {"name": "labrat training fraction of the loop's wall clock", "value": f"{labrat['train_fraction']:.3f}",
         "target": f">= {TRAIN_FRACTION_TARGET}", "pass": labrat["train_fraction"] >= TRAIN_FRACTION_TARGET},
        {"name": "  of the budget, train.py's loop stepped (start-up and save reserve are the rest)",
         "value": fmt(labrat["stepping_fraction"], 3, ""), "target": "(info)", "pass": None},
        {"name": "experiments/hour, labrat / bare", "value": f"{ratio:.3f}x "
         f"({labrat['per_hour']:.2f} vs {bare['per_hour']:.2f})", "target": f">= {RATE_TARGET}x",
         "pass": ratio >= RATE_TARGET, "ratio": ratio},
        # Training and evaluation times vary by a second or two from run to run (the machine, the model):
        # this row gives both loops the bare loop's train and eval times, so only the harness's cost remains.
        {"name": "  the same with equal train and eval times (harness cost alone)", "value": f"{equal:.3f}x "
         f"({labrat['outside_s']:.3f} vs {bare['outside_s']:.3f} s per experiment outside train and eval)",
         "target": "(info)", "pass": None, "ratio": equal},
    ]


def fmt(value, digits: int = 2, unit: str = " s") -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}{unit}"


LOOP_COLUMNS = ("loop", "experiments", "wall / experiment", "train", "eval", "overhead mean / max",
                "between experiments", "train tok/s", "experiments/hour", "training fraction", "max load")


def loop_cells(s: dict) -> list[str]:
    return [s["loop"], str(s["experiments"]), fmt(s["wall_per_experiment_s"]), fmt(s["train_s"]), fmt(s["eval_s"]),
            f"{s['overhead_mean_s']:.3f} / {s['overhead_max_s']:.3f} s", fmt(s["between_s"], 3),
            fmt(s["tok_s"], 0, ""), f"{s['per_hour']:.2f}", f"{s['train_fraction']:.3f}", f"{s['load_max']:.2f}"]


def print_tables(summaries: list[dict], checks: list[dict], phases: list[dict], labrat: dict, bare: dict,
                 header: str) -> None:
    table = Table(title="labrat session benchmark: per loop (means over the experiments)")
    for column in LOOP_COLUMNS:
        table.add_column(column, justify="left" if column == "loop" else "right")
    for s in summaries:
        table.add_row(*loop_cells(s))
    console.print(table)

    table = Table(title="targets")
    for column in ("measurement", "value", "target", "result"):
        table.add_column(column)
    for c in checks:
        table.add_row(c["name"], c["value"], c["target"], {True: "[green]PASS[/]", False: "[red]MISS[/]", None: ""}[c["pass"]])
    console.print(table)

    table = Table(title="labrat overhead per experiment, by phase")
    for column, justify in (("phase", "left"), ("mean", "right"), ("max", "right"), ("what", "left")):
        table.add_column(column, justify=justify)
    for p in phases:
        table.add_row(p["phase"], f"{p['mean_s']:.3f} s", f"{p['max_s']:.3f} s", p["note"])
    total = sum(p["mean_s"] for p in phases)
    table.add_row("total", f"{total:.3f} s", "", "= experiment wall - train - eval")
    console.print(table)

    table = Table(title="per experiment (the bare loop trains labrat's train.py of the same row)")
    for column in ("#", "change", "labrat", "wall", "overhead", "bare", "wall", "overhead"):
        table.add_column(column)
    for a, b in zip(labrat["rows"], bare["rows"]):
        table.add_row(str(a["id"]), a["description"][:40],
                      f"{a['status']} {fmt(a['metric'], 4, '')}", fmt(a["wall"]), fmt(a["overhead"], 3),
                      f"{b['status']} {fmt(b['metric'], 4, '')}", fmt(b["wall"]), fmt(b["overhead"], 3))
    console.print(table)
    console.print(header, highlight=False)


def markdown(summaries: list[dict], checks: list[dict], phases: list[dict], info: dict, args, command: str) -> str:
    lines = [f"## Session: `{command}`", "",
             f"Measured {info['date']} on {info['host']} ({info['cores']} cores, Docker {info['docker']}), "
             f"runtime {args.runtime}: {args.experiments} experiments per loop, {args.budget:g} s training budget, "
             f"{args.eval_tokens:,} evaluation tokens, `{TRAINER_CONFIG}`; load average (1, 5, 15 min) before "
             f"({info['load_before']}), between the loops ({info['load_middle']}), after ({info['load_after']}). "
             f"Loop wall time: from the first experiment's start to the last one's end; labrat's session also "
             f"spent {info['open_s']:.2f} s opening (lab lock, image check, data, first working container) and "
             f"{info['close_s']:.2f} s closing; the bare loop {info['prepare_s']:.2f} s preparing its data.", "",
             "| " + " | ".join(LOOP_COLUMNS) + " |", "|" + "---|" * len(LOOP_COLUMNS)]
    lines += ["| " + " | ".join(loop_cells(s)) + " |" for s in summaries]
    lines += ["", "| measurement | value | target | result |", "|---|---|---|---|"]
    lines += [f"| {c['name'].strip()} | {c['value']} | {c['target']} | {({True: 'PASS', False: 'MISS', None: ''})[c['pass']]} |"
              for c in checks]
    lines += ["", "| labrat overhead phase | mean | max | what |", "|---|---|---|---|"]
    lines += [f"| {p['phase']} | {p['mean_s']:.3f} s | {p['max_s']:.3f} s | {p['note']} |" for p in phases]
    lines += [f"| total | {sum(p['mean_s'] for p in phases):.3f} s | | experiment wall - train - eval |"]
    return "\n".join(lines) + "\n"


def machine() -> dict:
    return {"date": dt.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
            "cores": os.cpu_count(), "docker": client().version().get("Version")}


# -- main ---------------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK['budget']:g} s budget, {QUICK['experiments']} experiments, "
                             f"{QUICK['eval_tokens']:,} eval tokens (explicit options still win)")
    parser.add_argument("--budget", type=float, help=f"training seconds per experiment (default {DEFAULTS['budget']:g})")
    parser.add_argument("--experiments", type=int, help=f"experiments per loop (default {DEFAULTS['experiments']})")
    parser.add_argument("--eval-tokens", type=int, help=f"held-out tokens per evaluation (default {DEFAULTS['eval_tokens']:,})")
    parser.add_argument("--runtime", choices=("runc", "runsc"), default="runc")
    parser.add_argument("--markdown", action="store_true", help="also print a dated markdown snippet for docs/benchmarks.md")
    parser.add_argument("--json", type=Path, help="also write every measurement as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary lab and repository (debugging)")
    args = parser.parse_args()
    base = QUICK if args.quick else DEFAULTS
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.experiments < 2 or args.budget <= 0 or args.eval_tokens < 1024:
        parser.error("--experiments must be >= 2, --budget > 0, --eval-tokens >= 1024")
    interrupt_on_sigterm()  # SIGTERM unwinds like Ctrl-C: the session closes, snapshots and temp dirs go

    info = machine()
    info["load_before"] = load()
    if os.getloadavg()[0] > 0.5:
        console.print(f"[yellow]load average {info['load_before']}: something else is running; timings may be "
                      "disturbed[/]")
    workdir = Path(tempfile.mkdtemp(prefix="labrat-bench-session-"))
    lab, state = workdir / "lab", {}
    removed: list[str] = []
    try:
        write_lab(lab, args.budget, args.experiments, args.eval_tokens, args.runtime)
        console.print(f"[dim]labrat loop: {args.experiments} experiments, {args.budget:g} s budget, runtime "
                      f"{args.runtime}, in {lab} ...[/]", highlight=False)
        labrat = run_labrat(lab, state)
        wait_for_removals(state["session_id"])
        with console.status("removing the lab's snapshots ..."):
            removed = SnapshotStore().gc(keep=[], name_prefix=state["lab_id"]).removed
        info["load_middle"] = load()
        sources = [(r["description"], r["source"]) for r in labrat["rows"]]
        env = {**os.environ, **image_malloc_env(labrat["image"])}
        console.print(f"[dim]bare loop: the same {len(sources)} train.py versions, in {workdir / 'bare'} ...[/]",
                      highlight=False)
        bare = run_bare(workdir / "bare", sources, args.budget, args.eval_tokens, labrat, env)
        info["load_after"] = load()
    finally:
        if lab_id := state.get("lab_id") or _lab_id(lab):
            with contextlib.suppress(Exception):
                removed += SnapshotStore().gc(keep=[], name_prefix=lab_id).removed
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    summaries = [loop_summary("labrat", labrat, args.budget), loop_summary("bare", bare, args.budget)]
    checks = verdicts(summaries[0], summaries[1])
    phases = phase_breakdown(labrat["rows"])
    command = "python bench/session.py" + (" --quick" if args.quick else "") + \
        ("" if args.runtime == "runc" else f" --runtime {args.runtime}")
    header = (f"# {command}, {info['date']}, {info['host']}: {info['cores']} cores, Docker {info['docker']}, "
              f"{args.runtime}; {args.experiments} experiments x {args.budget:g} s, {args.eval_tokens:,} eval tokens; "
              f"labrat session open {labrat['open_s']:.2f} s, close {labrat['close_s']:.2f} s, whole session "
              f"{labrat['session_wall']:.1f} s; bare data prepare {bare['prepare_s']:.2f} s; load average "
              f"before ({info['load_before']}), between ({info['load_middle']}), after ({info['load_after']}); "
              f"removed {len(removed)} snapshots")
    info.update(open_s=labrat["open_s"], close_s=labrat["close_s"], prepare_s=bare["prepare_s"])
    print_tables(summaries, checks, phases, labrat, bare, header)
    if args.markdown:
        print()
        print(markdown(summaries, checks, phases, info, args, command))
    if args.json:
        strip = lambda rows: [{k: v for k, v in r.items() if k != "source"} for r in rows]  # noqa: E731
        args.json.write_text(json.dumps({
            "machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "summaries": summaries,
            "checks": checks, "phases": phases, "labrat_rows": strip(labrat["rows"]), "bare_rows": bare["rows"],
            "labrat": {k: v for k, v in labrat.items() if k in ("open_s", "close_s", "session_wall", "gaps")},
        }, indent=2, default=str))
    return 0 if all(c["pass"] is not False for c in checks) else 1


def _lab_id(lab: Path) -> str | None:
    """The lab id from the ledger, when the session failed before the benchmark learnt it."""
    if not (lab / LEDGER_FILE).exists():
        return None
    with contextlib.suppress(Exception):
        ledger = Ledger(lab / LEDGER_FILE)
        try:
            return ledger.meta("lab_id")
        finally:
            ledger.close()
    return None


if __name__ == "__main__":
    sys.exit(main())
