"""Access control against a real stack: every operation, every kind of caller, two tenants.

A real API process (uvicorn) with a keys file written by `cnnserve keys add`, a real worker
that trains the tenants' jobs on real Fashion-MNIST, and a table of what each operation of the
OpenAPI document needs: an operation the table does not know fails the test, so a new endpoint
cannot ship without a rule. Each operation is tried with no key, a wrong key, a key without the
scope, the other tenant's key, the owner's key and two admins' keys (a keys-file admin and a
legacy `CNNSERVE_API_KEYS` one), and the other tenant's answers are searched for the owner's ids.

With `CNNSERVE_SECURITY_REPORT=<file>` the figures (requests, refusals, leaks) are written there
(docs/security.md quotes them).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service.conftest import Server
from tests.workers.helpers import WorkerProcess
from workers.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[3]
TINY = {"model": "lenet", "epochs": 1, "train_limit": 512, "batch_size": 64, "device": "cpu"}
LEGACY_KEY = "legacy-admin-key-5b1e0c9d2a7f"
PIXELS = [[0, 255, 0], [255, 0, 255], [0, 255, 0]]


@dataclass(frozen=True)
class Rule:
    """What an operation needs, and what its owner gets."""

    scope: str  # open, any, read, predict, train
    owned: bool = False  # another tenant gets a 404
    ok: int = 200


RULES: dict[tuple[str, str], Rule] = {
    ("GET", "/v1/whoami"): Rule("any"),
    ("GET", "/v1/models"): Rule("read"),
    ("GET", "/v1/models/{name}"): Rule("read"),
    ("GET", "/v1/models/{name}/summary"): Rule("read"),
    ("POST", "/v1/models/{name}/summary"): Rule("read"),
    ("POST", "/v1/ops/corr2d"): Rule("read"),
    ("POST", "/v1/ops/pool2d"): Rule("read"),
    ("GET", "/v1/ops/output-size"): Rule("read"),
    ("GET", "/v1/jobs/compare"): Rule("read", owned=True),
    ("GET", "/v1/jobs/compare.{format}"): Rule("read", owned=True),
    ("GET", "/v1/jobs/events"): Rule("read"),  # others' jobs are left out, not refused
    ("POST", "/v1/jobs"): Rule("train", ok=202),
    ("GET", "/v1/jobs"): Rule("read"),
    ("GET", "/v1/jobs/{job_id}"): Rule("read", owned=True),
    ("POST", "/v1/jobs/{job_id}/cancel"): Rule("train", owned=True, ok=409),  # it finished
    ("GET", "/v1/jobs/{job_id}/events"): Rule("read", owned=True),
    ("GET", "/v1/jobs/{job_id}/curves.{format}"): Rule("read", owned=True),
    ("POST", "/v1/sweeps"): Rule("train", ok=202),
    ("GET", "/v1/sweeps"): Rule("read"),
    ("GET", "/v1/sweeps/{sweep_id}"): Rule("read", owned=True),
    ("POST", "/v1/sweeps/{sweep_id}/cancel"): Rule("train", owned=True, ok=202),
    ("GET", "/v1/sweeps/{sweep_id}/events"): Rule("read", owned=True),
    ("GET", "/v1/checkpoints"): Rule("read"),
    ("GET", "/v1/checkpoints/{ref}"): Rule("read", owned=True),
    ("DELETE", "/v1/checkpoints/{ref}"): Rule("train", owned=True, ok=204),
    ("GET", "/v1/checkpoints/{ref}/weights"): Rule("read", owned=True),
    ("GET", "/v1/checkpoints/{ref}/model.onnx"): Rule("read", owned=True),
    ("POST", "/v1/checkpoints/{ref}/predict"): Rule("predict", owned=True),
    ("POST", "/v1/checkpoints/{ref}/explain"): Rule("predict", owned=True),
    ("GET", "/v1/checkpoints/{ref}/evaluation"): Rule("read", owned=True),
    ("GET", "/v1/checkpoints/{ref}/confusion.{format}"): Rule("read", owned=True),
    ("POST", "/v1/checkpoints/{ref}/evaluate"): Rule("train", owned=True, ok=202),
    ("GET", "/v1/evaluations/{evaluation_id}"): Rule("read", owned=True),
    ("GET", "/v2"): Rule("read"),
    ("GET", "/v2/health/live"): Rule("open"),
    ("GET", "/v2/health/ready"): Rule("open"),
    ("GET", "/v2/models/{model}"): Rule("read", owned=True),
    ("GET", "/v2/models/{model}/versions/{model_version}"): Rule("read", owned=True),
    ("GET", "/v2/models/{model}/ready"): Rule("read", owned=True),
    ("GET", "/v2/models/{model}/versions/{model_version}/ready"): Rule("read", owned=True),
    ("POST", "/v2/models/{model}/infer"): Rule("predict", owned=True),
    ("POST", "/v2/models/{model}/versions/{model_version}/infer"): Rule("predict", owned=True),
    ("GET", "/healthz"): Rule("open"),
    ("GET", "/readyz"): Rule("open"),
    ("GET", "/metrics"): Rule("open"),  # CNNSERVE_METRICS_SCOPE unset
}

V2_BODY = {"inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "UINT8",
                       "data": [0] * 784}]}  # fmt: skip
BODIES: dict[tuple[str, str], Any] = {
    ("POST", "/v1/models/{name}/summary"): {"input_shape": [1, 1, 28, 28]},
    ("POST", "/v1/ops/corr2d"): {"X": [[0, 1, 2], [3, 4, 5], [6, 7, 8]], "K": [[0, 1], [2, 3]]},
    ("POST", "/v1/ops/pool2d"): {"X": [[0, 1, 2], [3, 4, 5], [6, 7, 8]], "pool_size": 2},
    ("POST", "/v1/jobs"): TINY,
    ("POST", "/v1/sweeps"): {"base": TINY, "grid": {"lr": [0.05]}},
    ("POST", "/v1/checkpoints/{ref}/predict"): {"pixels": PIXELS},
    ("POST", "/v1/checkpoints/{ref}/explain"): {"pixels": PIXELS},
    ("POST", "/v1/checkpoints/{ref}/evaluate"): {"limit": 200},
    ("POST", "/v2/models/{model}/infer"): V2_BODY,
    ("POST", "/v2/models/{model}/versions/{model_version}/infer"): V2_BODY,
}
STATE_CHANGES = {  # operation: its audit action
    ("POST", "/v1/jobs"): "job.submit",
    ("POST", "/v1/jobs/{job_id}/cancel"): "job.cancel",
    ("POST", "/v1/sweeps"): "sweep.submit",
    ("POST", "/v1/sweeps/{sweep_id}/cancel"): "sweep.cancel",
    ("DELETE", "/v1/checkpoints/{ref}"): "checkpoint.delete",
    ("POST", "/v1/checkpoints/{ref}/evaluate"): "checkpoint.evaluate",
}
CALLERS = ("none", "wrong", "noscope", "bob", "alice", "root", "legacy")


@dataclass
class Tenants:
    keys: dict[str, str]
    keys_file: Path
    server: Server
    worker: WorkerProcess
    alice: dict[str, str] = field(default_factory=dict)
    bob: dict[str, str] = field(default_factory=dict)

    def headers(self, who: str) -> dict[str, str]:
        key = {"none": None, "wrong": "cns_000000000000_" + "x" * 43, **self.keys}.get(who)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def log(self) -> str:
        port = self.server.url.rsplit(":", 1)[1]
        return next(self.keys_file.parent.glob(f"uvicorn-{port}.log")).read_text()


def keys_add(keys_file: Path, name: str, *args: str) -> str:
    """`cnnserve keys add` as an operator runs it; the key is alone on its last line."""
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "keys", "add", name, *args],
        env={**os.environ, "CNNSERVE_API_KEYS_FILE": str(keys_file)},
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    key = out.rstrip("\n").rsplit("\n", 1)[-1]
    assert re.fullmatch(r"cns_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", key), out
    return key


def wait_for(client: httpx.Client, path: str, headers: dict[str, str], done: Callable[[Any], bool],
             timeout: float = 120.0) -> Any:  # fmt: skip
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(path, headers=headers).json()
        if done(body):
            return body
        assert time.monotonic() < deadline, f"{path}: {body}"
        time.sleep(0.3)


def make_tenants(
    tmp_path: Path,
    uvicorn_server: Callable[..., Server],
    start_worker: Callable[..., WorkerProcess],
) -> Tenants:
    keys_file = tmp_path / "keys.toml"
    keys = {
        "alice": keys_add(keys_file, "alice", "--scopes", "read,predict,train"),
        "bob": keys_add(keys_file, "bob", "--scopes", "read,predict,train"),
        "reader": keys_add(keys_file, "reader", "--scopes", "read"),
        "predictor": keys_add(keys_file, "predictor", "--scopes", "predict"),
        "root": keys_add(keys_file, "root", "--scopes", "admin"),
        "legacy": LEGACY_KEY,
    }
    server = uvicorn_server(CNNSERVE_API_KEYS_FILE=str(keys_file), CNNSERVE_API_KEYS=LEGACY_KEY)
    worker = start_worker()
    t = Tenants(keys, keys_file, server, worker)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        a, b = t.headers("alice"), t.headers("bob")
        job = c.post("/v1/jobs", json={**TINY, "epochs": 3}, headers=a).json()["id"]
        bob_job = c.post("/v1/jobs", json={**TINY, "lr": 0.01}, headers=b).json()["id"]
        sweep = c.post("/v1/sweeps", json={"base": TINY, "grid": {"lr": [0.2]}}, headers=a)
        for job_id, h in ((job, a), (bob_job, b)):
            done = wait_for(c, f"/v1/jobs/{job_id}", h, lambda j: j["status"] == "succeeded")
            assert done["owner"] == ("alice" if h is a else "bob")
        sweep_id = sweep.json()["id"]
        wait_for(c, f"/v1/sweeps/{sweep_id}", a, lambda s: s["status"] == "succeeded")
        ckpts = [x["id"] for x in c.get(f"/v1/checkpoints?job_id={job}", headers=a).json()[
            "checkpoints"]]  # fmt: skip
        assert len(ckpts) == 3, ckpts
        ev = c.post(f"/v1/checkpoints/{job}-e003/evaluate", json={"limit": 200}, headers=a)
        ev_id = ev.json()["id"]
        wait_for(c, f"/v1/evaluations/{ev_id}", a, lambda e: e["status"] == "succeeded")
        sweep_jobs = c.get(f"/v1/sweeps/{sweep_id}", headers=a).json()["jobs"]
        t.alice = {
            "job": job,
            "sweep": sweep_id,
            "sweep_job": sweep_jobs[0]["id"],
            "evaluation": ev_id,
            **{f"e{i + 1}": cid for i, cid in enumerate(sorted(ckpts))},
        }
        t.bob = {"job": bob_job, "checkpoint": f"{bob_job}-e001"}
    worker.stop()  # what the matrix submits stays queued
    return t


def request_for(
    t: Tenants, method: str, path: str, who: str, key: str
) -> tuple[str, dict[str, Any]]:
    """The URL and httpx arguments that try `method path` on alice's things as `who`, with
    the key of `key`."""
    a = t.alice
    ref = a["e3"]
    if (method, path) == ("DELETE", "/v1/checkpoints/{ref}"):
        # each caller allowed to delete removes a checkpoint of its own choosing: the last one
        # deletes the checkpoint every other operation used, so deletions go last
        ref = {"alice": a["e1"], "root": a["e2"], "legacy": a["e3"]}.get(who, a["e1"])
    url = (
        path.replace("{job_id}", a["job"])
        .replace("{sweep_id}", a["sweep"])
        .replace("{evaluation_id}", a["evaluation"])
        .replace("{name}", "lenet")
        .replace("{model_version}", a["e3"])
        .replace("{model}", a["job"])
        .replace("{ref}", ref)
        .replace("{format}", "png")
    )
    query = {
        "/v1/models/{name}/summary": {"input_shape": "1,1,28,28"},
        "/v1/ops/output-size": {"n": "28", "kernel": "5", "padding": "2"},
        "/v1/jobs/compare": {"ids": a["job"]},
        "/v1/jobs/compare.{format}": {"ids": a["job"]},
        "/v1/jobs/events": {"ids": a["job"]},
    }.get(path, {}) if method == "GET" else {}  # fmt: skip
    kwargs: dict[str, Any] = {"params": query, "headers": t.headers(key)}
    body = BODIES.get((method, path))
    if body is not None:
        kwargs["json"] = body
    return url, kwargs


def expected(rule: Rule, who: str) -> int | None:
    """The status `who` must get (None: whatever a caller without a key gets)."""
    if rule.scope == "open":
        return None
    if who == "wrong":
        return 401
    if rule.scope == "any":
        return 200
    if who == "none":
        return 401
    if who == "noscope":
        return 403
    if who == "bob" and rule.owned:
        return 404
    return rule.ok


def noscope_key(rule: Rule) -> str:
    return "predictor" if rule.scope == "read" else "reader"


def test_every_operation_answers_each_caller_as_its_rule_says(
    tmp_path: Path,
    settings: Settings,
    uvicorn_server: Callable[..., Server],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    t = make_tenants(tmp_path, uvicorn_server, start_worker)
    alice_ids = set(t.alice.values())
    with httpx.Client(base_url=t.server.url, timeout=60) as c:
        spec = c.get("/openapi.json").json()
        ops = [(m.upper(), p) for p, item in spec["paths"].items() for m in item]
        unknown = sorted(set(ops) - set(RULES))
        assert not unknown, f"operations without an access rule in this test: {unknown}"
        assert not set(RULES) - set(ops), "the table names operations the API does not have"
        for method, path in ops:  # the document says what the table says
            declared = spec["paths"][path][method.lower()].get("security")
            scope = RULES[(method, path)].scope
            if scope in ("read", "predict", "train"):
                assert declared == [{"ApiKey": [scope]}], (method, path, declared)

        tried = refused = 0
        seen: Counter[tuple[str, int]] = Counter()
        leaks: list[str] = []
        deletes = [op for op in ops if op[0] == "DELETE"]
        for method, path in [op for op in ops if op[0] != "DELETE"] + deletes:
            rule = RULES[(method, path)]
            baseline = None
            for who in CALLERS:
                key = noscope_key(rule) if who == "noscope" else who
                url, kwargs = request_for(t, method, path, who, key)
                r = c.request(method, url, **kwargs)
                tried += 1
                want = expected(rule, who)
                if want is None:
                    baseline = r.status_code if baseline is None else baseline
                    assert r.status_code == baseline and r.status_code not in (401, 403), (
                        method, path, who, r.status_code)  # fmt: skip
                    continue
                assert r.status_code == want, (method, path, who, r.status_code, r.text[:300])
                seen[(who, r.status_code)] += 1
                if r.status_code in (401, 403, 404):
                    refused += 1
                if r.status_code == 401:
                    assert r.headers["www-authenticate"].startswith("Bearer"), (method, path)
                if who == "bob":
                    text = r.content.decode("utf-8", "replace")
                    asked = url + json.dumps(kwargs.get("params", {}))
                    leaks += [f"{method} {path}: {i}" for i in alice_ids
                              if i in text and i not in asked]  # fmt: skip

        # bob's own view: listings, aliases and V2 names answer with his things only
        b = t.headers("bob")
        listings = ["/v1/jobs", "/v1/sweeps", "/v1/checkpoints", "/v1/checkpoints?model=lenet"]
        for path in listings:
            text = c.get(path, headers=b).text
            tried += 1
            leaks += [f"GET {path}: {i}" for i in alice_ids if i in text]
        assert t.bob["job"] in c.get("/v1/jobs", headers=b).text
        assert c.get("/v1/checkpoints/lenet:best", headers=b).json()["id"] == t.bob["checkpoint"]
        assert c.get("/v1/checkpoints/lenet:best", headers=t.headers("alice")).json()["owner"] == (
            "alice")  # fmt: skip
        v2 = c.get("/v2/models/lenet", headers=b).json()
        assert v2["parameters"]["checkpoint"] == t.bob["checkpoint"]
        assert not alice_ids & set(v2["versions"])
        # bob following alice's queued job gets an empty stream that ends, not her events
        queued = c.post("/v1/jobs", json=TINY, headers=t.headers("alice")).json()["id"]
        r = c.get("/v1/jobs/events", params={"ids": queued}, headers=b, timeout=10)
        tried += 2
        assert r.status_code == 200 and queued not in r.text.replace(f"ids={queued}", "")
        # init_from another tenant's checkpoint is refused like a missing one
        r = c.post("/v1/jobs", json={**TINY, "init_from": t.alice["e3"]}, headers=b)
        tried += 1
        assert r.status_code == 422 and "no checkpoint" in r.json()["detail"]
        # an Idempotency-Key alice used is not bob's: he gets a job of his own
        idem = {"Idempotency-Key": "same-key-for-both"}
        first = c.post("/v1/jobs", json=TINY, headers={**t.headers("alice"), **idem}).json()
        second = c.post("/v1/jobs", json=TINY, headers={**b, **idem})
        tried += 2
        assert second.status_code == 202 and second.json()["id"] != first["id"]

        log = t.log()
    assert not leaks, leaks
    # every attempted state change has its audit line, and no key or hash is in the log
    audits = [line for line in log.splitlines() if "audit action=" in line]
    for op, action in STATE_CHANGES.items():
        lines = [line for line in audits if f"action={action} " in line]
        assert len(lines) >= len(CALLERS), (action, len(lines))
        ok = f"status={RULES[op].ok}"
        assert any("principal=alice" in line and ok in line for line in lines), action
        assert any("principal=reader" in line and "status=403" in line for line in lines), action
        assert any("principal=- " in line and "status=401" in line for line in lines), action
    for secret in (*t.keys.values(), *re.findall(r'sha256 = "([0-9a-f]{64})"',
                                                  t.keys_file.read_text())):  # fmt: skip
        assert secret not in log
    assert "cns_" not in log

    report = os.environ.get("CNNSERVE_SECURITY_REPORT")
    if report:
        Path(report).write_text(
            json.dumps(
                {
                    "operations": len(ops),
                    "callers": list(CALLERS),
                    "requests": tried,
                    "refused_as_expected": refused,
                    "by_caller_and_status": {f"{w} {s}": n for (w, s), n in sorted(seen.items())},
                    "leaks": len(leaks),
                    "audit_lines": len(audits),
                },
                indent=2,
            )
            + "\n"
        )


def test_the_keys_file_is_reread_on_change_and_on_sighup(
    tmp_path: Path, uvicorn_server: Callable[..., Server]
) -> None:
    keys_file = tmp_path / "keys.toml"
    admin = keys_add(keys_file, "admin-1", "--scopes", "admin")
    server = uvicorn_server(CNNSERVE_API_KEYS_FILE=str(keys_file), CNNSERVE_API_KEYS_RELOAD_S="0.2")
    slow = uvicorn_server(CNNSERVE_API_KEYS_FILE=str(keys_file), CNNSERVE_API_KEYS_RELOAD_S="3600")
    bearer = lambda k: {"Authorization": f"Bearer {k}"}  # noqa: E731
    with httpx.Client(timeout=20) as c:
        assert c.get(f"{server.url}/v1/jobs", headers=bearer(admin)).status_code == 200
        assert c.get(f"{slow.url}/v1/jobs", headers=bearer(admin)).status_code == 200
        dave = keys_add(keys_file, "dave", "--scopes", "read")
        deadline = time.monotonic() + 10
        while c.get(f"{server.url}/v1/jobs", headers=bearer(dave)).status_code != 200:
            assert time.monotonic() < deadline, "the new key was not picked up"
            time.sleep(0.1)
        # the server that looks only hourly has not seen it ... until SIGHUP
        assert c.get(f"{slow.url}/v1/jobs", headers=bearer(dave)).status_code == 401
        os.kill(slow.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while c.get(f"{slow.url}/v1/jobs", headers=bearer(dave)).status_code != 200:
            assert time.monotonic() < deadline, "SIGHUP did not reload the keys"
            time.sleep(0.1)
        assert c.get(f"{slow.url}/healthz").status_code == 200  # SIGHUP did not stop it
        # a revoked key stops working; a broken edit keeps the last good keys
        subprocess.run(
            [sys.executable, "-m", "service.cli", "keys", "revoke", "dave"],
            env={**os.environ, "CNNSERVE_API_KEYS_FILE": str(keys_file)},
            check=True,
            capture_output=True,
            cwd=ROOT,
        )
        deadline = time.monotonic() + 10
        while c.get(f"{server.url}/v1/jobs", headers=bearer(dave)).status_code != 401:
            assert time.monotonic() < deadline, "the revoked key still works"
            time.sleep(0.1)
        keys_file.write_text(keys_file.read_text() + "\n[this is not toml\n")
        time.sleep(1.0)
        assert c.get(f"{server.url}/v1/jobs", headers=bearer(admin)).status_code == 200
