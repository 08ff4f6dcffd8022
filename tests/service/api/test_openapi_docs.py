"""The OpenAPI document is complete, and `/docs` renders offline in a real browser."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.service.conftest import Server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, op)
        for path, item in schema["paths"].items()
        for method, op in item.items()
        if isinstance(op, dict)
    ]


def test_openapi_documents_every_operation_and_error(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert schema["info"]["title"] == "cnnserve"
    assert schema["info"]["version"]
    assert "Fashion-MNIST" in schema["info"]["description"]
    tags = {t["name"]: t["description"] for t in schema["tags"]}
    assert set(tags) >= {"models", "ops", "jobs", "checkpoints", "health"}
    ops = operations(schema)
    assert len(ops) >= 20
    for method, path, op in ops:
        where = f"{method.upper()} {path}"
        assert op.get("summary"), where
        assert op.get("description"), where
        assert op.get("responses"), where
        # the Open Inference Protocol's errors are its own {"error": ...}; the rest RFC 9457
        kind, media = (
            ("InferenceError", "application/json")
            if path.startswith("/v2")
            else ("Problem", "application/problem+json")
        )
        for code, response in op["responses"].items():
            if code[0] in "45":
                content = response["content"]
                assert list(content) == [media], (where, code)
                assert content[media]["schema"] == {"$ref": f"#/components/schemas/{kind}"}
                assert content[media].get("example"), (where, code)
    paths = schema["paths"]
    assert {"202", "401", "409", "422", "429", "503"} <= set(paths["/v1/jobs"]["post"]["responses"])
    assert paths["/v1/jobs"]["post"]["security"] == [{"ApiKey": ["train"]}]
    assert (
        "text/event-stream"
        in paths["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
    )
    schemas = schema["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    mine = (
        "Job", "JobPage", "JobSpec", "SummaryOut", "SummaryRequest", "ModelInfo", "ModelList",
        "Corr2dRequest", "Pool2dRequest", "TensorOut", "OutputSizeOut", "Readiness", "Problem",
        "Progress", "EpochMetrics", "LayerSummary", "Recipe", "Check", "Liveness", "JobStatus",
    )  # fmt: skip
    for name in mine:
        assert schemas[name].get("examples"), name
    # every request body has an example through its schema
    for method, path, op in ops:
        for media in op.get("requestBody", {}).get("content", {}).values():
            ref = media["schema"].get("$ref", "")
            if ref:
                target = schemas[ref.rsplit("/", 1)[1]]
                assert target.get("examples") or media.get("examples"), (method, path)


def test_docs_assets_are_served_locally(client: TestClient) -> None:
    html = client.get("/docs").text
    assert "cdn" not in html.lower()
    for asset in ("/static-docs/swagger-ui-bundle.js", "/static-docs/swagger-ui.css"):
        assert asset in html
        r = client.get(asset)
        assert r.status_code == 200 and len(r.content) > 100_000
    assert client.get("/redoc").status_code == 200


@pytest.mark.integration
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed")
def test_docs_render_in_headless_chromium(
    uvicorn_server: Callable[..., Server], tmp_path: Path
) -> None:
    url = uvicorn_server().url
    profile = tmp_path / "profile"
    shot = tmp_path / "docs.png"
    common = [
        CHROMIUM,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        "--window-size=1280,2000",
        "--virtual-time-budget=8000",
    ]
    subprocess.run(
        [*common, f"--screenshot={shot}", f"{url}/docs"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    img = Image.open(shot)
    img.load()
    assert img.size == (1280, 2000)
    colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200, "the docs page looks blank"
    # the DOM after Swagger UI ran: our operations are on the page, no render error
    dom = subprocess.run(
        [*common, "--dump-dom", f"{url}/docs"],
        check=True,
        capture_output=True,
        timeout=120,
        text=True,
    ).stdout
    assert "opblock" in dom
    for summary in ("Submit a training job", "Summarise a model", "Follow a job"):
        assert summary in dom, summary
    assert "Unable to render" not in dom
    shutil.rmtree(profile, ignore_errors=True)
