"""One job's life on a worker: lease, attempts, cancel, resume, training and its record.

The Celery task calls `run_job`; everything here is plain Python over Redis (`JobStore`) and
the checkpoint store, so it runs the same under any worker pool or none.

Durability, in brief: a job is trained only by the holder of its lease (renewed by a
heartbeat thread). A worker that dies stops renewing; `recover_orphans`, run by every live
worker, finds `running` jobs without a lease and queues them again, and the next worker
resumes from the job's `latest` checkpoint. Each start counts as an attempt; past
`max_attempts` the job fails instead of killing workers in a loop. `resend_lost` does the same
for the queued: a job (or evaluation) recorded but whose message the broker no longer holds
(a Redis that lost its last writes) is sent again, instead of waiting for ever.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from workers.contracts import EVALUATE_TASK, TRAIN_TASK, JobSpec, JobStatus
from workers.errors import DeviceError, TrainingError
from workers.settings import Settings
from workers.store.checkpoints import (
    STORE_UNAVAILABLE,
    CheckpointError,
    CheckpointStore,
    SavedCheckpoint,
    retry_unavailable,
)
from workers.store.evaluations import EvaluationStore
from workers.store.jobs import EpochMetrics, JobNotFoundError, JobRecord, JobStore, Progress
from workers.store.jobs import now_iso as _now
from workers.training.data import load_fashion_mnist
from workers.training.devices import release_memory, requested_device, resolve_device
from workers.training.engine import Outcome, StopRequest, TrainOptions, TrainResult, train

log = logging.getLogger(__name__)

#: Set when the worker is asked to shut down: running jobs stop and go back to the queue.
shutdown_requested = threading.Event()
#: The job this process is training (for the worker's heartbeat), or None.
current_job: str | None = None


class LeaseKeeper:
    """Renews a job's lease from a daemon thread; `lost` is set if someone else took it."""

    def __init__(self, store: JobStore, job_id: str, owner: str, ttl_s: float) -> None:
        self.store = store
        self.job_id = job_id
        self.owner = owner
        self.ttl_s = ttl_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lease-{job_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self.store.renew_lease(self.job_id, self.owner, self.ttl_s):
                    log.error("job %s: lease lost; another worker owns the job now", self.job_id)
                    self.lost.set()
                    return
            except Exception:  # a Redis blip: keep trying until the lease runs out
                log.warning("job %s: lease renewal failed", self.job_id, exc_info=True)


class JobCallbacks:
    """Engine callbacks that keep the job record and its event stream up to date."""

    def __init__(self, store: JobStore, job_id: str, lease: LeaseKeeper):
        self.store = store
        self.job_id = job_id
        self.lease = lease
        self.finished_elsewhere = False

    def on_progress(self, progress: Progress) -> None:
        def change(rec: JobRecord) -> None:
            if rec.status.finished:
                self.finished_elsewhere = True
            rec.progress = progress

        try:  # progress is best effort: a Redis blip must not stop training
            self.store.update(
                self.job_id, change, event=lambda _rec: ("progress", progress.model_dump())
            )
        except redis.RedisError as exc:
            log.warning("job %s: progress not recorded (%s)", self.job_id, exc)

    def on_epoch(self, metrics: EpochMetrics, saved: SavedCheckpoint) -> None:
        def change(rec: JobRecord) -> None:
            rec.metrics = [m for m in rec.metrics if m.epoch < metrics.epoch] + [metrics]
            rec.checkpoints = saved.kept
            rec.latest_checkpoint = saved.latest
            rec.best_checkpoint = saved.best

        event = {**metrics.model_dump(), "checkpoint": saved.manifest.id}
        # an epoch's record must not be lost to a Redis blip, nor end the attempt
        self._until_recorded(
            lambda: self.store.update(self.job_id, change, event=lambda _rec: ("epoch", event))
        )

    def _until_recorded(self, op: Callable[[], object]) -> None:
        """Run `op`, riding out a Redis outage for as long as this worker holds the lease."""
        delay = 0.2
        while True:
            try:
                op()
                return
            except redis.RedisError as exc:
                if self.lease.lost.is_set() or shutdown_requested.is_set():
                    raise
                log.warning("job %s: Redis unavailable (%s); retrying", self.job_id, exc)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def stop_requested(self) -> StopRequest | None:
        if self.lease.lost.is_set():
            return StopRequest.lost
        if shutdown_requested.is_set():
            return StopRequest.interrupt
        try:
            cancel = self.store.cancel_requested(self.job_id)
        except redis.RedisError:
            cancel = False  # asked again at the next check
        if self.finished_elsewhere or cancel:
            return StopRequest.cancel
        return None


def finish(
    store: JobStore, job_id: str, status: JobStatus, error: str | None = None, **event: Any
) -> bool:
    """Move a job to a final status (unless it already has one) and emit its status event."""
    changed = False

    def change(rec: JobRecord) -> None:
        nonlocal changed
        changed = not rec.status.finished  # decided afresh if the transaction is retried
        if not changed:
            return
        rec.status = status
        rec.finished_at = _now()
        rec.error = error
        if status is JobStatus.succeeded:
            rec.progress.eta_s = 0.0

    def status_event(_rec: JobRecord) -> tuple[str, dict[str, Any]] | None:
        if not changed:
            return None
        data: dict[str, Any] = {"status": status.value, **event}
        if error is not None:
            data["error"] = error
        return "status", data

    store.update(job_id, change, event=status_event)
    return changed


def requeue(
    store: JobStore, job_id: str, enqueue: Callable[[str], Any], reason: str, **event: Any
) -> bool:
    """Put a `running` job back to `queued` and send it again (worker lost or shut down)."""
    changed = False

    def change(rec: JobRecord) -> None:
        nonlocal changed
        changed = rec.status is JobStatus.running
        if changed:
            rec.status = JobStatus.queued

    def status_event(_rec: JobRecord) -> tuple[str, dict[str, Any]] | None:
        return ("status", {"status": "queued", "reason": reason, **event}) if changed else None

    store.update(job_id, change, event=status_event)
    if changed:
        enqueue(job_id)
        log.info("job %s queued again: %s", job_id, reason)
    return changed


@dataclass(frozen=True)
class ResumePoint:
    """What the checkpoint index holds of a job: where it resumes, and what its record lists."""

    latest: str | None = None
    best: str | None = None
    #: The job's checkpoint ids, oldest first (as `SavedCheckpoint.kept`).
    checkpoints: list[str] = field(default_factory=list)
    #: The metrics history the latest checkpoint carries (up to its epoch).
    history: list[EpochMetrics] = field(default_factory=list)


def _resume_point(ckpts: CheckpointStore, job_id: str) -> ResumePoint:
    """The job's checkpoints as the index has them: the latest (to resume from), the best, all
    of them, and the metrics history the latest carries."""
    aliases = ckpts.aliases(job_id)
    latest = aliases.get("latest")
    if latest is None:
        return ResumePoint()
    kept = [c.id for c in reversed(ckpts.list(job_id=job_id))]
    try:
        manifest = ckpts.manifest(latest)
    except CheckpointError:
        return ResumePoint(latest, aliases.get("best"), kept)  # the engine refuses it clearly
    history = [EpochMetrics.model_validate(h) for h in manifest.history]
    done = [m for m in history if m.epoch <= manifest.epoch]
    return ResumePoint(latest, aliases.get("best"), kept, done)


def run_job(
    job_id: str,
    *,
    worker: str,
    settings: Settings,
    enqueue: Callable[[str], Any],
) -> str:
    """Train one delivered job to its end (or drop the delivery); returns what happened."""
    store = JobStore.from_url(settings.redis_url)
    try:
        return _deliver(store, job_id, worker, settings, enqueue)
    finally:
        store.r.close()


def _deliver(
    store: JobStore, job_id: str, worker: str, settings: Settings, enqueue: Callable[[str], Any]
) -> str:
    try:
        record = store.get(job_id)
    except JobNotFoundError:
        log.warning("job %s: no such job record; dropping the message", job_id)
        return "missing"
    if record.status.finished:
        log.info("job %s is already %s; dropping the message", job_id, record.status.value)
        return "finished"
    if store.cancel_requested(job_id):
        finish(store, job_id, JobStatus.cancelled, reason="cancelled before it started")
        return "cancelled"
    owner = f"{worker}#{uuid.uuid4().hex[:8]}"
    if not store.acquire_lease(job_id, owner, settings.lease_seconds):
        # a live worker trains it; if that worker dies, recover_orphans queues it again
        log.info("job %s is leased by another live worker; dropping this delivery", job_id)
        return "duplicate"
    global current_job
    lease = LeaseKeeper(store, job_id, owner, settings.lease_seconds)
    lease.start()
    current_job = job_id
    try:
        return _run_leased(store, record.spec, job_id, worker, settings, lease, enqueue)
    finally:
        current_job = None
        lease.stop()
        store.release_lease(job_id, owner)
        release_memory("cuda")  # a no-op unless this process initialised CUDA


@dataclass(frozen=True)
class Attempt:
    """Where an attempt starts: the device, and the checkpoint it resumes from."""

    worker: str
    device: str
    device_error: DeviceError | None
    found: ResumePoint

    @property
    def resume_from(self) -> str | None:
        return self.found.latest


def _start_attempt(
    store: JobStore, job_id: str, attempt: Attempt, max_attempts: int
) -> tuple[str, JobRecord]:
    """Mark the job running (or failed past `max_attempts`), with its status event, at once."""
    decision = "run"

    def start(rec: JobRecord) -> None:
        nonlocal decision
        decision = "run"  # decided afresh if the transaction is retried
        if rec.status.finished:
            decision = "finished"
            return
        # the checkpoint store is the truth: no gaps, no duplicates, and nothing missing that
        # a worker killed between publishing an epoch and recording it left out
        found = attempt.found
        rec.metrics = found.history if found.latest is not None else []
        rec.checkpoints = found.checkpoints
        rec.latest_checkpoint = found.latest
        rec.best_checkpoint = found.best
        if rec.attempts >= max_attempts:
            decision = "gave_up"
            rec.status = JobStatus.failed
            rec.finished_at = _now()
            rec.error = (
                f"gave up after {rec.attempts} attempts (CNNSERVE_MAX_ATTEMPTS="
                f"{max_attempts}): the worker training this job stopped mid-run each "
                f"time (last: {rec.worker}, at epoch {rec.progress.epoch}). Check that worker's "
                "log (out of memory?) and resubmit, e.g. with a smaller batch_size"
            )
            return
        rec.attempts += 1
        rec.status = JobStatus.running
        rec.started_at = rec.started_at or _now()
        rec.finished_at = None
        rec.worker = attempt.worker
        rec.device = attempt.device
        rec.error = None
        done = found.history[-1].epoch if found.history else rec.epoch_offset
        rec.progress = Progress(epoch=done, epochs=rec.epoch_offset + rec.spec.epochs)

    def status_event(rec: JobRecord) -> tuple[str, dict[str, Any]] | None:
        if decision == "gave_up":
            return "status", {"status": "failed", "error": rec.error}
        if decision == "run":
            return "status", {
                "status": "running",
                "attempt": rec.attempts,
                "worker": attempt.worker,
                "device": attempt.device,
                "resumed_from": attempt.resume_from,
            }
        return None

    record = store.update(job_id, start, event=status_event)
    return decision, record


def _prepare_attempt(
    ckpts: CheckpointStore,
    spec: JobSpec,
    job_id: str,
    worker: str,
    settings: Settings,
    lease: LeaseKeeper,
) -> Attempt:
    # the checkpoint store unreachable: wait for it (holding the lease) rather than start over
    found = retry_unavailable(
        lambda: _resume_point(ckpts, job_id),
        stop=lambda: lease.lost.is_set() or shutdown_requested.is_set(),
        what=f"job {job_id}: finding its latest checkpoint",
    )
    device_request = requested_device(spec.device, settings.worker_device)
    try:
        return Attempt(worker, str(resolve_device(device_request)), None, found)
    except DeviceError as exc:  # recorded as the attempt's failure
        return Attempt(worker, device_request, exc, found)


def _run_leased(
    store: JobStore,
    spec: JobSpec,
    job_id: str,
    worker: str,
    settings: Settings,
    lease: LeaseKeeper,
    enqueue: Callable[[str], Any],
) -> str:
    ckpts = CheckpointStore.from_settings(settings, store.r)
    try:
        attempt = _prepare_attempt(ckpts, spec, job_id, worker, settings, lease)
    except STORE_UNAVAILABLE as exc:  # stopping: the job stays queued for the next worker
        log.warning("job %s: not started, the checkpoint store is unavailable: %s", job_id, exc)
        return "interrupted"
    decision, record = _start_attempt(store, job_id, attempt, settings.max_attempts)
    if decision == "finished":
        return "finished"
    if decision == "gave_up":
        log.error("job %s: %s", job_id, record.error)
        return "failed"
    log.info(
        "job %s: attempt %d on %s (resume from %s)",
        job_id,
        record.attempts,
        worker,
        attempt.resume_from,
    )
    try:
        if attempt.device_error is not None:
            raise attempt.device_error
        result = train(
            record.spec,
            job_id=job_id,
            data=load_fashion_mnist(settings),
            store=ckpts,
            options=TrainOptions.from_settings(settings, attempt.device),
            callbacks=JobCallbacks(store, job_id, lease),
            resume_from=attempt.resume_from,
            init_from=record.parent_checkpoint,
            epoch_offset=record.epoch_offset,
            owner=record.owner,
        )
    except TrainingError as exc:
        log.error("job %s failed: %s", job_id, exc)
        finish(store, job_id, JobStatus.failed, str(exc))
        return "failed"
    except STORE_UNAVAILABLE as exc:  # given up only when this worker stops: run it elsewhere
        log.warning("job %s: the checkpoint store is unavailable while stopping: %s", job_id, exc)
        if shutdown_requested.is_set() and not lease.lost.is_set():
            requeue(store, job_id, enqueue, f"worker {worker} shut down")
        return "interrupted"
    except Exception as exc:  # a bug or an environment problem: fail the job, keep the worker
        log.exception("job %s crashed", job_id)
        finish(store, job_id, JobStatus.failed, f"training crashed: {type(exc).__name__}: {exc}")
        return "failed"
    return _record_outcome(store, job_id, result, worker, settings, lease, enqueue)


def _record_outcome(
    store: JobStore,
    job_id: str,
    result: TrainResult,
    worker: str,
    settings: Settings,
    lease: LeaseKeeper,
    enqueue: Callable[[str], Any],
) -> str:
    """Give the job the final status its run ended with (or queue it again); what happened."""
    if result.outcome is Outcome.completed:
        finish(store, job_id, JobStatus.succeeded, seconds=result.seconds)
        return "succeeded"
    at = result.stopped_at or Progress()
    if result.outcome is Outcome.cancelled:
        finish(
            store,
            job_id,
            JobStatus.cancelled,
            reason="cancelled while running",
            epoch=at.epoch,
            batch=at.batch,
        )
        return "cancelled"
    if result.outcome is Outcome.timed_out:
        kept = (
            f"checkpoints up to {result.latest_checkpoint} are kept"
            if result.latest_checkpoint
            else "no epoch had finished, so there is no checkpoint"
        )
        finish(
            store,
            job_id,
            JobStatus.failed,
            f"stopped at epoch {at.epoch}, batch {at.batch}: the attempt ran longer than the "
            f"wall-time ceiling of {settings.job_max_seconds} s (CNNSERVE_JOB_MAX_SECONDS); "
            f"{kept}. Resubmit with fewer epochs or raise the ceiling",
            epoch=at.epoch,
            batch=at.batch,
        )
        return "timed_out"
    # interrupted: the lease went elsewhere, or this worker is shutting down
    if shutdown_requested.is_set() and not lease.lost.is_set():
        requeue(store, job_id, enqueue, f"worker {worker} shut down", epoch=at.epoch)
    return "interrupted"


def recover_orphans(
    store: JobStore, settings: Settings, enqueue: Callable[[str], Any]
) -> list[str]:
    """Queue again every `running` job whose worker died (its lease expired); returns their ids.

    Reads only the running index and those jobs' leases: its cost does not grow with history.
    """
    running = store.running_ids()
    recovered = []
    for job_id, held in zip(running, store.leases_held(running), strict=True):
        # one worker requeues a given orphan; the others see the claim and skip it
        if held or not store.claim_requeue(job_id, settings.lease_seconds):
            continue
        if store.lease_held(job_id):
            continue
        try:
            rec = store.get(job_id)
        except JobNotFoundError:
            continue
        reason = f"worker {rec.worker} stopped mid-job; resuming from its last checkpoint"
        if requeue(store, job_id, enqueue, reason, epoch=rec.progress.epoch):
            recovered.append(job_id)
    return recovered


def resend_lost(
    store: JobStore,
    settings: Settings,
    send: Callable[[str, str], Any],
    in_broker: Callable[[], set[str] | None],
) -> list[str]:
    """Send again (`send(task, id)`) every job and evaluation queued for longer than
    `lease_seconds` whose message the broker holds neither waiting nor delivered (`in_broker`:
    the task ids it holds, None when too many to tell); returns their ids.

    Reads the queued indexes, and the broker only when something has waited that long. A
    message sent twice is harmless: a delivery of a job already leased or finished is dropped.
    """
    cutoff = time.time() - settings.lease_seconds
    evaluations = EvaluationStore(store.r)
    waiting = [(TRAIN_TASK, i) for i in store.queued_before(cutoff)]
    waiting += [(EVALUATE_TASK, i) for i in evaluations.queued_before(cutoff)]
    if not waiting:
        return []
    held = in_broker()
    if held is None:
        return []
    resent = []
    for task, object_id in waiting:
        if object_id in held or not store.claim_resend(object_id, settings.lease_seconds):
            continue
        try:
            record = store.get(object_id) if task == TRAIN_TASK else evaluations.get(object_id)
        except JobNotFoundError:
            record = None
        if record is not None and record.status is JobStatus.queued:
            send(task, object_id)
            log.warning("%s was queued but its message was lost; sent again", object_id)
            resent.append(object_id)
    return resent
