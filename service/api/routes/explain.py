"""`POST /v1/checkpoints/{ref}/explain`: why a checkpoint classified images as it did.

As TorchServe's `/explanations`: the same inputs as predict, and per image the predicted class
and an Integrated Gradients attribution map over the 28×28 input the network saw (Captum); with
`Accept: image/png` a heatmap of it over that input instead. The work is the pipeline's
(`service.inference.pipeline.explain_images`); this route encodes its answer.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request, Response

from service.access.auth import Allow
from service.api.deps import InferenceDep, PredictManifest
from service.api.problems import problem_responses
from service.api.schemas import CLASSIFY_REFUSALS, ExplainResponse, Explanation
from service.inference import pipeline
from service.inference.decode import PREDICT_BODY
from service.inference.explain import METHOD, heatmap_png

router = APIRouter(prefix="/checkpoints", tags=["checkpoints"])


@router.post(
    "/{ref}/explain",
    summary="Explain a checkpoint's predictions",
    description="The same inputs as predict; per image, the predicted class and an Integrated "
    "Gradients attribution map (Captum) over the 28×28 input the network saw, from a black "
    "baseline, on the predicted class's score. With `Accept: image/png`, a heatmap instead: "
    "one panel per image, positive attribution in red and negative in blue over the input, "
    "the class below. At most `explain_max_images` images per call. "
    + pipeline.PREPROCESSING_DESCRIPTION,
    openapi_extra=PREDICT_BODY,
    response_model=ExplainResponse,
    dependencies=[Allow("predict")],
    responses={
        200: {
            "description": "The explanations (JSON), or a heatmap (PNG) when asked for.",
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
        },
        **problem_responses(
            *CLASSIFY_REFUSALS,
            503,
            s413="9 images in one request; this server explains at most 8: split them",
            s503="explaining took longer than this server allows; send fewer images",
        ),
    },
)
async def explain(
    request: Request,
    manifest: PredictManifest,
    inference: InferenceDep,
    query: Annotated[pipeline.PreprocessQuery, Query()],
) -> Any:
    how = pipeline.Preparation.of(manifest, query)
    done = await pipeline.explain_images(inference, how, request)
    classes = done.loaded.manifest.classes
    probs, targets = done.probs, done.targets
    if "image/png" in request.headers.get("accept", ""):
        captions = [f"{classes[t]} {probs[i, t]:.2f}" for i, t in enumerate(targets)]
        png = heatmap_png(done.batch, done.attributions, captions)
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})
    return ExplainResponse(
        checkpoint=manifest.id,
        model=manifest.model,
        method=METHOD,
        steps=inference.settings.explain_steps,
        explanations=[
            Explanation(
                label=classes[t],
                class_id=int(t),
                probability=float(probs[i, t]),
                attribution=np.round(done.attributions[i], 6).tolist(),
            )
            for i, t in enumerate(targets)
        ],
    )
