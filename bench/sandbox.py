"""Sandbox benchmark: exec latency, start/close, snapshot cost, restore (also deep in a lineage), CPU matmul ratio.

    python bench/sandbox.py                  # the full run (the 1000-deep lineage takes several minutes)
    python bench/sandbox.py --quick          # smoke run: fewer repeats, lineage depths 10,60
    python bench/sandbox.py --runtimes runc --depths 10,100 --json out.json

Every figure is measured in this run and printed with its target. Snapshots it creates are named `bench-*`
and removed at the end (also on an error or Ctrl-C); sandboxes are always closed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness import logs  # noqa: E402

# The store logs every snapshot at info level: it would bury the progress display.
logs.configure(level=os.environ.get("LABRAT_LOG_LEVEL", "warning"))

from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from sandbox.engine import client  # noqa: E402
from sandbox.policy import SandboxPolicy  # noqa: E402
from sandbox.sandbox import Sandbox, interrupt_on_sigterm  # noqa: E402
from sandbox.snapshots import Snapshot, SnapshotStore  # noqa: E402

# -- constants ---------------------------------------------------------------------------------------

SESSION = f"bench{os.getpid()}"  # container names and owner labels: ours alone on a shared engine
PREFIX = "bench-"  # every snapshot this script creates; the only ones it ever removes
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
KiB, MiB = 1024, 1024 * 1024

# Repeats (full run, --quick run).
EXEC_N = (50, 20)
START_N = (10, 3)
RESTORE_N = (7, 3)
EDIT_N = (5, 3)  # one-line-edit snapshots
LINEAGE_RESTORE_N = 3
MATMUL_REPEATS = (3, 1)  # interleaved bare/container pairs; best of each
MATMUL_SECONDS = (5.0, 2.0)  # timed loop, after warm-up
DEPTHS = ("10,500,1000", "10,60")

MATMUL_N = 1024
SNAPSHOT_SIZES = {"1 KiB": KiB, "1 MiB": MiB, "100 MiB": 100 * MiB}
TEXT_FILE_LINES = 200  # the small text file of the one-line edit (~9 KB)

# Targets.
EXEC_P50_TARGET_S = 0.050
EDIT_SNAPSHOT_TARGET_S = 0.100
LAYER_SLACK, LAYER_FIXED_BYTES = 1.1, 64 * KiB  # layer_bytes <= changed * 1.1 + 64 KiB
RESTORE_TARGET_S = 0.300
MATMUL_TARGET = {"runc": 0.98, "runsc": 0.90}

# Run identically on the host (venv python) and in the container (/opt/venv python): same torch, same work.
MATMUL_SNIPPET = """
import json, os, sys, time, torch
torch.set_num_threads(os.cpu_count())
n, seconds = {n}, {seconds}
a, b = torch.randn(n, n), torch.randn(n, n)
c = torch.empty(n, n)
for _ in range(20):  # warm-up: thread pool, caches, clocks
    torch.mm(a, b, out=c)
iters, start = 0, time.perf_counter()
while (elapsed := time.perf_counter() - start) < seconds:
    torch.mm(a, b, out=c)
    iters += 1
print(json.dumps({{"gflops": 2 * n**3 * iters / elapsed / 1e9, "threads": torch.get_num_threads()}}))
"""

console = Console()


# -- rows ----------------------------------------------------------------------------------------------

class Results:
    """The table's rows: (section, measurement, value text, target text, pass: True/False/None) plus raw data."""

    def __init__(self):
        self.rows: list[dict] = []

    def add(self, section: str, name: str, value: str, target: str = "", ok: bool | None = None, **data) -> None:
        self.rows.append({"section": section, "name": name, "value": value, "target": target, "pass": ok, **data})

    def skip(self, section: str, name: str, reason: str) -> None:
        self.add(section, name, f"skipped: {reason}", skipped=reason)

    def error(self, section: str, exc: BaseException) -> None:
        self.add(section, "error", f"{type(exc).__name__}: {exc}"[:300], ok=False, error=str(exc))


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: with 50 samples p95 is the 48th, a value actually observed."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered)) - 1))]


def timed(fn: Callable, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def must(result, what: str):
    """An exec that must succeed: a failing setup step would make every later figure meaningless."""
    if result.exit_code != 0 or result.limit:
        raise RuntimeError(f"{what} failed (exit {result.exit_code}, {result.limit}): {result.stderr[-300:]}")
    return result


# -- 1. exec latency ------------------------------------------------------------------------------------

def bench_exec(results: Results, policy: SandboxPolicy, n: int) -> None:
    section = f"exec ({policy.runtime})"
    host = []
    for _ in range(n):
        elapsed, _ = timed(subprocess.run, ["true"], check=True)
        host.append(elapsed)
    box = Sandbox.start(policy, session=SESSION, role="exec")
    try:
        for _ in range(3):  # warm-up: the first execs pay for page cache and the engine's exec setup
            must(box.exec("true"), "warm-up exec")
        inside, internal = [], []
        for _ in range(n):
            # Wall time around exec(): what a caller waits, including the exec_inspect and OOM check after it.
            elapsed, result = timed(box.exec, "true")
            must(result, "exec true")
            inside.append(elapsed)
            internal.append(result.duration)
    finally:
        box.close()
    p50, p95 = statistics.median(inside), percentile(inside, 95)
    h50, h95 = statistics.median(host), percentile(host, 95)
    # The exec target is for the default (runc) sandbox; runsc's exec goes through gVisor and is shown for reference.
    gated = policy.runtime == "runc"
    results.add(section, f"sandbox exec `true` p50 / p95 (n={n})", f"{ms(p50)} / {ms(p95)}",
                f"p50 <= {ms(EXEC_P50_TARGET_S)}" if gated else "(info)", (p50 <= EXEC_P50_TARGET_S) if gated else None,
                p50_s=p50, p95_s=p95, exec_duration_p50_s=statistics.median(internal))
    results.add(section, "  of which ExecResult.duration p50", ms(statistics.median(internal)))
    results.add(section, "host subprocess.run(['true']) p50 / p95", f"{ms(h50)} / {ms(h95)}", p50_s=h50, p95_s=h95)
    results.add(section, "ratio sandbox / host (p50, p95)", f"{p50 / h50:.1f}x, {p95 / h95:.1f}x",
                ratio_p50=p50 / h50, ratio_p95=p95 / h95)


# -- 2. start / close -------------------------------------------------------------------------------------

def bench_start(results: Results, policy: SandboxPolicy, n: int) -> None:
    section = f"start ({policy.runtime})"
    timings = [time_first_exec(lambda: Sandbox.start(policy, session=SESSION, role="start")) for _ in range(n)]
    start_only, start_exec, close = (list(column) for column in zip(*timings))
    med = statistics.median
    results.add(section, f"Sandbox.start + first exec, median of {n}", f"{med(start_exec):.3f} s", seconds=med(start_exec))
    results.add(section, "Sandbox.start alone, median", f"{med(start_only):.3f} s", seconds=med(start_only))
    results.add(section, "close(), median", f"{med(close):.3f} s", seconds=med(close))


# -- 3. snapshot cost ---------------------------------------------------------------------------------------

def make_base(store: SnapshotStore, policy: SandboxPolicy) -> Snapshot:
    """The snapshot every restore below starts from: the image plus one small text file to edit."""
    lines = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(TEXT_FILE_LINES))
    with Sandbox.start(policy, session=SESSION, role="base") as box:
        box.write_file("notes.txt", lines)
        return store.snapshot(box, name=f"{PREFIX}base")


def layer_target(changed: int) -> int:
    return int(changed * LAYER_SLACK + LAYER_FIXED_BYTES)


def bench_snapshot(results: Results, store: SnapshotStore, base: Snapshot, policy: SandboxPolicy, edits: int) -> None:
    section = "snapshot (runc)"
    # A fresh restore per size, so the committed layer holds only that one change.
    for label, size in SNAPSHOT_SIZES.items():
        box = store.restore(base, policy, session=SESSION, role="snap")
        try:
            must(box.exec(f"head -c {size} /dev/urandom > blob", timeout=120), f"write {label}")
            seconds, snap = timed(store.snapshot, box, name=f"{PREFIX}size-{size}")
        finally:
            box.close()
        limit = layer_target(size)
        results.add(section, f"write {label} random, snapshot", f"{seconds:.3f} s; layer {snap.layer_bytes:,} B "
                    f"= {snap.layer_bytes / size:.2f}x changed", f"layer <= {limit:,} B", snap.layer_bytes <= limit,
                    seconds=seconds, layer_bytes=snap.layer_bytes, changed_bytes=size)

    # A one-line edit: overlayfs copies the whole (small) file up, so "changed" is the file's size.
    times, layers, changed = [], [], 0
    for i in range(edits):
        box = store.restore(base, policy, session=SESSION, role="edit")
        try:
            must(box.exec(f"sed -i '3s/.*/line 3: edited {i}/' notes.txt"), "one-line edit")
            changed = int(must(box.exec("stat -c %s notes.txt"), "stat").stdout)
            seconds, snap = timed(store.snapshot, box, name=f"{PREFIX}edit-{i}")
        finally:
            box.close()
        times.append(seconds)
        layers.append(snap.layer_bytes)
    seconds, layer, limit = statistics.median(times), max(layers), layer_target(changed)
    results.add(section, f"snapshot of a one-line edit, median of {edits}", f"{ms(seconds)} (min {ms(min(times))})",
                f"<= {ms(EDIT_SNAPSHOT_TARGET_S)}", seconds <= EDIT_SNAPSHOT_TARGET_S, seconds=seconds, all_s=times)
    results.add(section, "  its layer vs the edited file", f"{layer:,} B vs {changed:,} B", f"<= {limit:,} B",
                layer <= limit, layer_bytes=layer, changed_bytes=changed)


# -- 4. restore ---------------------------------------------------------------------------------------------

def time_first_exec(make_box: Callable[[], Sandbox]) -> tuple[float, float, float]:
    """(start alone, start + first exec, close) in seconds for a sandbox that make_box() starts."""
    t0 = time.perf_counter()
    box = make_box()
    try:
        t1 = time.perf_counter()
        must(box.exec("true"), "first exec")
        t2 = time.perf_counter()
    finally:
        box.close()
    return t1 - t0, t2 - t0, time.perf_counter() - t2


def restore_once(store: SnapshotStore, snap: Snapshot, policy: SandboxPolicy) -> tuple[float, float]:
    """(restore alone, restore + first exec) in seconds; the sandbox is closed outside the timing."""
    return time_first_exec(lambda: store.restore(snap, policy, session=SESSION, role="restore"))[:2]


def bench_restore(results: Results, store: SnapshotStore, base: Snapshot, policy: SandboxPolicy, n: int) -> None:
    section = "restore (runc)"
    runs = [restore_once(store, base, policy) for _ in range(n)]
    alone, total = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    results.add(section, f"restore + first exec, median of {n}", f"{total:.3f} s", f"<= {RESTORE_TARGET_S} s",
                total <= RESTORE_TARGET_S, seconds=total)
    results.add(section, "  store.restore alone, median", f"{alone:.3f} s", seconds=alone)


# -- 5. CPU matmul throughput ---------------------------------------------------------------------------------

def matmul_bare(snippet: str) -> dict:
    python = str(VENV_PYTHON if VENV_PYTHON.exists() else sys.executable)
    out = subprocess.run([python, "-c", snippet], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def matmul_container(box: Sandbox, snippet: str, seconds: float) -> dict:
    result = must(box.exec(["python", "-c", snippet], timeout=seconds * 4 + 120), "in-container matmul")
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_matmul(results: Results, runtime: str, repeats: int, seconds: float) -> None:
    section = f"matmul ({runtime})"
    snippet = MATMUL_SNIPPET.format(n=MATMUL_N, seconds=seconds)
    policy = SandboxPolicy(runtime=runtime, memory_bytes=4 * 1024**3)
    bare, inside, threads = [], [], None
    with Sandbox.start(policy, session=SESSION, role="matmul") as box:
        for _ in range(repeats):  # interleaved, so host drift hits both sides alike
            bare.append(matmul_bare(snippet)["gflops"])
            run = matmul_container(box, snippet, seconds)
            inside.append(run["gflops"])
            threads = run["threads"]
    ratio, target = max(inside) / max(bare), MATMUL_TARGET[runtime]
    results.add(section, f"{MATMUL_N}x{MATMUL_N} fp32 matmul, container / bare (best of {repeats})",
                f"{ratio:.3f}x  ({max(inside):.1f} vs {max(bare):.1f} GFLOP/s, {threads} threads)", f">= {target}x",
                ratio >= target, ratio=ratio, container_gflops=max(inside), bare_gflops=max(bare),
                container_all=inside, bare_all=bare)


# -- 6. restore deep in a lineage ------------------------------------------------------------------------------

def bench_lineage(results: Results, store: SnapshotStore, policy: SandboxPolicy, depths: list[int]) -> None:
    section = "lineage (runc)"
    deepest, wanted = max(depths), set(depths)
    at: dict[int, Snapshot] = {}
    step_times = []
    build_start = time.perf_counter()
    with Progress(TextColumn("lineage"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[last]}"), console=console, transient=True) as progress:
        task = progress.add_task("build", total=deepest, last="")
        previous: Snapshot | None = None
        for i in range(1, deepest + 1):
            # Step 1 starts from the image, so bench-lin-<i> sits at lineage depth i.
            t0 = time.perf_counter()
            box = (Sandbox.start(policy, session=SESSION, role="lineage") if previous is None
                   else store.restore(previous, policy, session=SESSION, role="lineage"))
            try:
                must(box.exec(f"echo {i} > step.txt"), "lineage write")
                previous = store.snapshot(box, name=f"{PREFIX}lin-{i}")
            finally:
                box.close()
            step_times.append(time.perf_counter() - t0)
            if i in wanted:
                at[i] = previous
            progress.update(task, advance=1, last=f"{step_times[-1]:.2f} s/step, layer depth {previous.depth}")
    build = time.perf_counter() - build_start
    results.add(section, f"build {deepest} steps (restore, write, snapshot, close)",
                f"{build:.1f} s total, {statistics.median(step_times):.3f} s/step median, max {max(step_times):.2f} s",
                seconds=build, step_median_s=statistics.median(step_times), step_max_s=max(step_times))
    for depth in depths:
        snap = at[depth]
        with store.restore(snap, policy, session=SESSION, role="check") as box:  # the lineage's state survived
            got = box.read_text("step.txt").strip()
        if got != str(depth):
            raise RuntimeError(f"restore of {snap.name} shows step {got!r}, expected {depth}")
        totals = [restore_once(store, snap, policy)[1] for _ in range(LINEAGE_RESTORE_N)]
        total = statistics.median(totals)
        results.add(section, f"restore + first exec at lineage depth {snap.lineage_depth} (layer depth {snap.depth})",
                    f"{total:.3f} s", f"<= {RESTORE_TARGET_S} s", total <= RESTORE_TARGET_S, seconds=total,
                    lineage_depth=snap.lineage_depth, layer_depth=snap.depth, layer_bytes=snap.layer_bytes)


# -- machine, cleanup, output -------------------------------------------------------------------------------

def runsc_registered() -> bool:
    return "runsc" in client().info().get("Runtimes", {})


def machine() -> dict:
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:"))
    return {"date": dt.datetime.now().isoformat(timespec="seconds"), "host": platform.node(), "cores": os.cpu_count(),
            "ram_gib": round(mem_kib / 1024**2, 1), "docker": client().version().get("Version"),
            "runsc": runsc_registered()}


def remove_bench_snapshots(store: SnapshotStore) -> list[str]:
    """Remove every `bench-*` snapshot; gc's name prefix keeps everyone else's out of reach."""
    return store.gc(keep=[], name_prefix=PREFIX).removed


def print_table(results: Results, header: str) -> None:
    table = Table(title="labrat sandbox benchmark", show_lines=False)
    for column, style in (("section", "cyan"), ("measurement", ""), ("value", "bold"), ("target", ""), ("result", "")):
        table.add_column(column, style=style or None, overflow="fold")
    previous = None
    for row in results.rows:
        verdict = {True: "[green]PASS[/]", False: "[red]FAIL[/]", None: ""}[row["pass"]]
        table.add_row(row["section"] if row["section"] != previous else "", row["name"], row["value"], row["target"],
                      verdict, end_section=False)
        previous = row["section"]
    console.print(table)
    console.print(header)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a shallow lineage (a smoke run)")
    parser.add_argument("--depths", help=f"lineage depths to restore at (default {DEPTHS[0]}; --quick {DEPTHS[1]})")
    parser.add_argument("--runtimes", default="runc,runsc", help="runtimes for the exec, start and matmul rows")
    parser.add_argument("--json", type=Path, help="also write the rows and the machine as JSON here")
    args = parser.parse_args()
    q = 1 if args.quick else 0
    depths = sorted({int(d) for d in (args.depths or DEPTHS[q]).split(",") if d.strip()})
    if not depths or depths[0] < 1:
        parser.error("--depths must be positive integers")
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    if unknown := set(runtimes) - set(MATMUL_TARGET):
        parser.error(f"unknown runtime(s) {', '.join(sorted(unknown))}: choose from runc, runsc")
    interrupt_on_sigterm()  # SIGTERM unwinds like Ctrl-C: sandboxes closed, bench-* snapshots removed

    info = machine()
    store = SnapshotStore()
    results = Results()
    runc = SandboxPolicy()  # the default, hardened policy on runc

    def section(name: str, fn: Callable, *fn_args) -> None:
        # One failing measurement is reported as a row; the others still run, and cleanup always does.
        console.print(f"[dim]measuring {name} ...[/]")
        try:
            fn(*fn_args)
        except Exception as exc:  # noqa: BLE001 - a benchmark reports, it does not stop
            results.error(name, exc)

    try:
        if stale := remove_bench_snapshots(store):
            console.print(f"[yellow]removed {len(stale)} bench-* snapshots left by an earlier run[/]")
        usable = []
        for runtime in runtimes:
            if runtime == "runsc" and not info["runsc"]:
                reason = "runsc is not registered with the Docker engine ('runsc' not in client().info()['Runtimes'])"
                console.print(f"[yellow]{reason}: skipping the runsc rows[/]")
                results.skip("runsc", "exec, start and matmul under runsc", reason)
            else:
                usable.append(runtime)
        for runtime in usable:
            policy = SandboxPolicy(runtime=runtime)
            section(f"exec ({runtime})", bench_exec, results, policy, EXEC_N[q])
            section(f"start ({runtime})", bench_start, results, policy, START_N[q])

        base = None
        try:
            base = make_base(store, runc)
        except Exception as exc:  # noqa: BLE001
            results.error("snapshot base", exc)
        if base is not None:
            section("snapshot (runc)", bench_snapshot, results, store, base, runc, EDIT_N[q])
            section("restore (runc)", bench_restore, results, store, base, runc, RESTORE_N[q])

        for runtime in usable:
            section(f"matmul ({runtime})", bench_matmul, results, runtime, MATMUL_REPEATS[q], MATMUL_SECONDS[q])

        section("lineage (runc)", bench_lineage, results, store, runc, depths)
    finally:
        with console.status("removing bench-* snapshots ..."):
            removed = remove_bench_snapshots(store)

    header = (f"# bench/sandbox.py{' --quick' if args.quick else ''}, {info['date']}, {info['host']}: "
              f"{info['cores']} cores, {info['ram_gib']} GiB RAM, Docker {info['docker']}, "
              f"runsc {'registered' if info['runsc'] else 'not registered'}; removed {len(removed)} bench-* snapshots")
    print_table(results, header)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "quick": args.quick, "rows": results.rows}, indent=2))
    return 0 if all(row["pass"] is not False for row in results.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
