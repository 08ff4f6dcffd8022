"""Prometheus metrics of the API, defined once per process, and the middleware that counts requests.

Other service modules import the instruments from here, e.g. inference:

    from service.metrics import INFERENCE_LATENCY, INFERENCE_BATCH_SIZE, MODEL_CACHE_HITS
    INFERENCE_LATENCY.labels(model="lenet").observe(seconds)
    INFERENCE_BATCH_SIZE.labels(model="lenet").observe(len(batch))
    MODEL_CACHE_HITS.inc()

Request metrics are labelled by route template (`/v1/jobs/{job_id}`), never by raw path, so
the number of series stays bounded.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram
from prometheus_client import generate_latest as _generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from workers.contracts import CUDA_QUEUE, QUEUE, JobStatus
from workers.store.jobs import JobStore

HTTP_REQUESTS = Counter(
    "cnnserve_http_requests",
    "HTTP requests answered, by method, route template and status code.",
    ["method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "cnnserve_http_request_duration_seconds",
    "Time to answer an HTTP request (to the end of the body), by method and route template.",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
JOBS = Gauge("cnnserve_jobs", "Jobs in the store, by status.", ["status"])
QUEUE_DEPTH = Gauge(
    "cnnserve_queue_depth", "Training tasks waiting in the broker queue for a worker."
)

INFERENCE_LATENCY = Histogram(
    "cnnserve_inference_latency_seconds",
    "Time of one model forward pass over a batch, by model.",
    ["model"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
INFERENCE_BATCH_SIZE = Histogram(
    "cnnserve_inference_batch_size",
    "Images in one inference batch, by model.",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
MODEL_CACHE_HITS = Counter(
    "cnnserve_model_cache_hits", "Predictions served by an already loaded checkpoint."
)
MODEL_CACHE_MISSES = Counter(
    "cnnserve_model_cache_misses", "Predictions that had to load a checkpoint first."
)

UNMATCHED_ROUTE = "<unmatched>"


def route_template(scope: Scope) -> str:
    """The template of the route that served `scope`, or a fixed label when none matched."""
    # FastAPI ≥ 0.120 keeps included routers nested; its effective context has the full path
    fastapi_scope = scope.get("fastapi")
    context = (
        fastapi_scope.get("effective_route_context") if isinstance(fastapi_scope, dict) else None
    )
    for candidate in (context, scope.get("route")):
        path = getattr(candidate, "path", None)
        if isinstance(path, str):
            return path
    return UNMATCHED_ROUTE


class RequestMetricsMiddleware:
    """Count HTTP requests and time them, labelled by route template and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        route: str | None = None

        async def send_wrapper(message: Message) -> None:
            nonlocal status, route
            if message["type"] == "http.response.start":
                status = int(message["status"])
                # routing details leave the scope when the endpoint returns: read them now
                route = route_template(scope)
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = route or route_template(scope)
            observe_request(scope.get("method", ""), route, status, time.perf_counter() - start)


#: Labelled series looked up once: `labels()` takes a lock and checks its arguments on every
#: call, on the hot paths. Bounded: labels are methods, route templates, statuses and models.
_SERIES: dict[tuple[Any, tuple[str, ...]], Any] = {}


def _series(metric: Any, *labels: str) -> Any:
    key = (metric, labels)
    series = _SERIES.get(key)
    if series is None:
        series = _SERIES[key] = metric.labels(*labels)
    return series


def observe_request(method: str, route: str, status: int, seconds: float) -> None:
    """Count one answered request and its time under its route template."""
    _series(HTTP_REQUESTS, method, route, str(status)).inc()
    _series(HTTP_LATENCY, method, route).observe(seconds)


def observe_batch(model: str, images: int, seconds: float) -> None:
    """Record one forward pass of a model: its images and its time."""
    _series(INFERENCE_LATENCY, model).observe(seconds)
    _series(INFERENCE_BATCH_SIZE, model).observe(images)


def refresh_job_gauges(store: JobStore) -> None:
    """Set the jobs-by-status and queue-depth gauges from Redis (called per scrape)."""
    counts = store.count_by_status()
    for status in JobStatus:
        JOBS.labels(status.value).set(counts.get(status.value, 0))
    r: Any = store.r
    # Celery's Redis transport keeps a queue as a list named after it
    QUEUE_DEPTH.set(int(r.llen(QUEUE)) + int(r.llen(CUDA_QUEUE)))


def render_latest() -> tuple[bytes, str]:
    """The process's metrics in Prometheus text format, and the content type."""
    return _generate_latest(REGISTRY), CONTENT_TYPE_LATEST
