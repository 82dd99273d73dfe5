"""The live view renders what the issue asks for: experiment n/max, phase time, best, gap, rate, tokens, cost."""

import io

from rich.console import Console

from harness.ledger import Experiment
from harness.progress import LiveView, results_table


def _experiment(id_, status, metric, gap, parent=None, tokens=(0, 0), cost=0.0):
    return Experiment(id=id_, session_id="s", parent_id=parent, status=status, description=f"change {id_}",
                      metric=metric, floor_gap=gap, seconds=12.5, tokens_in=tokens[0], tokens_out=tokens[1],
                      cost_usd=cost, started_at="2026-11-23T00:00:00")


def test_live_view_shows_progress_best_gap_rate_tokens_and_cost():
    console = Console(file=io.StringIO(), force_terminal=True, width=140, record=True)
    view = LiveView(console, max_experiments=10, floor_bpb=0.46)
    view.experiment_started(1, "baseline")
    view.experiment_finished(_experiment(1, "keep", 1.5, 1.04))
    view.experiment_finished(_experiment(2, "discard", 1.7, 1.24, parent=1))
    view.usage(12_000, 3_000, 0.081)
    view.experiment_started(3, "lr x2")
    view.phase("training", 60)
    console.print(view.render())
    text = console.export_text()
    assert "2 / 10" in text and "running #3: lr x2" in text
    assert "training" in text and "/ 60s" in text
    assert "#1  val_bpb 1.500000  (gap to floor 1.0400)" in text
    assert "experiments/hour" in text and "12,000 tokens in / 3,000 out, $0.0810" in text
    assert "discard" in text and "1.700000" in text


def test_without_a_terminal_each_experiment_is_one_plain_line():
    stream = io.StringIO()
    view = LiveView(Console(file=stream, force_terminal=False, width=200), max_experiments=None)
    with view:
        view.experiment_finished(_experiment(4, "crash", None, None))
    assert view.live is None
    assert stream.getvalue().startswith("#4    crash    val_bpb -")


def test_results_table_columns():
    console = Console(file=io.StringIO(), width=200, record=True)
    console.print(results_table([_experiment(1, "keep", 1.25, 0.79, tokens=(100, 20), cost=0.5)]))
    text = console.export_text()
    for column in ("parent", "status", "val_bpb", "gap", "memory GB", "seconds", "tokens", "cost $", "description"):
        assert column in text
    assert "1.250000" in text and "120" in text and "0.5000" in text


def test_a_stated_expectation_is_shown_next_to_the_measured_effect_and_the_noise():
    from harness.history import Standing, experiment_detail
    from harness.ledger import Experiment
    from harness.noise import Noise, Runs

    base = dict(session_id="s", status="keep", description="d", started_at="2026-12-03T00:00:00")
    parent = Experiment(id=1, parent_id=None, metric=1.25, **base)
    child = Experiment(id=2, parent_id=1, metric=1.2, hypothesis="wider is better", expected_delta=-0.1, **base)

    def standing(e: Experiment, sd: float | None) -> Standing:
        return Standing(parent, Runs.of(e, []), Runs.of(parent, []), Noise(sd, 4 if sd else 0))

    detail = experiment_detail(child, standing=standing(child, 0.005))
    assert ("hypothesis: wider is better\nexpected Δ -0.1000, measured Δ -0.0500 (val_bpb against #1; "
            "noise σ 0.005000 bpb (df 4)): surprising: 7.1 standard errors worse than expected") in detail
    assert "surprising" not in experiment_detail(child, standing=standing(child, 0.02))  # 1.8 standard errors off
    assert "surprising" not in experiment_detail(child, standing=standing(child, None))  # no noise measured: no verdict
    assert "hypothesis" not in experiment_detail(parent)  # nothing stated, nothing shown
    crashed = Experiment(id=3, parent_id=1, metric=None, hypothesis="h", **{**base, "status": "crash"})
    assert "no expected Δ, no measured Δ" in experiment_detail(crashed, standing=standing(crashed, 0.005))


def test_with_lanes_the_live_view_shows_what_each_lane_is_doing():
    console = Console(file=io.StringIO(), force_terminal=True, width=160, record=True)
    view = LiveView(console, max_experiments=10, lanes=2)
    view.experiment_started(2, "matrix_lr: 0.02 -> 0.04", lane=0)
    view.phase("training", 30, lane=0)
    view.experiment_started(3, "n_embd: 128 -> 192", lane=1)
    view.phase("evaluating", None, lane=1)
    view.experiment_finished(_experiment(2, "discard", 1.7, 1.2, parent=1))  # lane 0's
    console.print(view.render())
    text = console.export_text()
    assert "lane 0" in text and "agent" in text.split("lane 0", 1)[1].splitlines()[0]
    assert "#3 n_embd: 128 -> 192: evaluating" in text
