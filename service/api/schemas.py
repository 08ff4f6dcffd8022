"""The answers of classification and explanation (`PredictResponse`, `ExplainResponse`): what
`/docs` shows of them and what the schemathesis run checks every answer against.

The pipeline builds these answers as plain JSON (`service.inference.encode`); the schemas are
declared once here, for the routes that answer them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.inference.explain import METHOD

#: The statuses predict and explain refuse a call with: no key or scope, no such checkpoint
#: (or a corrupt one), too many images or pixels, no image format it reads, a bad image.
CLASSIFY_REFUSALS = (401, 403, 404, 409, 413, 415, 422)
#: The checkpoint id the examples name.
EXAMPLE_ID = "0123456789abcdef-e002"
#: An example's most likely class.
_EXAMPLE_SCORE: dict[str, Any] = {"label": "ankle boot", "class_id": 9, "probability": 0.97}


def with_examples(*examples: dict[str, Any]) -> ConfigDict:
    """A schema's `model_config` that shows these examples in `/docs`."""
    return ConfigDict(json_schema_extra={"examples": list(examples)})


def _example(**answer: Any) -> ConfigDict:
    """A response schema's example: an answer of the example checkpoint."""
    return with_examples({"checkpoint": EXAMPLE_ID, "model": "lenet", **answer})


class ClassScore(BaseModel):
    """A class and the probability the network gives it."""

    label: str = Field(description="The class name.", examples=["ankle boot"])
    class_id: int = Field(description="The class index (Fashion-MNIST label).", examples=[9])
    probability: float = Field(description="Softmax probability, 0..1.", examples=[0.97])


class CheckpointAnswer(BaseModel):
    """What a checkpoint answered, and which one it was."""

    checkpoint: str = Field(description="The checkpoint id the ref resolved to.")
    model: str = Field(description="The model of that checkpoint.")


class Prediction(ClassScore):
    """The most likely class of one image, and the `top_k` most likely."""

    top_k: list[ClassScore] = Field(description="The top_k classes, most likely first.")
    input: list[list[int]] | None = Field(
        None,
        description="With return_input=true: the 28×28 grayscale image (0–255) the network saw "
        "after preprocessing, rows top to bottom.",
    )


class PredictResponse(CheckpointAnswer):
    """Predictions, one per image, in the order the images were sent."""

    model_config = _example(
        predictions=[
            {
                **_EXAMPLE_SCORE,
                "top_k": [
                    _EXAMPLE_SCORE,
                    {"label": "sneaker", "class_id": 7, "probability": 0.02},
                ],
            }
        ]
    )

    predictions: list[Prediction]


class Explanation(ClassScore):
    """One image's predicted class and how much each input pixel added to its score."""

    attribution: list[list[float]] = Field(
        description="28×28: each input pixel's Integrated Gradients share of the predicted "
        "class's score (positive: for the class, negative: against it); rows top to bottom."
    )


class ExplainResponse(CheckpointAnswer):
    """Explanations, one per image, in the order the images were sent."""

    model_config = _example(
        method=METHOD,
        steps=32,
        explanations=[{**_EXAMPLE_SCORE, "attribution": [[0.0] * 28] * 28}],
    )

    method: str = Field(description="How attributions were computed.", examples=[METHOD])
    steps: int = Field(description="Integration steps from the black baseline to the image.")
    explanations: list[Explanation]
