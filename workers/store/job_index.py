"""The job store's indexes in Redis: jobs by status and model, and finished jobs by age.

Every index is a sorted set of job ids scored by creation time (the score of the job in the
`jobs` set), so a filtered listing reads only the ids it shows, a count is one ZCARD, and the
orphan scan reads only the running jobs. `JobStore` writes them in the same MULTI/EXEC as the
record whenever a job is created, changes status or is removed, so they never disagree.

Keys (prefix `cnnserve:`):
- `jobs`                              every job (the listing without filters)
- `jobs:status:{status}`              the jobs in one status
- `jobs:model:{model}`                the jobs of one model
- `jobs:status:{status}:model:{model}` both filters at once
- `jobs:finished`                     finished jobs scored by when they finished (retention)
- `owner:{owner}:jobs...`             the four above again for the jobs one principal
                                      submitted (`JobRecord.owner`): a tenant's listing and
                                      its count of queued and running jobs (the quota)
- `schema`                            `2` once the records of an earlier version are indexed
- `evaluations:queued`                evaluations waiting on the training queue, and
  `owner:{owner}:evaluations:active`  one principal's queued and running evaluations
                                      (`workers.store.evaluations`): work on the same queue,
                                      so they count with the jobs against the queue limit
                                      and the owner's quota (`QUEUE_FN`)
"""

from __future__ import annotations

import logging
import math
import re
import time
import uuid
from typing import Any

from workers.contracts import JOB_ID_RE, JobStatus

log = logging.getLogger(__name__)

PREFIX = "cnnserve:"
ALL_JOBS = f"{PREFIX}jobs"
FINISHED = f"{PREFIX}jobs:finished"
SCHEMA_KEY = f"{PREFIX}schema"
SCHEMA_LOCK = f"{PREFIX}schema:lock"
#: The store's layout version: 1 had records and `jobs` only; 2 adds the indexes.
SCHEMA = "2"
#: Records indexed per round trip when an earlier version's store is upgraded.
MIGRATE_CHUNK = 500
MIGRATE_LOCK_S = 60

Cursor = tuple[float, str]
EVALUATIONS_QUEUED = f"{PREFIX}evaluations:queued"
#: An evaluation's record lasts this long; an entry of the sets older than that is stale.
EVALUATION_TTL_S = 7 * 86400


def owner_evaluations_key(owner: str) -> str:
    """One owner's queued and running evaluations."""
    return f"{PREFIX}owner:{owner}:evaluations:active"


def record_key(job_id: str) -> str:
    """The key of a job's record; its events, cancel flag and lease hang off it."""
    return f"{PREFIX}job:{job_id}"


def status_key(status: JobStatus | str) -> str:
    return f"{PREFIX}jobs:status:{JobStatus(status).value}"


def model_key(model: str) -> str:
    return f"{PREFIX}jobs:model:{model}"


def status_model_key(status: JobStatus | str, model: str) -> str:
    return f"{status_key(status)}:model:{model}"


def owner_prefix(owner: str | None) -> str:
    """Where one principal's job indexes live (`PREFIX` itself for everyone's)."""
    return PREFIX if owner is None else f"{PREFIX}owner:{owner}:"


def listing_key(status: JobStatus | None, model: str | None, owner: str | None = None) -> str:
    """The index that holds exactly the jobs a listing with these filters shows (of one
    owner's jobs, with `owner`)."""
    base = owner_prefix(owner)
    if status is not None and model is not None:
        return f"{base}jobs:status:{JobStatus(status).value}:model:{model}"
    if status is not None:
        return f"{base}jobs:status:{JobStatus(status).value}"
    if model is not None:
        return f"{base}jobs:model:{model}"
    return f"{base}jobs"


def active_keys(owner: str) -> tuple[str, str, str]:
    """One owner's queued and running jobs and its active evaluations (what its quota
    counts)."""
    return (
        listing_key(JobStatus.queued, None, owner),
        listing_key(JobStatus.running, None, owner),
        owner_evaluations_key(owner),
    )


#: Lua: the work on the training queue, jobs and evaluations alike. `queued_work(prefix,
#: now)` counts what waits (the queue limit), `active_work(prefix, owner, now)` what one owner
#: has queued or running (its quota); evaluations whose records have expired are dropped
#: from their sets first.
QUEUE_FN = f"""
local EVALUATION_TTL = {EVALUATION_TTL_S}
local function evaluations_in(key, now)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. (tonumber(now) - EVALUATION_TTL))
  return redis.call('ZCARD', key)
end
local function queued_work(prefix, now)
  return redis.call('ZCARD', prefix .. 'jobs:status:queued')
    + evaluations_in(prefix .. 'evaluations:queued', now)
end
local function active_work(prefix, owner, now)
  local base = prefix .. 'owner:' .. owner .. ':'
  return redis.call('ZCARD', base .. 'jobs:status:queued')
    + redis.call('ZCARD', base .. 'jobs:status:running')
    + evaluations_in(base .. 'evaluations:active', now)
end
"""


#: Lua: file one job under its status and model (and its owner's, when it has one), and
#: nowhere else (idempotent). The score is the job's in `jobs` if it has one (its creation
#: time), else the one given; Redis orders these string scores as doubles, so they are never
#: turned into Lua numbers.
_INDEX_FN = """
local STATUSES = {'queued', 'running', 'succeeded', 'failed', 'cancelled'}
local DONE = {succeeded = true, failed = true, cancelled = true}
local function file_under(base, id, score, status, model)
  redis.call('ZADD', base .. 'jobs', score, id)
  redis.call('ZADD', base .. 'jobs:model:' .. model, score, id)
  for _, s in ipairs(STATUSES) do
    local key = base .. 'jobs:status:' .. s
    if s == status then
      redis.call('ZADD', key, score, id)
      redis.call('ZADD', key .. ':model:' .. model, score, id)
    else
      redis.call('ZREM', key, id)
      redis.call('ZREM', key .. ':model:' .. model, id)
    end
  end
end
local function index_job(prefix, id, score, status, model, finished, owner)
  score = redis.call('ZSCORE', prefix .. 'jobs', id) or score
  file_under(prefix, id, score, status, model)
  if owner and owner ~= '' then
    file_under(prefix .. 'owner:' .. owner .. ':', id, score, status, model)
  end
  if DONE[status] then
    redis.call('ZADD', prefix .. 'jobs:finished', finished or score, id)
  else
    redis.call('ZREM', prefix .. 'jobs:finished', id)
  end
end
"""

INDEX_ONE = (
    _INDEX_FN
    + """
index_job(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7])
return 1
"""
)

#: Lua: record new queued jobs (each record, its indexes and first event) unless they would
#: take the queue past `max_queued`, or their owner's queued and running work past
#: `max_active` (evaluations count too, `QUEUE_FN`); one atomic step, so concurrent submits
#: (or a sweep's children), from any number of API processes, cannot overshoot either limit,
#: and a sweep is recorded whole or not at all. ARGV: prefix, score, max queued ('' for
#: none), event data, maxlen, owner ('' for none), max active ('' for none), then per job its
#: id, model and record JSON. Returns {1 if created else 0, work queued (or the owner's
#: active work) before, 'queue' or 'active': which limit refused}.
CREATE = (
    _INDEX_FN
    + QUEUE_FN
    + """
local prefix, score, max, owner, max_active = ARGV[1], ARGV[2], ARGV[3], ARGV[6], ARGV[7]
local queued = queued_work(prefix, score)
local count = (#ARGV - 7) / 3
if max ~= '' and queued + count > tonumber(max) then return {0, queued, 'queue'} end
if owner ~= '' and max_active ~= '' then
  local active = active_work(prefix, owner, score)
  if active + count > tonumber(max_active) then return {0, active, 'active'} end
end
for i = 8, #ARGV, 3 do
  local id = ARGV[i]
  redis.call('SET', prefix .. 'job:' .. id, ARGV[i + 2])
  index_job(prefix, id, score, 'queued', ARGV[i + 1], nil, owner)
  redis.call('XADD', prefix .. 'job:' .. id .. ':events', 'MAXLEN', '~', ARGV[5], '*',
             'event', 'status', 'data', ARGV[4])
end
return {1, queued, ''}
"""
)

#: Lua: index the jobs `ARGV[2..]` from their records as they are now (one atomic step per
#: chunk, so a worker changing a job meanwhile cannot leave it filed under an old status).
#: Returns {indexed, removed from `jobs` (no record), unreadable}.
MIGRATE = (
    _INDEX_FN
    + """
local function epoch(iso)
  local y, mo, d, h, mi, s = string.match(iso or '', '^(%d+)-(%d+)-(%d+)T(%d+):(%d+):(%d+)')
  if not y then return nil end
  y, mo, d = tonumber(y), tonumber(mo), tonumber(d)
  if mo <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local doy = math.floor((153 * ((mo + 9) % 12) + 2) / 5) + d - 1
  local days = era * 146097 + yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return string.format('%d', (days - 719468) * 86400 + h * 3600 + mi * 60 + s)
end
local prefix, indexed, removed, unreadable = ARGV[1], 0, 0, 0
for i = 2, #ARGV do
  local id = ARGV[i]
  local raw = redis.call('GET', prefix .. 'job:' .. id)
  if not raw then
    redis.call('ZREM', prefix .. 'jobs', id)
    removed = removed + 1
  else
    local ok, rec = pcall(cjson.decode, raw)
    local spec = ok and type(rec) == 'table' and rec.spec
    if type(spec) == 'table' and type(spec.model) == 'string'
        and (rec.status == 'queued' or rec.status == 'running' or DONE[rec.status]) then
      local finished = type(rec.finished_at) == 'string' and epoch(rec.finished_at) or nil
      local owner = type(rec.owner) == 'string' and rec.owner or nil
      index_job(prefix, id, '0', rec.status, spec.model, finished, owner)
      indexed = indexed + 1
    else
      unreadable = unreadable + 1
    end
  end
end
return {indexed, removed, unreadable}
"""
)


def index_job(
    pipe: Any,
    job_id: str,
    score: float,
    status: JobStatus,
    model: str,
    finished_at: float | None = None,
    owner: str | None = None,
) -> None:
    """Queue the script that files `job_id` under `status` and `model` (and only there), in
    everyone's indexes and in its `owner`'s.

    Idempotent: run again for the same job, or with a new status, it moves the job's entries;
    a job already listed keeps its creation time as its score.
    """
    finished = finished_at if finished_at is not None else time.time()
    pipe.eval(
        INDEX_ONE,
        0,
        PREFIX,
        job_id,
        repr(score),
        status.value,
        model,
        repr(finished),
        owner or "",
    )


def unindex_job(pipe: Any, job_id: str, model: str | None, owner: str | None = None) -> None:
    """Queue the commands that remove `job_id` from every index."""
    pipe.zrem(FINISHED, job_id)
    for who in (None, owner) if owner else (None,):
        pipe.zrem(listing_key(None, None, who), job_id)
        for status in JobStatus:
            pipe.zrem(listing_key(status, None, who), job_id)
            if model is not None:
                pipe.zrem(listing_key(status, model, who), job_id)
        if model is not None:
            pipe.zrem(listing_key(None, model, who), job_id)


def format_cursor(cursor: Cursor) -> str:
    score, job_id = cursor
    return f"{score!r}:{job_id}"


def parse_cursor(raw: str, member: re.Pattern[str] = JOB_ID_RE) -> Cursor:
    """`score:id` as `format_cursor` writes it (a bare score, as version 1 gave out, too); the
    id must match `member` (a job id, or another index's member such as a checkpoint id)."""
    score, _, member_id = raw.partition(":")
    value = float(score)
    if math.isnan(value) or (member_id and not member.fullmatch(member_id)):
        raise ValueError(f"not a cursor: {raw!r}")
    return value, member_id


def page(r: Any, key: str, limit: int, cursor: Cursor | None) -> tuple[list[str], Cursor | None]:
    """Ids of `key` newest first after `cursor`: one page, and the cursor of the next one.

    Ties in creation time are broken by id (Redis orders equal scores by member), so no job
    is skipped or shown twice across pages, even when the cursor's own job has since left
    the index (a queued job that started running, say).
    """
    top = "+inf" if cursor is None else repr(cursor[0])
    found: list[tuple[str, float]] = []
    offset = 0
    while len(found) <= limit:
        want = limit + 2 - len(found)
        batch = r.zrevrangebyscore(key, top, "-inf", start=offset, num=want, withscores=True)
        if not batch:
            break
        offset += len(batch)
        for job_id, score in batch:
            if cursor is not None and score == cursor[0] and job_id >= cursor[1]:
                continue  # at or before the cursor in this order
            found.append((job_id, score))
    ids = [job_id for job_id, _ in found[:limit]]
    more = len(found) > limit
    return ids, ((found[limit - 1][1], found[limit - 1][0]) if more else None)


def ensure_indexed(r: Any, wait_s: float = 600.0) -> int:
    """Index every job an earlier version recorded, once per store; returns how many.

    Idempotent and safe when several API and worker processes start together: one takes a
    lock and indexes (renewing the lock per chunk); the others wait for the schema mark. If
    the indexer dies, its lock lapses and the next process starts over.
    """
    if r.get(SCHEMA_KEY) == SCHEMA:
        return 0
    token = uuid.uuid4().hex
    deadline = time.monotonic() + wait_s
    while not r.set(SCHEMA_LOCK, token, nx=True, ex=MIGRATE_LOCK_S):
        if r.get(SCHEMA_KEY) == SCHEMA:
            return 0
        if time.monotonic() > deadline:
            raise TimeoutError("another process is still indexing the job store")
        time.sleep(0.1)
    try:
        if r.get(SCHEMA_KEY) == SCHEMA:
            return 0
        total = unreadable = start = 0
        while True:
            ids = r.zrange(ALL_JOBS, start, start + MIGRATE_CHUNK - 1)
            if not ids:
                break
            indexed, removed, bad = r.eval(MIGRATE, 0, PREFIX, *ids)
            total, unreadable = total + indexed, unreadable + bad
            start += len(ids) - removed  # what was removed no longer takes a rank
            r.expire(SCHEMA_LOCK, MIGRATE_LOCK_S)
        r.set(SCHEMA_KEY, SCHEMA)
        if unreadable:
            log.warning("job store upgrade: %d unreadable record(s) left unindexed", unreadable)
        return int(total)
    finally:
        if r.get(SCHEMA_LOCK) == token:
            r.delete(SCHEMA_LOCK)


def counts(r: Any) -> dict[str, int]:
    """Jobs per status, from the index sizes."""
    pipe = r.pipeline(transaction=False)
    for status in JobStatus:
        pipe.zcard(status_key(status))
    return {s.value: int(n) for s, n in zip(JobStatus, pipe.execute(), strict=True)}


def ids_in(r: Any, status: JobStatus) -> list[str]:
    return list(r.zrange(status_key(status), 0, -1))


def expired(r: Any, before: float, limit: int) -> list[str]:
    """Finished jobs that finished before `before` (oldest first, at most `limit`)."""
    return list(r.zrangebyscore(FINISHED, "-inf", before, start=0, num=limit))
