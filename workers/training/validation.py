"""Evaluation on the test set: loss, accuracy and the confusion matrix, kept on the device.

`Tally` accumulates a validation pass batch by batch without a host sync: the summed loss and
the confusion matrix (rows: true class, columns: predicted) grow on the device and are read
back once, together, at the end; accuracy is the matrix's trace over its sum. The engine's
validation after every epoch and `evaluate_checkpoint` (a worker re-evaluating any checkpoint)
both use it, so a checkpoint's matrix and its `val_acc` cannot disagree. Both feed the network
through the checkpoint's own preprocessing (`workers.preprocessing.Transform`), as serving does.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from workers.preprocessing import Transform
from workers.store.checkpoints import CheckpointStore, StoredEvaluation
from workers.training.data import FashionMNIST

#: Test images per evaluation batch hold about this many input pixels (bounded memory).
EVAL_PIXELS = 2**21


def model_input(transform: Transform, images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 28×28 images (N×28×28, on the device) as the network's input, as the manifest's
    preprocessing says (scaled and resized on the device), channels-last where that is faster."""
    x = transform(images)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@dataclass(frozen=True)
class Scores:
    """What a pass over a labelled set found."""

    loss: float
    accuracy: float
    images: int
    confusion_matrix: list[list[int]]


class Tally:
    """Loss and confusion matrix of a pass, accumulated on the device (no host sync)."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.num_classes = num_classes
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.cells = torch.zeros(num_classes * num_classes, device=device, dtype=torch.int64)

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Count one batch: its summed cross-entropy and each (true, predicted) pair."""
        self.loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
        cell = labels * self.num_classes + logits.argmax(dim=1)
        self.cells.index_add_(0, cell, torch.ones_like(cell))

    def scores(self) -> Scores:
        """The pass's numbers, read back from the device at once (one sync)."""
        values = torch.cat([self.loss_sum.view(1), self.cells.to(torch.float64)]).tolist()
        loss_sum, cells = values[0], [int(v) for v in values[1:]]
        c = self.num_classes
        matrix = [cells[i * c : (i + 1) * c] for i in range(c)]
        n = sum(cells)
        hits = sum(matrix[i][i] for i in range(c))
        return Scores(
            loss=loss_sum / max(n, 1),
            accuracy=hits / max(n, 1),
            images=n,
            confusion_matrix=matrix,
        )


def evaluate_checkpoint(
    store: CheckpointStore,
    ckpt_id: str,
    data: FashionMNIST,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    limit: int | None = None,
) -> StoredEvaluation:
    """Evaluate a checkpoint on the first `limit` test images (all by default) and store the
    result beside it; the same pass as the engine's validation after every epoch."""
    model, manifest = store.load_model(ckpt_id, device)
    model.to(memory_format=torch.channels_last)
    n = min(limit or data.test_images.shape[0], data.test_images.shape[0])
    x = data.test_images[:n].to(device)
    y = data.test_labels[:n].to(device)
    transform = Transform(manifest.preprocessing)
    size = manifest.input_size
    batch = max(1, min(2048 if device.type == "cuda" else 256, EVAL_PIXELS // size**2))
    tally = Tally(manifest.num_classes, device)
    autocast: Any = (
        torch.autocast(device.type, dtype=amp_dtype, cache_enabled=False)
        if amp_dtype is not None
        else contextlib.nullcontext()
    )
    with torch.inference_mode(), autocast:
        for start in range(0, n, batch):
            tally.add(
                model(model_input(transform, x[start : start + batch], True)),
                y[start : start + batch],
            )
    scores = tally.scores()
    evaluation = StoredEvaluation(
        checkpoint=ckpt_id,
        images=scores.images,
        limit=limit,
        loss=scores.loss,
        accuracy=scores.accuracy,
        confusion_matrix=scores.confusion_matrix,
        device=str(device),
    )
    store.save_evaluation(evaluation)
    return evaluation
