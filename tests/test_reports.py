"""The report, the progress chart and the Pareto fronts on a 500-experiment ledger, and the HTML report in a
real headless Chromium (Debian's package, installed by scripts/setup-test-tools.sh).

The ledger is built row by row through the Ledger API with planted facts: one knob that helps (LR), one
that always hurts (DROPOUT, a dead end), null knobs, confirmations of every keep, a few expectations far
from their measurement both ways, and text written by a hostile agent (tags, a javascript: link, images
that would be fetched from a local server). The assertions compare the report with those facts, computed
here independently of the code under test.
"""

from __future__ import annotations

import http.server
import json
import random
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness.lab import LEDGER_FILE
from harness.ledger import Ledger
from tests.conftest import LABRAT

ROWS = 500
SIGMA = 0.01
CONFIG = {"keep_rule": "significant", "noise_seeds": 3, "trainer_config": "cpu-tiny", "time_budget": 30.0,
          "seed": 1337, "significance": 0.05}
KNOBS = {"LR": -0.03, "DROPOUT": +0.03, "WIDTH": 0.0, "WARMUP": 0.0, "BATCH": 0.0}  # true effect on val_bpb


def hostile_text(port: int) -> tuple[str, str]:
    """A description and a hypothesis (each within the report's 90 characters a cell)."""
    return (f'<img src="http://127.0.0.1:{port}/tag.png" onerror="pwned=1">[c](javascript:pwned=3)',
            f"![m](http://127.0.0.1:{port}/md.png)<script>pwned=2</script> | a pipe ` a tick")


@dataclass
class Planted:
    """What the builder put in the ledger, to check the report against."""

    rows: int = 0
    baseline: int = 0
    wins: dict[int, list[int]] = field(default_factory=dict)  # kept id -> its confirmations
    replicated: set[int] = field(default_factory=set)  # every variant run more than once
    means: dict[int, float] = field(default_factory=dict)  # every variant's mean of runs
    values: dict[int, tuple[int, float, float]] = field(default_factory=dict)  # params, memory GB, tokens/s
    surprising_better: list[int] = field(default_factory=list)
    surprising_worse: list[int] = field(default_factory=list)
    dead_knob_tries: int = 0
    hostile_id: int = 0
    chain: list[int] = field(default_factory=list)  # the best variant's lineage


def build_lab(path: Path, port: int, rows: int = ROWS) -> Planted:
    """A lab of `rows` ledger rows (replicates included)."""
    path.mkdir(parents=True, exist_ok=True)
    rng, planted = random.Random(15), Planted()
    with Ledger(path / LEDGER_FILE) as ledger:
        ledger.start_session("s", agent="offline", model=None, config=CONFIG)
        ledger.set_root_sources("s", {"trainer/train.py": "LR = 1\n"})

        def finish(e: int, status: str, metric: float | None, params: int, **fields) -> None:
            memory, speed = round(0.5 + params / 4e6, 3), round(2e5 - params / 200 + rng.uniform(-2e3, 2e3))
            ledger.finish_experiment(
                e, status, metric=metric, eval_json=json.dumps({"parameters": params, "floor_bpb": 0.5}),
                memory_bytes=int(memory * 1024**3), summary_json=json.dumps({"tokens_per_s": speed}),
                sources_json=json.dumps({"trainer/train.py": f"LR = {e}\n"}), **fields)
            if metric is not None and status != "replicate":
                planted.values[e] = (params, memory, speed)
            planted.rows += 1

        def replicate(of: int, truth: float, params: int) -> list[int]:
            ids = []
            planted.replicated.add(of)
            for _ in range(2):
                r = ledger.begin_experiment("s", of, f"confirmation of #{of}", replicate_of=of)
                finish(r, "replicate", truth + rng.gauss(0, SIGMA), params)
                ids.append(r)
            return ids

        base = planted.baseline = ledger.begin_experiment("s", None, "baseline")
        truth, params = 2.0, 1_000_000
        first = truth + rng.gauss(0, SIGMA)
        finish(base, "keep", first, params)
        runs = {base: [first]}
        for r in replicate(base, truth, params):
            runs[base].append(ledger.experiment(r).metric)
        planted.means[base] = sum(runs[base]) / 3
        best, best_truth, n = base, truth, 0
        while planted.rows < rows:
            n += 1
            knob = rng.choice(list(KNOBS))
            effect = KNOBS[knob] if knob != "LR" or rng.random() < 0.4 else 0.0
            variant_params = max(50_000, params + rng.choice([-1, 1]) * rng.randrange(0, 400_000))
            hypothesis, expected = f"{knob} {n}: a try", KNOBS[knob]
            if n % 7 == 0 and knob == "DROPOUT":
                expected = -0.1  # measured +0.03: far worse than expected
            diff = f"--- a/trainer/train.py\n+++ b/trainer/train.py\n@@ -1 +1 @@\n-{knob} = 1\n+{knob} = 2\n"
            description = f"set {knob} to {n}"
            if n == 60:
                description, hypothesis = hostile_text(port)
                effect, knob, expected = -0.05, "LR", +0.05  # far better than expected
            e = ledger.begin_experiment("s", best, description, hypothesis=hypothesis, expected_delta=expected)
            metric = best_truth + effect + rng.gauss(0, SIGMA)
            if planted.means[best] - metric > 2 * SIGMA:  # screened, then confirmed
                confirmations = replicate(e, best_truth + effect, variant_params)
                all_runs = [metric] + [ledger.experiment(r).metric for r in confirmations]
                mean = sum(all_runs) / 3
                keep = planted.means[best] - mean > 2 * SIGMA
                finish(e, "keep" if keep else "discard", metric, variant_params, diff=diff,
                       decision=f"3 runs: {'significant' if keep else 'not significant'}")
                planted.means[e] = mean
                if keep:
                    planted.wins[e] = confirmations
                    best, best_truth, params = e, best_truth + effect, variant_params
            else:
                status = "crash" if n % 41 == 0 else "discard"
                finish(e, status, None if status == "crash" else metric, variant_params, diff=diff)
                if status != "crash":
                    planted.means[e] = metric
            if n == 60:
                planted.hostile_id = e
            if knob == "DROPOUT":
                planted.dead_knob_tries += 1
        planted.chain = [x.id for x in ledger.lineage(ledger.best().id)]
        for e in ledger.experiments():
            if e.expected_delta is None or e.id not in planted.means or e.parent_id not in planted.means:
                continue
            measured = planted.means[e.id] - planted.means[e.parent_id]
            n_candidate = 3 if e.decision else 1
            se = SIGMA * (1 / n_candidate + 1 / 3) ** 0.5
            off = (measured - e.expected_delta) / se
            if abs(off) > 6:  # well past the 3-SE line, so the estimated σ cannot move it across
                (planted.surprising_worse if off > 0 else planted.surprising_better).append(e.id)
    return planted


@pytest.fixture(scope="module")
def tracker():
    """A local HTTP server that records every request: the report must make none."""
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        def process_request(self, request, client_address):
            requests.append("connection")  # a connection counts, even one that never sends a request
            super().process_request(request, client_address)

        def handle_error(self, request, client_address):
            pass  # a browser resetting a spare connection is no error of the test's

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], requests
    server.shutdown()


@pytest.fixture(scope="module")
def big_lab(tmp_path_factory, tracker):
    lab = tmp_path_factory.mktemp("reports") / "lab"
    return lab, build_lab(lab, tracker[0])


def section(report: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", report, re.MULTILINE | re.DOTALL)
    assert match, f"no section {title!r} in the report"
    return match.group(1)


def brute_front(points: dict[int, tuple[float, float]], lower_is_better: bool) -> set[int]:
    """The definition: no other point at least as good on both and strictly better on one."""
    sign = 1 if lower_is_better else -1
    front = set()
    for i, (v, m) in points.items():
        if not any((sign * w <= sign * v and n <= m and (sign * w < sign * v or n < m))
                   for j, (w, n) in points.items() if j != i):
            front.add(i)
    return front


def test_the_report_leads_with_confirmed_wins_surprises_fronts_contributions_and_dead_ends(big_lab):
    from harness.reports import report

    lab, planted = big_lab
    text = report(lab)
    order = [text.index(f"## {title}") for title in ("Significant wins", "Surprising results", "Pareto fronts",
                                                     "What each kept step contributed", "Dead ends", "Best variant")]
    assert order == sorted(order)
    assert planted.rows == ROWS and len(planted.wins) >= 3
    wins = section(text, "Significant wins")
    for kept, confirmations in planted.wins.items():
        row = next(line for line in wins.splitlines() if line.startswith(f"| {kept} |"))
        assert all(f"#{c}" in row for c in confirmations) and "| 3 |" in row

    surprising = section(text, "Surprising results")
    assert planted.surprising_better and planted.surprising_worse
    for e in planted.surprising_better + planted.surprising_worse:
        assert f"\n| {e} |" in surprising
    assert "better than expected" in surprising and "worse than expected" in surprising

    contributions = section(text, "What each kept step contributed")
    ids = [int(m) for m in re.findall(r"^\| (\d+) \|", contributions, re.MULTILINE)]
    assert ids == planted.chain
    total = planted.means[planted.chain[-1]] - planted.means[planted.chain[0]]
    assert f"In all: {total:+.4f} bpb over {len(planted.chain) - 1} step(s)" in contributions
    step_deltas = [float(d) for d in re.findall(r"\| ([+-]\d\.\d{4}) ± \d\.\d{4} \|$", contributions, re.MULTILINE)]
    assert len(step_deltas) == len(planted.chain) - 1 and abs(sum(step_deltas) - total) < 5e-4 * len(step_deltas)

    dead = section(text, "Dead ends")
    row = next(line for line in dead.splitlines() if line.startswith("| knob DROPOUT |"))
    assert f"| {planted.dead_knob_tries} |" in row
    assert "| knob LR |" not in dead  # LR was kept: not a dead end
    assert f"#{planted.chain[-1]}: val_bpb" in section(text, "Best variant")


def test_pareto_fronts_are_the_non_dominated_variants(big_lab):
    from harness.lab import open_ledger
    from harness.pareto import fronts

    lab, planted = big_lab
    with open_ledger(lab) as ledger:
        found = {f.axis.name: f for f in fronts(ledger)}
    for axis, index, lower in (("parameters", 0, True), ("memory", 1, True), ("throughput", 2, False)):
        points = {e: (planted.values[e][index], planted.means[e]) for e in planted.values}
        assert set(found[axis].front_ids) == brute_front(points, lower), axis
        assert {p.experiment_id for p in found[axis].points} == set(planted.values)
        assert len(found[axis].front) >= 2


def test_a_measure_the_agent_can_forge_is_no_value_unless_it_is_a_finite_positive_number():
    from harness.ledger import Experiment
    from harness.pareto import AXES

    def throughput(value) -> float | None:
        return AXES["throughput"].value(Experiment(id=1, session_id="s", parent_id=None, status="keep",
                                                   description="d", started_at="x",
                                                   summary_json=json.dumps({"tokens_per_s": value})))

    for forged in (float("nan"), float("inf"), -1.0, 0, True, "fast", [1], None):
        assert throughput(forged) is None, forged
    assert throughput(123.5) == 123.5


def test_the_progress_chart_labels_kept_steps_ticks_integers_and_keeps_the_legend_off_the_data(big_lab, tmp_path):
    from harness.reports import LABEL_SPACING, MAX_LABELS, plot

    lab, planted = big_lab
    series = plot(lab, tmp_path / "progress.png")
    assert (tmp_path / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(series.ids) == set(planted.means)  # variants, not replicates
    assert set(series.replicate_ids) == planted.replicated and len(series.replicate_ids) == 2 * len(planted.replicated)
    labelled = series.labelled_ids
    assert 3 <= len(labelled) <= MAX_LABELS and set(labelled) <= set(series.kept_ids)
    assert planted.baseline in labelled and planted.hostile_id in labelled  # the largest gain is labelled
    spacing = (series.ids[-1] - series.ids[0]) * LABEL_SPACING
    assert all(b - a >= spacing for a, b in zip(labelled, labelled[1:]))
    assert series.running_best[-1] == pytest.approx(planted.means[planted.chain[-1]])
    assert series.noise_sd == pytest.approx(SIGMA, rel=0.3)
    assert series.xticks and all(t == int(t) for t in series.xticks)
    assert series.legend_outside is True
    assert series.lanes == {}  # one lane: no lane lines
    build_lab(tmp_path / "small", port=1, rows=6)
    small = plot(tmp_path / "small", tmp_path / "small.png")  # a few experiments: where ticks 1.5, 2.5 came from
    assert len(small.ids) <= 4 and small.xticks and all(t == int(t) for t in small.xticks)


def test_the_cli_prints_fronts_draws_them_and_marks_surprises_in_the_log(big_lab, tmp_path):
    lab, planted = big_lab

    def labrat(*args):
        return subprocess.run([LABRAT, *args, "--lab", str(lab)], capture_output=True, text=True, timeout=300)

    printed = labrat("pareto", "--axis", "memory")
    assert printed.returncode == 0 and "peak memory" in printed.stdout and "throughput" not in printed.stdout
    refused = labrat("pareto", "--axis", "speed")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "unknown axis 'speed'" in refused.stderr
    drawn = labrat("plot", "--pareto", "-o", str(tmp_path / "pareto.png"))
    assert drawn.returncode == 0 and "parameters front" in drawn.stdout
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    log = labrat("log", "--limit", str(ROWS))
    marked = {int(m) for m in re.findall(r"│\s+(\d+) │[^\n]*surprising", log.stdout)}
    assert set(planted.surprising_better + planted.surprising_worse) <= marked


def chromium_probe(page: Path, tmp_path: Path) -> dict:
    """Open `page` in headless Chromium and return what a probe script found once it had loaded."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed: run scripts/setup-test-tools.sh (make test does)")
    probe = """<script>window.addEventListener('load', () => {
      const r = {
        images: [...document.images].map(i => ({src: i.getAttribute('src').slice(0, 22), w: i.naturalWidth})),
        h2: [...document.querySelectorAll('h2')].map(h => h.textContent),
        tables: document.querySelectorAll('table').length,
        links: [...document.querySelectorAll('a')].map(a => a.getAttribute('href')),
        handlers: [...document.querySelectorAll('*')].filter(e => [...e.attributes].some(a => a.name.startsWith('on'))).length,
        scripts: document.querySelectorAll('script').length,
        pwned: window.pwned || 0, title: document.title,
        overflow: document.documentElement.scrollWidth - window.innerWidth,
      };
      const pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(r);
      document.body.appendChild(pre);
    });</script>"""
    probed = tmp_path / f"probed-{page.name}"
    probed.write_text(page.read_text().replace("</body>", probe + "</body>"))
    done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,900",
                           "--virtual-time-budget=15000", "--dump-dom", probed.as_uri()],
                          capture_output=True, text=True, timeout=180)
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.DOTALL)
    assert found, f"the probe did not run: {done.stderr[-2000:]}"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
                      .replace("&amp;", "&"))


def test_the_html_report_renders_in_a_real_browser_self_contained_and_inert(big_lab, tracker, tmp_path):
    lab, planted = big_lab
    port, requests = tracker
    written = subprocess.run([LABRAT, "report", "--html", "-o", str(tmp_path / "report.html"), "--lab", str(lab)],
                             capture_output=True, text=True, timeout=300)
    assert written.returncode == 0, written.stderr
    found = chromium_probe(tmp_path / "report.html", tmp_path)
    assert found["h2"][:5] == ["Significant wins", "Surprising results", "Pareto fronts",
                               "What each kept step contributed", "Dead ends"]
    assert len(found["images"]) == 2 and all(i["src"] == "data:image/png;base64," and i["w"] > 500
                                             for i in found["images"])
    assert found["tables"] >= 7
    # The hostile agent's text is shown as text: no handler, no script but the probe, no link, nothing fetched.
    assert found["pwned"] == 0 and found["handlers"] == 0 and found["scripts"] == 1
    assert not any(href and href.startswith("javascript") for href in found["links"])
    assert requests == []
    page = (tmp_path / "report.html").read_text()
    assert "[c](javascript:pwned=3)" in page.replace("\\", "") and "&lt;script&gt;pwned=2" in page  # as text
    assert found["title"] == f"labrat report: {lab.name}"

    # The check above can fail: the same browser does fetch an image a page really asks for.
    control = tmp_path / "control.html"
    control.write_text(f'<html><body><img src="http://127.0.0.1:{port}/control.png"></body></html>')
    chromium_probe(control, tmp_path)
    assert "/control.png" in requests


def test_a_direction_is_the_knobs_a_diff_sets():
    from harness.reports import knobs_changed

    diff = ("--- #1/trainer/train.py\n+++ #4/trainer/train.py\n@@ -1,3 +1,3 @@\n"
            "-        matrix_lr=0.02, embed_lr=0.3, head_lr=0.008,\n"
            "+        matrix_lr=0.02, embed_lr=0.15, head_lr=0.008,\n"
            "-LR = 1e-3\n+LR = 2e-3\n+WARMUP: int = 10\n"
            '-    "dropout": 0.1,\n+    "dropout": 0.0,\n'
            "     depth = 4\n-if a == b:\n+if a == c:\n")
    assert knobs_changed(diff) == ["LR", "WARMUP", "dropout", "embed_lr"]
    assert knobs_changed("--- a\n+++ b\n-# a comment\n+# another comment\n") == []


def test_with_lanes_the_chart_draws_each_lanes_running_best(tmp_path):
    from harness.reports import plot

    lab = tmp_path / "lanes"
    lab.mkdir()
    with Ledger(lab / LEDGER_FILE) as ledger:
        ledger.start_session("s", agent="offline", model=None, config=CONFIG)
        base = ledger.begin_experiment("s", None, "baseline")
        ledger.finish_experiment(base, "keep", metric=2.0)
        for lane, metric, status in ((1, 1.9, "keep"), (0, 2.1, "discard"), (0, 1.8, "keep"), (1, 1.95, "discard")):
            e = ledger.begin_experiment("s", base, f"lane {lane}", lane=lane)
            ledger.finish_experiment(e, status, metric=metric)
    series = plot(lab, tmp_path / "lanes.png")
    assert series.lanes == {0: ([1, 3, 4], [2.0, 2.0, 1.8]), 1: ([2, 5], [1.9, 1.9])}
    assert series.running_best == [2.0, 1.9, 1.9, 1.8, 1.8]
