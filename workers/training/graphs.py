"""A training step captured once as a CUDA graph and replayed for every full batch.

A LeNet step on a GPU is some forty tiny kernels whose launch cost dwarfs their work (the
spec's eager loop: 1.5 s per epoch against a 0.15 s goal); a replay is one launch. This is
PyTorch's whole-network capture (the "CUDA Graphs" part of its CUDA semantics notes):

- a few eager warm-up steps on a side stream (cuDNN autotuning, cuBLAS workspaces, the
  optimizer's lazily created state), then capture on that same stream;
- grads set to None just before capture, so backward allocates them in the graph's private
  memory pool and every replay writes them afresh;
- the batch's indices copied into a static buffer before each replay; the step gathers,
  scales and resizes the batch on the device itself, so nothing else has to be copied.

The step must keep its shapes and never sync with the host: the engine replays full batches
only and runs the last, partial batch of an epoch eagerly (zeroing the graph's grads in place
so they stay where the graph writes them). Only the SGD family is captured: AdamW's step needs
`capturable=True` state, which would change its checkpoints, so it stays eager. If capture
fails the run logs why and goes on eagerly (slower, never wrong) on the stream it started
on; out of memory during capture is not a capture problem but the batch not fitting, and
fails the job with the engine's out-of-memory advice.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch

__all__ = ["CAPTURABLE_OPTIMIZERS", "WARMUP_STEPS", "StepGraph", "graphs_apply"]

log = logging.getLogger(__name__)

#: Eager steps before capture (PyTorch's notes use 3; DDP would need 11).
WARMUP_STEPS = 3
#: Optimizers whose `step()` is capturable as they are built by `make_optimizer`.
CAPTURABLE_OPTIMIZERS = frozenset({"sgd", "sgd_momentum"})


def graphs_apply(device: torch.device, optimizer: str, *, wanted: bool, compiled: bool) -> bool:
    """Whether a run on `device` with `optimizer` should capture its training step.

    Not with `torch.compile` (its guards and own graph trees do not nest in a manual capture).
    """
    return wanted and device.type == "cuda" and optimizer in CAPTURABLE_OPTIMIZERS and not compiled


class StepGraph:
    """Trains one batch per `step(idx)`: eagerly while warming up, then by graph replay.

    `body(idx)` is the training step without zeroing grads: gather the batch `idx` from the
    device-resident data, forward, loss, backward, optimizer step, and add the batch's summed
    loss into a tensor that outlives the graph.
    """

    def __init__(
        self,
        body: Callable[[torch.Tensor], None],
        optimizer: torch.optim.Optimizer,
        batch_size: int,
        device: torch.device,
    ) -> None:
        self.body = body
        self.optimizer = optimizer
        self.batch_size = batch_size
        self.device = device
        self.static_idx = torch.zeros(batch_size, dtype=torch.int64, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.stream: torch.cuda.Stream | None = None
        self.warmed_up = 0
        #: Why capture failed (the run then stays eager), or None.
        self.failure: str | None = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def step(self, idx: torch.Tensor) -> None:
        """Train on the examples `idx` (a full batch is replayed once the graph exists)."""
        full = idx.shape[0] == self.batch_size
        if full and self.graph is not None:
            self.static_idx.copy_(idx)
            self._replay()
        elif not full or self.failure is not None:
            self._eager(idx)
        elif self.warmed_up < WARMUP_STEPS:
            with self._side_stream():
                self._eager(idx)
            self.warmed_up += 1
        else:
            self.static_idx.copy_(idx)
            try:
                self._capture()
            except torch.cuda.OutOfMemoryError:
                raise  # the batch does not fit: the job fails with the out-of-memory advice
            except RuntimeError as exc:  # capture errors surface as RuntimeError subclasses
                self._give_up(exc)
                self._eager(idx)
            else:
                self._replay()  # capture records the step without running it

    def _eager(self, idx: torch.Tensor) -> None:
        # once captured, the grads live in the graph's pool: zero them there, don't drop them
        self.optimizer.zero_grad(set_to_none=self.graph is None)
        self.body(idx)

    @contextlib.contextmanager
    def _side_stream(self) -> Iterator[None]:
        if self.device.type != "cuda":
            yield
            return
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            yield
        current.wait_stream(self.stream)

    def _capture(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        origin = torch.cuda.current_stream(self.device)
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                self.body(self.static_idx)
        except BaseException:
            # `torch.cuda.graph` leaves its capture stream current when capture fails: put
            # the run back on the stream it was on, or later work would race the default one
            torch.cuda.set_stream(origin)
            raise
        self.graph = graph
        log.info("training step captured as a CUDA graph (batch %d)", self.batch_size)

    def _replay(self) -> None:
        assert self.graph is not None
        self.graph.replay()

    def _give_up(self, exc: BaseException) -> None:
        self.graph = None
        self.failure = f"{type(exc).__name__}: {exc}"
        # whatever capture allocated (grads, activations) is not to be trusted: start clean
        self.optimizer.zero_grad(set_to_none=True)
        log.warning("CUDA graph capture failed, training eagerly: %s", self.failure)
