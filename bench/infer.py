"""Inference benchmark: batch-1 latency and batched throughput, eager PyTorch vs cnnserve's path.

For each model a freshly initialised checkpoint is saved to a temporary store and loaded twice
through `service.inference.load_for_inference`: once with the eager backend (plain PyTorch, the
baseline) and once as the server loads it (`auto`: ONNX Runtime where the export works). Both
take what the server feeds them, N×1×28×28 floats, and include training's bilinear resize to the
model's input size and the softmax. Timings are wall-clock medians over a bounded time.

    python -m bench infer [--models lenet,resnet18,vgg] [--seconds 3] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.machine import core_count, cpu_name
from bench.stores import bench_redis, open_store
from models import build_model, get_model_entry
from service.inference.backends import (
    LoadedModel,
    cpu_budget,
    load_for_inference,
)
from workers.store.checkpoints import CheckpointStore, Manifest, Preprocessing

logger = logging.getLogger(__name__)

DEFAULT_MODELS = ("lenet", "resnet18", "vgg")
GOALS_MS = {"resnet18": 10.0, "vgg": 15.0}


def machine_info() -> dict[str, Any]:
    """The machine and library versions a result was measured with."""

    def ver(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "missing"

    cpu, cores = cpu_name(), core_count()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": cores,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ver("onnxruntime"),
        "fastapi": ver("fastapi"),
        "uvicorn": ver("uvicorn"),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


@dataclass
class Timing:
    """Latency statistics of one function, measured in rounds interleaved with others."""

    runs: int
    median_ms: float  # over every sample of every round
    best_round_median_ms: float  # the quietest round: what the code costs without neighbours
    p90_ms: float
    images_per_s: float  # from best_round_median_ms


def _round(fn: Callable[[], object], seconds: float, min_runs: int = 3) -> list[float]:
    samples: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(samples) < min_runs or time.perf_counter() < deadline:
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples


def time_interleaved(
    fns: dict[str, tuple[Callable[[], object], int]], seconds: float, rounds: int
) -> dict[str, Timing]:
    """Time each `fn` (a batch of `images`) in `rounds` short rounds, taking turns.

    On a machine shared with other work the load changes by the second; taking turns gives
    every contender the same neighbours, and the quietest round's median shows the code's
    own cost.
    """
    for fn, _ in fns.values():
        fn()
        fn()
    per_round: dict[str, list[list[float]]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, (fn, _) in fns.items():
            per_round[name].append(_round(fn, seconds / rounds))
    out: dict[str, Timing] = {}
    for name, (_, images) in fns.items():
        samples = sorted(x for r in per_round[name] for x in r)
        best = min(statistics.median(r) for r in per_round[name])
        out[name] = Timing(
            runs=len(samples),
            median_ms=statistics.median(samples) * 1e3,
            best_round_median_ms=best * 1e3,
            p90_ms=samples[int(0.9 * (len(samples) - 1))] * 1e3,
            images_per_s=images / best,
        )
    return out


def save_fresh_checkpoint(store: CheckpointStore, name: str, job_id: str) -> Manifest:
    """Save a freshly initialised (seed 0) model at its default arch and size as epoch 1."""
    entry = get_model_entry(name)
    torch.manual_seed(0)
    saved = store.save(
        job_id=job_id,
        epoch=1,
        model=build_model(name),
        manifest_fields={
            "model": name,
            "arch": entry.default_arch,
            "input_size": entry.input_size,
            "preprocessing": Preprocessing(resize=entry.input_size),
        },
    )
    return saved.manifest


def _load(
    store: CheckpointStore, ckpt_id: str, backend: str, cache: Path, threads: int
) -> LoadedModel:
    # `cache`: the exported graph lives beside the checkpoint in the store now
    return load_for_inference(
        store,
        ckpt_id,
        backend=backend,  # type: ignore[arg-type]
        threads=threads,
        max_batch_size=1024,
    )


def bench_model(
    name: str,
    store: CheckpointStore,
    cache: Path,
    *,
    seconds: float,
    batch: int,
    rounds: int,
    threads: int,
) -> dict[str, Any]:
    """Eager vs served-path timings for one freshly initialised model at its default size."""
    entry = get_model_entry(name)
    manifest = save_fresh_checkpoint(store, name, f"{len(store.list()):016x}")
    eager = _load(store, manifest.id, "eager", cache, threads)
    started = time.perf_counter()
    served = _load(store, manifest.id, "auto", cache, threads)
    load_s = time.perf_counter() - started
    rng = np.random.default_rng(0)
    one = rng.random((1, 1, 28, 28), dtype=np.float32)
    many = rng.random((batch, 1, 28, 28), dtype=np.float32)
    diff = float(np.abs(eager.run(many) - served.run(many)).max())
    result: dict[str, Any] = {
        "model": name,
        "input_size": entry.input_size,
        "served_backend": served.backend,
        "first_load_s": round(load_s, 3),
        "max_abs_prob_diff": diff,
    }
    timings = time_interleaved(
        {
            "eager_batch1": (partial(eager.run, one), 1),
            "served_batch1": (partial(served.run, one), 1),
            f"eager_batch{batch}": (partial(eager.run, many), batch),
            f"served_batch{batch}": (partial(served.run, many), batch),
        },
        seconds,
        rounds,
    )
    result.update({name: asdict(t) for name, t in timings.items()})
    logger.info(
        "%s: eager %.2f ms, %s %.2f ms at batch 1",
        name,
        result["eager_batch1"]["best_round_median_ms"],
        served.backend,
        result["served_batch1"]["best_round_median_ms"],
    )
    return result


def markdown(results: Sequence[dict[str, Any]], batch: int) -> str:
    """The results as a markdown table."""
    lines = [
        "Latencies are the median of the quietest of the interleaved rounds.",
        "",
        f"| model | input | served backend | eager batch 1 (ms) | served batch 1 (ms) | "
        "served batch 1, all rounds (ms) | "
        f"speed-up | eager batch {batch} (img/s) | served batch {batch} (img/s) | goal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        e1 = r["eager_batch1"]["best_round_median_ms"]
        s1 = r["served_batch1"]["best_round_median_ms"]
        eb, sb = r[f"eager_batch{batch}"], r[f"served_batch{batch}"]
        goal = GOALS_MS.get(r["model"])
        goal_text = f"≤ {goal:g} ms: {'met' if s1 <= goal else 'missed'}" if goal else "–"
        if r["model"] == "resnet18":
            goal_text += (
                f"; ≥ 200 img/s batched: {'met' if sb['images_per_s'] >= 200 else 'missed'}"
            )
        lines.append(
            f"| {r['model']} | {r['input_size']}×{r['input_size']} | {r['served_backend']} | "
            f"{e1:.2f} | {s1:.2f} | {r['served_batch1']['median_ms']:.2f} | "
            f"{e1 / s1:.1f}× | {eb['images_per_s']:.0f} | "
            f"{sb['images_per_s']:.0f} | {goal_text} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench infer", description=__doc__)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument(
        "--seconds", type=float, default=8.0, help="time per measurement, over all rounds"
    )
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds")
    parser.add_argument(
        "--threads", type=int, default=0, help="intra-op threads (0: as the server picks)"
    )
    parser.add_argument("--batch", type=int, default=32, help="batch size for throughput")
    parser.add_argument("--out", type=Path, default=Path("docs/bench-infer.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    workers, threads = cpu_budget()
    threads = args.threads or threads
    torch.set_num_threads(threads)
    results = []
    with (
        tempfile.TemporaryDirectory(prefix="cnnserve-bench-") as tmp,
        bench_redis(Path(tmp)),
    ):
        store = open_store(Path(tmp) / "checkpoints")
        for name in args.models.split(","):
            results.append(
                bench_model(
                    name.strip(),
                    store,
                    Path(tmp) / "onnx-cache",
                    seconds=args.seconds,
                    batch=args.batch,
                    rounds=args.rounds,
                    threads=threads,
                )
            )
    report = {
        "benchmark": "inference",
        "machine": machine_info(),
        "threads": threads,
        "compute_workers": workers,
        "batch": args.batch,
        "seconds_per_measurement": args.seconds,
        "rounds": args.rounds,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    sys.stdout.write(markdown(results, args.batch) + "\n")
    sys.stdout.write(f"results written to {args.out}\n")
    return 0
