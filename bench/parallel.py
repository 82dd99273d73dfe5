"""Lanes benchmark: experiments/hour with 2 lanes against 1, each lane's training fraction, and the head's
overhead per experiment at 1, 10 and 100 lanes.

    python bench/parallel.py                 # 30 s budget, 6 experiments a run (~15 minutes on 2 cores)
    python bench/parallel.py --quick         # 15 s budget, 4 experiments
    python bench/parallel.py --markdown      # also a dated snippet for docs/benchmarks.md

Part 1 runs `labrat run` twice, one after the other (never at once: they would share the cores), on the
same lab settings (offline agent, synthetic data, the budget, 1 CPU core an experiment): `--parallel 1`
and `--parallel 2`, each the baseline then 8 experiments. The window is the steady state after the
baseline (which runs alone before the lanes start): experiments/hour = the experiments after the
baseline x 3600 / the wall time from the first one's start to the last one's end (ledger timestamps);
the ratio's target is >= 1.7. Training fraction = the
time each lane spent in training processes (the ledger's train_seconds) / the lanes' wall time (lanes x
wall): the share of each slot's clock spent training (target >= 0.85 at a 60 s budget; shorter budgets
pay the same fixed costs on less training).

Part 2 is the head alone: LabSession and N lane Sessions (each with its own ledger connection, on a thread
of its own, as `labrat run --parallel N` runs them) record 200 experiments whose training is a stub (a
sleep, no container) lasting 100 ms x N, lane k starting k x 100 ms late, so the lab finishes 10
experiments a second, evenly spread, at every N (100 lanes of 5-minute experiments finish one every 3 s:
this is 30x that rate). The head's overhead per experiment is each
lane's time in the bookkeeping calls (the budget check, begin, finish with results.tsv, adopting the
lab's best), averaged: it must not grow with N.

Every figure is measured in this run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
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

logs.configure(level=os.environ.get("LABRAT_LOG_LEVEL", "warning"))

from harness.config import LabConfig  # noqa: E402
from harness.ledger import Ledger  # noqa: E402
from harness.session import LabSession  # noqa: E402
from sandbox.snapshots import SnapshotStore  # noqa: E402

LABRAT = str(Path(sys.executable).parent / "labrat")
TOTAL_EXPERIMENTS = 200  # of the head simulation, at every lane count: results.tsv grows with rows, not lanes
STUB_SECONDS_PER_LANE = 0.1  # a stub experiment lasts 100 ms x lanes: the lab finishes 10 a second at any count


def run_lab(lab: Path, parallel: int, budget: float, experiments: int) -> dict:
    lab.mkdir(parents=True)
    (lab / "labrat.toml").write_text(f"time_budget = {budget}\nmax_experiments = {experiments}\ncpus = 1.0\n"
                                     f"parallel = {parallel}\neval_tokens = 16384\n")
    env = {**os.environ, "LABRAT_LOG_LEVEL": "warning"}
    done = subprocess.run([LABRAT, "run", "--lab", str(lab)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"labrat run --parallel {parallel} failed: {done.stderr[-2000:]}")
    with Ledger(lab / "ledger.db") as ledger:
        rows = [e for e in ledger.experiments() if e.finished_at]
        lab_id = ledger.meta("lab_id")
    SnapshotStore().gc(keep=[], name_prefix=f"{lab_id}-")
    # The steady state: the baseline runs alone before the lanes start, so the window opens after it.
    candidates = [e for e in rows if e.replicate_of is None and e.parent_id is not None]
    start = min(dt.datetime.fromisoformat(e.started_at) for e in candidates)
    end = max(dt.datetime.fromisoformat(e.finished_at) for e in candidates)
    wall = (end - start).total_seconds()
    training = sum(e.train_seconds or 0 for e in candidates)
    return {"parallel": parallel, "experiments": len(candidates), "wall": wall,
            "per_hour": len(candidates) * 3600 / wall, "training_fraction": training / (parallel * wall)}


def head_overhead(lanes: int, root: Path) -> float:
    """Seconds of bookkeeping per experiment with `lanes` lanes recording at once (training: a sleep)."""
    per_lane = TOTAL_EXPERIMENTS // lanes
    lab = root / f"head-{lanes}"
    lab.mkdir()
    config = LabConfig(max_experiments=lanes * per_lane + 1, parallel=1)
    lab_session = LabSession(lab, config, SnapshotStore(), agent="bench")
    lab_session.open()
    lab_session.start_row()
    lab_session.set_root_sources({})
    first = lab_session.lane(0, own_connection=True)
    baseline = first.begin_experiment("baseline", None)
    first.finish_experiment(baseline, "keep", metric=2.0)
    spent: list[float] = []
    lock = threading.Lock()

    def work(index: int) -> None:
        session = lab_session.lane(index, own_connection=True) if index else first
        mine = []
        time.sleep(index * STUB_SECONDS_PER_LANE)  # the lanes' experiments end evenly spread, as they drift apart
        for n in range(per_lane):
            started = time.perf_counter()
            session.stop_reason()
            experiment_id = session.begin_experiment(f"lane {index} change {n}", session.base)
            head = time.perf_counter() - started
            time.sleep(STUB_SECONDS_PER_LANE * lanes)  # training and evaluation, stubbed
            started = time.perf_counter()
            metric = 2.0 - 0.001 * n - 0.0001 * index
            session.finish_experiment(experiment_id, "keep" if n % 3 == 0 else "discard", metric=metric)
            session.adopt_lab_best()
            mine.append(head + time.perf_counter() - started)
        with lock:
            spent.extend(mine)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(lanes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lab_session.close("bench", resumable=False)
    return statistics.mean(spent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--skip-real", action="store_true", help="part 2 only (no containers)")
    args = parser.parse_args()
    budget, experiments = (15.0, 5) if args.quick else (30.0, 9)  # the baseline, then an even number
    with tempfile.TemporaryDirectory(prefix="labrat-bench-parallel-") as tmp:
        root = Path(tmp)
        real = [] if args.skip_real else [run_lab(root / f"lab{n}", n, budget, experiments) for n in (1, 2)]
        heads = {n: head_overhead(n, root) for n in (1, 10, 100)}
    date = dt.date.today().isoformat()
    lines = [f"## Lanes: `python bench/parallel.py{' --quick' if args.quick else ''}` ({date}, {platform.node()}, "
             f"{os.cpu_count()} cores)", ""]
    if real:
        one, two = real
        lines += [f"Budget {budget:g} s, the baseline and {experiments - 1} experiments a run (the window: those "
                  f"{experiments - 1}), 1 CPU core an experiment, offline agent.", "",
                  "| lanes | experiments | wall s | experiments/hour | training fraction |", "|---|---|---|---|---|"]
        lines += [f"| {r['parallel']} | {r['experiments']} | {r['wall']:.0f} | {r['per_hour']:.1f} | "
                  f"{r['training_fraction']:.2f} |" for r in real]
        lines += ["", f"- experiments/hour, 2 lanes / 1: **{two['per_hour'] / one['per_hour']:.2f}x** (target >= 1.7)",
                  f"- training fraction with 2 lanes: **{two['training_fraction']:.2f}** (target >= 0.85)", ""]
    lines += [f"The head alone ({TOTAL_EXPERIMENTS} experiments at every lane count, a stub experiment "
              f"{STUB_SECONDS_PER_LANE * 1000:.0f} ms x lanes, so the lab finishes the same number a second):",
              "", "| lanes | head's time per experiment (ms) |", "|---|---|"]
    lines += [f"| {n} | {seconds * 1000:.1f} |" for n, seconds in heads.items()]
    lines += ["", f"- 100 lanes / 1 lane: {heads[100] / heads[1]:.2f}x"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
