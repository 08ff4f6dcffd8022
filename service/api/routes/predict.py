"""Classification: `POST /v1/checkpoints/{ref}/predict` with image files, base64 or pixels.

A codec over the inference pipeline (`service.inference.pipeline`): the checkpoint's manifest
says how to preprocess (as training did), the decode stage reads the images within the limits,
the batcher stacks concurrent requests into one forward pass. `service.api.fastpath` answers
the common multipart call with the same pipeline and the same `PredictQuery`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from service.access.auth import Allow
from service.api.deps import PredictManifest, get_inference
from service.api.problems import problem_responses
from service.api.schemas import CLASSIFY_REFUSALS, PredictResponse
from service.inference.decode import PREDICT_BODY
from service.inference.pipeline import (
    PREPROCESSING_DESCRIPTION,
    PredictQuery,
    Preparation,
    predict_answer,
    request_images,
)

router = APIRouter(prefix="/checkpoints", tags=["checkpoints"])


@router.post(
    "/{ref}/predict",
    response_model=PredictResponse,
    response_model_exclude_none=True,
    summary="Classify images with a checkpoint",
    description="Top-k Fashion-MNIST classes with probabilities, one prediction per image in "
    f"the order sent. {PREPROCESSING_DESCRIPTION} Concurrent requests for one checkpoint are "
    "batched into one forward pass.",
    openapi_extra=PREDICT_BODY,
    dependencies=[Allow("predict")],
    responses=problem_responses(
        *CLASSIFY_REFUSALS,
        s413="the PNG is 20000×20000 = 400000000 pixels, more than the 16777216 this server "
        "decodes; downscale it first",
        s415="image 0: the content is a GIF image, not an image this server reads; "
        "send PNG, JPEG, WebP or BMP",
    ),
)
async def predict(
    request: Request, manifest: PredictManifest, query: Annotated[PredictQuery, Query()]
) -> Response:
    inference = await get_inference(request)
    how = Preparation.of(manifest, query)
    native = await request_images(request, inference.settings, how)
    body = await predict_answer(inference, how, native, query.top_k, query.return_input)
    return Response(body, media_type="application/json")
