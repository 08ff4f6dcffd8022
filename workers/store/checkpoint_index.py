"""The checkpoint index in Redis: every checkpoint's summary, per job, per model and per tenant,
ordered for `best` and `latest`, beside the job index.

The checkpoint store publishes a checkpoint (its files complete in the store, manifest last)
by filing it here in one Lua script, which also moves the job's aliases and prunes its old
epochs; a delete unfiles it in one script before its files go. So an alias can never name a
checkpoint the index does not have, whichever API processes and workers save and delete at
once, and `best` and `latest` are never stored: they are the first entry of an ordered set.

One rule for "best", everywhere (a job's, a model's, a tenant's): the highest `val_acc`, ties
to the newest (`created_at`), then to the larger id. `rank` writes it as a string that Redis
orders lexicographically, so the best is one ZREVRANGEBYLEX away whatever the number of
checkpoints.

Keys (prefix `cnnserve:`):
- `ckpt:{id}`                         hash: job, model, owner, epoch, created, rank, summary
                                      (the listing's JSON), manifest_sha256, store (the
                                      location of the store that published it),
                                      evaluation_sha256, `onnx:{name}` (the sha256 of each
                                      exported graph)
- `ckpts`, `ckpts:model:{model}`      every checkpoint (of a model), scored by creation (ms):
                                      listings newest first, `<model>:latest`
- `ckpts:model:{model}:best`          the same by rank (score 0, member `rank`): `<model>:best`
- `ckpts:job:{job}`                   a job's checkpoints scored by epoch: `<job>:latest`
- `ckpts:job:{job}:best`              by rank: `<job>:best`
- `owner:{owner}:ckpts...`            the three model/all sets again for one principal's
- `ckpts:indexed:{store}`             set once a store written by an earlier version (files,
                                      SQLite, aliases.json) is indexed here; `...:lock` meanwhile
"""

from __future__ import annotations

import json
import math
import struct
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from workers.store.job_index import PREFIX

#: Fields of a manifest a listing shows (the rest is one object read away).
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
INDEX_LOCK_S = 60


def record_key(ckpt_id: str) -> str:
    return f"{PREFIX}ckpt:{ckpt_id}"


def _base(owner: str | None) -> str:
    return PREFIX if owner is None else f"{PREFIX}owner:{owner}:"


def listing_key(model: str | None = None, owner: str | None = None) -> str:
    """Checkpoints (of a model, of one owner's) scored by creation time."""
    key = f"{_base(owner)}ckpts"
    return key if model is None else f"{key}:model:{model}"


def best_key(model: str, owner: str | None = None) -> str:
    return f"{listing_key(model, owner)}:best"


def job_key(job_id: str) -> str:
    return f"{PREFIX}ckpts:job:{job_id}"


def created_ms(iso: str) -> int:
    """Milliseconds since the epoch of an ISO 8601 time (0 when it cannot be read)."""
    try:
        return max(0, int(datetime.fromisoformat(iso).timestamp() * 1000))
    except ValueError:
        return 0


def rank(val_acc: float | None, created: int, ckpt_id: str) -> str:
    """The one rule for "best" as a string that sorts like it: higher `val_acc` first, then
    newer, then the larger id. A checkpoint without a validation accuracy ranks last.

    A non-negative double's IEEE 754 bits order as its value, so 16 hex digits of them compare
    exactly (no rounding: 0.85 ties 0.85 and nothing else); '-' sorts before any digit.
    """
    if val_acc is None or math.isnan(val_acc) or val_acc < 0:
        acc = "-"
    else:
        acc = f"{struct.unpack('>Q', struct.pack('>d', val_acc + 0.0))[0]:016x}"
    return f"{acc}|{created:015d}|{ckpt_id}"


def id_of_rank(member: str) -> str:
    return member.rsplit("|", 1)[-1]


_COMMON = """
local P = ARGV[1]
local function bases(owner)
  if owner and owner ~= '' then return {P, P .. 'owner:' .. owner .. ':'} end
  return {P}
end
local function unfile(id)
  local rec = P .. 'ckpt:' .. id
  local f = redis.call('HMGET', rec, 'job', 'model', 'owner', 'rank')
  if not f[1] then return false end
  for _, b in ipairs(bases(f[3])) do
    redis.call('ZREM', b .. 'ckpts', id)
    redis.call('ZREM', b .. 'ckpts:model:' .. f[2], id)
    redis.call('ZREM', b .. 'ckpts:model:' .. f[2] .. ':best', f[4])
  end
  redis.call('ZREM', P .. 'ckpts:job:' .. f[1], id)
  redis.call('ZREM', P .. 'ckpts:job:' .. f[1] .. ':best', f[4])
  redis.call('DEL', rec)
  return true
end
local function aliases(job)
  local latest = redis.call('ZREVRANGE', P .. 'ckpts:job:' .. job, 0, 0)[1]
  local top = redis.call('ZREVRANGEBYLEX', P .. 'ckpts:job:' .. job .. ':best', '+', '-',
                         'LIMIT', 0, 1)[1]
  local best = top and string.match(top, '([^|]+)$') or false
  return latest or false, best
end
"""

#: Lua: file one checkpoint (replacing an earlier filing of the same id: the same manifest
#: keeps what was recorded of it, its evaluation's and graphs' hashes), then, with a `keep`,
#: prune the job's epochs that are neither among its last `keep`, nor its best or latest.
#: ARGV: prefix, id, job, model, owner ('' none), epoch, created ms, rank, summary JSON,
#: manifest sha256, keep ('' for no pruning), the store's location. Returns JSON
#: {latest, best, kept, pruned}.
PUBLISH = (
    _COMMON
    + """
local id, job, model, owner = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local epoch, created, rank, keep = ARGV[6], ARGV[7], ARGV[8], ARGV[11]
local rec = P .. 'ckpt:' .. id
local carried = {}
if redis.call('HGET', rec, 'manifest_sha256') == ARGV[10] then
  local was = redis.call('HGETALL', rec)
  for i = 1, #was, 2 do
    if was[i] == 'evaluation_sha256' or string.sub(was[i], 1, 5) == 'onnx:' then
      table.insert(carried, was[i])
      table.insert(carried, was[i + 1])
    end
  end
end
unfile(id)
redis.call('HSET', rec, 'job', job, 'model', model, 'owner', owner,
           'epoch', epoch, 'created', created, 'rank', rank, 'summary', ARGV[9],
           'manifest_sha256', ARGV[10], 'store', ARGV[12])
if #carried > 0 then redis.call('HSET', rec, unpack(carried)) end
for _, b in ipairs(bases(owner)) do
  redis.call('ZADD', b .. 'ckpts', created, id)
  redis.call('ZADD', b .. 'ckpts:model:' .. model, created, id)
  redis.call('ZADD', b .. 'ckpts:model:' .. model .. ':best', 0, rank)
end
redis.call('ZADD', P .. 'ckpts:job:' .. job, epoch, id)
redis.call('ZADD', P .. 'ckpts:job:' .. job .. ':best', 0, rank)
local latest, best = aliases(job)
local ids = redis.call('ZRANGE', P .. 'ckpts:job:' .. job, 0, -1)
local kept, pruned = {}, {}
local n = #ids
for i, cid in ipairs(ids) do
  if keep == '' or i > n - tonumber(keep) or cid == latest or cid == best then
    table.insert(kept, cid)
  else
    unfile(cid)
    table.insert(pruned, cid)
  end
end
return cjson.encode({latest = latest, best = best, kept = kept, pruned = pruned})
"""
)

#: Lua: unfile one checkpoint. ARGV: prefix, id. Returns JSON {found, latest, best} (the job's
#: aliases after it).
UNFILE = (
    _COMMON
    + """
local found = unfile(ARGV[2])
local job = ARGV[3]
local latest, best = aliases(job)
return cjson.encode({found = found, latest = latest, best = best})
"""
)

#: Lua: record a field (the sha256 of an evaluation or an exported graph) of a checkpoint that
#: is still filed; nothing for one deleted meanwhile. ARGV: prefix, id, field, value.
#: Returns 1 if recorded.
ANNOTATE = """
local rec = ARGV[1] .. 'ckpt:' .. ARGV[2]
if redis.call('EXISTS', rec) == 0 then return 0 end
redis.call('HSET', rec, ARGV[3], ARGV[4])
return 1
"""


#: Lua: the upgrade's lock, renewed / released only by the process holding it (its token).
RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('EXPIRE', KEYS[1], ARGV[2])
"""
UNLOCK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""


@dataclass(frozen=True)
class Filed:
    """What publishing a checkpoint left: the job's aliases, what it kept and pruned."""

    latest: str
    best: str
    kept: list[str]
    pruned: list[str]


@dataclass(frozen=True)
class Entry:
    """One checkpoint as the index has it."""

    summary: dict[str, Any]
    owner: str | None
    manifest_sha256: str
    fields: dict[str, str]


Cursor = tuple[float, str]


class CheckpointIndex:
    """The index of one checkpoint store, in Redis (see the module's docstring)."""

    def __init__(self, client: Any) -> None:
        self.r: Any = client
        self._publish = client.register_script(PUBLISH)
        self._unfile = client.register_script(UNFILE)
        self._annotate = client.register_script(ANNOTATE)
        self._renew = client.register_script(RENEW)
        self._unlock = client.register_script(UNLOCK)

    # writing
    def publish(
        self,
        summary: dict[str, Any],
        val_acc: float | None,
        manifest_sha256: str,
        keep: int | None,
        store: str,
    ) -> Filed:
        """File a checkpoint (its files already complete in the store at `store`) and prune
        its job."""
        ckpt_id = summary["id"]
        created = created_ms(summary["created_at"])
        raw = self._publish(
            args=[
                PREFIX,
                ckpt_id,
                summary["job_id"],
                summary["model"],
                summary.get("owner") or "",
                summary["epoch"],
                created,
                rank(val_acc, created, ckpt_id),
                json.dumps(summary),
                manifest_sha256,
                "" if keep is None else keep,
                store,
            ]
        )
        out = json.loads(raw)
        return Filed(out["latest"], out["best"], _list(out["kept"]), _list(out["pruned"]))

    def publish_many(
        self, entries: Iterable[tuple[dict[str, Any], float | None, str]], store: str
    ) -> int:
        """File many checkpoints of `store` without pruning (an upgrade), one round trip per
        500."""
        pipe = self.r.pipeline(transaction=False)
        n = 0
        for summary, val_acc, sha in entries:
            created = created_ms(summary["created_at"])
            self._publish(
                args=[
                    PREFIX,
                    summary["id"],
                    summary["job_id"],
                    summary["model"],
                    summary.get("owner") or "",
                    summary["epoch"],
                    created,
                    rank(val_acc, created, summary["id"]),
                    json.dumps(summary),
                    sha,
                    "",
                    store,
                ],
                client=pipe,
            )
            n += 1
            if n % 500 == 0:
                pipe.execute()
        pipe.execute()
        return n

    def unfile(self, ckpt_id: str, job_id: str) -> tuple[bool, str | None, str | None]:
        """Remove a checkpoint: whether it was filed, and its job's latest and best after."""
        out = json.loads(self._unfile(args=[PREFIX, ckpt_id, job_id]))
        return bool(out["found"]), out["latest"] or None, out["best"] or None

    def annotate(self, ckpt_id: str, field: str, value: str) -> bool:
        """Record `field` on a checkpoint still filed (False: it was deleted meanwhile)."""
        return bool(self._annotate(args=[PREFIX, ckpt_id, field, value]))

    # reading
    def entry(self, ckpt_id: str) -> Entry | None:
        raw = self.r.hgetall(record_key(ckpt_id))
        if not raw:
            return None
        return Entry(
            summary=json.loads(raw["summary"]),
            owner=raw.get("owner") or None,
            manifest_sha256=raw.get("manifest_sha256", ""),
            fields=raw,
        )

    def field(self, ckpt_id: str, name: str) -> tuple[bool, str | None]:
        """Whether the checkpoint is filed, and one field of it."""
        pipe = self.r.pipeline(transaction=False)
        pipe.exists(record_key(ckpt_id))
        pipe.hget(record_key(ckpt_id), name)
        exists, value = pipe.execute()
        return bool(exists), value

    def aliases(self, job_id: str) -> dict[str, str]:
        """A job's `latest` and `best` (empty when it has no checkpoint)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.zrevrange(job_key(job_id), 0, 0)
        pipe.zrevrangebylex(f"{job_key(job_id)}:best", "+", "-", start=0, num=1)
        latest, best = pipe.execute()
        out = {}
        if latest:
            out["latest"] = latest[0]
        if best:
            out["best"] = id_of_rank(best[0])
        return out

    def best(self, model: str, owner: str | None = None, count: int = 1) -> list[str]:
        """Ids of `model`'s best checkpoints (of one owner's), best first."""
        top = self.r.zrevrangebylex(best_key(model, owner), "+", "-", start=0, num=count)
        return [id_of_rank(m) for m in top]

    def newest(self, model: str, owner: str | None = None, count: int = 1) -> list[str]:
        """Ids of `model`'s newest checkpoints (of one owner's), newest first."""
        return list(self.r.zrevrange(listing_key(model, owner), 0, count - 1))

    def job_ids(self, job_id: str) -> list[str]:
        """A job's checkpoint ids by epoch."""
        return list(self.r.zrange(job_key(job_id), 0, -1))

    def page(
        self,
        *,
        job_id: str | None = None,
        model: str | None = None,
        owner: str | None = None,
        limit: int | None = None,
        cursor: Cursor | None = None,
    ) -> tuple[list[dict[str, Any]], Cursor | None]:
        """Summaries newest first (of a job, a model, one owner's), `limit` at most after
        `cursor` (no `limit`: all of them after it), and the cursor of the next page."""
        from workers.store.job_index import page

        key = job_key(job_id) if job_id is not None else listing_key(model, owner)
        if limit is None and cursor is None:
            ids, after = list(self.r.zrevrange(key, 0, -1)), None
        else:
            ids, after = page(self.r, key, limit or max(1, int(self.r.zcard(key))), cursor)
        pipe = self.r.pipeline(transaction=False)
        for ckpt_id in ids:
            pipe.hmget(record_key(ckpt_id), "summary", "owner")
        rows = []
        for found in pipe.execute():
            raw, who = found
            if raw is None:  # deleted between the two reads
                continue
            summary = json.loads(raw)
            # a job's checkpoints are one model's, one owner's: filtered here, not indexed
            wrong_model = model is not None and summary["model"] != model
            if job_id is not None and (wrong_model or (owner is not None and who != owner)):
                continue
            rows.append(summary)
        return rows, after

    def count(self) -> int:
        return int(self.r.zcard(listing_key()))

    # the upgrade from an earlier version
    def indexed_key(self, location: str) -> str:
        import hashlib

        return f"{PREFIX}ckpts:indexed:{hashlib.sha256(location.encode()).hexdigest()[:16]}"

    def is_indexed(self, location: str) -> bool:
        return bool(self.r.exists(self.indexed_key(location)))

    def lock(self, location: str, wait_s: float) -> str | None:
        """Take the upgrade's lock (a token), or None once another process has indexed."""
        token = uuid.uuid4().hex
        mark = self.indexed_key(location)
        deadline = time.monotonic() + wait_s
        while not self.r.set(f"{mark}:lock", token, nx=True, ex=INDEX_LOCK_S):
            if self.r.exists(mark):
                return None
            if time.monotonic() > deadline:
                raise TimeoutError("another process is still indexing the checkpoint store")
            time.sleep(0.1)
        if self.r.exists(mark):
            self.unlock(location, token)
            return None
        return token

    def renew(self, location: str, token: str) -> bool:
        """Keep the upgrade's lock another `INDEX_LOCK_S` (False: it is no longer ours)."""
        key = f"{self.indexed_key(location)}:lock"
        return bool(self._renew(keys=[key], args=[token, INDEX_LOCK_S]))

    def mark_indexed(self, location: str) -> None:
        self.r.set(self.indexed_key(location), location)

    def unlock(self, location: str, token: str) -> None:
        """Give the lock back, if it is still ours (one step: never another's)."""
        self._unlock(keys=[f"{self.indexed_key(location)}:lock"], args=[token])


def _list(value: Any) -> list[str]:
    # cjson writes an empty Lua table as {}
    return [str(v) for v in value] if isinstance(value, list) else []
