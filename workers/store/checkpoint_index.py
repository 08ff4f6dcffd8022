"""The checkpoint store's index: one row per checkpoint in a SQLite file beside the checkpoints.

`<model>:best`, a job's best and the checkpoint listing read the index, not every manifest:
one indexed query whatever the number of checkpoints. The store writes a row when it saves a
checkpoint and removes it when it prunes or deletes one; the first process to open a store
written before the index existed indexes its manifests once (under SQLite's write lock, so
processes starting together do it once). SQLite's locking works between the processes of one
machine, and between containers sharing a local volume; put the data directory on a file
system with working POSIX locks (not NFS).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.store.checkpoints import Manifest

log = logging.getLogger(__name__)

INDEX_FILE = "index.sqlite3"
#: Bump when the schema changes; a store indexed by another version is indexed again.
INDEX_VERSION = "2"  # 2: the owner column
#: Fields of a manifest the listing shows (the rest is one file read away).
SUMMARY_FIELDS = (
    "id",
    "job_id",
    "epoch",
    "model",
    "arch",
    "input_size",
    "metrics",
    "weights_sha256",
    "created_at",
    "owner",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoints (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    model TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    val_acc REAL NOT NULL,
    created REAL NOT NULL,
    summary TEXT NOT NULL,
    owner TEXT
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
#: Made after an older table has been given its owner column.
_INDEXES = """
CREATE INDEX IF NOT EXISTS checkpoints_best ON checkpoints (model, val_acc DESC, created DESC);
CREATE INDEX IF NOT EXISTS checkpoints_job ON checkpoints (job_id, epoch);
CREATE INDEX IF NOT EXISTS checkpoints_newest ON checkpoints (created DESC, epoch DESC);
CREATE INDEX IF NOT EXISTS checkpoints_owner_best
    ON checkpoints (owner, model, val_acc DESC, created DESC);
CREATE INDEX IF NOT EXISTS checkpoints_owner_newest
    ON checkpoints (owner, created DESC, epoch DESC);
"""


def _created(iso: str) -> float:
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return 0.0


_INSERT = (
    "INSERT OR REPLACE INTO checkpoints (id, job_id, model, epoch, val_acc, created, summary, "
    "owner) VALUES (?,?,?,?,?,?,?,?)"
)


def _row(m: Manifest) -> tuple[str, str, str, int, float, float, str, str | None]:
    summary = {name: getattr(m, name) for name in SUMMARY_FIELDS}
    val_acc = float(m.metrics.get("val_acc", -1.0))
    created = _created(m.created_at)
    return (m.id, m.job_id, m.model, m.epoch, val_acc, created, json.dumps(summary), m.owner)


def _owner_clause(within: str | None, where: list[str], args: list[Any]) -> None:
    """Restrict a query to one owner's checkpoints (None: everyone's)."""
    if within is not None:
        where.append("owner = ?")
        args.append(within)


class CheckpointIndex:
    """Checkpoint summaries by id, job and model, in `root/index.sqlite3`."""

    def __init__(self, root: Path, scan: Callable[[], Iterable[Manifest]]) -> None:
        self.path = Path(root) / INDEX_FILE
        self._scan = scan
        self._local = threading.local()

    @contextmanager
    def _db(self, write: bool = False) -> Iterator[sqlite3.Connection | None]:
        """This thread's connection (None when no store exists yet and this is a read)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            if not write and not self.path.parent.is_dir():
                yield None
                return
            conn = self._open()
            self._local.conn = conn
        if write:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        else:
            yield conn

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        # the default rollback journal: one file, no shared memory (safe on any local volume)
        conn.executescript(_SCHEMA)
        conn.execute("BEGIN IMMEDIATE")  # one process indexes an older store; others wait
        try:
            columns = {row[1] for row in conn.execute("PRAGMA table_info(checkpoints)")}
            if "owner" not in columns:  # a version 1 index: rebuilt below
                conn.execute("ALTER TABLE checkpoints ADD COLUMN owner TEXT")
            for statement in _INDEXES.split(";"):
                if statement.strip():
                    conn.execute(statement)
            built = conn.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
            if built is None or built[0] != INDEX_VERSION:
                conn.execute("DELETE FROM checkpoints")
                rows = [_row(m) for m in self._scan()]
                conn.executemany(_INSERT, rows)
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('version', ?)", (INDEX_VERSION,))
                if rows:
                    log.info("checkpoint index built: %d checkpoint(s) in %s", len(rows), self.path)
        except BaseException:
            conn.execute("ROLLBACK")
            conn.close()
            raise
        conn.execute("COMMIT")
        return conn

    # writing
    def add(self, manifest: Manifest) -> None:
        with self._db(write=True) as db:
            assert db is not None
            db.execute(_INSERT, _row(manifest))

    def remove(self, ckpt_ids: Iterable[str]) -> None:
        ids = [(i,) for i in ckpt_ids]
        if not ids:
            return
        with self._db(write=True) as db:
            assert db is not None
            db.executemany("DELETE FROM checkpoints WHERE id = ?", ids)

    # reading
    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._db() as db:
            return [] if db is None else db.execute(sql, args).fetchall()

    def best(self, model: str, within: str | None = None) -> list[str]:
        """Checkpoint ids of `model` (of one owner's, with `within`), best validation accuracy
        first (newest among equals)."""
        where, args = ["model = ?"], [model]
        _owner_clause(within, where, args)
        rows = self._query(
            f"SELECT id FROM checkpoints WHERE {' AND '.join(where)} "
            "ORDER BY val_acc DESC, created DESC LIMIT 8",
            tuple(args),
        )
        return [r[0] for r in rows]

    def owner(self, ckpt_id: str) -> tuple[bool, str | None]:
        """Whether the index has the checkpoint, and its owner (None: none recorded)."""
        rows = self._query("SELECT owner FROM checkpoints WHERE id = ?", (ckpt_id,))
        return (True, rows[0][0]) if rows else (False, None)

    def val_acc(self, ckpt_id: str) -> float | None:
        rows = self._query("SELECT val_acc FROM checkpoints WHERE id = ?", (ckpt_id,))
        return float(rows[0][0]) if rows else None

    def of_job(self, job_id: str) -> list[tuple[str, float]]:
        """`(id, val_acc)` of a job's checkpoints, by epoch."""
        rows = self._query(
            "SELECT id, val_acc FROM checkpoints WHERE job_id = ? ORDER BY epoch", (job_id,)
        )
        return [(r[0], float(r[1])) for r in rows]

    def summaries(
        self,
        *,
        job_id: str | None = None,
        model: str | None = None,
        limit: int | None = None,
        within: str | None = None,
    ) -> list[dict[str, Any]]:
        """Summaries of the checkpoints (of a job, of a model, of one owner), newest first (at
        most `limit`)."""
        where: list[str] = []
        args: list[Any] = []
        _owner_clause(within, where, args)
        if job_id is not None:
            where.append("job_id = ?")
            args.append(job_id)
        if model is not None:
            where.append("model = ?")
            args.append(model)
        sql = "SELECT summary FROM checkpoints"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created DESC, epoch DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [json.loads(r[0]) for r in self._query(sql, tuple(args))]
