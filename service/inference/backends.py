"""Inference backends: the network wrapped for serving, ONNX export, and the runners.

- The network is wrapped with its checkpoint's resize (`workers.preprocessing.Transform`, as
  training does it on the device) and a softmax, so every backend takes N×1×28×28 floats
  (scaled) and returns probabilities.
- ONNX Runtime where the export works and agrees with PyTorch (on this 2-core CPU it is
  2–6× faster at batch 1, see docs/benchmarks.md), eager PyTorch otherwise. The exported graph
  is kept in the checkpoint store beside its checkpoint (named by the weights' sha256, so
  exported once for every process on every host), read through the store's bounded cache.
- `cpu_budget` splits this machine's cores between compute threads and intra-op threads.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from torch import nn

from workers.preprocessing import NATIVE_SIZE, Transform
from workers.store.checkpoints import CheckpointStore, Manifest

logger = logging.getLogger(__name__)

Backend = Literal["onnxruntime", "eager"]
#: Bump when the exported graph changes, so stale cached .onnx files are not reused.
EXPORT_VERSION = "v2"
#: Largest absolute difference in probabilities tolerated between ONNX Runtime and PyTorch.
BACKEND_TOLERANCE = 1e-4

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
    """A classifier as inference runs it: 28×28 in, its preprocessing's resize, probabilities
    out."""

    def __init__(self, net: nn.Module, transform: Transform) -> None:
        super().__init__()
        self.net = net
        self.transform = transform

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The network's class scores for 28×28 inputs (what explanations attribute)."""
        out: torch.Tensor = self.net(self.transform.resize(x))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)


RunFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class LoadedModel:
    """A checkpoint ready to classify: its manifest and a batch function (N×1×28×28 → N×C)."""

    manifest: Manifest
    backend: Backend
    run_batch: RunFn
    #: The eager network (explanations need its gradients whatever the backend).
    module: InferenceNet
    #: The ONNX graph on disk, when one was exported.
    onnx_path: Path | None = None
    max_batch_size: int = 64

    @property
    def checkpoint_id(self) -> str:
        return self.manifest.id

    @property
    def weights_sha256(self) -> str:
        return self.manifest.weights_sha256

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


def onnx_name(manifest: Manifest) -> str:
    """The name of a checkpoint's exported graph: keyed by its weights, input size, opset and
    the export's version."""
    return (
        f"{manifest.model}-{manifest.weights_sha256[:32]}-r{manifest.preprocessing.resize}"
        f"-o{manifest.onnx.opset}-{EXPORT_VERSION}.onnx"
    )


def load_for_inference(
    store: CheckpointStore,
    ckpt_id: str,
    *,
    backend: Literal["auto", "onnxruntime", "eager"],
    threads: int,
    max_batch_size: int = 64,
) -> LoadedModel:
    """Load a checkpoint's verified weights and pick the backend that serves it."""
    net, manifest = store.load_model(ckpt_id, "cpu")
    module = InferenceNet(net, Transform(manifest.preprocessing)).eval()
    eager = eager_runner(module)
    chosen: Backend = "eager"
    run = eager
    exported: Path | None = None
    if backend in ("auto", "onnxruntime"):
        try:
            path = exported = ensure_onnx(module, manifest, store)
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
                exported = None
            else:
                run, chosen = candidate, "onnxruntime"
        except Exception:  # any export or runtime failure: eager still answers correctly
            logger.warning("ONNX export of %s failed; serving it with eager PyTorch", ckpt_id)
            logger.debug("ONNX failure", exc_info=True)
            exported = None
    return LoadedModel(manifest, chosen, run, module, exported, max_batch_size)


def ensure_onnx(module: InferenceNet, manifest: Manifest, store: CheckpointStore) -> Path:
    """A local file of the checkpoint's exported graph: from the store (through its cache), or
    exported here and published beside the checkpoint."""

    def export(path: Path) -> None:
        started = time.perf_counter()
        export_onnx(module, path, manifest)
        logger.info("exported %s to ONNX in %.2f s", manifest.id, time.perf_counter() - started)

    return store.onnx_path(manifest, onnx_name(manifest), export)
