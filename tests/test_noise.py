"""The noise floor's statistics and the keep rules' false-keep rates (no engine: harness/noise.py alone).

The rates are measured by simulation with the functions the experiment job calls (screen, then the
t-test on all runs with the pooled noise), on a null model: every variant scores the same mean plus
Gaussian noise, as a change that cannot matter does. tests/test_keep_rules.py drives the same rule through
real sessions.
"""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from scipy import stats

from harness.config import ConfigError, LabConfig, apply_overrides
from harness.ledger import SCHEMA, Experiment, Ledger
from harness.noise import Noise, Runs, screen, significance_test

ROW = dict(session_id="s", parent_id=None, status="keep", description="d", started_at="2026-12-03T00:00:00")


def runs(experiment_id: int, metrics, seeds=None) -> Runs:
    return Runs(experiment_id, tuple(float(m) for m in metrics), tuple(seeds or range(len(metrics))))


def test_the_pooled_noise_and_the_t_test_agree_with_scipy():
    rng = np.random.default_rng(7)
    a, b = rng.normal(1.0, 0.02, 5), rng.normal(0.97, 0.02, 4)
    noise = Noise.pooled([runs(1, a), runs(2, b)])
    assert noise.df == 7
    pooled_var = ((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / 7
    assert noise.sd == pytest.approx(np.sqrt(pooled_var))
    decision = significance_test(runs(2, b), runs(1, a), noise, alpha=0.05)
    expected = stats.ttest_ind(a, b, equal_var=True, alternative="greater")  # a's mean larger: b is better
    assert f"t = {expected.statistic:.2f}" in decision.reason
    assert decision.keep == (expected.pvalue < 0.05)
    # Pooling more groups in one step or two gives the same estimate.
    c = rng.normal(1.1, 0.02, 3)
    assert Noise.pooled([runs(1, a)]).with_runs(runs(2, b), runs(3, c)).sd == \
        pytest.approx(Noise.pooled([runs(1, a), runs(2, b), runs(3, c)]).sd)
    assert Noise.pooled([runs(1, [1.0])]) == Noise(None, 0)  # one run says nothing about the noise


def test_a_train_py_that_ignores_the_seed_is_detected():
    assert runs(1, [1.25, 1.25, 1.25], seeds=[10, 11, 12]).ignores_seed
    assert not runs(1, [1.25, 1.2501, 1.25], seeds=[10, 11, 12]).ignores_seed
    assert not runs(1, [1.25, 1.25], seeds=[10, 10]).ignores_seed  # the same seed twice: nothing learnt
    assert not runs(1, [1.25]).ignores_seed
    # With no noise at all, a strict gain is real and a tie is not.
    silent = Noise.pooled([runs(1, [1.25, 1.25, 1.25])])
    assert silent.sd == 0.0
    assert significance_test(runs(2, [1.24] * 3), runs(1, [1.25] * 3), silent, 0.05).keep
    assert not significance_test(runs(2, [1.25] * 3), runs(1, [1.25] * 3), silent, 0.05).keep


def test_runs_count_scored_replicates_only():
    experiment = Experiment(id=4, metric=1.0, seed=5, **ROW)
    scored = Experiment(id=5, metric=1.1, seed=6, replicate_of=4, **{**ROW, "status": "replicate"})
    crashed = Experiment(id=6, metric=None, seed=7, replicate_of=4, **{**ROW, "status": "crash"})
    found = Runs.of(experiment, [scored, crashed])
    assert found.metrics == (1.0, 1.1) and found.seeds == (5, 6) and found.mean == pytest.approx(1.05)


def null_session(rule: str, rng: np.random.Generator, candidates: int, k: int = 3, alpha: float = 0.05) -> int:
    """One session of null changes under a keep rule, as the experiment job runs it: keeps among the candidates."""
    def draw(n: int) -> np.ndarray:  # every variant is the same code: one mean, the same noise
        return rng.normal(1.0, 0.01, n)

    base = runs(0, draw(k if rule == "significant" else 1))  # the baseline and its noise floor
    groups, keeps = [base], 0
    for i in range(1, candidates + 1):
        first = float(draw(1)[0])
        if rule == "better":
            if first < base.metrics[0]:
                keeps, base = keeps + 1, runs(i, [first])
            continue
        noise = Noise.pooled(groups)
        if screen(first, base, noise):
            continue
        candidate = runs(i, [first, *draw(k - 1)])
        groups.append(candidate)
        if significance_test(candidate, base, noise.with_runs(candidate), alpha).keep:
            keeps, base = keeps + 1, candidate
    return keeps


def test_null_changes_are_kept_often_by_better_and_at_most_one_in_twenty_by_significant():
    rng = np.random.default_rng(2026)
    sessions, candidates = 400, 25
    better = sum(null_session("better", rng, candidates) for _ in range(sessions)) / (sessions * candidates)
    significant = sum(null_session("significant", rng, candidates) for _ in range(sessions)) / (sessions * candidates)
    # Greedy keeping of noise: the expected number of records in 25 draws after the first is H(26) - 1 = 2.85.
    assert 0.08 < better < 0.16, better
    # The t-test's level bounds it (the screen only removes keeps); 10,000 candidates: a standard error of 0.002.
    assert significant <= 0.05, significant
    assert significant > 0  # the rule keeps when the evidence says so: it is not a rule that never keeps


def test_a_real_gain_is_kept_by_significant():
    rng = np.random.default_rng(3)
    base = runs(0, rng.normal(1.0, 0.01, 3))
    noise = Noise.pooled([base])
    first = 0.95
    assert screen(first, base, noise) is None
    candidate = runs(1, [first, *rng.normal(0.95, 0.01, 2)])
    decision = significance_test(candidate, base, noise.with_runs(candidate), 0.05)
    assert decision.keep and "significant" in decision.reason
    within = screen(float(base.mean) - 0.5 * noise.sd, base, noise)
    assert within is not None and not within.keep and "within the noise" in within.reason


def test_significant_needs_replicates_and_new_labs_use_it(tmp_path):
    with pytest.raises(ConfigError, match="noise_seeds of 2 or more"):
        apply_overrides(LabConfig(), keep_rule="significant", noise_seeds=1)
    from harness.config import load_config
    from harness.lab import init_lab

    init_lab(tmp_path / "lab")
    config = load_config(tmp_path / "lab")
    assert config.keep_rule == "significant" and config.noise_seeds == 3 and config.significance == 0.05
    assert LabConfig().keep_rule == "better"  # a labrat.toml without the key (an older lab) keeps its rule


def test_an_older_ledger_gains_the_replicate_status_and_keeps_its_rows(tmp_path):
    path = tmp_path / "ledger.db"
    old = sqlite3.connect(path)
    old_schema = SCHEMA.replace(", 'replicate')", ")")
    for column in ("seed INTEGER,", "replicate_of INTEGER REFERENCES experiments(id),", "decision TEXT,"):
        old_schema = old_schema.replace(f"    {column}\n", "")
    assert "'replicate'" not in old_schema and "replicate_of" not in old_schema
    old.executescript(old_schema)
    old.execute("INSERT INTO sessions (id, started_at, agent, config_json) VALUES ('s', 'now', 'offline', '{}')")
    old.execute("INSERT INTO experiments (session_id, status, description, metric, started_at) "
                "VALUES ('s', 'keep', 'baseline', 1.25, 'now')")
    old.execute("INSERT INTO tool_calls (session_id, experiment_id, name, input_json, output, is_error, seconds, "
                "created_at) VALUES ('s', 1, 'bash', '{}', 'ok', 0, 0.1, 'now')")
    old.execute("UPDATE sessions SET base_experiment_id = 1")
    old.commit()
    old.close()

    with Ledger(path) as ledger:
        assert ledger.experiment(1).metric == 1.25 and ledger.session("s").base_experiment_id == 1
        replicate = ledger.begin_experiment("s", None, "noise floor 1/1 of #1", replicate_of=1)
        ledger.finish_experiment(replicate, "replicate", metric=1.26, seed=1339)
        assert [r.metric for r in ledger.replicates(1)] == [1.26]
        assert ledger.db.execute("SELECT count(*) FROM tool_calls WHERE experiment_id = 1").fetchone()[0] == 1
        assert ledger.db.execute("PRAGMA foreign_key_check").fetchall() == []
        assert ledger.meta("schema_version") == "4"
    with Ledger(path) as again:  # opening a migrated ledger changes nothing
        assert [e.status for e in again.experiments()] == ["keep", "replicate"]


def test_the_research_programs_constraints_discard_with_the_reason():
    import json

    from harness.experiment import frame_broken

    fields = {"eval_json": json.dumps({"parameters": 460_000}), "memory_bytes": 3 * 1024**3,
              "summary_json": json.dumps({"tokens_per_s": 20_000.0})}
    assert frame_broken(LabConfig(), fields) is None  # no frame set: nothing to break
    within = LabConfig(max_params=500_000, max_memory_gb=3.5, min_tokens_per_second=10_000)
    assert frame_broken(within, fields) is None
    assert frame_broken(within.model_copy(update={"max_params": 100_000}), fields) == \
        "broke max_params: 460,000 weights > 100,000"
    assert frame_broken(within.model_copy(update={"max_memory_gb": 2}), fields) == \
        "broke max_memory_gb: peak 3.00 GB > 2 GB"
    assert frame_broken(within.model_copy(update={"min_tokens_per_second": 50_000}), fields) == \
        "broke min_tokens_per_second: 20,000 tokens/s reported < 50000"
    for claimed, shown in ((float("nan"), "nan"), ("fast", "no"), (True, "no"), (None, "no")):  # not a rate
        lying = {**fields, "summary_json": json.dumps({"tokens_per_s": claimed})}
        assert frame_broken(within, lying).startswith(f"broke min_tokens_per_second: {shown} tokens/s"), claimed
