"""Quotas and the predict rate hold across two API processes that share one Redis.

Two real uvicorn processes serve one deployment (one of them logging JSON); nothing works the
queue, so submitted jobs stay queued and count against their owner's quota. Requests alternate
between the two processes, so a limit kept per process would let twice as many through.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.service.access.test_access_stack import TINY, keys_add
from tests.service.checkpoint_helpers import JOB_A, JOB_B, lenet, save
from tests.service.conftest import Server
from workers.settings import Settings
from workers.store.checkpoints import CheckpointStore

pytestmark = [pytest.mark.integration]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def log_of(tmp_path: Path, server: Server) -> list[str]:
    port = server.url.rsplit(":", 1)[1]
    return (tmp_path / f"uvicorn-{port}.log").read_text().splitlines()


def test_quotas_and_the_predict_rate_are_shared_by_two_api_processes(
    tmp_path: Path, settings: Settings, uvicorn_server: Callable[..., Server]
) -> None:
    keys_file = tmp_path / "keys.toml"
    alice = keys_add(
        keys_file,
        "alice",
        "--scopes",
        "read,predict,train",
        "--max-active-jobs",
        "3",
        "--max-sweep-jobs",
        "2",
        "--predict-rate",
        "6/minute",
    )
    bob = keys_add(keys_file, "bob", "--scopes", "read,predict,train")
    store = CheckpointStore.from_settings(settings)
    a_ckpt = save(store, lenet(), job_id=JOB_A, owner="alice").id
    b_ckpt = save(store, lenet(), job_id=JOB_B, owner="bob").id
    env = {"CNNSERVE_API_KEYS_FILE": str(keys_file), "CNNSERVE_MAX_ACTIVE_JOBS": "10"}
    one = uvicorn_server(**env)
    two = uvicorn_server(**env, CNNSERVE_LOG_FORMAT="json")
    urls = [one.url, two.url]

    with httpx.Client(timeout=30) as c:
        # five submissions at once, spread over both processes: exactly three get in
        def submit(i: int) -> httpx.Response:
            return c.post(f"{urls[i % 2]}/v1/jobs", json=TINY, headers=bearer(alice))

        with ThreadPoolExecutor(5) as pool:
            answers = list(pool.map(submit, range(5)))
        codes = sorted(r.status_code for r in answers)
        assert codes == [202, 202, 202, 429, 429], codes
        for r in answers:
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) > 0
                body = r.json()
                assert "max_active_jobs" in body["detail"] and body["limit"] == "max_active_jobs"
                assert body["max_active_jobs"] == 3
        me = c.get(f"{two.url}/v1/whoami", headers=bearer(alice)).json()
        assert me["limits"]["active_jobs"] == 3 and me["limits"]["max_active_jobs"] == 3
        # another principal is not held by alice's quota (its own is the default, 10)
        assert c.post(f"{one.url}/v1/jobs", json=TINY, headers=bearer(bob)).status_code == 202
        # a sweep over alice's sweep size is a 422 naming it; one within it still counts
        grid3 = {"base": TINY, "grid": {"lr": [0.1, 0.2, 0.3]}}
        r = c.post(f"{one.url}/v1/sweeps", json=grid3, headers=bearer(alice))
        assert r.status_code == 422 and "max_sweep_jobs" in r.json()["detail"]
        grid2 = {"base": TINY, "grid": {"lr": [0.1, 0.2]}}
        r = c.post(f"{two.url}/v1/sweeps", json=grid2, headers=bearer(alice))
        assert r.status_code == 429 and "max_active_jobs" in r.json()["detail"]
        # cancelling a queued job frees its place at once
        queued = next(r.json()["id"] for r in answers if r.status_code == 202)
        assert c.post(f"{two.url}/v1/jobs/{queued}/cancel", headers=bearer(alice)).status_code == (
            202)  # fmt: skip
        assert c.post(f"{one.url}/v1/jobs", json=TINY, headers=bearer(alice)).status_code == 202

        # six predictions a minute, whichever process answers
        pixels = {"pixels": [[0, 255], [255, 0]]}
        seen = []
        for i in range(10):
            r = c.post(f"{urls[i % 2]}/v1/checkpoints/{a_ckpt}/predict", json=pixels,
                       headers=bearer(alice))  # fmt: skip
            seen.append(r.status_code)
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
                assert r.headers["ratelimit-limit"] == "6"
                assert r.headers["ratelimit-remaining"] == "0"
                assert int(r.headers["ratelimit-reset"]) >= 1
                assert "predict_rate" in r.json()["detail"]
        assert seen == [200] * 6 + [429] * 4, seen
        # V2 inference is the same budget, refused in the V2 error format
        v2 = {"inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "UINT8",
                          "data": [0] * 784}]}  # fmt: skip
        r = c.post(f"{one.url}/v2/models/{JOB_A}/infer", json=v2, headers=bearer(alice))
        assert r.status_code == 429 and "predict_rate" in r.json()["error"]
        assert r.headers["retry-after"]
        # bob's predictions are his own budget (no limit)
        for url in urls * 4:
            r = c.post(f"{url}/v1/checkpoints/{b_ckpt}/predict", json=pixels, headers=bearer(bob))
            assert r.status_code == 200

    # the JSON-logging process wrote one JSON object per line, audit lines among them
    records = [json.loads(line) for line in log_of(tmp_path, two) if line.startswith("{")]
    audits = [r for r in records if r.get("audit")]
    assert audits, records[-5:]
    assert {"action", "principal", "key", "target", "outcome", "status"} <= set(audits[0])
    assert any(
        a["action"] == "job.submit" and a["principal"] == "alice" and a["status"] == 429
        for a in audits
    )
    for line in log_of(tmp_path, one) + log_of(tmp_path, two):
        assert alice not in line and bob not in line
