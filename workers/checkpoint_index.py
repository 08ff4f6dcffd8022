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
    from workers.checkpoints import Manifest

log = logging.getLogger(__name__)

INDEX_FILE = "index.sqlite3"
#: Bump when the schema changes; a store indexed by another version is indexed again.
INDEX_VERSION = "1"
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
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoints (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    model TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    val_acc REAL NOT NULL,
    created REAL NOT NULL,
    summary TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS checkpoints_best ON checkpoints (model, val_acc DESC, created DESC);
CREATE INDEX IF NOT EXISTS checkpoints_job ON checkpoints (job_id, epoch);
CREATE INDEX IF NOT EXISTS checkpoints_newest ON checkpoints (created DESC, epoch DESC);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def _created(iso: str) -> float:
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return 0.0


def _row(m: Manifest) -> tuple[str, str, str, int, float, float, str]:
    summary = {name: getattr(m, name) for name in SUMMARY_FIELDS}
    val_acc = float(m.metrics.get("val_acc", -1.0))
    return (m.id, m.job_id, m.model, m.epoch, val_acc, _created(m.created_at), json.dumps(summary))


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
            built = conn.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
            if built is None or built[0] != INDEX_VERSION:
                conn.execute("DELETE FROM checkpoints")
                rows = [_row(m) for m in self._scan()]
                conn.executemany("INSERT OR REPLACE INTO checkpoints VALUES (?,?,?,?,?,?,?)", rows)
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
            db.execute("INSERT OR REPLACE INTO checkpoints VALUES (?,?,?,?,?,?,?)", _row(manifest))

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

    def best(self, model: str) -> list[str]:
        """Checkpoint ids of `model`, best validation accuracy first (newest among equals)."""
        rows = self._query(
            "SELECT id FROM checkpoints WHERE model = ? ORDER BY val_acc DESC, created DESC "
            "LIMIT 8",
            (model,),
        )
        return [r[0] for r in rows]

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
        self, *, job_id: str | None = None, model: str | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """Summaries of the checkpoints (of a job, of a model), newest first (at most `limit`)."""
        where: list[str] = []
        args: list[Any] = []
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
