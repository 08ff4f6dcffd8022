"""The CUDA-graph training step's bookkeeping, on the CPU.

A CUDA graph cannot be captured without a GPU, so here a stand-in replays the step the way a
captured graph does (grads written afresh, the batch read from the static index buffer); the
rest is the real engine: warm-up, capture on the fourth full batch, the partial last batch run
eagerly beside the graph, the epoch's loss summed in place, the fallback when capture fails.
Training this way must give the very weights eager training gives. The real capture is tested
in `test_gpu.py`.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import pytest
import torch

from tests.workers.helpers import lenet_spec, numbers, weights
from workers.errors import OutOfMemoryError
from workers.store.checkpoints import CheckpointStore
from workers.store.jobs import new_job_id
from workers.training import engine, graphs
from workers.training.data import FashionMNIST
from workers.training.engine import Outcome, TrainOptions, TrainResult, train
from workers.training.graphs import WARMUP_STEPS, StepGraph, graphs_apply

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH = 64
FULL_BATCHES = 8
#: 8 full batches and a partial one of 20 per epoch
SPEC = lenet_spec(
    epochs=2, train_limit=FULL_BATCHES * BATCH + 20, batch_size=BATCH, optimizer="sgd_momentum"
)


class StandIn:
    """Counts what a captured graph would have done."""

    def __init__(self) -> None:
        self.captures = 0
        self.replays = 0


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> StandIn:
    """Make the CPU engine take the CUDA-graph path, replaying the step eagerly."""
    counts = StandIn()

    def capture(self: StepGraph) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = cast(torch.cuda.CUDAGraph, object())
        counts.captures += 1

    def replay(self: StepGraph) -> None:
        # the captured backward wrote grads afresh, whatever they held before
        self.optimizer.zero_grad(set_to_none=True)
        self.body(self.static_idx)
        counts.replays += 1

    def applies_as_on_a_gpu(device: torch.device, optimizer: str, **flags: bool) -> bool:
        return graphs_apply(torch.device("cuda"), optimizer, **flags)

    monkeypatch.setattr(engine, "graphs_apply", applies_as_on_a_gpu)
    monkeypatch.setattr(StepGraph, "_capture", capture)
    monkeypatch.setattr(StepGraph, "_replay", replay)
    return counts


def run(data: FashionMNIST, store: CheckpointStore, **options: Any) -> TrainResult:
    return train(
        SPEC, job_id=new_job_id(), data=data, store=store, options=TrainOptions("cpu", **options)
    )


def test_graph_replays_train_exactly_as_eager_steps(
    data: FashionMNIST, checkpoint_store: CheckpointStore, stand_in: StandIn
) -> None:
    store = checkpoint_store
    graphed = run(data, store)
    eager = run(data, store, cuda_graphs=False)

    assert graphed.cuda_graph and not eager.cuda_graph
    assert stand_in.captures == 1
    # after warm-up every full batch is one replay; each partial last batch ran eagerly
    assert stand_in.replays == SPEC.epochs * FULL_BATCHES - WARMUP_STEPS
    assert numbers(graphed.history) == numbers(eager.history)
    wg = weights(store, graphed.latest_checkpoint or "")
    we = weights(store, eager.latest_checkpoint or "")
    assert all(torch.equal(wg[k], we[k]) for k in we)


def test_a_failed_capture_trains_on_eagerly(
    data: FashionMNIST,
    checkpoint_store: CheckpointStore,
    stand_in: StandIn,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken_capture(self: StepGraph) -> None:
        raise RuntimeError("operation not permitted when stream is capturing")

    store = checkpoint_store
    eager = run(data, store, cuda_graphs=False)
    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.WARNING, graphs.__name__):
        mp.setattr(StepGraph, "_capture", broken_capture)
        fallen_back = run(data, store)

    assert fallen_back.outcome is Outcome.completed and not fallen_back.cuda_graph
    # the reason travels with the result (the GPU window's report records it)
    assert fallen_back.cuda_graph_failure == (
        "RuntimeError: operation not permitted when stream is capturing"
    )
    assert eager.cuda_graph_failure is None
    assert stand_in.replays == 0
    assert "training eagerly" in caplog.text and "not permitted" in caplog.text
    assert numbers(fallen_back.history) == numbers(eager.history)


@pytest.mark.parametrize(
    ("device", "optimizer", "wanted", "compiled", "applies"),
    [
        ("cuda", "sgd", True, False, True),
        ("cuda:1", "sgd_momentum", True, False, True),
        ("cuda", "adamw", True, False, False),  # needs capturable state
        ("cuda", "sgd", False, False, False),  # CNNSERVE_TRAIN_CUDA_GRAPHS=false
        ("cuda", "sgd", True, True, False),  # torch.compile has its own graphs
        ("cpu", "sgd", True, False, False),
    ],
)
def test_which_runs_capture_their_step(
    device: str, optimizer: str, wanted: bool, compiled: bool, applies: bool
) -> None:
    got = graphs_apply(torch.device(device), optimizer, wanted=wanted, compiled=compiled)
    assert got is applies


class FakeStreams:
    """The current-stream bookkeeping of torch.cuda, for a capture that cannot run here."""

    def __init__(self) -> None:
        self.default = object()
        self.current = self.default

    def current_stream(self, device: object = None) -> object:
        return self.current

    def set_stream(self, stream: object) -> None:
        self.current = stream


@pytest.fixture
def cuda_capture(monkeypatch: pytest.MonkeyPatch) -> FakeStreams:
    """The engine on the CUDA-graph path with `torch.cuda.graph` as it behaves on a GPU whose
    capture fails: the capture stream is made current, and capture_end raises."""
    streams = FakeStreams()

    class FailingGraph:
        def capture_end(self) -> None:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    class graph:
        def __init__(self, cuda_graph: FailingGraph, stream: object = None) -> None:
            self.cuda_graph, self.stream = cuda_graph, stream or object()

        def __enter__(self) -> None:
            streams.current = self.stream

        def __exit__(self, *exc: object) -> None:
            # as torch's: capture_end first, so a failure leaves the capture stream current
            self.cuda_graph.capture_end()
            streams.current = streams.default

    def applies_as_on_a_gpu(device: torch.device, optimizer: str, **flags: bool) -> bool:
        return graphs_apply(torch.device("cuda"), optimizer, **flags)

    monkeypatch.setattr(engine, "graphs_apply", applies_as_on_a_gpu)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FailingGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "current_stream", streams.current_stream)
    monkeypatch.setattr(torch.cuda, "set_stream", streams.set_stream)
    return streams


def test_a_failed_capture_leaves_the_run_on_the_stream_it_started_on(
    data: FashionMNIST, checkpoint_store: CheckpointStore, cuda_capture: FakeStreams
) -> None:
    result = run(data, checkpoint_store)

    assert result.outcome is Outcome.completed and not result.cuda_graph
    # the eager steps after the failure, and everything after the run, use the run's stream
    assert cuda_capture.current is cuda_capture.default


def test_out_of_memory_during_capture_fails_the_job_as_out_of_memory(
    data: FashionMNIST, checkpoint_store: CheckpointStore, stand_in: StandIn
) -> None:
    def out_of_memory(self: StepGraph) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StepGraph, "_capture", out_of_memory)
        with pytest.raises(OutOfMemoryError, match="smaller batch_size"):
            run(data, checkpoint_store)
    assert stand_in.replays == 0  # not trained on eagerly as if capture had merely failed


class QueuedWork:
    """A GPU's queue, stood in for: replays are queued, and done only when waited for."""

    def __init__(self) -> None:
        self.queued = 0
        self.seen_at_ticks: list[int] = []

    def wait(self, device: torch.device) -> None:
        self.queued = 0


def test_progress_and_stops_count_only_work_the_device_has_finished(
    data: FashionMNIST,
    checkpoint_store: CheckpointStore,
    stand_in: StandIn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpu = QueuedWork()
    replay = StepGraph._replay

    def queue_replay(self: StepGraph) -> None:
        replay(self)
        gpu.queued += 1

    monkeypatch.setattr(StepGraph, "_replay", queue_replay)
    monkeypatch.setattr(engine, "wait_for_device", gpu.wait, raising=False)

    class Ticks:
        def on_progress(self, progress: object) -> None:
            gpu.seen_at_ticks.append(gpu.queued)

        def on_epoch(self, metrics: object, saved: object) -> None:
            return None

        def stop_requested(self) -> None:
            return None

    result = train(
        SPEC,
        job_id=new_job_id(),
        data=data,
        store=checkpoint_store,
        options=TrainOptions("cpu", progress_interval_s=0.0),
        callbacks=Ticks(),
    )
    assert result.outcome is Outcome.completed and stand_in.replays > 0
    # every tick (progress, images/s, ETA, the cancel check, the wall-time ceiling) came after
    # the device had run what the host had queued
    assert len(gpu.seen_at_ticks) >= SPEC.epochs * FULL_BATCHES
    assert set(gpu.seen_at_ticks) == {0}
