"""`/healthz`, `/readyz` and `/metrics` at the root, for orchestrators and Prometheus."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import anyio
from anyio import to_thread
from celery import Celery
from fastapi import APIRouter, Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, ConfigDict, Field

from service.access.auth import authorize, bearer_scheme
from service.api.deps import CeleryDep, JobStoreDep, SettingsDep
from service.api.problems import problem_responses
from service.errors import ForbiddenError, ServiceUnavailableError, UnauthorizedError
from service.metrics import refresh_job_gauges, render_latest
from workers.celery_app import live_workers, worker_heartbeats
from workers.store.checkpoints import CheckpointStore, StoreUnavailableError

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])

WORKER_PING_TIMEOUT_S = 1.0
WORKER_CACHE_S = 5.0
CHECK_DEADLINE_S = 3.0


class Check(BaseModel):
    """One readiness check."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"ok": True, "detail": "PONG from redis://127.0.0.1:6379/0"}]
        }
    )

    ok: bool
    detail: str


class WorkerInfo(BaseModel):
    """A training worker seen lately, and what it trains on."""

    name: str
    device: str | None = Field(
        None,
        description="What it trains on: `cpu` or `cuda:N` (null when it does not say: an older "
        "worker, or one seen only by a Celery ping). Jobs that ask for `cuda` wait for a "
        "worker on a GPU.",
    )
    gpu: str | None = Field(None, description="The GPU's name, on a GPU worker.")
    job: str | None = Field(None, description="The job it trains now, if any.")


class Readiness(BaseModel):
    """The service is ready: every check passed (what each found: for admins only)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "status": "ready",
                    "checks": {
                        "redis": {"ok": True, "detail": "PONG from redis://127.0.0.1:6379/0"},
                        "storage": {"ok": True, "detail": "data/checkpoints is writable"},
                        "workers": {"ok": True, "detail": "1 worker(s): celery@host (cpu)"},
                    },
                    "workers": [{"name": "celery@host", "device": "cpu", "gpu": None, "job": None}],
                }
            ]
        }
    )

    status: str = Field(description="`ready`.")
    checks: dict[str, Check] | None = Field(
        None,
        description="What each check found (paths, hosts, workers): only for a key with the "
        "admin scope, or anyone on a server without keys.",
    )
    workers: list[WorkerInfo] | None = Field(
        None,
        description="The training workers seen lately and the device each trains on (`cpu`, "
        "`cuda:N`): only for a key with the admin scope, or anyone on a server without keys.",
    )


class Liveness(BaseModel):
    """The process is up."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok"}]})

    status: str


@dataclass
class WorkerPingCache:
    """The last answer of a worker ping, kept a few seconds so probes stay cheap."""

    at: float = 0.0
    workers: list[WorkerInfo] = field(default_factory=list)
    error: str | None = None


def _redact(url: str) -> str:
    # never show a password that may be in the URL
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


def _check_storage(path: Path) -> Check:
    """The data directory is there (made once when missing) and writable: a stat and an
    access check, never a file written per probe."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fs = os.statvfs(path)
    except OSError as exc:
        return Check(ok=False, detail=f"{path} is not usable: {exc.strerror or exc}")
    if fs.f_flag & os.ST_RDONLY:
        return Check(ok=False, detail=f"{path} is on a read-only file system")
    if not os.access(path, os.W_OK | os.X_OK):
        return Check(ok=False, detail=f"{path} is not writable by this process")
    free_gib = fs.f_bavail * fs.f_frsize / 2**30
    return Check(ok=True, detail=f"{path} is writable ({free_gib:.1f} GiB free)")


async def _check_checkpoints(store: CheckpointStore) -> Check:
    """The checkpoint store answers (a bucket) or is writable (the local directory)."""
    if not store.remote:
        return await to_thread.run_sync(_check_storage, Path(store.location))
    try:
        with anyio.fail_after(CHECK_DEADLINE_S):
            detail = await to_thread.run_sync(store.check, abandon_on_cancel=True)
    except TimeoutError:
        return Check(
            ok=False, detail=f"the checkpoint store {store.location} did not answer in time"
        )
    except StoreUnavailableError as exc:
        return Check(ok=False, detail=str(exc))
    return Check(ok=True, detail=detail)


def _find_workers(celery: Celery, redis_url: str) -> list[WorkerInfo]:
    """Workers seen lately: their heartbeat keys (instant), else a Celery ping."""
    # a worker busy training may answer a ping late (its one thread is the job's); its heartbeat
    # thread beats regardless
    beating = {
        str(b["name"]): WorkerInfo(
            name=str(b["name"]), device=b.get("device"), gpu=b.get("gpu"), job=b.get("job")
        )
        for b in worker_heartbeats(redis_url)
        if b.get("name")
    }
    if beating:
        return [beating[name] for name in sorted(beating)]
    return [WorkerInfo(name=name) for name in live_workers(celery, WORKER_PING_TIMEOUT_S)]


def _label(worker: WorkerInfo) -> str:
    on = ", ".join(part for part in (worker.device, worker.gpu) if part)
    return f"{worker.name} ({on})" if on else worker.name


async def _check_workers(request: Request, celery: Celery, redis_url: str) -> Check:
    cache: WorkerPingCache = request.app.state.worker_ping_cache
    if time.monotonic() - cache.at > WORKER_CACHE_S:
        try:
            with anyio.fail_after(CHECK_DEADLINE_S):
                workers = await to_thread.run_sync(
                    _find_workers, celery, redis_url, abandon_on_cancel=True
                )
            cache.workers, cache.error = workers, None
        except TimeoutError:
            cache.workers, cache.error = [], "the worker ping did not return in time"
        except Exception as exc:  # the broker's errors vary by transport
            cache.workers, cache.error = [], f"the worker ping failed: {exc}"
        cache.at = time.monotonic()
    if cache.error:
        return Check(ok=False, detail=cache.error)
    if not cache.workers:
        return Check(ok=False, detail="no worker answered a ping; start one with `cnnserve worker`")
    labels = ", ".join(_label(w) for w in cache.workers)
    return Check(ok=True, detail=f"{len(cache.workers)} worker(s): {labels}")


@router.get(
    "/healthz",
    summary="Liveness",
    description="200 while the process serves requests; checks nothing else.",
    response_model=Liveness,
)
async def healthz() -> Liveness:
    return Liveness(status="ok")


def _sees_details(request: Request, credentials: HTTPAuthorizationCredentials | None) -> bool:
    """Whether this caller may read what the checks found (the data path, Redis's host and
    database, worker names): an admin's key, or anyone on a server without keys. A wrong key
    counts as none here: the probe itself stays open."""
    state = request.app.state
    try:
        return authorize(state.key_ring, state.settings, "any", credentials).principal.admin
    except (UnauthorizedError, ForbiddenError):
        return False


@router.get(
    "/readyz",
    summary="Readiness",
    description="Redis answers a ping, the checkpoint store answers (the bucket of "
    "CNNSERVE_CHECKPOINT_URL, else the data directory is there and writable: a stat, no write) "
    "and at least one training worker is alive (its heartbeat in Redis, or a Celery ping; "
    "cached a few seconds). 503 naming the failing checks otherwise. Open to all; what each "
    "check found (paths, hosts) and the workers with their devices are shown to a key with the "
    "admin scope only (to everyone on a server without keys).",
    response_model=Readiness,
    response_model_exclude_none=True,
    responses=problem_responses(
        503, s503="not ready: workers: no worker answered a ping; start one with cnnserve worker"
    ),
    openapi_extra={"security": [{}, {"ApiKey": ["admin"]}]},
)
async def readyz(
    request: Request,
    settings: SettingsDep,
    store: JobStoreDep,
    celery: CeleryDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Readiness:
    checks: dict[str, Check] = {}
    try:
        with anyio.fail_after(CHECK_DEADLINE_S):
            await to_thread.run_sync(store.r.ping, abandon_on_cancel=True)
        checks["redis"] = Check(ok=True, detail=f"PONG from {_redact(settings.redis_url)}")
    except TimeoutError:
        checks["redis"] = Check(ok=False, detail="Redis did not answer a ping in time")
    except Exception as exc:  # redis-py raises several kinds for a dead server
        checks["redis"] = Check(
            ok=False, detail=f"Redis at {_redact(settings.redis_url)} is not reachable: {exc}"
        )
    checks["storage"] = await _check_checkpoints(request.app.state.checkpoint_store)
    if checks["redis"].ok:
        checks["workers"] = await _check_workers(request, celery, settings.redis_url)
    else:
        checks["workers"] = Check(ok=False, detail="not checked: the broker is not reachable")
    workers = request.app.state.worker_ping_cache.workers if checks["redis"].ok else []
    failing = [name for name, c in checks.items() if not c.ok]
    if not _sees_details(request, credentials):
        if failing:
            raise ServiceUnavailableError(
                f"not ready: {', '.join(failing)} (a key with the admin scope sees why)",
                headers={"Retry-After": "5"},
                checks={k: {"ok": v.ok} for k, v in checks.items()},
            )
        return Readiness(status="ready")
    if failing:
        raise ServiceUnavailableError(
            "not ready: " + "; ".join(f"{name}: {checks[name].detail}" for name in failing),
            headers={"Retry-After": "5"},
            checks={k: v.model_dump() for k, v in checks.items()},
            workers=[w.model_dump() for w in workers],
        )
    return Readiness(status="ready", checks=checks, workers=workers)


def metrics_access(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> None:
    """Open, or the scope `CNNSERVE_METRICS_SCOPE` names (when the server has keys)."""
    settings = request.app.state.settings
    if settings.metrics_scope:
        authorize(request.app.state.key_ring, settings, settings.metrics_scope, credentials)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    description="Request counts and latencies by route, jobs by status, queue depth, "
    "inference latency and batch sizes, and model cache hits, in Prometheus text format.",
    response_class=Response,
    responses={
        200: {"description": "Prometheus text.", "content": {"text/plain": {}}},
        **problem_responses(401, 403),
    },
    dependencies=[Depends(metrics_access)],
    # a key only where CNNSERVE_METRICS_SCOPE names a scope: `{}` says it may be left out
    openapi_extra={"security": [{}]},
)
def metrics(store: JobStoreDep) -> Response:
    try:
        refresh_job_gauges(store)
    except Exception as exc:  # metrics must still answer when Redis is down
        logger.warning("could not refresh job gauges: %s", exc)
    body, content_type = render_latest()
    return Response(body, media_type=content_type)
