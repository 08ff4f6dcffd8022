"""The checkpoint store's index: `<model>:best`, job aliases and listings without reading every
manifest, kept right through saves, pruning, deletes, hand-removed files and an upgrade."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch

from models import build_model
from workers.store.checkpoint_index import INDEX_FILE
from workers.store.checkpoints import (
    CheckpointNotFoundError,
    CheckpointStore,
    Preprocessing,
    SavedCheckpoint,
)

JOBS = ["a" * 16, "b" * 16, "c" * 16]


def save(
    store: CheckpointStore, job: str, epoch: int, val_acc: float, model: str = "lenet"
) -> SavedCheckpoint:
    size = 28 if model == "lenet" else 32
    torch.manual_seed(0)
    return store.save(
        job_id=job,
        epoch=epoch,
        model=build_model(model, input_size=size),
        manifest_fields={
            "model": model,
            "input_size": size,
            "preprocessing": Preprocessing(resize=size),
            "metrics": {"train_loss": 1.0, "val_loss": 1.0, "val_acc": val_acc},
        },
        keep=2,
    )


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(tmp_path / "checkpoints")


def test_save_reports_the_aliases_and_what_it_kept(store: CheckpointStore) -> None:
    accs = [0.5, 0.8, 0.6, 0.7]
    saved = [save(store, JOBS[0], e, acc) for e, acc in enumerate(accs, start=1)]

    last = saved[-1]
    assert (last.latest, last.best) == (f"{JOBS[0]}-e004", f"{JOBS[0]}-e002")
    # keep=2 keeps the last two epochs and the best
    assert last.kept == [f"{JOBS[0]}-e002", f"{JOBS[0]}-e003", f"{JOBS[0]}-e004"]
    assert store.aliases(JOBS[0]) == {"latest": last.latest, "best": last.best}
    assert [c.id for c in store.list(job_id=JOBS[0])] == list(reversed(last.kept))


def test_model_best_is_the_best_of_every_job_and_follows_deletes(store: CheckpointStore) -> None:
    save(store, JOBS[0], 1, 0.70)
    save(store, JOBS[1], 1, 0.81)
    save(store, JOBS[2], 1, 0.81)  # as good, and newer: it wins the tie
    save(store, JOBS[2], 2, 0.99, model="resnet18")

    assert store.resolve("lenet:best") == f"{JOBS[2]}-e001"
    assert store.resolve("resnet18:best") == f"{JOBS[2]}-e002"
    store.delete(f"{JOBS[2]}-e001")
    assert store.resolve("lenet:best") == f"{JOBS[1]}-e001"
    shutil.rmtree(store.root / JOBS[1])  # removed by hand, behind the store's back
    assert store.resolve("lenet:best") == f"{JOBS[0]}-e001"
    assert {c.id for c in store.list(model="lenet")} == {f"{JOBS[0]}-e001"}
    store.delete(f"{JOBS[0]}-e001")
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint of model 'lenet'"):
        store.resolve("lenet:best")


def test_a_store_from_before_the_index_is_indexed_once_when_opened(
    store: CheckpointStore,
) -> None:
    for job, acc in zip(JOBS, (0.6, 0.9, 0.7), strict=True):
        save(store, job, 1, acc)
        save(store, job, 2, acc - 0.1)
    listing = [c.model_dump() for c in store.list()]
    (store.root / INDEX_FILE).unlink()  # as the previous version left the directory

    answers: list[str] = []

    def open_and_resolve() -> None:  # several processes opening the store at once
        answers.append(CheckpointStore(store.root).resolve("lenet:best"))

    threads = [threading.Thread(target=open_and_resolve) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert answers == [f"{JOBS[1]}-e001"] * 4
    assert [c.model_dump() for c in CheckpointStore(store.root).list()] == listing


def test_reading_a_store_that_does_not_exist_yet_creates_nothing(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "nowhere" / "checkpoints")
    assert store.list() == []
    with pytest.raises(CheckpointNotFoundError):
        store.resolve("lenet:best")
    assert not (tmp_path / "nowhere").exists()
