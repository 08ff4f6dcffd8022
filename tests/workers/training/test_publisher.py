"""Publishing staged checkpoints: a worker whose lease lapsed publishes nothing more."""

from __future__ import annotations

import torch

from models import build_model
from workers.store.checkpoints import CheckpointStore, Preprocessing
from workers.training.publisher import Publisher

JOB = "0123456789abcdef"


def _staged(store: CheckpointStore, epoch: int, val_acc: float):  # type: ignore[no-untyped-def]
    torch.manual_seed(epoch)
    return store.stage(
        job_id=JOB,
        epoch=epoch,
        model=build_model("lenet", input_size=28),
        manifest_fields={
            "model": "lenet",
            "input_size": 28,
            "preprocessing": Preprocessing(resize=28),
            "metrics": {"val_acc": val_acc},
        },
    )


def test_a_worker_that_lost_its_job_publishes_nothing_over_the_new_owners(
    checkpoint_store: CheckpointStore,
) -> None:
    """Worker A's lease lapses (a long stall) and worker B resumes the job and publishes its
    own epoch 2. A checkpoint A staged before it noticed must not reach the store or the index
    (its files would interleave with B's under the same keys: a corrupt `latest`)."""
    published: list[str] = []
    lost = False
    publisher = Publisher(
        checkpoint_store,
        keep=3,
        on_published=lambda _m, saved: published.append(saved.manifest.id),
        stop=lambda: lost,
        lost=lambda: lost,
    )
    publisher.submit(_staged(checkpoint_store, 1, 0.5), metrics=None)  # type: ignore[arg-type]
    publisher.drain()
    b_epoch_2 = checkpoint_store.save(
        job_id=JOB,
        epoch=2,
        model=build_model("lenet", input_size=28),
        manifest_fields={
            "model": "lenet",
            "input_size": 28,
            "preprocessing": Preprocessing(resize=28),
            "metrics": {"val_acc": 0.7},
        },
    )
    stale = _staged(checkpoint_store, 2, 0.9)  # A's epoch 2, staged before its lease lapsed
    lost = True
    publisher.submit(stale, metrics=None)  # type: ignore[arg-type]
    publisher.close()

    assert published == [f"{JOB}-e001"]
    assert not stale.directory.exists()  # dropped
    manifest = checkpoint_store.manifest(f"{JOB}-e002")  # B's, intact
    assert manifest.weights_sha256 == b_epoch_2.manifest.weights_sha256
    assert checkpoint_store.aliases(JOB) == {"latest": f"{JOB}-e002", "best": f"{JOB}-e002"}


def test_a_lease_lost_during_the_upload_files_nothing(checkpoint_store: CheckpointStore) -> None:
    """The lease lapses while the files go up (a long upload to a slow bucket): the files are
    not filed, and the job's aliases stay where the new owner put them."""
    checkpoint_store.ensure_indexed()  # a store in use (nothing from an earlier version)
    answers = iter([False, True])  # still the job's when it starts, not once the files are up
    published: list[str] = []
    publisher = Publisher(
        checkpoint_store,
        keep=3,
        on_published=lambda _m, saved: published.append(saved.manifest.id),
        stop=lambda: False,
        lost=lambda: next(answers, True),
    )
    staged = _staged(checkpoint_store, 1, 0.5)
    publisher.submit(staged, metrics=None)  # type: ignore[arg-type]
    publisher.close()
    assert published == [] and not staged.directory.exists()
    assert checkpoint_store.aliases(JOB) == {}
