"""The lab's disk fills up for real (the lab lives on a small tmpfs, then a filler takes every byte left):
`labrat run` stops with one line saying so, the ledger passes SQLite's integrity check and keeps every
finished experiment, and once space is freed the next run goes on."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest

from harness.ledger import Ledger
from sandbox.snapshots import SnapshotStore
from tests.adversarial.conftest import ledger_rows
from tests.conftest import LABRAT, make_lab



@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI must run as root to mount a small filesystem for the lab")
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def labrat_run(lab: Path, n: int) -> subprocess.CompletedProcess:
    return subprocess.run([LABRAT, "run", "--lab", str(lab), "--max-experiments", str(n)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "LABRAT_LOG_LEVEL": "warning"})


def fill(disk: Path) -> Path:
    """Write until the filesystem refuses: ENOSPC for real, not simulated."""
    filler = disk / "filler"
    with contextlib.suppress(OSError), open(filler, "wb") as f:
        while True:
            f.write(b"\0" * (1 << 20))
            f.flush()
    with contextlib.suppress(OSError), open(filler, "ab") as f:  # the last partial MiB
        while True:
            f.write(b"\0" * 4096)
            f.flush()
    return filler


def rows(lab: Path) -> list[dict]:
    keys = ("id", "status", "metric", "snapshot")
    return [{key: e[key] for key in keys} for e in ledger_rows(lab)[0]]


def test_a_full_lab_disk_is_one_clear_error_and_the_ledger_survives(small_disk):
    lab = small_disk / "lab"
    lab.mkdir()
    make_lab(lab, max_experiments=100)
    first = labrat_run(lab, 1)
    assert first.returncode == 0, first.stderr[-2000:]
    before = rows(lab)
    assert [e["status"] for e in before] == ["keep"]

    filler = fill(small_disk)
    assert os.statvfs(small_disk).f_bavail == 0
    full = labrat_run(lab, 3)
    assert full.returncode == 2, full.stderr[-3000:]
    assert "Traceback" not in full.stderr + full.stdout, full.stderr[-3000:]
    errors = [line for line in full.stderr.splitlines() if line.startswith("labrat: error:")]
    assert len(errors) == 1 and "disk is full" in errors[0] and "resumes" in errors[0], full.stderr[-3000:]
    after = rows(lab)
    assert after[: len(before)] == before  # nothing finished was lost or rewritten
    assert all(e["status"] != "keep" or e["metric"] is not None for e in after)

    filler.unlink()
    resumed = labrat_run(lab, 3)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = rows(lab)
    assert final[: len(before)] == before
    assert not [e for e in final if e["status"] == "running"]
    assert [e for e in final[len(before):] if e["status"] in ("keep", "discard")], final
    ledger = Ledger(lab / "ledger.db")
    try:
        assert (lab / "results.tsv").read_text() == ledger.results_tsv()
        lab_id = ledger.meta("lab_id")
    finally:
        ledger.close()
    SnapshotStore().gc(keep=[], name_prefix=lab_id)
