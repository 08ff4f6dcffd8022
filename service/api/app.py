"""The FastAPI application factory: routers, error handlers, limits, metrics and offline docs."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import anyio
import redis
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp

from service import server_version
from service.access.audit import AuditMiddleware
from service.access.auth import PredictLimiter, log_auth_mode
from service.access.keys import KeyRing
from service.api.admission import Admission
from service.api.body_limit import BodySizeLimitMiddleware
from service.api.fastpath import FastPath
from service.api.handlers import register_exception_handlers
from service.api.logs import configure_logging
from service.api.problems import problemize_openapi
from service.api.routes import (
    access,
    checkpoints,
    evaluation,
    explain,
    health,
    job_events,
    job_views,
    jobs,
    ops,
    predict,
    sweeps,
    v2,
)
from service.api.routes import models as models_routes
from service.api.routes.health import WorkerPingCache
from service.api.streams import EventReader, StreamLimiter
from service.metrics import RequestMetricsMiddleware
from workers.celery_app import make_celery
from workers.contracts import warm_network_fit
from workers.settings import Settings, get_settings
from workers.store.checkpoints import CheckpointStore, StoreUnavailableError
from workers.store.jobs import JobStore

logger = logging.getLogger(__name__)

API_PREFIX = "/v1"
#: Finished jobs past their retention are looked for at least this often (seconds).
RETENTION_CHECK_MAX_S = 60.0
STATIC_URL = "/static-docs"
UI_URL = "/ui"

DESCRIPTION = """\
Train the convolutional networks of *Dive into Deep Learning* (LeNet and chapter 8's AlexNet,
VGG, NiN, GoogLeNet, BN-LeNet, ResNet-18, DenseNet, RegNetX-32) on Fashion-MNIST with Celery
workers, keep their checkpoints, and serve shape summaries and image classification from them.

* **models**: the zoo, default recipes and layer-by-layer shape summaries.
* **ops**: the book's primitives: cross-correlation, pooling, output-size arithmetic.
* **jobs**: submit training jobs (or fine-tune from a checkpoint), follow them live (Server-Sent
  Events), plot their curves, compare several.
* **sweeps**: a grid or random search over a spec, with a live leaderboard.
* **checkpoints**: list, download (weights, ONNX), delete, classify images with a trained
  checkpoint and explain its predictions.
* **v2**: the Open Inference Protocol (KServe V2), as Triton's clients speak it.

Errors are [RFC 9457](https://www.rfc-editor.org/rfc/rfc9457) `application/problem+json`.
When the server has API keys, calls need `Authorization: Bearer <key>` with the scope each
operation lists (`read`, `predict`, `train` or `admin`; the lock icon and "Authorize" above),
and a key's holder sees only its own jobs, sweeps and checkpoints (admins: everyone's).
`GET /v1/whoami` says what a key may do.
"""

TAGS: list[dict[str, Any]] = [
    {"name": "models", "description": "The networks of the book, their recipes and shapes."},
    {"name": "ops", "description": "The seed's primitives (D2L 7.2–7.5) on small inputs."},
    {
        "name": "jobs",
        "description": "Training jobs: submit, list, cancel, live events and training curves.",
    },
    {
        "name": "sweeps",
        "description": "Many jobs from one spec and a grid or random search, ranked.",
    },
    {
        "name": "checkpoints",
        "description": "Trained weights by id or alias, and image classification with them.",
    },
    {
        "name": "v2",
        "description": "The Open Inference Protocol (KServe V2 REST, with Triton's binary tensor "
        "and classification extensions): tritonclient and other V2 clients work unchanged. "
        'Errors are `{"error": "..."}`.',
    },
    {"name": "health", "description": "Liveness, readiness and Prometheus metrics."},
]


def _lifespan(settings: Settings) -> Any:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = redis.Redis.from_url(
            settings.redis_url,
            decode_responses=True,
            socket_connect_timeout=2,
            socket_timeout=10,
            health_check_interval=30,
        )
        app.state.settings = settings
        app.state.job_store = JobStore(client)
        app.state.checkpoint_store = CheckpointStore.from_settings(settings, client)
        # enqueues by task name only: workers.celery_app never imports the engine here
        app.state.celery = make_celery(settings)
        app.state.worker_ping_cache = WorkerPingCache()
        app.state.stream_limiter = StreamLimiter(
            settings.max_streams, settings.max_streams_per_principal
        )
        app.state.event_reader = EventReader(settings.redis_url, settings.max_streams)
        app.state.predict_limiter = PredictLimiter(settings.redis_url)
        ring: KeyRing = app.state.key_ring
        reload_on_hup = _reload_keys_on_sighup(ring)
        log_auth_mode(settings, ring)
        await _index_job_store(app.state.job_store)
        await _index_checkpoint_store(app.state.checkpoint_store)
        logger.info("cnnserve API ready (Redis %s)", settings.redis_url.rsplit("@", 1)[-1])
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(anyio.to_thread.run_sync, warm_network_fit)
                if settings.job_retention is not None:
                    tasks.start_soon(_purge_expired_jobs, app.state.job_store, settings)
                yield
                tasks.cancel_scope.cancel()
        finally:
            if reload_on_hup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            inference = getattr(app.state, "inference", None)
            if inference is not None and hasattr(inference, "close"):
                inference.close()
            app.state.celery.close()
            await app.state.event_reader.aclose()
            client.close()

    return lifespan


def _reload_keys_on_sighup(ring: KeyRing) -> bool:
    """Re-read the keys file on SIGHUP (where this process's loop may take signals)."""
    if ring.path is None:
        return False
    try:
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGHUP, lambda: ring.reload(force=True)
        )
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests)
        return False
    return True


async def _index_job_store(store: JobStore) -> None:
    """Index a job store written by an earlier version before serving (once per store)."""
    try:
        indexed = await anyio.to_thread.run_sync(store.ensure_indexed)
    except redis.RedisError as exc:  # the listing indexes it on first use instead
        logger.warning("job store not indexed at start-up (Redis: %s); will retry", exc)
        return
    if indexed:
        logger.info("job store upgraded: %d earlier job(s) indexed", indexed)


async def _index_checkpoint_store(store: CheckpointStore) -> None:
    """Index a checkpoint store written by an earlier version before serving (once per store)."""
    try:
        indexed = await anyio.to_thread.run_sync(store.ensure_indexed)
    except (redis.RedisError, StoreUnavailableError) as exc:  # indexed on first use instead
        logger.warning("checkpoint store not indexed at start-up (%s); will retry", exc)
        return
    if indexed:
        logger.info("checkpoint store upgraded: %d earlier checkpoint(s) indexed", indexed)


async def _purge_expired_jobs(store: JobStore, settings: Settings) -> None:
    """Remove finished jobs older than `job_retention`, checked a few times per retention."""
    assert settings.job_retention is not None
    keep_s = settings.job_retention.total_seconds()
    every_s = min(RETENTION_CHECK_MAX_S, max(1.0, keep_s / 10))
    while True:
        try:
            removed = await anyio.to_thread.run_sync(store.purge_finished, keep_s)
            if removed:
                logger.info("removed %d finished job(s) past their retention", removed)
        except redis.RedisError as exc:
            logger.warning("retention: Redis unavailable (%s)", exc)
        await anyio.sleep(every_s)


def _add_dashboard(app: FastAPI) -> None:
    """The dashboard at `/`: static files from the package, no CDN, no build step."""
    ui = resources.files("service") / "ui"
    app.mount(UI_URL, StaticFiles(directory=str(ui)), name="ui")
    page = (ui / "index.html").read_text()

    @app.get("/", include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})


def _add_docs(app: FastAPI) -> None:
    """Swagger UI and ReDoc served from local files, so /docs works without a network."""
    static = resources.files("fastapi_offline") / "static"
    app.mount(STATIC_URL, StaticFiles(directory=str(static)), name="static-docs")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} – API docs",
            swagger_js_url=f"{root}{STATIC_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{STATIC_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{STATIC_URL}/favicon.png",
            swagger_ui_parameters={"defaultModelsExpandDepth": 0, "tryItOutEnabled": True},
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} – API reference",
            redoc_js_url=f"{root}{STATIC_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{STATIC_URL}/favicon.png",
            with_google_fonts=False,
        )


def _custom_openapi(app: FastAPI) -> Any:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
                tags=app.openapi_tags,
            )
            for component in schema.get("components", {}).get("schemas", {}).values():
                if "enum" in component and "examples" not in component:
                    component["examples"] = component["enum"][:1]
            app.openapi_schema = problemize_openapi(schema)
        return app.openapi_schema

    return openapi


class CnnserveAPI(FastAPI):
    """FastAPI with the fast path (`service.api.fastpath`) in front of its middleware stack: the
    hot inference calls skip the stack's layers; the fast path counts them in the metrics
    itself and hands everything else, refusals included, to the stack."""

    def build_middleware_stack(self) -> ASGIApp:
        return FastPath(super().build_middleware_stack())


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the cnnserve API for `settings` (default: the process's `get_settings()`)."""
    settings = settings or get_settings()
    configure_logging(settings)
    app = CnnserveAPI(
        title="cnnserve",
        version=server_version(),
        summary="Train and serve the CNNs of Dive into Deep Learning on Fashion-MNIST.",
        description=DESCRIPTION,
        openapi_tags=TAGS,
        docs_url=None,
        redoc_url=None,
        lifespan=_lifespan(settings),
    )
    # state is also set here so code that runs before the lifespan (tests) sees the settings
    app.state.settings = settings
    app.state.key_ring = KeyRing(settings)
    register_exception_handlers(app)
    app.add_middleware(Admission)  # innermost: a refusal is audited, counted, and body-free
    app.add_middleware(AuditMiddleware)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetricsMiddleware)
    # job_views before jobs: `/v1/jobs/compare` and `/v1/jobs/events` are not job ids.
    # predict and V2 first: routes are matched in order, and theirs are the hot paths (no
    # route before them could take their paths).
    app.include_router(predict.router, prefix=API_PREFIX)
    app.include_router(v2.router)
    routers = (
        access,
        models_routes,
        ops,
        job_views,
        jobs,
        job_events,
        sweeps,
        checkpoints,
    )
    for module in (*routers, explain, evaluation):
        app.include_router(module.router, prefix=API_PREFIX)
    app.include_router(health.router)
    _add_docs(app)
    _add_dashboard(app)
    app.openapi = _custom_openapi(app)  # type: ignore[method-assign]
    return app
