"""A bounded soak: 16 concurrent clients of mixed traffic against a real API and worker.

Summaries, job submissions (tiny LeNet jobs a real worker trains), job reads and
classification, for `CNNSERVE_SOAK_SECONDS` (60 by default) after a warm-up. Zero 5xx, zero
failed connections, the API's resident memory within `CNNSERVE_SOAK_RSS_MARGIN_MIB` of its
post-warm-up size, and every job a client got a 202 for is accounted for at the end.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import pytest

from tests.reliability.procs import ApiProcess, rss_kib
from tests.service.checkpoint_helpers import JOB_A, fashion_test_set, lenet, png, save
from tests.workers.helpers import WorkerProcess
from workers.settings import Settings
from workers.store.checkpoints import CheckpointStore

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

CLIENTS = 16
SOAK_S = float(os.environ.get("CNNSERVE_SOAK_SECONDS", "60"))
WARMUP_S = 10.0
RSS_MARGIN_MIB = float(os.environ.get("CNNSERVE_SOAK_RSS_MARGIN_MIB", "64"))
SUBMIT_EVERY_S = 4.0
TINY_JOB = {"model": "lenet", "epochs": 1, "train_limit": 256, "device": "cpu"}


@dataclass
class Tally:
    """What the clients saw."""

    statuses: Counter[int] = field(default_factory=Counter)
    by_kind: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    server_errors: list[str] = field(default_factory=list)
    submitted: list[str] = field(default_factory=list)


async def client_loop(
    base: str, index: int, until: float, tally: Tally, images: list[bytes]
) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=30) as c:
        step = 0
        next_submit = time.monotonic()
        while time.monotonic() < until:
            step += 1
            try:
                if index == 0 and time.monotonic() >= next_submit:
                    kind = "submit"
                    next_submit = time.monotonic() + SUBMIT_EVERY_S
                    r = await c.post("/v1/jobs", json={**TINY_JOB, "seed": step})
                    if r.status_code == 202:
                        tally.submitted.append(r.json()["id"])
                elif step % 4 == 0:
                    kind = "summary"
                    model, shape = (("lenet", "1,1,28,28"), ("vgg", "1,1,64,64"))[step % 8 == 0]
                    r = await c.get(f"/v1/models/{model}/summary", params={"input_shape": shape})
                elif step % 4 == 1 and tally.submitted:
                    kind = "job"
                    r = await c.get(f"/v1/jobs/{tally.submitted[step % len(tally.submitted)]}")
                else:
                    kind = "predict"
                    image = images[(index * 131 + step) % len(images)]
                    r = await c.post(
                        f"/v1/checkpoints/{JOB_A}:latest/predict",
                        files={"files": ("x.png", image)},
                    )
            except httpx.HTTPError as exc:
                tally.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            tally.statuses[r.status_code] += 1
            tally.by_kind[kind] += 1
            if r.status_code >= 500:
                tally.server_errors.append(f"{kind} {r.status_code} {r.text[:200]}")


async def soak(base: str, seconds: float, tally: Tally, images: list[bytes]) -> None:
    until = time.monotonic() + seconds
    await asyncio.gather(*(client_loop(base, i, until, tally, images) for i in range(CLIENTS)))


def test_sixteen_clients_of_mixed_traffic(
    settings: Settings,
    start_api: Callable[..., ApiProcess],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    save(CheckpointStore.from_settings(settings), lenet(), job_id=JOB_A, epoch=1)
    images = [png(a) for a in fashion_test_set()[0][:64]]
    worker = start_worker()
    api = start_api(log_level="WARNING")

    warmup = Tally()
    asyncio.run(soak(api.url, WARMUP_S, warmup, images))
    rss_start = rss_kib(api.pid)
    tally = Tally(submitted=list(warmup.submitted))
    started = time.monotonic()
    asyncio.run(soak(api.url, SOAK_S, tally, images))
    elapsed = time.monotonic() - started
    rss_end = rss_kib(api.pid)

    requests = sum(tally.statuses.values())
    growth_mib = (rss_end - rss_start) / 1024
    print(
        f"\nsoak: {requests} requests in {elapsed:.0f} s ({requests / elapsed:.0f}/s) from "
        f"{CLIENTS} clients; by kind {dict(tally.by_kind)}; statuses {dict(tally.statuses)}; "
        f"API RSS {rss_start / 1024:.0f} -> {rss_end / 1024:.0f} MiB; "
        f"jobs submitted {len(tally.submitted)}"
    )
    assert tally.server_errors == [], tally.server_errors[:5]
    assert tally.errors == [], tally.errors[:5]
    assert set(tally.statuses) <= {200, 202}, tally.statuses
    assert min(tally.by_kind[k] for k in ("submit", "summary", "job", "predict")) > 0
    assert growth_mib <= RSS_MARGIN_MIB, f"API RSS grew {growth_mib:.0f} MiB"

    # every accepted job has a record: finished well, or still waiting its turn
    final: Counter[str] = Counter()
    with httpx.Client(base_url=api.url, timeout=10) as c:
        for job_id in tally.submitted:
            r = c.get(f"/v1/jobs/{job_id}")
            assert r.status_code == 200, f"job {job_id} lost: {r.text}"
            final[r.json()["status"]] += 1
    print(f"jobs at the end: {dict(final)}")
    assert set(final) <= {"succeeded", "queued", "running"}, final
    assert final["succeeded"] >= 1, f"the worker finished none:\n{worker.log()[-3000:]}"
    assert "unhandled error" not in api.log()
