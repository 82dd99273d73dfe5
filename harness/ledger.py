"""The ledger: one SQLite file per lab (WAL), the record of sessions, experiments and tool calls.

Every experiment is written in one transaction when it ends; an experiment is first inserted as
`running`, so a harness killed mid-experiment leaves a row that the next start marks `crash`
(never a half-written result). `results.tsv` is exported with autoresearch's columns.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from harness import failpoints

Verdict = Literal["keep", "discard", "crash", "timeout"]  # how an experiment ended
# An experiment row: running, then its verdict; a replicate (another seed's run of an experiment's snapshot,
# for the noise floor or a confirmation) ends as `replicate` when it was scored.
Status = Literal["running", "keep", "discard", "crash", "timeout", "replicate"]
SCHEMA_VERSION = 4  # 3: the replicate status (the experiments table is rebuilt: SQLite cannot alter a CHECK); 4: lanes
# Columns added after version 1: a ledger made by an older labrat gets them on open (ALTER TABLE ADD COLUMN).
ADDED_COLUMNS = {
    "sessions": ["resumable INTEGER NOT NULL DEFAULT 1", "base_experiment_id INTEGER REFERENCES experiments(id)",
                 "root_sources_json TEXT"],
    "experiments": ["eval_json TEXT", "sources_json TEXT", "train_seconds REAL", "timings_json TEXT",
                    "compile_cache TEXT", "hypothesis TEXT", "expected_delta REAL", "seed INTEGER",
                    "replicate_of INTEGER REFERENCES experiments(id)", "decision TEXT", "lane INTEGER NOT NULL DEFAULT 0"],
}
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    started_at TEXT NOT NULL,
    ended_at TEXT,
    agent TEXT NOT NULL,
    model TEXT,
    config_json TEXT NOT NULL,
    stop_reason TEXT,
    resumable INTEGER NOT NULL DEFAULT 1,
    base_experiment_id INTEGER REFERENCES experiments(id),
    root_sources_json TEXT
);
CREATE TABLE IF NOT EXISTS experiments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL REFERENCES sessions(id),
    parent_id INTEGER REFERENCES experiments(id),
    status TEXT NOT NULL CHECK (status IN ('running', 'keep', 'discard', 'crash', 'timeout', 'replicate')),
    description TEXT NOT NULL,
    snapshot TEXT,
    snapshot_image_id TEXT,
    diff TEXT,
    metric REAL,
    floor_gap REAL,
    memory_bytes INTEGER,
    seconds REAL,
    tokens_in INTEGER NOT NULL DEFAULT 0,
    tokens_out INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0,
    log_tail TEXT,
    summary_json TEXT,
    eval_json TEXT,
    sources_json TEXT,
    train_seconds REAL,
    timings_json TEXT,
    compile_cache TEXT,
    hypothesis TEXT,
    expected_delta REAL,
    seed INTEGER,
    replicate_of INTEGER REFERENCES experiments(id),
    decision TEXT,
    lane INTEGER NOT NULL DEFAULT 0,
    started_at TEXT NOT NULL,
    finished_at TEXT
);
CREATE TABLE IF NOT EXISTS tool_calls (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL REFERENCES sessions(id),
    experiment_id INTEGER REFERENCES experiments(id),
    name TEXT NOT NULL,
    input_json TEXT NOT NULL,
    output TEXT NOT NULL,
    is_error INTEGER NOT NULL,
    seconds REAL NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT,
    kind TEXT NOT NULL,
    detail_json TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS experiments_by_session ON experiments(session_id, id);
CREATE TABLE IF NOT EXISTS lane_bases (
    session_id TEXT NOT NULL REFERENCES sessions(id),
    lane INTEGER NOT NULL CHECK (lane > 0),
    base_experiment_id INTEGER REFERENCES experiments(id),
    PRIMARY KEY (session_id, lane)
);
"""


TOOL_INPUT_CHARS = 100_000


def _bounded_json(value) -> str:
    """JSON of a tool input, still valid JSON when the input is too large to keep whole."""
    text = json.dumps(value, default=str)
    if len(text) <= TOOL_INPUT_CHARS:
        return text
    return json.dumps({"labrat_truncated": True, "chars": len(text), "head": text[:TOOL_INPUT_CHARS]})


def _set_lane_base(db: sqlite3.Connection, session_id: str, lane: int, experiment_id: int | None) -> None:
    if lane == 0:
        db.execute("UPDATE sessions SET base_experiment_id = ? WHERE id = ?", (experiment_id, session_id))
    else:
        db.execute("INSERT INTO lane_bases (session_id, lane, base_experiment_id) VALUES (?, ?, ?) ON CONFLICT "
                   "(session_id, lane) DO UPDATE SET base_experiment_id = excluded.base_experiment_id",
                   (session_id, lane, experiment_id))


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


class Experiment(BaseModel):
    id: int
    session_id: str
    parent_id: int | None
    status: Status
    description: str
    snapshot: str | None = None
    snapshot_image_id: str | None = None
    diff: str | None = None
    metric: float | None = None
    floor_gap: float | None = None
    memory_bytes: int | None = None
    seconds: float | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    log_tail: str | None = None
    summary_json: str | None = None  # training's own summary.json (informational: written by the agent's code)
    eval_json: str | None = None  # the protected evaluation's result
    sources_json: str | None = None  # {path: text} of the workspace's source files at this experiment
    train_seconds: float | None = None  # wall-clock seconds of the training process, host clock
    timings_json: str | None = None  # {phase: seconds}: snapshot, train_start, train, eval_start, eval, ...
    compile_cache: str | None = None  # off | cold | warm: whether training started with the lab's compile cache
    hypothesis: str | None = None  # the agent's, stated before the result: what the change should do, and why
    expected_delta: float | None = None  # the agent's expected change of val_bpb against the parent (negative: better)
    seed: int | None = None  # the harness's training seed for this run (None: an older labrat, the lab's seed)
    replicate_of: int | None = None  # this row re-ran that experiment's snapshot with another seed
    decision: str | None = None  # why the keep rule decided as it did (the significance test, the noise floor)
    lane: int = 0  # which of the session's lanes (agents in parallel, each with its own base) ran it
    started_at: str
    finished_at: str | None = None


class SessionRow(BaseModel):
    id: str
    started_at: str
    ended_at: str | None
    agent: str
    model: str | None
    config_json: str
    stop_reason: str | None
    resumable: bool
    base_experiment_id: int | None
    root_sources_json: str | None

    @property
    def config(self) -> dict:
        return json.loads(self.config_json)


class Imported(BaseModel):
    original_id: int
    id: int
    description: str
    new: bool  # False when the lab already had this experiment (same snapshot image)


class Ledger:
    """All of labrat's SQL. Use as `with Ledger(path) as ledger:`; every write is one transaction."""

    def __init__(self, path: str | Path, threads: bool = False):
        """`threads`: the connection may be used by another thread than the one that opens it (a lane's; never
        by two threads at once: each lane has its own connection)."""
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None,  # explicit transactions only
                                  check_same_thread=not threads)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a finished experiment survives a power cut
        self.db.execute("PRAGMA foreign_keys=ON")
        with self.transaction():
            for statement in SCHEMA.split(";"):  # executescript() would commit our open transaction
                if statement.strip():
                    self.db.execute(statement)
            for table, columns in ADDED_COLUMNS.items():
                present = {row["name"] for row in self.db.execute(f"PRAGMA table_info({table})")}
                for column in columns:
                    if column.split()[0] not in present:
                        self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
        self._allow_replicate_status()
        with self.transaction():
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    def _allow_replicate_status(self) -> None:
        """A ledger made before version 3 has an experiments table whose CHECK refuses `replicate`: rebuild it
        (SQLite's documented procedure: a new table, the rows copied, the old one dropped, the new renamed)."""
        def current() -> bool:
            return "'replicate'" in self.db.execute(
                "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'experiments'").fetchone()["sql"]

        if current():
            return
        create = next(statement for statement in SCHEMA.split(";") if "TABLE IF NOT EXISTS experiments (" in statement)
        self.db.execute("PRAGMA foreign_keys=OFF")  # only outside a transaction; the rows keep their ids
        try:
            with self.transaction() as db:
                if current():  # another process migrated it while this one waited for the lock
                    return
                columns = ", ".join(row["name"] for row in db.execute("PRAGMA table_info(experiments)"))
                db.execute(create.replace("IF NOT EXISTS experiments (", "experiments_v3 ("))
                db.execute(f"INSERT INTO experiments_v3 ({columns}) SELECT {columns} FROM experiments")
                db.execute("DROP TABLE experiments")
                db.execute("ALTER TABLE experiments_v3 RENAME TO experiments")
                db.execute("CREATE INDEX IF NOT EXISTS experiments_by_session ON experiments(session_id, id)")
                if problems := db.execute("PRAGMA foreign_key_check").fetchall():
                    raise sqlite3.IntegrityError(f"the ledger's references are broken: {[tuple(p) for p in problems][:3]}")
        finally:
            self.db.execute("PRAGMA foreign_keys=ON")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- sessions ----------------------------------------------------------------------------------
    def start_session(self, session_id: str, agent: str, model: str | None, config: dict,
                      base_experiment_id: int | None = None, root_sources: dict[str, str] | None = None) -> SessionRow:
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO sessions (id, started_at, agent, model, config_json, base_experiment_id,"
                       " root_sources_json) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (session_id, _now(), agent, model, json.dumps(config, sort_keys=True), base_experiment_id,
                        json.dumps(root_sources) if root_sources is not None else None))
        return self.session(session_id)

    def end_session(self, session_id: str, reason: str, resumable: bool = False) -> None:
        """Close a session. A resumable one (interrupted, API failure) is continued by the next `labrat run`."""
        with self.transaction() as db:
            db.execute("UPDATE sessions SET ended_at = ?, stop_reason = ?, resumable = ? WHERE id = ?",
                       (_now(), reason, int(resumable), session_id))

    def reopen_session(self, session_id: str) -> SessionRow:
        with self.transaction() as db:
            db.execute("UPDATE sessions SET ended_at = NULL, stop_reason = NULL, resumable = 1 WHERE id = ?", (session_id,))
        return self.session(session_id)

    def set_base(self, session_id: str, experiment_id: int | None, lane: int = 0) -> None:
        """The experiment a lane's next experiments start from (rollback moves lane 0's; adopting the lab's best
        moves another lane's). Lane 0's base is the session's."""
        with self.transaction() as db:
            _set_lane_base(db, session_id, lane, experiment_id)

    def lane_bases(self, session_id: str) -> dict[int, int | None]:
        """{lane: its base} of every lane of the session that has run an experiment or has a base of its own."""
        bases = {0: self.session(session_id).base_experiment_id}
        for row in self.db.execute("SELECT lane, base_experiment_id FROM lane_bases WHERE session_id = ?", (session_id,)):
            bases[row["lane"]] = row["base_experiment_id"]
        for row in self.db.execute("SELECT DISTINCT lane FROM experiments WHERE session_id = ?", (session_id,)):
            bases.setdefault(row["lane"], bases[0])
        return dict(sorted(bases.items()))

    def lane_base(self, session_id: str, lane: int = 0) -> int | None:
        """The base of a session's lane: lane 0's is the session's; another lane's starts as the session's."""
        if lane:
            row = self.db.execute("SELECT base_experiment_id FROM lane_bases WHERE session_id = ? AND lane = ?",
                                  (session_id, lane)).fetchone()
            if row is not None:
                return row["base_experiment_id"]
        return self.session(session_id).base_experiment_id

    def session(self, session_id: str) -> SessionRow:
        row = self.db.execute("SELECT * FROM sessions WHERE id = ?", (session_id,)).fetchone()
        if row is None:
            raise KeyError(f"no session {session_id} in {self.path}")
        return SessionRow(**dict(row))

    def sessions(self) -> list[SessionRow]:
        return [SessionRow(**dict(row)) for row in self.db.execute("SELECT * FROM sessions ORDER BY started_at, rowid")]

    def last_session(self) -> SessionRow | None:
        row = self.db.execute("SELECT * FROM sessions ORDER BY started_at DESC, rowid DESC LIMIT 1").fetchone()
        return SessionRow(**dict(row)) if row else None

    def set_root_sources(self, session_id: str, sources: dict[str, str]) -> SessionRow:
        """Record the workspace a session started from (the first experiment's diff is against it)."""
        with self.transaction() as db:
            db.execute("UPDATE sessions SET root_sources_json = ? WHERE id = ?", (json.dumps(sources), session_id))
        return self.session(session_id)

    def meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row["value"] if row else default

    def delete_meta(self, key: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM meta WHERE key = ?", (key,))

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # -- experiments -------------------------------------------------------------------------------
    def begin_experiment(self, session_id: str, parent_id: int | None, description: str, hypothesis: str | None = None,
                         expected_delta: float | None = None, replicate_of: int | None = None, lane: int = 0) -> int:
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO experiments (session_id, parent_id, status, description, hypothesis, expected_delta,"
                " replicate_of, lane, started_at) VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?)",
                (session_id, parent_id, description, hypothesis, expected_delta, replicate_of, lane, _now()))
            return int(cursor.lastrowid)

    def finish_experiment(self, experiment_id: int, status: Status, **fields) -> Experiment:
        """Record the outcome of an experiment: every field in one transaction.

        A kept experiment becomes its session's base in the same transaction, so a harness killed
        right after never resumes from a stale base."""
        if status == "running":
            raise ValueError("an experiment finishes with keep, discard, crash or timeout")
        allowed = set(Experiment.model_fields) - {"id", "session_id", "parent_id", "status", "description", "started_at"}
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"unknown experiment fields: {sorted(unknown)}")
        fields = {**fields, "finished_at": _now()}
        columns = ", ".join(f"{name} = ?" for name in fields)
        with self.transaction() as db:
            updated = db.execute(f"UPDATE experiments SET status = ?, {columns} WHERE id = ? AND status = 'running'",
                                 (status, *fields.values(), experiment_id)).rowcount
            if updated != 1:
                raise ValueError(f"experiment {experiment_id} is not running")
            if status == "keep":  # the experiment's lane moves to it
                row = db.execute("SELECT session_id, lane FROM experiments WHERE id = ?", (experiment_id,)).fetchone()
                _set_lane_base(db, row["session_id"], row["lane"], experiment_id)
            failpoints.reach("ledger.before_commit")
        return self.experiment(experiment_id)

    def set_snapshot(self, experiment_id: int, name: str, image_id: str) -> None:
        """Record the snapshot of an experiment that ended without one in its row (a killed harness)."""
        with self.transaction() as db:
            db.execute("UPDATE experiments SET snapshot = ?, snapshot_image_id = ? WHERE id = ? AND snapshot IS NULL",
                       (name, image_id, experiment_id))

    def recover_interrupted(self, reason: str = "harness stopped during the experiment") -> list[int]:
        """Mark experiments left `running` by a killed harness as crashed. Returns their ids."""
        with self.transaction() as db:
            ids = [row["id"] for row in db.execute("SELECT id FROM experiments WHERE status = 'running'")]
            db.execute("UPDATE experiments SET status = 'crash', log_tail = ?, finished_at = ? WHERE status = 'running'",
                       (reason, _now()))
        return ids

    def experiment(self, experiment_id: int) -> Experiment:
        row = self.db.execute("SELECT * FROM experiments WHERE id = ?", (experiment_id,)).fetchone()
        if row is None:
            raise KeyError(f"no experiment #{experiment_id} in {self.path}")
        return Experiment(**dict(row))

    def experiments(self, session_id: str | None = None) -> list[Experiment]:
        query, args = "SELECT * FROM experiments", ()
        if session_id:
            query, args = query + " WHERE session_id = ?", (session_id,)
        return [Experiment(**dict(row)) for row in self.db.execute(query + " ORDER BY id", args)]

    def replicates(self, experiment_id: int) -> list[Experiment]:
        """The rows that re-ran an experiment's snapshot with other seeds (its noise-floor runs or confirmations)."""
        return [Experiment(**dict(row)) for row in
                self.db.execute("SELECT * FROM experiments WHERE replicate_of = ? ORDER BY id", (experiment_id,))]

    def replicated(self) -> list[tuple[Experiment, list[Experiment], dict]]:
        """Every experiment that has replicates: (it, its replicates, the config of the session that ran it)."""
        rows = [Experiment(**dict(row)) for row in
                self.db.execute("SELECT * FROM experiments WHERE replicate_of IS NOT NULL ORDER BY id")]
        groups: dict[int, list[Experiment]] = {}
        for row in rows:
            groups.setdefault(row.replicate_of, []).append(row)
        found = []
        for experiment_id, replicates in groups.items():
            experiment = self.experiment(experiment_id)
            found.append((experiment, replicates, self.session(experiment.session_id).config))
        return found

    def running_experiment_id(self, session_id: str, lane: int = 0) -> int | None:
        row = self.db.execute("SELECT id FROM experiments WHERE session_id = ? AND lane = ? AND status = 'running'",
                              (session_id, lane)).fetchone()
        return row["id"] if row else None

    def lineage(self, experiment_id: int) -> list[Experiment]:
        """The experiment and its ancestors, oldest first (parents this ledger lacks end the chain)."""
        chain = [self.experiment(experiment_id)]
        while chain[-1].parent_id is not None:
            try:
                chain.append(self.experiment(chain[-1].parent_id))
            except KeyError:
                break
        return chain[::-1]

    def sources(self, experiment_id: int) -> dict[str, str]:
        """{path: text} of an experiment's workspace sources. 0 is the lab's starting point (the workspace its
        first session started from); an experiment that recorded none (it crashed early) has its session's
        starting sources. Raises KeyError for an unknown id."""
        if experiment_id == 0:
            first = self.db.execute("SELECT id FROM sessions ORDER BY started_at, rowid LIMIT 1").fetchone()
            return self.root_sources(first["id"]) if first else {}
        experiment = self.experiment(experiment_id)
        if experiment.sources_json:
            return json.loads(experiment.sources_json)
        return self.root_sources(experiment.session_id)

    def root_sources(self, session_id: str) -> dict[str, str]:
        """{path: text} of the workspace a session started from ({} until it is recorded)."""
        return json.loads(self.session(session_id).root_sources_json or "{}")

    def best(self, session_id: str | None = None) -> Experiment | None:
        """The kept experiment with the lowest mean of its runs (its own and its replicates': a lucky first run
        of a confirmed variant does not outrank a steadier one)."""
        where = " AND e.session_id = ?" if session_id else ""
        replicas = "FROM experiments r WHERE r.replicate_of = e.id AND r.status = 'replicate' AND r.metric IS NOT NULL"
        row = self.db.execute(
            f"SELECT e.*, (e.metric + COALESCE((SELECT SUM(r.metric) {replicas}), 0)) / (1 + (SELECT COUNT(*) "
            f"{replicas})) AS mean_of_runs FROM experiments e WHERE e.status = 'keep' AND e.metric IS NOT NULL"
            + where + " ORDER BY mean_of_runs ASC, e.id ASC LIMIT 1", (session_id,) if session_id else ()
        ).fetchone()
        if row is None:
            return None
        fields = dict(row)
        fields.pop("mean_of_runs")
        return Experiment(**fields)

    # -- tool calls and events ---------------------------------------------------------------------
    def record_tool_call(self, session_id: str, experiment_id: int | None, name: str, tool_input: dict,
                         output: str, is_error: bool, seconds: float) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO tool_calls (session_id, experiment_id, name, input_json, output, is_error, seconds, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (session_id, experiment_id, name, _bounded_json(tool_input), output[:20_000],
                 int(is_error), seconds, _now()))

    def record_event(self, session_id: str | None, kind: str, **detail) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO events (session_id, kind, detail_json, created_at) VALUES (?, ?, ?, ?)",
                       (session_id, kind, json.dumps(detail, default=str), _now()))

    # -- bundles -----------------------------------------------------------------------------------
    def add_imported(self, sessions: list[SessionRow], experiments: list[Experiment], source: str) -> list[Imported]:
        """Add a bundle's rows (as exported from another lab): sessions closed, experiments under new ids with
        their parents mapped; an experiment whose snapshot image this lab already has is not added twice."""
        imported: list[Imported] = []
        new_ids: dict[int, int] = {}
        with self.transaction() as db:
            for session in sessions:
                db.execute(
                    "INSERT OR IGNORE INTO sessions (id, started_at, ended_at, agent, model, config_json, stop_reason,"
                    " resumable, root_sources_json) VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?)",
                    (session.id, session.started_at, session.ended_at or session.started_at, session.agent,
                     session.model, session.config_json, f"imported from {source}", session.root_sources_json))
            for e in experiments:
                row = db.execute("SELECT id FROM experiments WHERE snapshot_image_id = ?",
                                 (e.snapshot_image_id,)).fetchone()
                if row:
                    new_ids[e.id] = row["id"]
                    imported.append(Imported(original_id=e.id, id=row["id"], description=e.description, new=False))
                    continue
                fields = e.model_dump(exclude={"id"})
                fields["parent_id"] = new_ids.get(e.parent_id) if e.parent_id is not None else None
                fields["replicate_of"] = new_ids.get(e.replicate_of) if e.replicate_of is not None else None
                cursor = db.execute(f"INSERT INTO experiments ({', '.join(fields)}) VALUES "
                                    f"({', '.join('?' * len(fields))})", tuple(fields.values()))
                new_ids[e.id] = int(cursor.lastrowid)
                imported.append(Imported(original_id=e.id, id=new_ids[e.id], description=e.description, new=True))
        return imported

    # -- export ------------------------------------------------------------------------------------
    def results_tsv(self) -> str:
        """autoresearch's results.tsv: commit, val_bpb, memory_gb, status, description (tab-separated); a lab that
        ran lanes gets a sixth column, lane."""
        experiments = self.experiments()
        lanes = any(e.lane for e in experiments)
        lines = ["commit\tval_bpb\tmemory_gb\tstatus\tdescription" + ("\tlane" if lanes else "")]
        for e in experiments:
            if e.status == "running":
                continue
            metric = f"{e.metric:.6f}" if e.metric is not None else "0.000000"
            memory = f"{(e.memory_bytes or 0) / 1024**3:.1f}"
            description = " ".join(e.description.split())
            commit = (e.snapshot_image_id or "").removeprefix("sha256:")[:12] or f"exp{e.id}"  # the snapshot's content id
            lines.append(f"{commit}\t{metric}\t{memory}\t{e.status}\t{description}" + (f"\t{e.lane}" if lanes else ""))
        return "\n".join(lines) + "\n"
