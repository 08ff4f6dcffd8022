"""Per-class evaluation: the confusion matrix kept by validation, re-evaluating a checkpoint,
and fine-tuning from one."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.workers.helpers import lenet_spec
from workers.store.checkpoints import CheckpointStore, LineageError
from workers.store.jobs import new_job_id
from workers.training.data import FashionMNIST
from workers.training.devices import prepare_device
from workers.training.engine import Outcome, train
from workers.training.validation import Tally, evaluate_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_tally_counts_each_true_and_predicted_pair() -> None:
    tally = Tally(3, torch.device("cpu"))
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    predicted = torch.tensor([0, 1, 1, 2, 0, 2])
    logits = torch.nn.functional.one_hot(predicted, 3).float() * 5
    tally.add(logits[:4], labels[:4])
    tally.add(logits[4:], labels[4:])
    scores = tally.scores()
    assert scores.confusion_matrix == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    assert scores.images == 6 and scores.accuracy == pytest.approx(4 / 6)
    expected = torch.nn.functional.cross_entropy(logits, labels).item()
    assert scores.loss == pytest.approx(expected)


def test_every_epoch_keeps_a_confusion_matrix_that_agrees_with_its_accuracy(
    data: FashionMNIST, checkpoint_store: CheckpointStore
) -> None:
    store = checkpoint_store
    result = train(
        lenet_spec(epochs=2, train_limit=1024), job_id=new_job_id(), data=data, store=store
    )
    assert result.outcome is Outcome.completed
    for metrics in result.history:
        matrix = metrics.confusion_matrix
        assert matrix is not None and len(matrix) == 10 and all(len(r) == 10 for r in matrix)
        assert sum(map(sum, matrix)) == 10_000  # every test image once
        assert sum(matrix[i][i] for i in range(10)) / 10_000 == pytest.approx(metrics.val_acc)
    manifest = store.manifest(result.latest_checkpoint or "")
    assert manifest.confusion_matrix == result.history[-1].confusion_matrix
    assert manifest.history[-1]["confusion_matrix"] == manifest.confusion_matrix


def test_any_checkpoint_can_be_evaluated_again_and_keeps_the_result(
    data: FashionMNIST, checkpoint_store: CheckpointStore
) -> None:
    store = checkpoint_store
    result = train(
        lenet_spec(epochs=1, train_limit=1024), job_id=new_job_id(), data=data, store=store
    )
    ckpt = result.latest_checkpoint or ""
    device, amp = prepare_device("cpu", "auto")

    full = evaluate_checkpoint(store, ckpt, data, device=device, amp_dtype=amp)
    assert full.images == 10_000 and full.accuracy == pytest.approx(result.history[0].val_acc)
    assert full.confusion_matrix == store.manifest(ckpt).confusion_matrix
    part = evaluate_checkpoint(store, ckpt, data, device=device, amp_dtype=amp, limit=500)
    assert part.images == 500 and sum(map(sum, part.confusion_matrix)) == 500
    assert store.evaluation(ckpt) == part  # the latest is kept beside the checkpoint


def test_fine_tuning_starts_from_the_parents_weights_and_can_continue_its_numbering(
    data: FashionMNIST, checkpoint_store: CheckpointStore
) -> None:
    small = dataclasses.replace(
        data, test_images=data.test_images[:2000], test_labels=data.test_labels[:2000]
    )
    store = checkpoint_store
    parent = train(
        lenet_spec(epochs=2, train_limit=3000, batch_size=32, optimizer="adamw", lr=0.01),
        job_id=new_job_id(),
        data=small,
        store=store,
    )
    parent_ckpt = parent.latest_checkpoint or ""
    parent_acc = parent.history[-1].val_acc
    assert parent_acc > 0.5

    # a tiny learning rate: the first epoch is where the parent was, not back at chance (0.1)
    spec = lenet_spec(
        epochs=2, train_limit=512, lr=1e-5, init_from=parent_ckpt, continue_epochs=True
    )
    lineage = store.lineage(
        spec.init_from, model="lenet", arch=None, input_size=28, continue_epochs=True
    )
    assert (lineage.parent, lineage.epoch_offset) == (parent_ckpt, 2)
    job = new_job_id()
    child = train(
        spec,
        job_id=job,
        data=small,
        store=store,
        init_from=lineage.parent,
        epoch_offset=lineage.epoch_offset,
    )
    assert [m.epoch for m in child.history] == [3, 4]
    assert child.history[0].val_acc == pytest.approx(parent_acc, abs=0.03)
    assert child.latest_checkpoint == f"{job}-e004"
    assert store.manifest(f"{job}-e003").parent == parent_ckpt

    with pytest.raises(LineageError, match="differs in input_size 28 \\(this job: 32\\)"):
        store.lineage(parent_ckpt, model="lenet", arch=None, input_size=32)
    with pytest.raises(LineageError, match="has no best checkpoint"):
        store.lineage("0000000000000000:best", model="lenet", arch=None, input_size=28)
