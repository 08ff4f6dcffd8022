"""`Annotated` dependency aliases and path parameters the routes share: settings, stores, the
Celery app and the inference service from `app.state`, valid jobs, resolved checkpoints.

`create_app` puts one of each on `app.state` in its lifespan, so a test can build an app with
its own settings and every route sees them.
"""

from __future__ import annotations

import threading
from typing import Annotated, Any

from celery import Celery
from fastapi import Depends, Path, Request

from service.access.auth import CallerDep, current_caller
from service.api.schemas import EXAMPLE_ID
from service.inference.batcher import InferenceService
from service.jobs.sweeps import SweepStore
from workers.contracts import JOB_ID_RE
from workers.settings import Settings
from workers.store.checkpoints import CheckpointStore, Manifest
from workers.store.jobs import JobNotFoundError, JobRecord, JobStore


async def get_app_settings(request: Request) -> Settings:
    """The settings the app was built with."""
    settings: Settings = request.app.state.settings
    return settings


async def get_job_store(request: Request) -> JobStore:
    """The app's job store (one Redis connection pool per app)."""
    store: JobStore = request.app.state.job_store
    return store


async def get_checkpoint_store(request: Request) -> CheckpointStore:
    """The app's checkpoint store (`CNNSERVE_CHECKPOINT_URL`, else `data_dir/checkpoints`)."""
    store: CheckpointStore = request.app.state.checkpoint_store
    return store


async def get_celery(request: Request) -> Celery:
    """The Celery app used to enqueue training tasks by name."""
    celery: Celery = request.app.state.celery
    return celery


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
JobStoreDep = Annotated[JobStore, Depends(get_job_store)]
CheckpointStoreDep = Annotated[CheckpointStore, Depends(get_checkpoint_store)]
CeleryDep = Annotated[Celery, Depends(get_celery)]

JobIdPath = Annotated[
    str,
    Path(
        description="A job id: 16 hex digits, as `POST /v1/jobs` returned it.",
        examples=["0123456789abcdef"],
    ),
]


async def valid_job_id(job_id: JobIdPath) -> str:
    """The path's job id when it has the shape of one; a 404 problem otherwise."""
    if not JOB_ID_RE.fullmatch(job_id):
        raise JobNotFoundError(job_id)
    return job_id


def valid_job(
    job_id: Annotated[str, Depends(valid_job_id)], store: JobStoreDep, caller: CallerDep
) -> JobRecord:
    """The job record the path names; a 404 problem when there is none, or it is another
    tenant's (the same answer: ids cannot be probed)."""
    record = store.get(job_id)
    if not caller.sees(record.owner):
        raise JobNotFoundError(job_id)
    return record


ValidJobId = Annotated[str, Depends(valid_job_id)]
ValidJob = Annotated[JobRecord, Depends(valid_job)]


async def sweep_store(request: Request) -> SweepStore:
    """The sweep records beside the app's job store."""
    store: JobStore = request.app.state.job_store
    return SweepStore(store.r)


SweepStoreDep = Annotated[SweepStore, Depends(sweep_store)]


_SERVICE_LOCK = threading.Lock()


async def get_inference(request: Request) -> InferenceService:
    """The app's inference service (`app.state.inference`), made on first use.

    `async` on purpose: FastAPI runs plain `def` dependencies on the thread pool, a hop that
    costs more than this lookup on every predict call.
    """
    return inference_of(request.app.state)


def inference_of(state: Any) -> InferenceService:
    """The inference service of an app's `state`, made on first use."""
    service: InferenceService | None = getattr(state, "inference", None)
    if service is None:
        with _SERVICE_LOCK:
            service = getattr(state, "inference", None)
            if service is None:
                service = InferenceService(state.settings, state.checkpoint_store)
                state.inference = service
    return service


InferenceDep = Annotated[InferenceService, Depends(get_inference)]


# --- checkpoints -------------------------------------------------------------------------------

RefPath = Annotated[
    str,
    Path(
        description="A checkpoint id (`<job>-eNNN`) or an alias: `<job>:latest`, "
        "`<job>:best`, `<model>:best`, `<model>:latest`.",
        examples=[EXAMPLE_ID, "0123456789abcdef:best", "lenet:best"],
        max_length=64,
    ),
]


async def resolved_manifest(ref: RefPath, request: Request, caller: CallerDep) -> Manifest:
    """The manifest of the checkpoint `ref` names, read afresh; a 404 problem when none does,
    or it is another tenant's."""
    resolver = inference_of(request.app.state).resolver
    return await resolver.manifest(ref, caller.within, fresh=True)


async def predict_manifest(ref: RefPath, request: Request) -> Manifest:
    """Like `resolved_manifest`, but a resolution under a second old is reused (the hot calls:
    predict, explain).

    The caller and the service straight from the request (each sub-dependency costs FastAPI's
    resolution on every call), so no dependency of a predict call needs the thread pool.
    """
    caller = await current_caller(request)
    return await inference_of(request.app.state).resolver.manifest(ref, caller.within)


ResolvedManifest = Annotated[Manifest, Depends(resolved_manifest)]
PredictManifest = Annotated[Manifest, Depends(predict_manifest)]
