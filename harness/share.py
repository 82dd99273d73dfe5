"""Experiments as portable bundles: `labrat export ID -o FILE [--lineage]`, `labrat import FILE`.

A bundle is one tar (sandbox/snapshots.py's format): `docker save` of the snapshot images and a
manifest with their checksum and, as checksummed metadata, the experiments' ledger rows and the
configuration of the sessions that ran them: everything `labrat reproduce` needs on another engine.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel

from harness.config import ConfigError
from harness.lab import ensure_lab, experiment_or_error, lock_lab, open_ledger
from harness.ledger import Experiment, Session
from sandbox.snapshots import SnapshotStore

BUNDLE_KIND = "labrat-experiments/1"


class Imported(BaseModel):
    original_id: int
    id: int
    description: str
    new: bool  # False when the lab already had this experiment (same snapshot image)


def export_experiment(lab: Path, experiment_id: int, path: Path, lineage: bool = False) -> list[Experiment]:
    """Write ID (and with `lineage` every ancestor) to `path`; returns the experiments written, oldest first."""
    ledger = open_ledger(lab)
    try:
        chain = [experiment_or_error(ledger, experiment_id)]
        while lineage and chain[-1].parent_id is not None:
            chain.append(ledger.experiment(chain[-1].parent_id))
        chain.reverse()
        for e in chain:
            if not e.snapshot:
                raise ConfigError(f"experiment #{e.id} has no snapshot ({e.status}): nothing to export")
        sessions = {e.session_id: ledger.session(e.session_id).model_dump() for e in chain}
        extra = {"kind": BUNDLE_KIND, "lab_id": ledger.meta("lab_id"),
                 "experiments": [e.model_dump() for e in chain], "sessions": sessions}
    finally:
        ledger.close()
    SnapshotStore().export([e.snapshot for e in chain], path, extra=extra)
    return chain


def import_bundle(lab: Path, path: Path) -> list[Imported]:
    """Load a bundle's snapshots and add its experiments to the lab's ledger (new ids, parents mapped)."""
    ensure_lab(lab)
    fd = lock_lab(lab)
    try:
        _, extra = SnapshotStore().import_(path)  # verifies both checksums first
        if extra.get("kind") != BUNDLE_KIND:
            raise ConfigError(f"{path} holds snapshots but no labrat experiments (made by `SnapshotStore.export`?)")
        ledger = open_ledger(lab)
        try:
            return _add_rows(ledger, extra, path)
        finally:
            ledger.close()
    finally:
        os.close(fd)


def _add_rows(ledger, extra: dict, path: Path) -> list[Imported]:
    imported: list[Imported] = []
    new_ids: dict[int, int] = {}
    with ledger.transaction() as db:
        for raw in extra["sessions"].values():
            session = Session(**raw)
            db.execute(
                "INSERT OR IGNORE INTO sessions (id, started_at, ended_at, agent, model, config_json, stop_reason,"
                " resumable, root_sources_json) VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?)",
                (session.id, session.started_at, session.ended_at or session.started_at, session.agent, session.model,
                 session.config_json, f"imported from {Path(path).name}", session.root_sources_json))
        for raw in extra["experiments"]:
            e = Experiment(**raw)
            row = db.execute("SELECT id FROM experiments WHERE snapshot_image_id = ?", (e.snapshot_image_id,)).fetchone()
            if row:
                new_ids[e.id] = row["id"]
                imported.append(Imported(original_id=e.id, id=row["id"], description=e.description, new=False))
                continue
            fields = e.model_dump(exclude={"id"})
            fields["parent_id"] = new_ids.get(e.parent_id) if e.parent_id is not None else None
            columns = ", ".join(fields)
            cursor = db.execute(f"INSERT INTO experiments ({columns}) VALUES ({', '.join('?' * len(fields))})",
                                tuple(fields.values()))
            new_ids[e.id] = int(cursor.lastrowid)
            imported.append(Imported(original_id=e.id, id=new_ids[e.id], description=e.description, new=True))
    ledger.record_event(None, "import", file=str(path), experiments=[i.id for i in imported])
    return imported
