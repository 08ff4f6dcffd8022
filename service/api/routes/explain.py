"""`POST /v1/checkpoints/{ref}/explain`: why a checkpoint classified images as it did.

As TorchServe's `/explanations`: the same inputs as predict, and per image the predicted class
and an Integrated Gradients attribution map over the 28×28 input the network saw (Captum); with
`Accept: image/png` a heatmap of it over that input instead.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from service.access.auth import Allow
from service.api.deps import InferenceDep
from service.api.problems import problem_responses
from service.api.routes.checkpoints import EXAMPLE_ID
from service.api.routes.predict import (
    PREDICT_BODY,
    PREPROCESSING_DESCRIPTION,
    Invert,
    Preparation,
    Preprocess,
    TooManyImagesError,
    predict_manifest,
    request_images,
)
from service.inference.explain import METHOD, attribute, heatmap_png
from workers.store.checkpoints import Manifest

router = APIRouter(prefix="/checkpoints", tags=["checkpoints"])


class Explanation(BaseModel):
    """One image's predicted class and how much each input pixel added to its score."""

    label: str = Field(description="The predicted class.", examples=["ankle boot"])
    class_id: int = Field(description="Its index.", examples=[9])
    probability: float = Field(description="Its softmax probability.", examples=[0.97])
    attribution: list[list[float]] = Field(
        description="28×28: each input pixel's Integrated Gradients share of the predicted "
        "class's score (positive: for the class, negative: against it); rows top to bottom."
    )


class ExplainResponse(BaseModel):
    """Explanations, one per image, in the order the images were sent."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "checkpoint": EXAMPLE_ID,
                    "model": "lenet",
                    "method": METHOD,
                    "steps": 32,
                    "explanations": [
                        {
                            "label": "ankle boot",
                            "class_id": 9,
                            "probability": 0.97,
                            "attribution": [[0.0] * 28] * 28,
                        }
                    ],
                }
            ]
        }
    )

    checkpoint: str = Field(description="The checkpoint id the ref resolved to.")
    model: str = Field(description="The model of that checkpoint.")
    method: str = Field(description="How attributions were computed.", examples=[METHOD])
    steps: int = Field(description="Integration steps from the black baseline to the image.")
    explanations: list[Explanation]


@router.post(
    "/{ref}/explain",
    summary="Explain a checkpoint's predictions",
    description="The same inputs as predict; per image, the predicted class and an Integrated "
    "Gradients attribution map (Captum) over the 28×28 input the network saw, from a black "
    "baseline, on the predicted class's score. With `Accept: image/png`, a heatmap instead: "
    "one panel per image, positive attribution in red and negative in blue over the input, "
    f"the class below. At most `explain_max_images` images per call. {PREPROCESSING_DESCRIPTION}",
    openapi_extra=PREDICT_BODY,
    response_model=ExplainResponse,
    dependencies=[Allow("predict")],
    responses={
        200: {
            "description": "The explanations (JSON), or a heatmap (PNG) when asked for.",
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
        },
        **problem_responses(
            401,
            403,
            404,
            409,
            413,
            415,
            422,
            503,
            s413="9 images in one request; this server explains at most 8: split them",
            s503="explaining took longer than this server allows; send fewer images",
        ),
    },
)
async def explain(
    request: Request,
    manifest: Annotated[Manifest, Depends(predict_manifest)],
    inference: InferenceDep,
    invert: Invert = "auto",
    mode: Preprocess = "auto",
) -> Any:
    settings = inference.settings
    started = time.monotonic()
    how = Preparation(manifest, invert, mode)
    batch = how.model_input(await request_images(request, settings, how))
    limit = settings.explain_max_images
    if len(batch) > limit:
        raise TooManyImagesError(
            f"{len(batch)} images in one request; this server explains at most {limit}: "
            "split them over several requests",
            limit=limit,
        )
    loaded, probs = await inference.predict(manifest, batch)
    targets = probs.argmax(axis=1)
    deadline = started + settings.explain_timeout_s
    attributions = await asyncio.get_running_loop().run_in_executor(
        inference.explainers,
        lambda: attribute(
            loaded.module, batch, targets, steps=settings.explain_steps, deadline=deadline
        ),
    )
    classes = loaded.manifest.classes
    if "image/png" in request.headers.get("accept", ""):
        captions = [f"{classes[t]} {probs[i, t]:.2f}" for i, t in enumerate(targets)]
        png = heatmap_png(batch, attributions, captions)
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})
    return ExplainResponse(
        checkpoint=manifest.id,
        model=manifest.model,
        method=METHOD,
        steps=settings.explain_steps,
        explanations=[
            Explanation(
                label=classes[t],
                class_id=int(t),
                probability=float(probs[i, t]),
                attribution=np.round(attributions[i], 6).tolist(),
            )
            for i, t in enumerate(targets)
        ],
    )
