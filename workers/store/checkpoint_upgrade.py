"""The upgrade from a store an earlier version wrote: its checkpoints filed in the Redis index.

Earlier versions kept the index in `index.sqlite3` beside the checkpoints and each job's
aliases in `<job>/aliases.json`. The first process to open such a store (API, worker or
`cnnserve train`, whichever starts first) files every readable manifest in the index (and the
evaluations kept beside them), then removes those two kinds of files; the aliases are recomputed
by the index's one rule for "best". Idempotent and safe when several processes start together:
one takes a lock in Redis and indexes, renewing it per chunk; the others wait for the mark it
leaves (`ckpts:indexed:{store}`). If it dies, its lock lapses and the next process starts over;
filing a checkpoint twice files it once. A store whose index was lost (Redis flushed, no AOF)
is indexed again the same way, so its checkpoints come back.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from workers.store.blobs import BlobNotFoundError, StoreUnavailableError
from workers.store.checkpoint_index import SUMMARY_FIELDS
from workers.store.manifest import Manifest

if TYPE_CHECKING:
    from workers.store.checkpoints import CheckpointStore

log = logging.getLogger(__name__)

MANIFEST_KEY = re.compile(r"^(?P<job>[0-9a-f]{16})/e(?P<epoch>[0-9]{3})/manifest\.json$")
#: What an earlier version kept beside the checkpoints; removed once they are indexed.
RETIRED = re.compile(r"^(index\.sqlite3(-journal|-wal|-shm)?|[0-9a-f]{16}/aliases\.json)$")
CHUNK = 500
#: Keys listed between two renewals of the lock (a bucket lists 1,000 a request).
LIST_RENEW_EVERY = 5000

Entry = tuple[dict[str, Any], float | None, str]


def index_earlier_store(store: CheckpointStore, wait_s: float = 600.0) -> int:
    """File every checkpoint of `store` not indexed yet, once per store; how many were."""
    index, where = store.index, store.location
    if index.is_indexed(where):
        return 0
    token = index.lock(where, wait_s)
    if token is None:  # another process did it meanwhile
        return 0
    try:
        retired: list[str] = []
        evaluations: list[tuple[str, str]] = []
        total = 0
        batch: list[Entry] = []

        def renew() -> None:
            if not index.renew(where, token):  # it lapsed: another process may be at it now
                raise StoreUnavailableError(
                    f"the upgrade of {where} lost its lock; the process that holds it now "
                    "indexes the store (retry in a moment)"
                )

        for entry in _scan(store, retired, evaluations, renew):
            batch.append(entry)
            if len(batch) == CHUNK:
                total += index.publish_many(batch, where)
                renew()
                batch = []
        total += index.publish_many(batch, where)
        for ckpt_id, sha in evaluations:
            index.annotate(ckpt_id, "evaluation_sha256", sha)
        for key in retired:
            store.blobs.delete_prefix(key)
        index.mark_indexed(where)
    finally:
        index.unlock(where, token)
    if total:
        log.info("checkpoint store %s upgraded: %d checkpoint(s) indexed", where, total)
    if retired:
        log.info("checkpoint store %s: removed %d retired index file(s)", where, len(retired))
    return total


def _scan(
    store: CheckpointStore,
    retired: list[str],
    evaluations: list[tuple[str, str]],
    renew: Callable[[], None],
) -> Iterator[Entry]:
    """Every readable manifest in the store as the index files it; notes the earlier version's
    files (`retired`) and the evaluations kept beside checkpoints. `renew` keeps the lock while
    the store is listed (a bucket of 100,000 checkpoints lists for longer than the lock lasts)."""
    keys = []
    for n, listed in enumerate(store.blobs.list_keys(), 1):
        keys.append(listed)
        if n % LIST_RENEW_EVERY == 0:
            renew()
    keys.sort()
    present = set(keys)
    for key in keys:
        if RETIRED.match(key):
            retired.append(key)
            continue
        m = MANIFEST_KEY.match(key)
        if not m:
            continue
        try:
            raw = store.blobs.get_bytes(key)
            manifest = Manifest.model_validate_json(raw)
        except (BlobNotFoundError, ValidationError) as exc:
            log.warning("upgrade: %s cannot be read (%s); left unindexed", key, exc)
            continue
        if manifest.id != f"{m['job']}-e{m['epoch']}":
            log.warning("upgrade: %s names checkpoint %s; left unindexed", key, manifest.id)
            continue
        summary = manifest.model_dump(mode="json", include=set(SUMMARY_FIELDS))
        yield summary, manifest.metrics.get("val_acc"), hashlib.sha256(raw).hexdigest()
        evaluation = key.removesuffix("manifest.json") + "evaluation.json"
        if evaluation in present:
            try:
                data = store.blobs.get_bytes(evaluation)
            except BlobNotFoundError:
                continue
            evaluations.append((manifest.id, hashlib.sha256(data).hexdigest()))
