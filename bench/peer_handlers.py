"""The peers' side of `bench peers`: one classifier, served by LitServe and by TorchServe.

Both peers run the same checkpoint as cnnserve (the weights verified by cnnserve's own
`CheckpointStore`, wrapped in the same `InferenceNet`: training's resize, softmax), eager
PyTorch under `inference_mode`, with the handler their documentation shows for an image
classifier: decode the upload with Pillow, grayscale, scale to 0–1, stack the batch, one
forward pass, answer the top class as JSON. Nothing cnnserve does on top (format sniffing,
bomb checks, auto-invert, top-k) is done here, so the comparison flatters the peers.

Configuration comes from the environment the benchmark sets:

- `PEER_CHECKPOINTS`, `PEER_CHECKPOINT`: the checkpoints folder and the id to serve;
- `PEER_THREADS`: intra-op threads (the benchmark gives every server the same);
- `PEER_STATS`: a file of two int64 counters (forward passes, images), updated in place per
  batch, from which the benchmark reads images per forward pass.

LitServe: `python -m bench.peer_handlers litserve PORT MAX_BATCH BATCH_TIMEOUT_S`.
TorchServe: this file is the archive's handler (`handle(data, context)`).
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


class Classifier:
    """The checkpoint, ready for batches of encoded images."""

    def __init__(self) -> None:
        from bench.stores import open_store
        from service.inference.backends import InferenceNet
        from workers.preprocessing import Transform

        threads = int(os.environ.get("PEER_THREADS", "2"))
        torch.set_num_threads(threads)
        store = open_store(Path(os.environ["PEER_CHECKPOINTS"]))  # CNNSERVE_REDIS_URL's index
        net, manifest = store.load_model(os.environ["PEER_CHECKPOINT"], "cpu")
        self.module = InferenceNet(net, Transform(manifest.preprocessing)).eval()
        self.classes = manifest.classes
        stats = os.environ.get("PEER_STATS")
        self.stats = np.memmap(stats, dtype=np.int64, mode="r+", shape=(2,)) if stats else None

    @staticmethod
    def decode(blob: bytes) -> np.ndarray:
        """One upload as the 1×28×28 float32 (0–1) input the network takes."""
        img = Image.open(io.BytesIO(blob)).convert("L")
        if img.size != (28, 28):
            img = img.resize((28, 28))
        return np.asarray(img, dtype=np.float32)[None] / 255.0

    def predict(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        """One forward pass over the batch; the top class of each image."""
        with torch.inference_mode():
            probs = self.module(torch.from_numpy(np.stack(images))).numpy()
        if self.stats is not None:
            self.stats[0] += 1
            self.stats[1] += len(images)
        top = probs.argmax(axis=1)
        return [
            {"label": self.classes[c], "class_id": int(c), "probability": float(p[c])}
            for c, p in zip(top, probs, strict=True)
        ]


# --- TorchServe -----------------------------------------------------------------------------

_classifier: Classifier | None = None


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[dict[str, Any]] | None:
    """TorchServe's entry point: a batch of requests in, one answer per request out."""
    global _classifier
    if _classifier is None:
        _classifier = Classifier()
    if data is None:  # TorchServe's initialisation call
        return None
    images = []
    for row in data:
        blob = row.get("files") or row.get("data") or row.get("body") or b""
        images.append(Classifier.decode(bytes(blob)))
    return _classifier.predict(images)


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "litserve":
        sys.exit("usage: python -m bench.peer_handlers litserve PORT MAX_BATCH BATCH_TIMEOUT_S")
    from bench.peer_litserve import serve  # the LitAPI must live in an importable module

    serve(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
