"""The encode stage: class probabilities as each protocol's answer.

`/v1` predict answers `PredictResponse` JSON (each image's class and its top k); `/v2` infer
answers the outputs a request asked for (`probabilities`, `label`, or the classification
extension's top k as `score:index:label`), which `service.inference.v2_codec` serialises.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from service.inference.v2_codec import InferRequest, OutputTensor, ProtocolError, RequestedOutput
from workers.store.checkpoints import Manifest

#: The outputs of a V2 model.
V2_OUTPUTS = ("probabilities", "label")


def _top(probs: np.ndarray, k: int) -> np.ndarray:
    """Each row's `k` most likely classes, most likely first (ties: the lower index)."""
    return np.argsort(-probs, axis=1, kind="stable")[:, : min(k, probs.shape[1])]


def predictions(probs: np.ndarray, classes: list[str], top_k: int) -> list[dict[str, Any]]:
    """Each image's most likely class and its `top_k`, as `Prediction` JSON objects.

    Built as plain dicts: the route still declares `PredictResponse` (the docs, and the
    schemathesis run that checks every answer against it), but validating the server's own
    numbers again per request cost more than LeNet's share of the forward pass.
    """
    out: list[dict[str, Any]] = []
    for row, best in zip(probs.tolist(), _top(probs, top_k).tolist(), strict=True):
        scores = [{"label": classes[c], "class_id": c, "probability": row[c]} for c in best]
        out.append({**scores[0], "top_k": scores})
    return out


def predict_body(manifest: Manifest, answers: list[dict[str, Any]]) -> bytes:
    """The `PredictResponse` JSON of these predictions by this checkpoint."""
    body = {"checkpoint": manifest.id, "model": manifest.model, "predictions": answers}
    return json.dumps(body, separators=(",", ":")).encode()


def v2_outputs(request: InferRequest, probs: np.ndarray, classes: list[str]) -> list[OutputTensor]:
    """The output tensors a V2 request asked for (all of them when it named none)."""
    wanted = request.outputs or [RequestedOutput(name) for name in V2_OUTPUTS]
    n = len(probs)
    out = []
    for want in wanted:
        if want.name not in V2_OUTPUTS:
            raise ProtocolError(
                f"unknown output {want.name!r}; this model's outputs are {', '.join(V2_OUTPUTS)}"
            )
        binary = want.binary or request.binary_output
        if want.classification is not None:
            order = _top(probs, want.classification)
            k = order.shape[1]
            top = [f"{probs[i, c]:f}:{c}:{classes[c]}".encode() for i in range(n) for c in order[i]]
            out.append(OutputTensor(want.name, "BYTES", [n, k], top, binary))
        elif want.name == "probabilities":
            out.append(OutputTensor(want.name, "FP32", list(probs.shape), probs, binary))
        else:
            labels = [classes[c].encode() for c in probs.argmax(axis=1)]
            out.append(OutputTensor(want.name, "BYTES", [n], labels, binary))
    return out
