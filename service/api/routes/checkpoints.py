"""Checkpoints: list, read, download and delete them (classification is `routes.predict`).

A `ref` is a checkpoint id (`<job>-eNNN`, made by the server) or an alias (`<job>:latest`,
`<job>:best`, `<model>:best`, `<model>:latest`), resolved by the pipeline's one resolver
(`service.inference.resolve`, through `deps.ResolvedManifest`). `CheckpointStore.resolve` checks
it against strict patterns, so no client string ever becomes a path; anything else is a 404
problem.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from starlette.types import Receive, Scope, Send

from service.access.auth import Allow, CallerDep
from service.api.deps import CheckpointStoreDep, InferenceDep, ResolvedManifest
from service.api.pages import decode_cursor, encode_cursor
from service.api.problems import problem_responses
from workers.contracts import JOB_ID_PATTERN, MODEL_NAME_PATTERN
from workers.store.checkpoints import (
    CHECKPOINT_ID_RE,
    CheckpointSummary,
    Manifest,
)

logger = logging.getLogger(__name__)


class PinnedFileResponse(FileResponse):
    """A file response from a pinned file (`CheckpointFiles.pinned`), released however the
    response ends: sent, refused (a range it cannot satisfy answers before a background task
    would run), or cut off."""

    def __init__(self, path: Path, release: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self.release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


router = APIRouter(prefix="/checkpoints", tags=["checkpoints"])


# --- schemas -------------------------------------------------------------------------------


class CheckpointList(BaseModel):
    """Checkpoints matching the filters, newest first (one page of them, with `limit`)."""

    checkpoints: list[CheckpointSummary]
    next_cursor: str | None = Field(
        None, description="Pass as `cursor` for the next page; null on the last page."
    )


# --- routes --------------------------------------------------------------------------------


@router.get(
    "",
    summary="List checkpoints",
    description="Checkpoints newest first, optionally only one job's or one model's. Without "
    "`limit`, every one; with it, a page at a time: pass `next_cursor` (also in the "
    '`Link: <...>; rel="next"` header) as `cursor`. Each entry is a summary of its manifest; '
    "`GET /v1/checkpoints/{ref}` has all. A principal that is not an admin lists only its own "
    "jobs' checkpoints.",
    dependencies=[Allow("read")],
    responses=problem_responses(401, 403, 422, s422="cursor is not one this API gave out"),
)
def list_checkpoints(
    request: Request,
    response: Response,
    caller: CallerDep,
    store: CheckpointStoreDep,
    job_id: Annotated[
        str | None,
        Query(pattern=JOB_ID_PATTERN, description="Only this job's checkpoints."),
    ] = None,
    model: Annotated[
        str | None,
        Query(pattern=MODEL_NAME_PATTERN, description="Only checkpoints of this model."),
    ] = None,
    limit: Annotated[
        int | None, Query(ge=1, le=1000, description="Checkpoints per page (none: all).")
    ] = None,
    cursor: Annotated[
        str | None, Query(description="`next_cursor` of the previous page.", max_length=96)
    ] = None,
) -> CheckpointList:
    after = decode_cursor(cursor, CHECKPOINT_ID_RE) if cursor else None
    found, following = store.page(
        job_id=job_id, model=model, limit=limit, within=caller.within, cursor=after
    )
    next_cursor = encode_cursor(following) if following else None
    if next_cursor:
        url = request.url.remove_query_params("cursor").include_query_params(cursor=next_cursor)
        response.headers["Link"] = f'<{url.path}?{url.query}>; rel="next"'
    return CheckpointList(checkpoints=found, next_cursor=next_cursor)


@router.get(
    "/{ref}",
    summary="Get a checkpoint's manifest",
    description="The manifest: model, arch, input size, classes, the preprocessing inference "
    "applies, metrics and history, the job spec, data set and weight hashes, versions.",
    dependencies=[Allow("read")],
    responses=problem_responses(401, 403, 404, 409),
)
def get_checkpoint(manifest: ResolvedManifest) -> Manifest:
    return manifest


@router.get(
    "/{ref}/weights",
    summary="Download a checkpoint's weights",
    description="The safetensors file (the model's state_dict), verified against the "
    "manifest's sha256 before it is sent. Load it with `safetensors.torch.load_file`.",
    response_class=FileResponse,
    responses={
        200: {
            "description": "The safetensors file.",
            "content": {"application/octet-stream": {"schema": {"type": "string"}}},
        },
        **problem_responses(401, 403, 404, 409),
    },
    dependencies=[Allow("read")],
)
def get_weights(manifest: ResolvedManifest, store: CheckpointStoreDep) -> FileResponse:
    # pinned: another process's cache eviction (or a delete) cannot unlink it mid-response
    path, release = store.pinned(lambda: store.weights_path(manifest.id))
    return PinnedFileResponse(
        path,
        release,
        media_type="application/octet-stream",
        filename=f"{manifest.id}.safetensors",
        headers={"X-Weights-SHA256": manifest.weights_sha256},
    )


@router.get(
    "/{ref}/model.onnx",
    summary="Download a checkpoint as ONNX",
    description="The ONNX graph ONNX Runtime serves for this checkpoint: input `image` "
    "(N×1×28×28 float32, 28×28 grayscale pixels scaled to 0..1 as the manifest's "
    "preprocessing says; the graph resizes to the network's input itself), output "
    "`probabilities` (N×10 softmax), a dynamic batch axis, the opset in the manifest's `onnx` "
    "and the classes and preprocessing in the graph's metadata. Exported once per checkpoint "
    "and cached. Load it with `onnxruntime.InferenceSession`.",
    response_class=FileResponse,
    responses={
        200: {
            "description": "The ONNX model file.",
            "content": {"application/octet-stream": {"schema": {"type": "string"}}},
        },
        **problem_responses(401, 403, 404, 409),
    },
    dependencies=[Allow("read")],
)
async def get_onnx(
    manifest: ResolvedManifest, inference: InferenceDep, store: CheckpointStoreDep
) -> FileResponse:
    try:
        path, release = store.files.pinned(await inference.onnx_file(manifest))
    except FileNotFoundError:  # evicted by a process sharing the cache in between: again
        path, release = store.files.pinned(await inference.onnx_file(manifest))
    return PinnedFileResponse(
        path,
        release,
        media_type="application/octet-stream",
        filename=f"{manifest.id}.onnx",
        headers={"X-ONNX-Opset": str(manifest.onnx.opset)},
    )


@router.delete(
    "/{ref}",
    summary="Delete a checkpoint",
    description="Removes the checkpoint's files; the job's `latest` and `best` aliases move "
    "to what is left. Needs the train scope (an admin's key for another tenant's).",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[Allow("train", audit_as="checkpoint.delete")],
    responses=problem_responses(401, 403, 404),
)
def delete_checkpoint(
    manifest: ResolvedManifest,
    store: CheckpointStoreDep,
    inference: InferenceDep,
) -> Response:
    store.delete(manifest.id)
    inference.forget(manifest)
    logger.info("deleted checkpoint %s", manifest.id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
