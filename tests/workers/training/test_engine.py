"""The training engine on the CPU: the d2l recipe, reproducible, resumable, stoppable."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tests.workers.helpers import lenet_spec, numbers, weights
from workers.contracts import JobSpec
from workers.errors import DeviceError
from workers.store.checkpoints import CheckpointStore, SavedCheckpoint
from workers.store.jobs import EpochMetrics, Progress, new_job_id
from workers.training.data import FashionMNIST
from workers.training.devices import (
    prepare_device,
    requested_device,
    resolve_device,
    resolve_precision,
)
from workers.training.engine import Outcome, StopRequest, TrainOptions, train

#: keep in-process training on one core (see tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder:
    """Callbacks that remember what the engine said and can ask it to stop."""

    def __init__(self, stop_in_epoch: int | None = None, stop: StopRequest = StopRequest.cancel):
        self.progress: list[Progress] = []
        self.epochs: list[EpochMetrics] = []
        self.stop_in_epoch = stop_in_epoch
        self.stop = stop

    def on_progress(self, progress: Progress) -> None:
        self.progress.append(progress)

    def on_epoch(self, metrics: EpochMetrics, saved: SavedCheckpoint) -> None:
        self.epochs.append(metrics)

    def stop_requested(self) -> StopRequest | None:
        # at the first progress report of that epoch, however late the epoch before it is
        # published (to a bucket, publishing runs beside training and may end after it)
        if self.stop_in_epoch is None or not self.progress:
            return None
        return self.stop if self.progress[-1].epoch >= self.stop_in_epoch else None


def test_seeded_cpu_runs_are_reproducible(
    data: FashionMNIST, checkpoint_store: CheckpointStore
) -> None:
    store = checkpoint_store
    spec = lenet_spec(epochs=1, train_limit=512, seed=7)
    a = train(spec, job_id=new_job_id(), data=data, store=store, options=TrainOptions("cpu"))
    b = train(spec, job_id=new_job_id(), data=data, store=store, options=TrainOptions("cpu"))
    assert numbers(a.history) == numbers(b.history)
    wa, wb = weights(store, a.latest_checkpoint or ""), weights(store, b.latest_checkpoint or "")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    other = train(
        lenet_spec(epochs=1, train_limit=512, seed=8),
        job_id=new_job_id(),
        data=data,
        store=store,
        options=TrainOptions("cpu"),
    )
    assert numbers(other.history) != numbers(a.history)


def test_the_recipe_learns(data: FashionMNIST, checkpoint_store: CheckpointStore) -> None:
    spec = lenet_spec(epochs=2, train_limit=3000, batch_size=32, optimizer="adamw", lr=0.01)
    result = train(spec, job_id=new_job_id(), data=data, store=checkpoint_store)
    first, last = result.history
    assert last.train_loss < first.train_loss
    assert last.val_acc > 0.5  # chance is 0.1


def test_resuming_from_a_checkpoint_equals_training_straight_through(
    data: FashionMNIST, checkpoint_store: CheckpointStore
) -> None:
    store = checkpoint_store
    spec = lenet_spec(epochs=3, train_limit=512, optimizer="sgd_momentum")
    straight = train(spec, job_id=new_job_id(), data=data, store=store, options=TrainOptions("cpu"))

    job = new_job_id()
    stopped = train(spec, job_id=job, data=data, store=store, callbacks=Recorder(stop_in_epoch=2))
    assert stopped.outcome is Outcome.cancelled
    assert stopped.latest_checkpoint == f"{job}-e001"
    assert store.aliases(job)["latest"] == f"{job}-e001"  # the half-done epoch 2 left no trace
    resumed = train(spec, job_id=job, data=data, store=store, resume_from=f"{job}-e001")

    assert resumed.outcome is Outcome.completed and resumed.start_epoch == 2
    assert numbers(resumed.history) == numbers(straight.history)
    ws, wr = weights(store, straight.latest_checkpoint or ""), weights(store, f"{job}-e003")
    assert all(torch.equal(ws[k], wr[k]) for k in ws)


def test_progress_reports_batches_rate_and_eta(
    data: FashionMNIST, checkpoint_store: CheckpointStore
) -> None:
    rec = Recorder()
    spec = lenet_spec(epochs=2, train_limit=1000, batch_size=100)
    options = TrainOptions("cpu", progress_interval_s=0.0)
    result = train(
        spec,
        job_id=new_job_id(),
        data=data,
        store=checkpoint_store,
        options=options,
        callbacks=rec,
    )
    assert result.outcome is Outcome.completed
    assert [m.epoch for m in rec.epochs] == [1, 2]
    train_steps = [(p.epoch, p.batch) for p in rec.progress if p.batch < p.batches]
    assert train_steps[:3] == [(1, 1), (1, 2), (1, 3)]
    assert all(p.batches == 10 and p.epochs == 2 for p in rec.progress)
    assert all(p.images_per_s and p.images_per_s > 0 for p in rec.progress)
    etas = [p.eta_s for p in rec.progress if p.epoch == 1 and p.batch < 10]
    assert all(e is not None and e > 0 for e in etas)


def test_a_last_batch_of_one_example_is_dropped_and_the_epoch_counts_what_it_trained(
    data: FashionMNIST, checkpoint_store: CheckpointStore
) -> None:
    # 129 = one batch of 128 and one example: ResNet-18's BatchNorm at 32 px cannot train on
    # a batch of one (one value per channel in its last stage)
    small = dataclasses.replace(
        data, test_images=data.test_images[:256], test_labels=data.test_labels[:256]
    )
    spec = JobSpec(
        model="resnet18", device="cpu", input_size=32, train_limit=129, batch_size=128, epochs=2
    )
    rec = Recorder()
    store = checkpoint_store
    options = TrainOptions("cpu", progress_interval_s=0.0)
    result = train(
        spec, job_id=new_job_id(), data=small, store=store, options=options, callbacks=rec
    )

    assert result.outcome is Outcome.completed and len(result.history) == 2
    assert all(p.batches == 1 for p in rec.progress)
    assert all(math.isfinite(m.train_loss) and m.train_loss > 0 for m in result.history)
    dataset = store.manifest(result.latest_checkpoint or "").dataset
    assert (dataset["trained_on"], dataset["per_epoch"]) == (129, 128)


def test_other_input_sizes_are_resized_on_the_device_as_the_manifest_says(
    data: FashionMNIST, checkpoint_store: CheckpointStore
) -> None:
    store = checkpoint_store
    spec = lenet_spec(epochs=1, train_limit=256, input_size=32)
    result = train(spec, job_id=new_job_id(), data=data, store=store)
    manifest = store.manifest(result.latest_checkpoint or "")
    assert manifest.input_size == 32 and manifest.preprocessing.resize == 32
    assert manifest.preprocessing.interpolation == "bilinear"
    model, _ = store.load_model(manifest.id)
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 10)


def test_val_limit_validates_on_the_first_test_images_only(
    data: FashionMNIST, checkpoint_store: CheckpointStore
) -> None:
    store = checkpoint_store
    spec = lenet_spec(epochs=1, train_limit=256, val_limit=300)
    result = train(spec, job_id=new_job_id(), data=data, store=store)
    manifest = store.manifest(result.latest_checkpoint or "")
    assert manifest.dataset["validated_on"] == 300
    matrix = result.history[0].confusion_matrix
    assert matrix is not None
    # the rows count each true class among the first 300 test labels
    assert [sum(row) for row in matrix] == torch.bincount(
        data.test_labels[:300].long(), minlength=10
    ).tolist()


def test_a_wall_time_ceiling_stops_the_run_and_keeps_checkpoints(
    data: FashionMNIST, checkpoint_store: CheckpointStore
) -> None:
    store = checkpoint_store
    job = new_job_id()
    result = train(
        lenet_spec(epochs=5, train_limit=256),
        job_id=job,
        data=data,
        store=store,
        options=TrainOptions("cpu", max_seconds=0.0),
    )
    assert result.outcome is Outcome.timed_out
    assert result.stopped_at is not None and result.stopped_at.epoch == 1
    assert result.history == [] and store.aliases(job) == {}


def test_an_interrupt_leaves_the_job_to_its_new_owner(
    data: FashionMNIST, checkpoint_store: CheckpointStore
) -> None:
    rec = Recorder(stop_in_epoch=2, stop=StopRequest.interrupt)
    result = train(
        lenet_spec(epochs=3, train_limit=256),
        job_id=new_job_id(),
        data=data,
        store=checkpoint_store,
        callbacks=rec,
    )
    assert result.outcome is Outcome.interrupted and len(result.history) == 1


def test_device_requests() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert requested_device("auto", "cuda:1") == "cuda:1"
    assert requested_device("cuda", "cuda:1") == "cuda:1"
    assert requested_device("cpu", "cuda:1") == "cpu"
    assert requested_device("cuda:0", "cpu") == "cuda:0"
    assert resolve_precision("auto", torch.device("cpu")) is None
    assert resolve_precision("bf16", torch.device("cpu")) is torch.bfloat16
    # a clear error for a typo, also where CUDA is present
    for typo in ("cuda:x", "gpu", "cuda:0 ", "cuda:0\n"):
        with pytest.raises(DeviceError, match="unknown device"):
            resolve_device(typo)
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(DeviceError, match="has no usable CUDA GPU"):
            resolve_device("cuda:0")


def test_cuda_n_is_made_current_before_its_bf16_support_is_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a stand-in for a machine whose GPU 0 lacks bf16 and GPU 1 has it: torch answers
    # is_bf16_supported() for the *current* device
    current = [0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.__setitem__(0, d.index))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **_: current[0] == 1)

    assert prepare_device("cuda:1", "auto") == (torch.device("cuda", 1), torch.bfloat16)
    assert current == [1]
    assert prepare_device("cuda:0", "auto") == (torch.device("cuda", 0), None)
    with pytest.raises(DeviceError, match="no bf16 support"):
        prepare_device("cuda:0", "bf16")
