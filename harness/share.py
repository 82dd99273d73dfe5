"""Experiments as portable bundles: `labrat export ID -o FILE [--lineage]`, `labrat import FILE`.

A bundle is one tar (sandbox/snapshots.py's format): `docker save` of the snapshot images and a
manifest with their checksum and, as checksummed metadata, the experiments' ledger rows and the
configuration of the sessions that ran them: everything `labrat reproduce` needs on another engine.
"""

from __future__ import annotations

from pathlib import Path

from harness.config import ConfigError
from harness.lab import ensure_lab, experiment_or_error, lab_locked, open_ledger
from harness.ledger import Experiment, Imported, SessionRow
from sandbox.snapshots import SnapshotStore

BUNDLE_KIND = "labrat-experiments/1"


def export_experiment(lab: Path, experiment_id: int, path: Path, lineage: bool = False) -> list[Experiment]:
    """Write ID (and with `lineage` every ancestor) to `path`; returns the experiments written, oldest first."""
    with open_ledger(lab) as ledger:
        experiment_or_error(ledger, experiment_id)
        chain = ledger.lineage(experiment_id) if lineage else [ledger.experiment(experiment_id)]
        for e in chain:
            if not e.snapshot:
                raise ConfigError(f"experiment #{e.id} has no snapshot ({e.status}): nothing to export")
        sessions = {e.session_id: ledger.session(e.session_id).model_dump() for e in chain}
        extra = {"kind": BUNDLE_KIND, "lab_id": ledger.meta("lab_id"),
                 "experiments": [e.model_dump() for e in chain], "sessions": sessions}
    SnapshotStore().export([e.snapshot for e in chain], path, extra=extra)
    return chain


def import_bundle(lab: Path, path: Path) -> list[Imported]:
    """Load a bundle's snapshots and add its experiments to the lab's ledger (new ids, parents mapped)."""
    ensure_lab(lab)
    with lab_locked(lab):
        _, extra = SnapshotStore().import_(path)  # verifies both checksums first
        if extra.get("kind") != BUNDLE_KIND:
            raise ConfigError(f"{path} holds snapshots but no labrat experiments (made by `SnapshotStore.export`?)")
        with open_ledger(lab) as ledger:
            imported = ledger.add_imported([SessionRow(**raw) for raw in extra["sessions"].values()],
                                           [Experiment(**raw) for raw in extra["experiments"]], Path(path).name)
            ledger.record_event(None, "import", file=str(path), experiments=[i.id for i in imported])
            return imported
