"""Submitting and cancelling jobs, one or a sweep's many, the one way for both; and queueing
evaluations, which share the training queue and so its limit and the owners' quotas.

`POST /v1/jobs` and `POST /v1/sweeps` both come here. Each spec has passed `JobSpec`'s checks
(bounds, the network fit); here its `init_from` is resolved to a checkpoint of the same network
(or a 422 that says what differs), an `Idempotency-Key` is claimed or replayed (`Idempotency`),
the jobs are recorded in one atomic step with the queue limit (past it, the job store's
`QueueFullError` or `ActiveJobsLimitError`: a 429), and each is sent through `enqueue_job`.
When the broker cannot take them, nothing is left behind: the jobs not sent are removed and
those sent are cancelled before they start.
`POST .../evaluate` comes to `queue_evaluation`: the same limits, the same 429s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import redis
from celery import Celery
from kombu.exceptions import KombuError
from pydantic import BaseModel

from service.access.auth import Caller
from service.errors import (
    BadRequestError,
    IdempotencyConflictError,
    IdempotencyInFlightError,
    ServiceUnavailableError,
)
from workers.celery_app import enqueue, enqueue_job, worker_heartbeats
from workers.contracts import EVALUATE_TASK, JobSpec, JobStatus
from workers.settings import Settings
from workers.store.checkpoints import CheckpointStore, Lineage, LineageError
from workers.store.evaluations import EvaluationRecord, EvaluationStore
from workers.store.jobs import JobRecord, JobStore, Quota, new_job_id, now_iso

logger = logging.getLogger(__name__)

IDEMPOTENCY_KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")
T = TypeVar("T")


def _body_hash(body: BaseModel) -> str:
    """A request body's fingerprint for its Idempotency-Key (canonical JSON, sha256)."""
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _claim_key(
    store: JobStore, key: str, fingerprint: str, new_id: str, owner: str | None
) -> str | None:
    """Claim `owner`'s Idempotency-Key for `new_id`; the earlier id when the key was used
    before (by the same owner: each principal's keys are its own)."""
    if not IDEMPOTENCY_KEY_RE.fullmatch(key):
        raise BadRequestError("Idempotency-Key must be 1 to 255 printable ASCII characters")
    try:
        return store.idempotent_job(key, fingerprint, new_id, owner=owner)
    except ValueError as exc:
        raise IdempotencyConflictError(
            f"{exc}; use a new key for a new request", idempotency_key=key
        ) from None


def _in_flight() -> IdempotencyInFlightError:
    return IdempotencyInFlightError(
        "the first request with this Idempotency-Key is still being processed; retry in a moment",
        headers={"Retry-After": "1"},
    )


def _release_key(store: JobStore, key: str | None, new_id: str, owner: str | None) -> None:
    """Give back a key claimed for something that was not made."""
    if key is None:
        return
    try:
        store.forget_idempotency_key(key, new_id, owner)
    except redis.RedisError:
        logger.warning("could not release the Idempotency-Key of %s", new_id)


@dataclass(frozen=True)
class Idempotency:
    """A submission's `Idempotency-Key` (None: it sent none), claimed by its owner for what
    the submission makes (`claim`: a job id, or `sweep:<id>`): one way for jobs and sweeps."""

    store: JobStore
    key: str | None
    claim: str
    owner: str | None

    def replay(self, body: BaseModel, find: Callable[[str], T | None]) -> T | None:
        """What an earlier submission with this key and body made (`find` reads it from that
        submission's claim), or None when this one claimed the key (or sent none). The key with
        another body is a 422; while the first submission is still being made, a 409."""
        if self.key is None:
            return None
        earlier = _claim_key(self.store, self.key, _body_hash(body), self.claim, self.owner)
        if earlier is None:
            return None
        found = find(earlier)
        if found is None:
            raise _in_flight()
        return found

    @contextmanager
    def released_on_failure(self) -> Iterator[None]:
        """Give the key back when what it was claimed for is not made after all."""
        try:
            yield
        except BaseException:
            _release_key(self.store, self.key, self.claim, self.owner)
            raise


def lineage(
    ckpts: CheckpointStore, spec: JobSpec, caller: Caller, *, where: str = "init_from"
) -> Lineage:
    """Resolve `init_from` to a checkpoint of the same network among the caller's own (a 422
    naming what differs)."""
    assert spec.input_size is not None
    try:
        return ckpts.lineage(
            spec.init_from,
            model=spec.model,
            arch=spec.network_arch,
            input_size=spec.input_size,
            continue_epochs=spec.continue_epochs,
            within=caller.within,
        )
    except LineageError as exc:
        raise BadRequestError(f"{where}: {exc}", differs=exc.differs) from None


def records(
    ckpts: CheckpointStore,
    specs: Sequence[JobSpec],
    caller: Caller,
    sweep_id: str | None = None,
) -> list[JobRecord]:
    """The caller's new jobs' records, every `init_from` resolved first (nothing is recorded
    yet)."""
    out = []
    for i, spec in enumerate(specs):
        where = "init_from" if sweep_id is None else f"grid point {i}: init_from"
        line = lineage(ckpts, spec, caller, where=where)
        out.append(
            JobRecord(
                id=new_job_id(),
                spec=spec,
                parent_checkpoint=line.parent,
                epoch_offset=line.epoch_offset,
                sweep_id=sweep_id,
                owner=caller.owner,
            )
        )
    return out


def _quota(caller: Caller) -> Quota:
    return Quota(caller.owner, caller.principal.max_active_jobs if caller.owner else None)


def submit(
    store: JobStore,
    celery: Celery,
    settings: Settings,
    jobs: Sequence[JobRecord],
    caller: Caller,
) -> None:
    """Record the caller's `jobs` at once (or none: the job store's `QueueFullError` or
    `ActiveJobsLimitError`, a 429, past the queue limit or the caller's quota of active
    jobs), then enqueue each."""
    store.create_many(list(jobs), max_queued=settings.max_queued_jobs, quota=_quota(caller))
    sent: list[str] = []
    try:
        for job in jobs:
            enqueue_job(celery, job.id, job.spec.device)
            sent.append(job.id)
    except (KombuError, redis.RedisError, OSError) as exc:
        logger.warning("could not enqueue job %s: %s", jobs[len(sent)].id, exc)
        _take_back(store, [j.id for j in jobs], sent)
        what = "the job was" if len(jobs) == 1 else f"the {len(jobs)} jobs were"
        raise ServiceUnavailableError(
            f"the broker (Redis) is not reachable; {what} not created; retry shortly",
            headers={"Retry-After": "5"},
        ) from None
    for job in jobs:
        logger.info("queued job %s (%s)", job.id, job.spec.model)


def queue_evaluation(
    evaluations: EvaluationStore,
    celery: Celery,
    settings: Settings,
    record: EvaluationRecord,
    caller: Caller,
) -> None:
    """Record the caller's evaluation within the queue limit and its quota (429 past either,
    as for jobs), then enqueue it; when the broker cannot take it, nothing is left behind."""
    evaluations.create(record, max_queued=settings.max_queued_jobs, quota=_quota(caller))
    try:
        enqueue(celery, EVALUATE_TASK, record.id)
    except (KombuError, redis.RedisError, OSError) as exc:
        logger.warning("could not enqueue evaluation %s: %s", record.id, exc)
        try:
            evaluations.discard(record)
        except redis.RedisError:
            logger.warning("could not take back evaluation %s", record.id)
        raise ServiceUnavailableError(
            "the broker (Redis) is not reachable; the evaluation was not queued; retry shortly",
            headers={"Retry-After": "5"},
        ) from None


def _take_back(store: JobStore, ids: list[str], sent: list[str]) -> None:
    """Undo jobs the broker did not all take: remove the unsent, cancel the sent."""
    try:
        store.delete_many([i for i in ids if i not in sent])
        for job_id in sent:  # a worker that gets its message finds it cancelled and drops it
            cancel(store, job_id)
    except redis.RedisError:
        logger.warning("could not take back jobs %s", ids)


def cancel(store: JobStore, job_id: str) -> tuple[JobRecord, bool]:
    """Cancel a job: a queued one at once, a running one by its worker within seconds.

    Returns the record and whether there was anything to cancel (False: already finished).
    """
    unfinished = False
    cancelled_now = False

    def change(record: JobRecord) -> None:
        nonlocal unfinished, cancelled_now
        unfinished = not record.status.finished  # decided afresh if the transaction is retried
        cancelled_now = unfinished and record.status == JobStatus.queued
        if unfinished:
            record.cancel_requested = True
        if cancelled_now:
            record.status = JobStatus.cancelled
            record.finished_at = now_iso()

    def status_event(_record: JobRecord) -> tuple[str, dict[str, object]] | None:
        return ("status", {"status": JobStatus.cancelled.value}) if cancelled_now else None

    record = store.update(job_id, change, event=status_event)
    if unfinished:
        store.request_cancel(job_id)  # what a running job's worker looks for
    return record, unfinished


def may_wait_for_a_gpu(record: JobRecord) -> bool:
    """A queued job that asks for a GPU: `waiting_note` has something to look up."""
    return record.status is JobStatus.queued and record.spec.device.startswith("cuda")


def waiting_note(record: JobRecord, redis_url: str) -> str | None:
    """Why a queued job that asks for a GPU is not starting: no worker trains on one.

    Such a job sits on the GPU workers' queue (`workers.contracts.CUDA_QUEUE`), where CPU
    workers never look: it waits, and this says so, instead of training on the CPU or failing.
    None for every other job, and while a GPU worker is up.
    """
    if not may_wait_for_a_gpu(record):
        return None
    try:
        beating = worker_heartbeats(redis_url)
    except redis.RedisError:
        return None
    if any(str(w.get("device") or "").startswith("cuda") for w in beating):
        return None
    seen = ", ".join(f"{w.get('name')} ({w.get('device') or '?'})" for w in beating) or "none"
    return (
        f"waiting for a worker with a CUDA GPU (the job asks for {record.spec.device!r}); "
        f"no GPU worker is running (workers now: {seen}). Start one on a GPU machine with "
        "`cnnserve worker --device cuda`, or with Docker the GPU override "
        "(docker-compose.gpu.yml), or cancel the job and submit it with device 'auto'"
    )
