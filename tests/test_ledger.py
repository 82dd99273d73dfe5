"""The ledger on a real SQLite file: transactions, recovery after a kill, results.tsv."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from harness.ledger import Ledger

ROOT = Path(__file__).parent.parent


@pytest.fixture
def ledger(tmp_path):
    ledger = Ledger(tmp_path / "ledger.db")
    ledger.start_session("s1", agent="offline", model=None, config={"budget": 30})
    yield ledger
    ledger.close()


def test_experiment_lifecycle_and_best(ledger):
    a = ledger.begin_experiment("s1", None, "baseline")
    ledger.finish_experiment(a, "keep", metric=1.5, snapshot="s1-e1", memory_bytes=2 * 1024**3, seconds=31.0)
    b = ledger.begin_experiment("s1", a, "wider\tmodel\nwith newline")
    ledger.finish_experiment(b, "discard", metric=1.7)
    c = ledger.begin_experiment("s1", a, "lr x2")
    ledger.finish_experiment(c, "keep", metric=1.2)
    assert ledger.best().id == c
    assert [e.parent_id for e in ledger.experiments()] == [None, a, a]
    with pytest.raises(ValueError, match="not running"):
        ledger.finish_experiment(a, "discard")
    with pytest.raises(ValueError, match="unknown experiment fields"):
        ledger.finish_experiment(ledger.begin_experiment("s1", c, "x"), "crash", bogus=1)


def test_the_best_is_the_lowest_mean_of_runs_not_a_lucky_first_run(ledger):
    base = ledger.begin_experiment("s1", None, "baseline")
    ledger.finish_experiment(base, "keep", metric=1.5)
    lucky = ledger.begin_experiment("s1", base, "lucky first run")
    ledger.finish_experiment(lucky, "keep", metric=1.2)
    for metric in (1.45, 1.46):  # its confirmations: mean of runs 1.37
        ledger.finish_experiment(ledger.begin_experiment("s1", base, "confirm", replicate_of=lucky), "replicate",
                                 metric=metric)
    steady = ledger.begin_experiment("s1", lucky, "steady")
    ledger.finish_experiment(steady, "keep", metric=1.3)
    a_crashed_replicate = ledger.begin_experiment("s1", lucky, "confirm", replicate_of=steady)
    ledger.finish_experiment(a_crashed_replicate, "crash")  # no metric: not a run
    assert ledger.best().id == steady
    ledger.finish_experiment(ledger.begin_experiment("s1", lucky, "confirm", replicate_of=steady), "replicate",
                             metric=1.6)  # steady's mean becomes 1.45: worse than lucky's 1.37
    assert ledger.best().id == lucky


def test_results_tsv_has_autoresearchs_columns(ledger):
    e = ledger.begin_experiment("s1", None, "tabs\tand\nnewlines")
    ledger.finish_experiment(e, "keep", metric=0.987654321, memory_bytes=int(44.2 * 1024**3), snapshot="lab1-e00001",
                              snapshot_image_id="sha256:abcdef1234567890")
    ledger.begin_experiment("s1", e, "still running")
    lines = ledger.results_tsv().splitlines()
    assert lines[0].split("\t") == ["commit", "val_bpb", "memory_gb", "status", "description"]
    assert lines[1].split("\t") == ["abcdef123456", "0.987654", "44.2", "keep", "tabs and newlines"]
    assert len(lines) == 2  # the running experiment is not a result yet


def test_a_kill_mid_transaction_loses_nothing_and_leaves_no_half_row(ledger, tmp_path):
    done = ledger.begin_experiment("s1", None, "finished before the kill")
    ledger.finish_experiment(done, "keep", metric=1.0)
    script = (
        "import os, signal, sys\n"
        "from harness.ledger import Ledger\n"
        "l = Ledger(sys.argv[1])\n"
        "e = l.begin_experiment('s1', None, 'in flight')\n"
        "l.db.execute('BEGIN IMMEDIATE')\n"
        "l.db.execute(\"UPDATE experiments SET status='keep', metric=0.1 WHERE id=?\", (e,))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ledger.db")], cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL
    reopened = Ledger(tmp_path / "ledger.db")
    statuses = {e.description: (e.status, e.metric) for e in reopened.experiments()}
    assert statuses["finished before the kill"] == ("keep", 1.0)
    assert statuses["in flight"] == ("running", None)  # the uncommitted update vanished
    assert reopened.recover_interrupted() == [e.id for e in reopened.experiments() if e.description == "in flight"]
    assert {e.status for e in reopened.experiments()} == {"keep", "crash"}
    assert reopened.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    reopened.close()


def test_a_version_1_ledger_is_upgraded_in_place(tmp_path):
    """A ledger written by the first release (no session base, no sources) opens and keeps its rows."""
    import sqlite3

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        CREATE TABLE sessions (id TEXT PRIMARY KEY, started_at TEXT NOT NULL, ended_at TEXT, agent TEXT NOT NULL,
                               model TEXT, config_json TEXT NOT NULL, stop_reason TEXT);
        CREATE TABLE experiments (id INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT NOT NULL, parent_id INTEGER,
            status TEXT NOT NULL, description TEXT NOT NULL, snapshot TEXT, snapshot_image_id TEXT, diff TEXT,
            metric REAL, floor_gap REAL, memory_bytes INTEGER, seconds REAL, tokens_in INTEGER NOT NULL DEFAULT 0,
            tokens_out INTEGER NOT NULL DEFAULT 0, cost_usd REAL NOT NULL DEFAULT 0, log_tail TEXT, summary_json TEXT,
            started_at TEXT NOT NULL, finished_at TEXT);
        INSERT INTO sessions VALUES ('old', '2026-01-01', NULL, 'offline', NULL, '{}', NULL);
        INSERT INTO experiments (session_id, status, description, metric, started_at)
            VALUES ('old', 'keep', 'baseline', 1.5, '2026-01-01');
    """)
    db.close()
    ledger = Ledger(path)
    assert ledger.meta("schema_version") == "4"
    assert ledger.experiment(1).metric == 1.5 and ledger.experiment(1).timings_json is None
    assert ledger.experiment(1).lane == 0 and ledger.lane_base("old", 1) is None  # lanes came with version 4
    assert ledger.session("old").resumable and ledger.session("old").base_experiment_id is None
    b = ledger.begin_experiment("old", 1, "wider")
    assert ledger.finish_experiment(b, "keep", metric=1.2, sources_json="{}").metric == 1.2
    assert ledger.session("old").base_experiment_id == b  # a keep moves the base in the same transaction
    ledger.close()


def test_sources_lineage_and_the_running_experiment(tmp_path):
    """The named queries: 0 is the lab's starting point (its first session's), an experiment that recorded no
    sources has its own session's, lineage runs oldest first, and the ledger closes as a context manager."""
    with Ledger(tmp_path / "ledger.db") as ledger:
        ledger.start_session("s1", agent="offline", model=None, config={})
        ledger.set_root_sources("s1", {"train.py": "shipped\n"})
        a = ledger.begin_experiment("s1", None, "baseline")
        ledger.finish_experiment(a, "keep", metric=1.0, sources_json='{"train.py": "a\\n"}')
        ledger.start_session("s2", agent="offline", model=None, config={}, base_experiment_id=a)
        ledger.set_root_sources("s2", {"train.py": "a\n"})
        b = ledger.begin_experiment("s2", a, "crashed before its sources were read")
        assert ledger.running_experiment_id("s2") == b and ledger.running_experiment_id("s1") is None
        ledger.finish_experiment(b, "crash")
        c = ledger.begin_experiment("s2", b, "c")
        ledger.finish_experiment(c, "discard", metric=1.1, sources_json='{"train.py": "c\\n"}')
        assert ledger.sources(0) == {"train.py": "shipped\n"}
        assert ledger.sources(b) == {"train.py": "a\n"}  # s2's starting point, not s1's
        assert ledger.sources(c) == {"train.py": "c\n"}
        assert [e.id for e in ledger.lineage(c)] == [a, b, c]
        with pytest.raises(KeyError):
            ledger.sources(99)
    with pytest.raises(Exception, match="closed"):
        ledger.experiments()
