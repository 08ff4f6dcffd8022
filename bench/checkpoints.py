"""Saving a checkpoint to the local store and to an S3 server: `python -m bench checkpoints`.

For each model it saves `--saves` epoch checkpoints (weights, optimizer state, manifest) of one
job, alternating between the local directory and a bucket of moto's S3 server (started on a
free loopback port, as the tests do; `--url` names a real bucket instead, with the AWS
variables set), and times the two halves the engine sees: `stage` (writing the files to local
disk: what the training thread waits for) and `publish` (uploading them, the manifest last, and
filing them in the Redis index: what runs beside the next epoch when the store is a bucket).

    python -m bench checkpoints [--models lenet,resnet18] [--saves 10]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.infer import machine_info
from bench.stores import bench_redis
from models import build_model
from workers.contracts import JobSpec
from workers.store.checkpoints import CheckpointStore, Preprocessing

logger = logging.getLogger(__name__)


def _state(model: torch.nn.Module) -> dict[str, Any]:
    spec = JobSpec(model="lenet")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    return {"optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(), "spec": spec.model}


def time_saves(store: CheckpointStore, name: str, saves: int) -> dict[str, Any]:
    size = {"lenet": 28, "resnet18": 96, "vgg": 224}[name]
    model = build_model(name, input_size=size)
    state = _state(model)
    stage_s, publish_s = [], []
    job = f"{abs(hash((name, store.location))) % 16**16:016x}"
    for epoch in range(1, saves + 1):
        t0 = time.perf_counter()
        staged = store.stage(
            job_id=job,
            epoch=epoch,
            model=model,
            manifest_fields={
                "model": name,
                "input_size": size,
                "preprocessing": Preprocessing(resize=size),
                "metrics": {"val_acc": 0.5},
            },
            state=state,
        )
        t1 = time.perf_counter()
        store.publish(staged, keep=3)
        t2 = time.perf_counter()
        stage_s.append(t1 - t0)
        publish_s.append(t2 - t1)
    weights = sum(p.numel() * 4 for p in model.state_dict().values())
    return {
        "weights_mb": round(weights / 1e6, 2),
        "stage_p50_ms": round(statistics.median(stage_s) * 1e3, 1),
        "publish_p50_ms": round(statistics.median(publish_s) * 1e3, 1),
        "save_p50_ms": round(
            statistics.median(a + b for a, b in zip(stage_s, publish_s, strict=True)) * 1e3, 1
        ),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench checkpoints", description=__doc__)
    parser.add_argument("--models", default="lenet,resnet18")
    parser.add_argument("--saves", type=int, default=10)
    parser.add_argument("--url", help="a real bucket (s3://...), instead of moto's server")
    parser.add_argument("--out", type=Path, default=Path("docs/bench-checkpoints.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cnnserve-bench-ckpt-") as tmp, bench_redis(Path(tmp)):
        work = Path(tmp)
        server = None
        url = args.url
        if url is None:
            from tests.s3 import BUCKET, S3Server  # moto's server, as the tests run it

            server = S3Server(work / "moto.log")
            os.environ.update(server.env())
            url = f"s3://{BUCKET}/bench"
        redis_url = os.environ["CNNSERVE_REDIS_URL"]
        stores = {
            "local": CheckpointStore.open(work / "checkpoints", redis_url=redis_url),
            "s3": CheckpointStore.open(url, redis_url=redis_url, cache_dir=work / "cache"),
        }
        try:
            for name in args.models.split(","):
                for where, store in stores.items():
                    results.setdefault(name, {})[where] = time_saves(store, name, args.saves)
                    logger.info("%s to %s: %s", name, where, results[name][where])
        finally:
            for store in stores.values():
                store.close()
            if server is not None:
                server.stop()
    report = {
        "benchmark": "checkpoints",
        "machine": machine_info(),
        "saves": args.saves,
        "s3": "moto's S3 server on 127.0.0.1" if args.url is None else args.url,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| model (weights) | store | stage (training waits) | publish (beside training) |"]
    lines.append("|---|---|---|---|")
    for name, by in results.items():
        for where, r in by.items():
            lines.append(
                f"| {name} ({r['weights_mb']} MB) | {where} | {r['stage_p50_ms']} ms | "
                f"{r['publish_p50_ms']} ms |"
            )
    sys.stdout.write("\n".join(lines) + f"\nresults written to {args.out}\n")
    return 0
