"""Schemathesis against the API's own OpenAPI document, with and without a valid API key.

Every default check runs on every generated request: no 5xx, status codes, content types,
headers and bodies as documented, invalid input refused, valid input accepted, and operations
that declare the API key refuse a request without it (`ignored_auth`). The app runs with keys
configured and no worker: submitted jobs just queue (capped at a few, then 429).

Bounded: 20 examples per operation and phase, a fixed seed (`derandomize`), no deadline.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, positive_data_acceptance
from schemathesis.core.parameters import ParameterLocation

from service.api.app import create_app
from tests.service.checkpoint_helpers import JOB_A, lenet, save
from tests.workers.helpers import lenet_spec
from workers.contracts import JobStatus
from workers.settings import Settings
from workers.store.checkpoints import CheckpointStore
from workers.store.jobs import JobStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

KEY = "fuzz-key-3f9d8a7c61"
FUZZ = settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture
def app(settings: Settings, store: JobStore) -> Iterator[FastAPI]:
    """The API with keys, one finished job and checkpoints under the documented example ids."""
    ckpts = CheckpointStore.from_settings(settings)
    model = lenet(trained=False)
    for epoch in (1, 2):
        save(ckpts, model, job_id=JOB_A, epoch=epoch)
    # the OpenAPI examples name job 0123456789abcdef: a finished one, so its event stream ends
    store.create(lenet_spec(epochs=2), job_id=JOB_A)
    store.update(JOB_A, lambda r: setattr(r, "status", JobStatus.succeeded))
    store.add_event(JOB_A, "status", {"status": "succeeded"})
    yield create_app(settings.model_copy(update={"api_keys": KEY, "max_queued_jobs": 3}))


def _constrained(parameter: dict[str, Any]) -> bool:
    """Whether a parameter has values that break its schema (a bare path string has none)."""
    if parameter["in"] != "path":
        return True
    return bool(set(parameter.get("schema", {})) - {"type", "title", "description", "examples"})


def _cases() -> list[tuple[str, GenerationMode]]:
    """Every documented operation, valid input, and invalid input where it takes any.

    Building the app touches no Redis; an operation without parameters or body has no invalid
    input to generate.
    """
    paths = create_app(Settings()).openapi()["paths"]
    out = []
    for path, ops in paths.items():
        for method, op in ops.items():
            label = f"{method.upper()} {path}"
            out.append((label, GenerationMode.POSITIVE))
            if op.get("requestBody") or any(map(_constrained, op.get("parameters", []))):
                out.append((label, GenerationMode.NEGATIVE))
    return out


CASES = [pytest.param(label, mode, id=f"{label}-{mode.value}") for label, mode in _cases()]


def fuzz(app: FastAPI, label: str, mode: GenerationMode, headers: dict[str, str]) -> int:
    """Run one operation's generated cases through every default check; returns how many."""
    operation = schemathesis.openapi.from_asgi("/openapi.json", app).find_operation_by_label(label)
    assert operation is not None, label
    calls = 0
    # JSON Schema cannot say "an input shape the network takes" or "a cursor this API gave
    # out": schema-valid requests may get a documented 4xx problem, so that check is off.
    excluded = [positive_data_acceptance]
    if label == "GET /readyz":
        excluded.append(not_a_server_error)

    @FUZZ
    @given(case=operation.as_strategy(mode))
    def run(case: schemathesis.Case) -> None:
        nonlocal calls
        calls += 1
        send = headers
        meta = case._meta
        mangled = meta.components.get(ParameterLocation.HEADER) if meta is not None else None
        if mangled is not None and mangled.mode is GenerationMode.NEGATIVE:
            # the case breaks its headers on purpose (the Authorization header among them):
            # sending our key over it would turn an invalid request into a valid one
            send = {}
        response = case.call_and_validate(headers=send, excluded_checks=excluded)
        if label == "GET /readyz":  # no worker runs here: not ready, said as a 503 problem
            assert response.status_code == 503, response.text
            # (why, "no worker answered a ping", is for an admin's key only)
            assert response.json()["detail"].startswith("not ready: workers")
        security = case.operation.definition.raw.get("security")
        if not send and security and {} not in security:
            # no key: a key-guarded operation refuses, whatever else the request holds
            # (`{}` among the requirements: a key is optional there, as for whoami)
            assert response.status_code in (401, 404, 405, 413, 415, 422), response.text

    run()
    return calls


@pytest.mark.parametrize(("label", "mode"), CASES)
def test_fuzz_with_a_valid_key(app: FastAPI, label: str, mode: GenerationMode) -> None:
    assert fuzz(app, label, mode, {"Authorization": f"Bearer {KEY}"}) > 0


@pytest.mark.parametrize(("label", "mode"), CASES)
def test_fuzz_without_a_key(app: FastAPI, label: str, mode: GenerationMode) -> None:
    assert fuzz(app, label, mode, {}) > 0
