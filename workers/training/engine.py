"""The training engine: d2l's recipe on Fashion-MNIST, fast, resumable, and free of Celery.

Recipe (as the seed): Xavier init (the models do it), cross-entropy, plain SGD by default, a
fresh shuffle each epoch, validation on all 10,000 test images after every epoch.

Speed: the uint8 data set sits on the training device as one tensor; each batch is gathered,
scaled and resized there by the preprocessing the manifest records (`workers.preprocessing`);
losses and accuracy accumulate on the device and are read once per epoch. On a GPU: bf16
autocast, cudnn autotuning, and the training step captured once as a CUDA graph and replayed
per batch (`workers.training.graphs`; SGD family) or, optionally, `torch.compile`. On the CPU: no
DataLoader, no worker processes, no per-batch host sync.

The caller sees the run through `TrainingCallbacks` (progress, finished epochs, stop requests).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from typing import Any, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from models import build_model
from workers.contracts import JobSpec
from workers.errors import OutOfMemoryError, ResumeError
from workers.preprocessing import Transform
from workers.settings import Settings
from workers.store.checkpoints import (
    CheckpointError,
    CheckpointStore,
    Preprocessing,
    SavedCheckpoint,
    retry_unavailable,
)
from workers.store.jobs import EpochMetrics, Progress
from workers.training.data import FashionMNIST
from workers.training.devices import prepare_device, release_memory, resolve_device, wait_for_device
from workers.training.graphs import StepGraph, graphs_apply
from workers.training.publisher import Publisher
from workers.training.validation import Scores, Tally, model_input

__all__ = [
    "NullCallbacks",
    "Outcome",
    "StopRequest",
    "TrainOptions",
    "TrainResult",
    "TrainingCallbacks",
    "make_optimizer",
    "resolve_device",
    "train",
    "train_subset",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Validation batches hold about this many input pixels (bounded memory at 224×224).
EVAL_PIXELS = 2**21
#: Validation batch on the CPU, where cache locality beats fewer, larger batches.
CPU_EVAL_BATCH = 256


class StopRequest(StrEnum):
    """Why the caller wants the run to stop early."""

    cancel = "cancel"
    #: The worker is going away (shutting down): stop, record nothing; what is staged is
    #: still published (the job is still this worker's).
    interrupt = "interrupt"
    #: Someone else owns the job now (its lease was lost): stop, record and publish nothing.
    lost = "lost"


class Outcome(StrEnum):
    """How a run ended."""

    completed = "completed"
    cancelled = "cancelled"
    timed_out = "timed_out"
    interrupted = "interrupted"


class TrainingCallbacks(Protocol):
    """What the engine tells its caller, and asks it."""

    def on_progress(self, progress: Progress) -> None: ...

    def on_epoch(self, metrics: EpochMetrics, saved: SavedCheckpoint) -> None: ...

    def stop_requested(self) -> StopRequest | None: ...


class NullCallbacks:
    """Callbacks that listen to nothing and never stop the run."""

    def on_progress(self, progress: Progress) -> None:
        return None

    def on_epoch(self, metrics: EpochMetrics, saved: SavedCheckpoint) -> None:
        return None

    def stop_requested(self) -> StopRequest | None:
        return None


@dataclass(frozen=True)
class TrainOptions:
    """How to run a job, as opposed to what to train (the `JobSpec`)."""

    device: str = "auto"
    keep_checkpoints: int = 3
    max_seconds: float | None = None
    progress_interval_s: float = 0.5
    compile: bool = False
    #: Capture the training step as a CUDA graph where it applies (`workers.training.graphs`).
    cuda_graphs: bool = True
    torch_threads: int = 0

    @classmethod
    def from_settings(cls, settings: Settings, device: str) -> TrainOptions:
        """The options a worker or `cnnserve train` runs a job on `device` with."""
        return cls(
            device=device,
            keep_checkpoints=settings.keep_checkpoints,
            max_seconds=settings.job_max_seconds,
            compile=settings.train_compile,
            cuda_graphs=settings.train_cuda_graphs,
            torch_threads=settings.torch_threads,
        )


@dataclass
class TrainResult:
    """What a run did."""

    outcome: Outcome
    device: str
    precision: str
    history: list[EpochMetrics] = field(default_factory=list)
    start_epoch: int = 1
    resumed_from: str | None = None
    latest_checkpoint: str | None = None
    stopped_at: Progress | None = None
    seconds: float = 0.0
    #: Whether full batches were replayed from a captured CUDA graph.
    cuda_graph: bool = False
    #: Why capturing the training step failed, when it was tried and failed (the run went on
    #: eagerly); None when it was captured or never tried.
    cuda_graph_failure: str | None = None


def make_optimizer(name: str, params: Iterator[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The spec's optimizer: plain SGD (d2l), SGD with momentum 0.9, or AdamW."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")


def epoch_batches(n_train: int, batch_size: int) -> tuple[int, int]:
    """Batches per epoch and the examples they hold: a last batch of one example is dropped.

    A one-example batch cannot train a network whose BatchNorm sees a single value per
    channel (ResNet-18 below 64 px), and is a step of pure noise elsewhere; as `drop_last`
    would, the epoch skips it (another example each epoch, as the shuffle changes), and the
    epoch's loss, progress and images/s count only what was trained.
    """
    full, rest = divmod(n_train, batch_size)
    if rest == 1 and full > 0:
        return full, full * batch_size
    return full + (rest > 0), n_train


def train_subset(n_total: int, spec: JobSpec) -> torch.Tensor | None:
    """Indices of the examples a `train_limit` job trains on (fixed per seed), or None."""
    if spec.train_limit is None or spec.train_limit >= n_total:
        return None
    gen = torch.Generator().manual_seed(spec.seed)
    return torch.randperm(n_total, generator=gen)[: spec.train_limit]


class _Run:
    """One attempt at a job: owns the model, optimizer and device tensors until released."""

    def __init__(
        self,
        spec: JobSpec,
        job_id: str,
        data: FashionMNIST,
        store: CheckpointStore,
        options: TrainOptions,
        callbacks: TrainingCallbacks,
        device: torch.device,
        amp_dtype: torch.dtype | None,
    ) -> None:
        assert spec.input_size is not None and spec.lr is not None
        self.spec = spec
        self.job_id = job_id
        self.data = data
        self.store = store
        self.options = options
        self.callbacks = callbacks
        self.device = device
        self.amp_dtype = amp_dtype
        self.input_size = spec.input_size
        #: What every batch goes through on the device, and the manifest records for serving.
        self.transform = Transform(Preprocessing(resize=spec.input_size))
        self.cuda = device.type == "cuda"
        # every zoo model is convolutional; NHWC is faster on cuDNN and oneDNN alike (about
        # 1.1-2x per LeNet step on a 2-core CPU, measured against NCHW)
        self.channels_last = True
        self.started = time.monotonic()

        torch.manual_seed(spec.seed)  # Xavier init and dropout draw from the global RNG
        if self.cuda:
            torch.cuda.manual_seed_all(spec.seed)
            torch.backends.cudnn.benchmark = True
        self._build_model()
        self._place_data()
        self.shuffle = torch.Generator().manual_seed(spec.seed + 1)

        self.history: list[EpochMetrics] = []
        self.num_classes = 10
        self.start_epoch = 1
        #: Epochs are numbered after a parent's (`init_from` with `continue_epochs`).
        self.last_epoch = spec.epochs
        self.parent: str | None = None
        #: The principal whose job this is; its checkpoints record it (tenancy).
        self.owner: str | None = None
        self.resumed_from: str | None = None
        self.latest: str | None = None
        self.next_check = 0.0
        self.val_seconds = 0.0
        self.stopped_at: Progress | None = None
        self.rate: float | None = None
        #: Checkpoints go up beside training (a bucket) or at once (the local directory).
        self.publisher = Publisher(
            store,
            options.keep_checkpoints,
            self._published,
            stop=self._interrupted,
            lost=self._lost,
        )

    def _interrupted(self) -> bool:
        """This worker no longer owns the job (lease lost, or shutting down)."""
        return self.callbacks.stop_requested() in (StopRequest.interrupt, StopRequest.lost)

    def _lost(self) -> bool:
        """Another worker owns the job now: nothing of this attempt may be published."""
        return self.callbacks.stop_requested() is StopRequest.lost

    def read_store(self, op: Callable[[], T], what: str) -> T:
        """A read of the checkpoint store, riding out its outage while the job is ours."""
        return retry_unavailable(op, stop=self._interrupted, what=f"job {self.job_id}: {what}")

    # set-up
    def _build_model(self) -> None:
        """The network, its optimizer, and the captured or compiled step where they apply."""
        spec, device, options = self.spec, self.device, self.options
        assert spec.lr is not None
        self.arch = spec.network_arch
        self.model = build_model(spec.model, arch=spec.arch_value, input_size=spec.input_size)
        self.model.to(device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(spec.optimizer, self.model.parameters(), spec.lr)
        self.forward: nn.Module = self.model
        if options.compile and self.cuda:
            self.forward = torch.compile(self.model)  # type: ignore[assignment]
        # the summed training loss of the epoch; a fixed tensor, as a captured step adds into it
        self.loss_sum = torch.zeros((), device=device)
        self.graph: StepGraph | None = None
        if graphs_apply(
            device, spec.optimizer, wanted=options.cuda_graphs, compiled=options.compile
        ):
            self.graph = StepGraph(self._train_step, self.optimizer, spec.batch_size, device)

    def _place_data(self) -> None:
        """The job's training examples and the test set, as uint8 tensors on the device."""
        data, device = self.data, self.device
        subset = train_subset(data.train_images.shape[0], self.spec)
        train_x, train_y = data.train_images, data.train_labels
        if subset is not None:
            train_x, train_y = train_x[subset], train_y[subset]
        self.train_x = train_x.to(device, non_blocking=True)
        self.train_y = train_y.to(device, non_blocking=True)
        # the first `val_limit` test images, or all of them
        self.test_x = data.test_images[: self.spec.val_limit].to(device, non_blocking=True)
        self.test_y = data.test_labels[: self.spec.val_limit].to(device, non_blocking=True)
        self.n_train = int(self.train_x.shape[0])
        self.batches, self.n_epoch = epoch_batches(self.n_train, self.spec.batch_size)
        if self.cuda:
            self.eval_batch = max(
                self.spec.batch_size, min(2048, EVAL_PIXELS // self.input_size**2)
            )
        else:  # large CPU batches fall out of cache: LeNet validates 2.5x faster at 256 than 2048
            self.eval_batch = max(1, min(CPU_EVAL_BATCH, EVAL_PIXELS // self.input_size**2))

    def number_after(self, epoch_offset: int) -> None:
        """Number this job's epochs after `epoch_offset` (a parent's, with `continue_epochs`)."""
        self.start_epoch = epoch_offset + 1
        self.last_epoch = epoch_offset + self.spec.epochs

    def start_from(self, parent: str) -> None:
        """Begin from another checkpoint's weights with a fresh optimizer: fine-tuning, or
        continuing a finished job with new settings."""
        try:
            manifest = self.store.manifest(parent)
            if (manifest.model, manifest.input_size) != (self.spec.model, self.input_size):
                raise ResumeError(
                    f"checkpoint {parent} holds {manifest.model} at {manifest.input_size}px, "
                    f"not this job's {self.spec.model} at {self.input_size}px"
                )
            self.model.load_state_dict(self.store.load_weights(parent))
        except CheckpointError as exc:
            raise ResumeError(
                f"cannot start from checkpoint {parent}: {exc}; submit the job again with "
                "another init_from"
            ) from exc
        except RuntimeError as exc:  # a state_dict of another architecture
            raise ResumeError(
                f"checkpoint {parent}'s weights do not fit this job's network ({exc}); "
                "init_from must name a checkpoint of the same model, arch and input size"
            ) from exc
        self.parent = parent
        log.info("job %s starts from the weights of %s", self.job_id, parent)

    def resume(self, ckpt_id: str) -> None:
        """Continue after `ckpt_id`: its weights, optimizer, RNG and shuffle state, history."""
        try:
            manifest = self.store.manifest(ckpt_id)
            weights = self.store.load_weights(ckpt_id)
            state = self.store.load_state(ckpt_id)
            if manifest.model != self.spec.model or manifest.input_size != self.input_size:
                raise ResumeError(
                    f"checkpoint {ckpt_id} holds {manifest.model} at {manifest.input_size}px, "
                    f"not this job's {self.spec.model} at {self.input_size}px"
                )
            self.model.load_state_dict(weights)
            self.optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["torch_rng"])
            if self.cuda and "cuda_rng" in state:
                torch.cuda.set_rng_state(state["cuda_rng"], self.device)
            self.shuffle.set_state(state["generator"])
            epoch = int(state["epoch"])
            history = [EpochMetrics.model_validate(h) for h in manifest.history]
        except CheckpointError as exc:
            raise ResumeError(
                f"cannot resume from checkpoint {ckpt_id}: {exc}. The job stops rather than "
                "train from scratch; resubmit it to start over"
            ) from exc
        except (KeyError, RuntimeError, ValueError) as exc:
            raise ResumeError(
                f"cannot resume from checkpoint {ckpt_id}: its resume state does not fit this "
                f"job ({exc}); resubmit the job to start over"
            ) from exc
        self.history = [m for m in history if m.epoch <= epoch]
        self.start_epoch = epoch + 1
        self.resumed_from = ckpt_id
        self.parent = manifest.parent
        self.latest = ckpt_id
        log.info("job %s resumes after epoch %d from %s", self.job_id, epoch, ckpt_id)

    # the loop
    def _prep(self, images: torch.Tensor) -> torch.Tensor:
        return model_input(self.transform, images, self.channels_last)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        # no cast cache: a graph capture forbids it, and each weight is cast once per step
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=False)

    def _checkpoint(
        self, epoch: int, batch: int, epoch_t0: float | None, *, force: bool = False
    ) -> Outcome | None:
        """Report progress and look for a stop; throttled to `progress_interval_s` unless forced.

        During validation (`epoch_t0` None) the training rate of the epoch is reported.
        """
        if time.monotonic() < self.next_check and not force:
            return None
        # the host runs ahead of a GPU: report, stop and time what the device has finished
        wait_for_device(self.device)
        now = time.monotonic()
        self.next_check = now + self.options.progress_interval_s
        done = min(batch * self.spec.batch_size, self.n_epoch)
        if epoch_t0 is not None:
            self.rate = done / max(now - epoch_t0, 1e-9) if batch else None
        rate = self.rate
        eta = None
        if rate:
            left_images = (self.n_epoch - done) + (self.last_epoch - epoch) * self.n_epoch
            eta = left_images / rate + (self.last_epoch - epoch + 1) * self.val_seconds
        progress = Progress(
            epoch=epoch,
            epochs=self.last_epoch,
            batch=batch,
            batches=self.batches,
            images_per_s=round(rate, 1) if rate else None,
            eta_s=round(eta, 1) if eta is not None else None,
        )
        self.stopped_at = progress
        self.callbacks.on_progress(progress)
        request = self.callbacks.stop_requested()
        if request is StopRequest.cancel:
            return Outcome.cancelled
        if request in (StopRequest.interrupt, StopRequest.lost):
            return Outcome.interrupted
        limit = self.options.max_seconds
        if limit is not None and now - self.started > limit:
            return Outcome.timed_out
        return None

    def _train_step(self, idx: torch.Tensor) -> None:
        """Train on examples `idx`, grads already zeroed; capturable (no sync, no allocation
        that outlives it but the grads)."""
        x = self._prep(self.train_x[idx])
        y = self.train_y[idx]
        with self._autocast():
            loss = F.cross_entropy(self.forward(x), y)
        loss.backward()
        self.optimizer.step()
        self.loss_sum.add_(loss.detach().float() * idx.shape[0])

    def train_epoch(self, epoch: int, epoch_t0: float) -> torch.Tensor | Outcome:
        """One pass over the (shuffled) training set; the summed loss, or why it stopped."""
        self.model.train()
        bs = self.spec.batch_size
        perm = torch.randperm(self.n_train, generator=self.shuffle).to(self.device)
        self.loss_sum.zero_()
        for b in range(self.batches):
            idx = perm[b * bs : (b + 1) * bs]
            if self.graph is not None:
                self.graph.step(idx)
            else:
                self.optimizer.zero_grad(set_to_none=True)
                self._train_step(idx)
            stop = self._checkpoint(epoch, b + 1, epoch_t0, force=b + 1 == self.batches)
            if stop is not None:
                return stop
        return self.loss_sum.clone()

    def validate(self, epoch: int) -> Scores | Outcome:
        """Loss, accuracy and confusion matrix on all test images, read back with one sync."""
        self.model.eval()
        tally = Tally(self.num_classes, self.device)
        n = int(self.test_x.shape[0])
        with torch.inference_mode():
            for start in range(0, n, self.eval_batch):
                x = self._prep(self.test_x[start : start + self.eval_batch])
                with self._autocast():
                    tally.add(self.forward(x), self.test_y[start : start + self.eval_batch])
                stop = self._checkpoint(epoch, self.batches, None)
                if stop is not None:
                    return stop
        return tally.scores()

    def save(self, epoch: int, metrics: EpochMetrics) -> None:
        """Stage this epoch's checkpoint (a snapshot, now) and hand it to the publisher."""
        state: dict[str, Any] = {
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "generator": self.shuffle.get_state(),
            "epoch": epoch,
        }
        if self.cuda:
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        dataset = self.data.describe()
        dataset.update(
            train_limit=self.spec.train_limit,
            trained_on=self.n_train,
            per_epoch=self.n_epoch,
            validated_on=int(self.test_x.shape[0]),
        )
        manifest_fields: dict[str, Any] = {
            "model": self.spec.model,
            "arch": self.arch,
            "input_size": self.input_size,
            "preprocessing": self.transform.preprocessing,
            "metrics": {
                "train_loss": metrics.train_loss,
                "val_loss": metrics.val_loss,
                "val_acc": metrics.val_acc,
            },
            "history": [m.model_dump() for m in self.history],
            "spec": self.spec.model_dump(mode="json"),
            "dataset": dataset,
            "confusion_matrix": metrics.confusion_matrix,
            "parent": self.parent,
            "owner": self.owner,
        }
        staged = self.store.stage(
            job_id=self.job_id,
            epoch=epoch,
            model=self.model,
            manifest_fields=manifest_fields,
            state=state,
        )
        self.publisher.submit(staged, metrics)

    def _published(self, metrics: EpochMetrics, saved: SavedCheckpoint) -> None:
        """An epoch's checkpoint is visible: record it (on the publisher's thread, for a bucket)."""
        self.latest = saved.manifest.id
        log.info(
            "job %s epoch %d/%d: train_loss %.4f val_loss %.4f val_acc %.4f (%.2f s)",
            self.job_id,
            metrics.epoch,
            self.last_epoch,
            metrics.train_loss,
            metrics.val_loss,
            metrics.val_acc,
            metrics.seconds,
        )
        self.callbacks.on_epoch(metrics, saved)

    def execute(self) -> TrainResult:
        for epoch in range(self.start_epoch, self.last_epoch + 1):
            epoch_t0 = time.monotonic()
            self.next_check = 0.0  # report the start of every epoch at once
            trained = self.train_epoch(epoch, epoch_t0)
            if isinstance(trained, Outcome):
                return self._result(trained)
            val_t0 = time.monotonic()
            validated = self.validate(epoch)
            if isinstance(validated, Outcome):
                return self._result(validated)
            now = time.monotonic()
            self.val_seconds = now - val_t0
            metrics = EpochMetrics(
                epoch=epoch,
                train_loss=float(trained.item()) / self.n_epoch,
                val_loss=validated.loss,
                val_acc=validated.accuracy,
                seconds=round(now - epoch_t0, 3),
                confusion_matrix=validated.confusion_matrix,
            )
            self.history.append(metrics)
            self.save(epoch, metrics)
            limit = self.options.max_seconds
            over = limit is not None and time.monotonic() - self.started > limit
            if over and epoch < self.last_epoch:
                return self._result(Outcome.timed_out)
        return self._result(Outcome.completed)

    def _result(self, outcome: Outcome) -> TrainResult:
        self.publisher.drain()  # an attempt ends once its checkpoints are visible
        return TrainResult(
            outcome=outcome,
            device=str(self.device),
            precision="bf16" if self.amp_dtype == torch.bfloat16 else "fp32",
            history=list(self.history),
            start_epoch=self.start_epoch,
            resumed_from=self.resumed_from,
            latest_checkpoint=self.latest,
            stopped_at=self.stopped_at if outcome is not Outcome.completed else None,
            seconds=round(time.monotonic() - self.started, 3),
            cuda_graph=self.graph is not None and self.graph.captured,
            cuda_graph_failure=self.graph.failure if self.graph is not None else None,
        )


def train(
    spec: JobSpec,
    *,
    job_id: str,
    data: FashionMNIST,
    store: CheckpointStore,
    options: TrainOptions | None = None,
    callbacks: TrainingCallbacks | None = None,
    resume_from: str | None = None,
    init_from: str | None = None,
    epoch_offset: int = 0,
    owner: str | None = None,
) -> TrainResult:
    """Train `spec` as job `job_id`, checkpointing every epoch into `store`.

    With `init_from` (any checkpoint id) training starts from its weights with a fresh
    optimizer; epochs are numbered after `epoch_offset`. With `resume_from` (a checkpoint id of
    this job) it continues after that epoch with the saved weights, optimizer, RNG and shuffle
    state (and keeps its parent in the manifest). Checkpoints record `owner` (the principal
    that submitted the job). Raises a `TrainingError` subclass with an
    actionable message for a missing device, a damaged checkpoint or CUDA running out of memory.
    """
    options = options or TrainOptions()
    device, amp_dtype = prepare_device(options.device, spec.precision)
    if options.torch_threads:
        torch.set_num_threads(options.torch_threads)
    run: _Run | None = None
    oom: str | None = None
    try:
        run = _Run(
            spec, job_id, data, store, options, callbacks or NullCallbacks(), device, amp_dtype
        )
        run.number_after(epoch_offset)
        run.owner = owner
        if resume_from is not None:
            run.read_store(partial(run.resume, resume_from), f"resuming from {resume_from}")
        elif init_from is not None:
            run.read_store(partial(run.start_from, init_from), f"starting from {init_from}")
        return run.execute()
    except torch.cuda.OutOfMemoryError:
        oom = (
            f"CUDA out of memory on {device} training {spec.model} at {spec.input_size}px with "
            f"batch_size {spec.batch_size}; submit it with a smaller batch_size "
            f"(e.g. {max(1, spec.batch_size // 2)}) or a smaller input_size"
        )
    finally:
        if run is not None:
            run.publisher.close()
        del run  # drop the model, optimizer and device tensors before emptying the cache
        release_memory(device)
    # raised outside the handler so no traceback keeps the run's tensors alive
    raise OutOfMemoryError(oom)
