"""The keep rules in real sessions: an agent (the real SDK against the fake Messages server) that makes only
changes that cannot matter, under `better` and under `significant`; the noise floor, confirmations and
`labrat noise`, `status` and `show` on the ledger they leave.

Training is deterministic (3 steps) and every run has a seed of its own from the harness, so a null change
scores like the baseline with another seed: the spread the rules must see through. tests/test_noise.py
measures the rules' false-keep rates by simulation; this is the same rule, end to end.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from harness.lab import LEDGER_FILE
from harness.ledger import Ledger
from sandbox.snapshots import SnapshotStore
from tests.conftest import LABRAT
from tests.fake_anthropic import fake_anthropic, reply, tool  # noqa: F401 (fixture)
from tests.test_claude_agent import EDITOR, TRAIN, run_session, write_config

pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")
NULL_CHANGES = 8
RENAME = ("python3 -c \"import pathlib, re; p = pathlib.Path('trainer/train.py'); "
          "p.write_text(re.sub(r'\\b(train_file|split_file_\\d+)\\b', 'split_file_{i}', p.read_text()))\"")
MORE_STEPS = ("    train(cfg, tokens, args.out, device, args.steps, args.seed,",
              "    train(cfg, tokens, args.out, device, args.steps * 10, args.seed,")  # a change that matters


def null_changes(fake, count: int) -> None:
    """`count` experiments, each a change that cannot matter: a comment, or a local variable renamed."""
    for i in range(1, count + 1):
        if i % 2:
            change = tool(EDITOR, {"command": "str_replace", "path": TRAIN, "old_str": "import numpy as np\n",
                                   "new_str": f"import numpy as np\n# null change {i}: a comment\n"})
        else:
            change = tool("bash", {"command": RENAME.format(i=i)})
        fake.script(reply(change, text=f"Null change {i}."),
                    reply(tool("run_experiment", {"description": f"null change {i}",
                                                  "hypothesis": "changes nothing", "expected_delta": 0.0})))


@pytest.fixture
def labs(tmp_path):
    made = []

    def make(name: str, **settings):
        path = tmp_path / name
        path.mkdir()
        write_config(path, eval_tokens=2048, **settings)
        made.append(path)
        return path

    yield make
    for path in made:
        if (path / LEDGER_FILE).exists():
            with Ledger(path / LEDGER_FILE) as ledger:
                lab_id = ledger.meta("lab_id")
            if lab_id:
                SnapshotStore().gc(keep=[], name_prefix=lab_id)


def test_null_changes_are_kept_by_better_and_not_by_significant_which_keeps_a_real_gain(labs, fake_anthropic):
    fake = fake_anthropic
    greedy = labs("better", keep_rule="better", noise_seeds=1, max_experiments=NULL_CHANGES)
    null_changes(fake, NULL_CHANGES)
    assert run_session(greedy).reason == f"max_experiments ({NULL_CHANGES}) reached"
    with Ledger(greedy / LEDGER_FILE) as ledger:
        rows = ledger.experiments()
    baseline, *candidates = rows
    assert len(rows) == NULL_CHANGES and all(e.replicate_of is None for e in rows)  # one run each
    assert len({e.seed for e in rows}) == NULL_CHANGES and len({e.metric for e in rows}) > 1  # seeds: noise
    greedy_keeps = [e for e in candidates if e.status == "keep"]
    assert greedy_keeps, [(e.id, e.metric) for e in rows]  # noise kept as progress

    careful = labs("significant", keep_rule="significant", noise_seeds=3, max_experiments=NULL_CHANGES + 1)
    null_changes(fake, NULL_CHANGES)
    fake.script(reply(tool(EDITOR, {"command": "str_replace", "path": TRAIN, "old_str": MORE_STEPS[0],
                                    "new_str": MORE_STEPS[1]})),
                reply(tool("run_experiment", {"description": "ten times the steps", "expected_delta": -0.5})))
    assert run_session(careful).reason == f"max_experiments ({NULL_CHANGES + 1}) reached"  # candidates only
    assert not fake.violations
    with Ledger(careful / LEDGER_FILE) as ledger:
        rows = ledger.experiments()
        replicates = {e.id: ledger.replicates(e.id) for e in rows}
    candidates = [e for e in rows if e.replicate_of is None]
    baseline, *nulls, real = candidates
    # The noise floor: the baseline ran three times, each run a row of its own with a seed of its own.
    assert baseline.status == "keep" and "noise floor: 3 runs" in baseline.decision
    assert [r.status for r in replicates[baseline.id]] == ["replicate", "replicate"]
    assert len({baseline.seed, *(r.seed for r in replicates[baseline.id])}) == 3
    assert len({baseline.metric, *(r.metric for r in replicates[baseline.id])}) == 3  # it does not ignore the seed
    # No null change was kept (at most 1 in 20 may be: 0 of 7). Each was either screened out with no more
    # runs, or confirmed with two more, linked to it, and then found not significant.
    assert [e.status for e in nulls] == ["discard"] * len(nulls), [(e.id, e.metric, e.decision) for e in nulls]
    for e in nulls:
        if "t = " in e.decision:
            assert "not significant" in e.decision and len(replicates[e.id]) == 2
        else:
            assert ("within the noise" in e.decision or "no better than" in e.decision) and not replicates[e.id]
    # A change that matters passes the screen, is confirmed by two more runs and kept.
    assert real.status == "keep" and " significant" in real.decision and "not significant" not in real.decision
    assert [r.status for r in replicates[real.id]] == ["replicate", "replicate"]
    assert all(r.parent_id == real.parent_id and r.snapshot is None for r in replicates[real.id])
    # The agent was told why: each experiment's outcome opens the next conversation's summary.
    summaries = [r.body["messages"][0]["content"][0]["text"] for r in fake.requests if len(r.body["messages"]) == 1]
    told = [s for s in summaries if "The keep rule:" in s]
    assert any("within the noise" in t or "not significant" in t or "no better" in t for t in told), summaries[-1]

    status = subprocess.run([LABRAT, "status", "--lab", str(careful)], capture_output=True, text=True)
    assert status.returncode == 0 and "noise of one run: σ " in status.stdout, status.stdout + status.stderr
    assert f"baseline #{baseline.id}: 3 runs" in status.stdout and "best's runs: 3 runs" in status.stdout
    shown = subprocess.run([LABRAT, "show", str(real.id), "--lab", str(careful)], capture_output=True, text=True)
    assert shown.returncode == 0 and "runs: 3 runs, mean" in shown.stdout and "keep rule: 3 runs at" in shown.stdout
    assert "expected Δ -0.5000, measured Δ" in shown.stdout

    # On demand: two more runs of the best, recorded as its replicates; the ledger's noise grows by them.
    noise = subprocess.run([LABRAT, "noise", "--lab", str(careful), "--seeds", "2"], capture_output=True, text=True)
    assert noise.returncode == 0, noise.stdout + noise.stderr
    assert f"#{real.id}: 5 runs, mean" in noise.stdout and "noise of one run in this lab: σ" in noise.stdout
    with Ledger(careful / LEDGER_FILE) as ledger:
        assert [r.status for r in ledger.replicates(real.id)] == ["replicate"] * 4


def test_a_model_over_max_params_is_discarded_by_the_evaluations_own_count(labs, fake_anthropic):
    """The count is the checkpoint's weights, taken by the evaluation before the model's code runs (a model
    that forges it is refused: tests/test_evaluator.py). The first run within the frame is the baseline."""
    fake = fake_anthropic
    lab = labs("frame", keep_rule="better", noise_seeds=1, max_params=200_000, max_experiments=2)
    fake.script(reply(tool("run_experiment", {"description": "the shipped model, 0.46 M weights"})),
                reply(tool(EDITOR, {"command": "str_replace", "path": TRAIN, "old_str": "n_head=4, n_embd=128,",
                                    "new_str": "n_head=4, n_embd=32,"})),
                reply(tool("run_experiment", {"description": "n_embd 128 -> 32: inside max_params"})))
    assert run_session(lab).reason == "max_experiments (2) reached" and not fake.violations
    with Ledger(lab / LEDGER_FILE) as ledger:
        over, within = ledger.experiments()
    assert over.status == "discard" and over.metric is not None
    weights = json.loads(over.eval_json)["parameters"]
    assert weights > 200_000 and over.decision == f"broke max_params: {weights:,} weights > 200,000"
    assert within.status == "keep" and within.parent_id is None  # the first run inside the frame: the baseline
    assert json.loads(within.eval_json)["parameters"] < 200_000 and within.decision is None
