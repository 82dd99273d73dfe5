"""Reproduce, rollback, export/import, regress, gc, plot and report on a real 20-experiment offline session."""

import json
import os
import subprocess
import tarfile
from pathlib import Path
from xml.etree import ElementTree

import pytest

from harness.ledger import Ledger
from sandbox.engine import client
from sandbox.snapshots import SnapshotStore
from tests.conftest import LABRAT, make_lab



def labrat(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([LABRAT, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "LABRAT_LOG_LEVEL": "warning"})


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = make_lab(tmp_path_factory.mktemp("repro") / "lab", deterministic_steps=10, eval_tokens=2048,
                   max_experiments=20)
    run = labrat("run", "--lab", str(lab), timeout=1800)
    assert run.returncode == 0, run.stderr[-2000:]
    yield lab
    ledger = Ledger(lab / "ledger.db")
    lab_id = ledger.meta("lab_id")
    ledger.close()
    SnapshotStore().gc(keep=[], name_prefix=f"{lab_id}-")


def experiments(lab: Path):
    ledger = Ledger(lab / "ledger.db")
    try:
        return ledger.experiments(), ledger.best()
    finally:
        ledger.close()


def test_the_best_of_twenty_reproduces_bit_identically(lab):
    rows, best = experiments(lab)
    assert len(rows) == 20 and best is not None
    done = labrat("reproduce", str(best.id), "--lab", str(lab))
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"recorded {best.metric:.6f}, reproduced {best.metric:.6f}: OK, bit-identical" in done.stdout


def test_regress_passes_on_the_best_and_fails_on_a_worse_variant(lab, tmp_path):
    rows, best = experiments(lab)
    passed = labrat("regress", "--best", "--lab", str(lab), "--junit", str(tmp_path / "pass.xml"))
    assert passed.returncode == 0 and "PASS" in passed.stdout
    suite = ElementTree.parse(tmp_path / "pass.xml").getroot()
    assert suite.get("failures") == "0" and suite.find("testcase").get("name") == f"experiment-{best.id}"

    worse = max((e for e in rows if e.metric is not None), key=lambda e: e.metric)
    assert worse.metric > best.metric
    failed = labrat("regress", str(worse.id), "--baseline", repr(best.metric), "--lab", str(lab),
                    "--junit", str(tmp_path / "fail.xml"))
    assert failed.returncode == 1 and "misses the baseline" in failed.stderr
    failure = ElementTree.parse(tmp_path / "fail.xml").getroot().find("testcase/failure")
    assert failure is not None and f"#{worse.id} misses the baseline" in failure.get("message")


def test_rollback_makes_the_next_session_start_there(lab):
    rows, best = experiments(lab)
    target = next(e for e in rows if e.status == "discard")
    rolled = labrat("rollback", str(target.id), "--lab", str(lab))
    assert rolled.returncode == 0 and f"starts from #{target.id}" in rolled.stdout
    again = labrat("run", "--lab", str(lab), "--max-experiments", "1")
    assert again.returncode == 0, again.stderr[-2000:]
    rows_after, _ = experiments(lab)
    assert rows_after[-1].parent_id == target.id  # branched from the rolled-back-to experiment: a tree
    assert labrat("rollback", "9999", "--lab", str(lab)).returncode == 2


def test_export_remove_import_elsewhere_and_reproduce(lab, tmp_path):
    _, best = experiments(lab)
    bundle = tmp_path / "best.tar"
    exported = labrat("export", str(best.id), "-o", str(bundle), "--lab", str(lab))
    assert exported.returncode == 0, exported.stderr
    snapshot = SnapshotStore().get(best.snapshot)
    client().images.remove(snapshot.ref)  # the image id may stay if a child snapshot uses it
    other = tmp_path / "other-lab"
    imported = labrat("import", str(bundle), "--lab", str(other))
    assert imported.returncode == 0, imported.stderr
    [line] = [line for line in imported.stdout.splitlines() if line.startswith("imported")]
    new_id = int(line.split(" as #")[1].split(":")[0])
    assert SnapshotStore().get(best.snapshot).image_id == best.snapshot_image_id
    redone = labrat("reproduce", str(new_id), "--lab", str(other))
    assert redone.returncode == 0 and "bit-identical" in redone.stdout, redone.stderr[-2000:]

    tampered = tmp_path / "tampered.tar"
    with tarfile.open(bundle) as src, tarfile.open(tampered, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name == "manifest.json":
                manifest = json.loads(data)
                manifest["extra"]["experiments"][-1]["metric"] = 0.001  # a better number than was measured
                data = json.dumps(manifest).encode()
                member.size = len(data)
            import io

            dst.addfile(member, io.BytesIO(data))
    refused = labrat("import", str(tampered), "--lab", str(tmp_path / "third-lab"))
    assert refused.returncode == 2 and "checksum mismatch" in refused.stderr and "Traceback" not in refused.stderr


def test_gc_removes_discards_and_keeps_what_must_restore(lab):
    rows, best = experiments(lab)
    store = SnapshotStore()
    dry = labrat("gc", "--dry-run", "--lab", str(lab))
    assert dry.returncode == 0 and "would remove" in dry.stdout
    discarded = [e for e in rows if e.status in ("discard", "crash") and e.snapshot]
    assert all(store.get(e.snapshot) for e in discarded)  # a dry run removes nothing
    done = labrat("gc", "--lab", str(lab))
    assert done.returncode == 0, done.stderr
    ledger = Ledger(lab / "ledger.db")
    rows = ledger.experiments()  # with the rollback test's branch
    needed = {s.base_experiment_id for s in ledger.sessions()} | {e.id for e in rows if e.status == "keep"}
    ledger.close()
    by_id = {e.id: e for e in rows}
    for e in list(needed):  # ancestors of what stays must stay, or it could not be restored
        while (e := by_id[e].parent_id) is not None:
            needed.add(e)
    for e in rows:
        if e.id in needed:
            assert store.get(e.snapshot)  # still restorable
            assert e.snapshot not in done.stdout
        elif e.snapshot:
            assert e.snapshot in done.stdout
    bases = needed
    with store.restore(best.snapshot, session=f"pytest{os.getpid()}") as box:
        assert box.read_text("trainer/train.py") == json.loads(best.sources_json)["trainer/train.py"]
    gone = next(e for e in discarded if e.id not in bases)
    refused = labrat("reproduce", str(gone.id), "--lab", str(lab))
    assert refused.returncode == 2 and "is gone" in refused.stderr


def test_plot_and_report(lab, tmp_path):
    from harness.reports import plot

    rows, best = experiments(lab)
    series = plot(lab, tmp_path / "progress.png")
    data = (tmp_path / "progress.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    scored = [e for e in rows if e.metric is not None]
    assert series.ids == [e.id for e in scored] and series.metrics == [e.metric for e in scored]
    assert series.kept_ids == [e.id for e in scored if e.status == "keep"]
    assert series.running_best[-1] == best.metric and series.running_best == sorted(series.running_best, reverse=True)
    assert series.floor_bpb is not None and series.floor_bpb < min(series.metrics)
    cli_plot = labrat("plot", "-o", str(tmp_path / "cli.png"), "--lab", str(lab))
    assert cli_plot.returncode == 0 and (tmp_path / "cli.png").read_bytes()[:4] == b"\x89PNG"

    report = labrat("report", "--lab", str(lab)).stdout
    assert f"#{best.id}: val_bpb **{best.metric:.6f}**" in report
    assert "## Lineage of kept changes" in report and "```diff" in report
    assert best.description in report


def test_reproduce_refuses_under_another_evaluator(lab, monkeypatch):
    """A labrat whose evaluation code differs must not claim to reproduce a result. A second labrat version
    cannot be installed inside a test, so this one stands in by reporting another evaluator hash."""
    import harness.reproduce
    from harness.config import ConfigError

    _, best = experiments(lab)
    monkeypatch.setattr(harness.reproduce, "evaluator_sha256", lambda: "0" * 64)
    with pytest.raises(ConfigError, match="evaluated by evaluator .* this labrat has 000000000000"):
        harness.reproduce.reproduce(lab, best.id)
