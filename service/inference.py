"""Classification inference: cached models, a CPU-friendly backend, and request batching.

- `ModelCache`: an LRU of loaded checkpoints (size `settings.model_cache_size`), keyed by
  checkpoint id and weights hash, counting hits and misses in the metrics.
- Backends: ONNX Runtime where the export works and agrees with PyTorch (on this 2-core CPU it
  is 2–6× faster at batch 1, see docs/benchmarks.md), eager PyTorch otherwise. The exported
  graph is cached under `data_dir/onnx-cache`, keyed by the weights' sha256.
- The network is wrapped with training's on-device resize (`F.interpolate`, bilinear, no
  antialias) and a softmax, so every backend takes N×1×28×28 floats and returns probabilities.
- Predict calls re-resolve a ref at most once per `REF_TTL_S` (1 s), not per request.
- `InferenceService`: runs the forward passes on a small thread pool (never on the event
  loop) and, when `settings.batching` is on, stacks concurrent requests for one checkpoint
  into one forward pass: the first request waits up to `batch_window_ms` for company (a full
  batch goes at once, and so does one as big as the checkpoint's last busy spell: the closed
  loop of clients that keeps it busy is all there), a checkpoint has at most one batch per
  compute thread in flight, and whatever queues meanwhile goes next (≤ `max_batch_size`
  images), taken by the compute thread itself as soon as its batch is done.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import threading
import time
import warnings
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from fastapi import Depends, Request
from PIL import Image
from torch import nn

from service.images import NATIVE_SIZE
from service.metrics import MODEL_CACHE_HITS, MODEL_CACHE_MISSES, observe_batch
from workers.checkpoints import CheckpointStore, Manifest
from workers.settings import Settings

logger = logging.getLogger(__name__)

Backend = Literal["onnxruntime", "eager"]
#: Bump when the exported graph changes, so stale cached .onnx files are not reused.
EXPORT_VERSION = "v2"
#: Largest absolute difference in probabilities tolerated between ONNX Runtime and PyTorch.
BACKEND_TOLERANCE = 1e-4
#: Predict re-resolves a ref (and re-reads its manifest) at most this often, so an alias like
#: `<job>:latest` follows a running job within this many seconds.
REF_TTL_S = 1.0
REF_CACHE_SIZE = 1024


#: Set by `cnnserve api --workers N` for its processes (how many share this machine's cores).
API_PROCESSES_ENV = "CNNSERVE_API_PROCESSES"


def cpu_budget() -> tuple[int, int]:
    """(compute workers, threads per worker) for this machine's usable cores.

    Few workers with several intra-op threads each: a big model's single image then uses the
    cores, while on a large machine a few forward passes can still run side by side.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    # `cnnserve api --workers N` runs N of these processes: each gets its share of the cores
    cores = max(1, cores // max(1, int(os.environ.get(API_PROCESSES_ENV, "1") or 1)))
    workers = max(1, cores // 4)
    return workers, max(1, cores // workers)


class InferenceNet(nn.Module):
    """A classifier as inference runs it: 28×28 in, training's resize, probabilities out."""

    def __init__(self, net: nn.Module, size: int) -> None:
        super().__init__()
        self.net = net
        self.size = size

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The network's class scores for 28×28 inputs (what explanations attribute)."""
        if self.size != NATIVE_SIZE:
            # exactly the engine's on-device resize of the 28×28 /255 tensor
            x = F.interpolate(
                x,
                size=(self.size, self.size),
                mode="bilinear",
                align_corners=False,
                antialias=False,
            )
        out: torch.Tensor = self.net(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)


RunFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class LoadedModel:
    """A checkpoint ready to classify: its manifest and a batch function (N×1×28×28 → N×C)."""

    checkpoint_id: str
    weights_sha256: str
    manifest: Manifest
    backend: Backend
    run_batch: RunFn
    #: The eager network (explanations need its gradients whatever the backend).
    module: InferenceNet
    #: The ONNX graph on disk, when one was exported.
    onnx_path: Path | None = None
    max_batch_size: int = 64

    def run(self, x: np.ndarray) -> np.ndarray:
        """Probabilities for a batch, in chunks of at most `max_batch_size` images."""
        if len(x) <= self.max_batch_size:
            return self.run_batch(x)
        parts = [
            self.run_batch(x[i : i + self.max_batch_size])
            for i in range(0, len(x), self.max_batch_size)
        ]
        return np.concatenate(parts)


def eager_runner(module: InferenceNet) -> RunFn:
    """A batch function running the module in eager PyTorch under inference mode."""

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(np.ascontiguousarray(x))).numpy()

    return run


def export_onnx(module: InferenceNet, path: Path, manifest: Manifest) -> None:
    """Export the module as the manifest's `onnx` says (named tensors, a dynamic batch axis),
    with the classes and preprocessing in the graph's metadata; written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    example = torch.zeros(1, 1, NATIVE_SIZE, NATIVE_SIZE)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            spec = manifest.onnx
            torch.onnx.export(
                module,
                (example,),
                str(tmp),
                dynamo=False,  # the dynamo exporter needs onnxscript; this one needs nothing
                input_names=[spec.input],
                output_names=[spec.output],
                dynamic_axes={spec.input: {0: "batch"}, spec.output: {0: "batch"}},
                opset_version=spec.opset,
            )
        graph = onnx.load(str(tmp))
        onnx.helper.set_model_props(
            graph,
            {
                "cnnserve.model": manifest.model,
                "cnnserve.classes": json.dumps(manifest.classes),
                "cnnserve.preprocessing": manifest.preprocessing.model_dump_json(),
            },
        )
        onnx.save(graph, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def onnx_runner(path: Path, threads: int) -> RunFn:
    """A batch function running an exported model with ONNX Runtime on the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning intra-op threads would take the CPU from the event loop between requests.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        out = session.run(None, {"image": np.ascontiguousarray(x, dtype=np.float32)})
        return np.asarray(out[0])

    return run


def onnx_cache_path(cache_dir: Path, manifest: Manifest) -> Path:
    """Where a checkpoint's exported graph lives: keyed by its weights and input size."""
    name = (
        f"{manifest.model}-{manifest.weights_sha256[:32]}-r{manifest.preprocessing.resize}"
        f"-o{manifest.onnx.opset}-{EXPORT_VERSION}.onnx"
    )
    return cache_dir / name


def load_for_inference(
    store: CheckpointStore,
    ckpt_id: str,
    *,
    backend: Literal["auto", "onnxruntime", "eager"],
    cache_dir: Path,
    threads: int,
    max_batch_size: int = 64,
) -> LoadedModel:
    """Load a checkpoint's verified weights and pick the backend that serves it."""
    net, manifest = store.load_model(ckpt_id, "cpu")
    module = InferenceNet(net, manifest.preprocessing.resize).eval()
    eager = eager_runner(module)
    chosen: Backend = "eager"
    run = eager
    exported: Path | None = None
    if backend in ("auto", "onnxruntime"):
        try:
            path = exported = ensure_onnx(module, manifest, cache_dir)
            candidate = onnx_runner(path, threads)
            probe = np.random.default_rng(0).random((2, 1, NATIVE_SIZE, NATIVE_SIZE))
            probe = probe.astype(np.float32)
            diff = float(np.abs(candidate(probe) - eager(probe)).max())
            if diff > BACKEND_TOLERANCE:
                logger.warning(
                    "ONNX Runtime disagrees with PyTorch on %s (max diff %.2e); serving eager",
                    ckpt_id,
                    diff,
                )
                path.unlink(missing_ok=True)
                exported = None
            else:
                run, chosen = candidate, "onnxruntime"
        except Exception:  # any export or runtime failure: eager still answers correctly
            logger.warning("ONNX export of %s failed; serving it with eager PyTorch", ckpt_id)
            logger.debug("ONNX failure", exc_info=True)
            exported = None
    return LoadedModel(
        checkpoint_id=ckpt_id,
        weights_sha256=manifest.weights_sha256,
        manifest=manifest,
        backend=chosen,
        run_batch=run,
        module=module,
        onnx_path=exported,
        max_batch_size=max_batch_size,
    )


def ensure_onnx(module: InferenceNet, manifest: Manifest, cache_dir: Path) -> Path:
    """The checkpoint's exported graph in the cache, exported first if it is not there."""
    path = onnx_cache_path(cache_dir, manifest)
    if not path.is_file():
        started = time.perf_counter()
        export_onnx(module, path, manifest)
        logger.info(
            "exported %s to ONNX in %.2f s: %s", manifest.id, time.perf_counter() - started, path
        )
    return path


Loader = Callable[[str], LoadedModel]


class ModelCache:
    """A bounded LRU of loaded models keyed by checkpoint id; thread-safe, loads deduplicated."""

    def __init__(self, loader: Loader, size: int) -> None:
        self._loader = loader
        self.size = size
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def __contains__(self, ckpt_id: object) -> bool:
        with self._lock:
            return ckpt_id in self._models

    def __len__(self) -> int:
        with self._lock:
            return len(self._models)

    def lookup(self, ckpt_id: str, weights_sha256: str) -> LoadedModel | None:
        """The cached model (refreshed as most recent) if its weights still match, else None."""
        with self._lock:
            loaded = self._models.get(ckpt_id)
            if loaded is None or loaded.weights_sha256 != weights_sha256:
                return None
            self._models.move_to_end(ckpt_id)
        MODEL_CACHE_HITS.inc()
        return loaded

    def load(self, ckpt_id: str, weights_sha256: str) -> LoadedModel:
        """Load (blocking) unless another thread just did; evicts the least recently used."""
        MODEL_CACHE_MISSES.inc()
        with self._lock:
            key_lock = self._loading.setdefault(ckpt_id, threading.Lock())
        with key_lock:
            with self._lock:
                loaded = self._models.get(ckpt_id)
                if loaded is not None and loaded.weights_sha256 == weights_sha256:
                    self._models.move_to_end(ckpt_id)
                    return loaded
            try:
                loaded = self._loader(ckpt_id)
            except BaseException:
                with self._lock:  # a failed load must not leave its lock behind
                    self._loading.pop(ckpt_id, None)
                raise
            with self._lock:
                self._models[ckpt_id] = loaded
                self._models.move_to_end(ckpt_id)
                while len(self._models) > self.size:
                    evicted, _ = self._models.popitem(last=False)
                    logger.info("model cache full: evicted %s", evicted)
                self._loading.pop(ckpt_id, None)
            return loaded

    def evict(self, ckpt_id: str) -> None:
        """Forget a checkpoint (after it was deleted)."""
        with self._lock:
            self._models.pop(ckpt_id, None)


@dataclass
class _Pending:
    x: np.ndarray
    future: asyncio.Future[np.ndarray]


@dataclass
class _Queue:
    """One checkpoint's waiting requests, and whether a compute thread is draining them.

    The event loop appends and starts a drain; a compute thread takes batch after batch
    until nothing waits, so the model never idles for a trip through the event loop
    between two batches. `lock` guards `pending`, `images` and `drains`; `timer` is the
    loop's alone.
    """

    loaded: LoadedModel
    loop: asyncio.AbstractEventLoop
    lock: threading.Lock = field(default_factory=threading.Lock)
    pending: deque[_Pending] = field(default_factory=deque)
    images: int = 0
    #: Compute threads draining it (at most the service's `parallel`).
    drains: int = 0
    timer: asyncio.TimerHandle | None = None


def _deliver(batch: list[_Pending], probs: np.ndarray | None, failure: Exception | None) -> None:
    """Give each request of a batch its rows of the answer, or the failure (on the loop)."""
    start = 0
    for p in batch:
        end = start + len(p.x)
        if not p.future.done():  # a client may have gone away
            if failure is not None:
                p.future.set_exception(failure)
            else:
                assert probs is not None
                p.future.set_result(probs[start:end])
        start = end


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> bool:
    """`fn(*args)` on `loop` from another thread; False when the loop has closed."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        return False
    return True


class InferenceService:
    """Classifies preprocessed batches for checkpoints, off the event loop, batched."""

    def __init__(self, settings: Settings, store: CheckpointStore) -> None:
        self.settings = settings
        self.store = store
        # the server process's Pillow guard matches its own limit (images.decode_image checks
        # each header against the limit before decoding anyway)
        Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
        workers, threads = cpu_budget()
        self.threads = threads
        #: Batches of one checkpoint that may run at once (one per compute thread).
        self.parallel = workers
        torch.set_num_threads(threads)
        self._compute = ThreadPoolExecutor(workers, thread_name_prefix="cnnserve-infer")
        self._loaders = ThreadPoolExecutor(2, thread_name_prefix="cnnserve-load")
        #: Explanations (gradients, many forward passes) one at a time, beside predictions.
        self.explainers = ThreadPoolExecutor(1, thread_name_prefix="cnnserve-explain")
        self.onnx_cache_dir = settings.data_dir / "onnx-cache"
        self.cache = ModelCache(self._load, settings.model_cache_size)
        self._queues: dict[str, _Queue] = {}
        #: Images each checkpoint's last busy spell served (one drain, start to end).
        self._spells: dict[str, int] = {}
        #: Drains handed to the compute pool that no thread has started yet.
        self._waiting = 0
        self._waiting_lock = threading.Lock()
        self._refs: dict[str, tuple[float, Manifest]] = {}

    def _load(self, ckpt_id: str) -> LoadedModel:
        return load_for_inference(
            self.store,
            ckpt_id,
            backend=self.settings.inference_backend,
            cache_dir=self.onnx_cache_dir,
            threads=self.threads,
            max_batch_size=self.settings.max_batch_size,
        )

    def cached_manifest(self, ref: str) -> Manifest | None:
        """The manifest `ref` resolved to less than `REF_TTL_S` ago, if any."""
        entry = self._refs.get(ref)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def remember_manifest(self, ref: str, manifest: Manifest) -> None:
        """Keep a ref's resolution for `REF_TTL_S` (bounded; cleared wholesale when full)."""
        if len(self._refs) >= REF_CACHE_SIZE:
            self._refs.clear()
        self._refs[ref] = (time.monotonic() + REF_TTL_S, manifest)

    async def model(self, manifest: Manifest) -> LoadedModel:
        """The loaded model for a checkpoint, from the cache or loaded on a worker thread."""
        loaded = self.cache.lookup(manifest.id, manifest.weights_sha256)
        if loaded is not None:
            return loaded
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._loaders, self.cache.load, manifest.id, manifest.weights_sha256
        )

    async def onnx_file(self, manifest: Manifest) -> Path:
        """The checkpoint's ONNX graph (the one ONNX Runtime serves), exported if need be."""
        loaded = await self.model(manifest)
        if loaded.onnx_path is not None and loaded.onnx_path.is_file():
            return loaded.onnx_path
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._loaders, ensure_onnx, loaded.module, loaded.manifest, self.onnx_cache_dir
        )

    async def predict(self, manifest: Manifest, x: np.ndarray) -> tuple[LoadedModel, np.ndarray]:
        """Class probabilities (N×C) for preprocessed images (N×1×28×28 float32)."""
        loaded = await self.model(manifest)
        if not self.settings.batching:
            return loaded, await self._forward(loaded, x)
        loop = asyncio.get_running_loop()
        queue = self._queues.get(loaded.checkpoint_id)
        if queue is None or queue.loaded is not loaded:
            if queue is not None and (queue.pending or queue.drains):
                # the checkpoint was reloaded: the old queue finishes, this one goes alone
                return loaded, await self._forward(loaded, x)
            queue = self._queues[loaded.checkpoint_id] = _Queue(loaded, loop)
        item = _Pending(x, loop.create_future())
        window = self.settings.batch_window_ms / 1000.0
        # a batch goes when it is full, or as big as the last busy spell (the clients that
        # keep this checkpoint busy are all here), or when the first request's wait is over
        full = min(self.settings.max_batch_size, self._spells.get(loaded.checkpoint_id, 1 << 30))
        with queue.lock:
            queue.pending.append(item)
            queue.images += len(x)
            free = queue.drains < self.parallel
            start = free and (queue.images >= full or window <= 0)
            queue.drains += start
        if start:
            self._start(queue)
        elif free and queue.timer is None:  # the first request waits a moment for company
            queue.timer = loop.call_later(window, self._window_closed, queue)
        return loaded, await item.future

    async def _forward(self, loaded: LoadedModel, x: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        probs = await loop.run_in_executor(self._compute, loaded.run, x)
        observe_batch(loaded.manifest.model, len(x), time.perf_counter() - started)
        return probs

    def _window_closed(self, queue: _Queue) -> None:
        """The first waiting request's wait is over: drain what came meanwhile (on the loop)."""
        queue.timer = None
        with queue.lock:
            if queue.drains >= self.parallel or not queue.pending:
                return
            queue.drains += 1
        self._start(queue)

    def _start(self, queue: _Queue) -> None:
        """Hand the queue to a compute thread (on the loop; the caller counted the drain)."""
        if queue.timer is not None:
            queue.timer.cancel()
            queue.timer = None
        self._submit(queue)

    def _submit(self, queue: _Queue, served: int = 0) -> None:
        """Put a drain of the queue in the compute pool's line (counted until it starts)."""
        with self._waiting_lock:
            self._waiting += 1
        self._compute.submit(self._drain, queue, served)

    def _next_batch(self, queue: _Queue) -> list[_Pending]:
        """The queue's next batch (≤ max_batch_size images, at least one request); an empty
        list ends the drain (under the queue's lock)."""
        batch: list[_Pending] = []
        images = 0
        with queue.lock:
            while queue.pending:
                n = len(queue.pending[0].x)
                if batch and images + n > self.settings.max_batch_size:
                    break
                batch.append(queue.pending.popleft())
                images += n
            queue.images -= images
            if not batch:
                queue.drains -= 1
        return batch

    def _drain(self, queue: _Queue, served: int = 0) -> None:
        """Run the queue's batches until none waits (on a compute thread), then remember how
        many images this busy spell served (`served`: those before a hand-over).

        When another checkpoint's queue waits for a compute thread, this one goes to the back
        of the line after each batch, so a busy checkpoint cannot starve the others.
        """
        with self._waiting_lock:
            self._waiting -= 1
        while batch := self._next_batch(queue):
            images = sum(len(p.x) for p in batch)
            served += images
            started = time.perf_counter()
            try:
                x = batch[0].x if len(batch) == 1 else np.concatenate([p.x for p in batch])
                probs: np.ndarray | None = queue.loaded.run(x)
                failure: Exception | None = None
            except Exception as exc:  # hand the failure to every waiting request
                probs, failure = None, exc
            else:
                observe_batch(queue.loaded.manifest.model, images, time.perf_counter() - started)
            if not _call_soon(queue.loop, _deliver, batch, probs, failure):
                return  # the loop is gone: nobody waits for answers
            if self._waiting and queue.pending:  # another queue is in line: go behind it
                self._submit(queue, served)
                return
        if served:  # a drain that found nothing taken says nothing of the clients
            if len(self._spells) >= REF_CACHE_SIZE:
                self._spells.clear()
            self._spells[queue.loaded.checkpoint_id] = served
        _call_soon(queue.loop, self._retire, queue)

    def _retire(self, queue: _Queue) -> None:
        """Forget a drained queue unless a request came since (on the loop)."""
        with queue.lock:
            idle = not (queue.pending or queue.drains)
        if idle and self._queues.get(queue.loaded.checkpoint_id) is queue:
            del self._queues[queue.loaded.checkpoint_id]

    def forget(self, deleted: Manifest) -> None:
        """Drop a deleted checkpoint: its cached model, every ref resolved to it, its graph."""
        self.cache.evict(deleted.id)
        for ref, (_, manifest) in list(self._refs.items()):
            if manifest.id == deleted.id:
                self._refs.pop(ref, None)
        onnx_cache_path(self.onnx_cache_dir, deleted).unlink(missing_ok=True)

    def close(self) -> None:
        """Stop the thread pools (pending forward passes finish first)."""
        self._compute.shutdown(wait=True)
        self._loaders.shutdown(wait=False)
        self.explainers.shutdown(wait=False)


_SERVICE_LOCK = threading.Lock()


async def get_inference(request: Request) -> InferenceService:
    """The app's inference service (`app.state.inference`), made on first use.

    `async` on purpose: FastAPI runs plain `def` dependencies on the thread pool, a hop that
    costs more than this lookup on every predict call.
    """
    return inference_of(request.app.state)


def inference_of(state: Any) -> InferenceService:
    """The inference service of an app's `state`, made on first use."""
    service: InferenceService | None = getattr(state, "inference", None)
    if service is None:
        with _SERVICE_LOCK:
            service = getattr(state, "inference", None)
            if service is None:
                service = InferenceService(state.settings, state.checkpoint_store)
                state.inference = service
    return service


InferenceDep = Annotated[InferenceService, Depends(get_inference)]
