"""Experiments over HTTP without a worker: sweeps (grid, random, limits, leaderboard, cancel),
fine-tune specs, comparisons and per-class evaluations."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from models import CLASSES
from service.access.keys import add_key
from tests.http_checks import assert_problem
from tests.service.checkpoint_helpers import JOB_A, lenet, save
from workers.contracts import QUEUE, JobStatus
from workers.settings import Settings
from workers.store.checkpoints import CheckpointStore
from workers.store.evaluations import EvaluationStore
from workers.store.jobs import EpochMetrics, JobRecord, JobStore

BASE = {"model": "lenet", "epochs": 2, "train_limit": 500}


def queued_tasks(store: JobStore) -> list[tuple[str, str]]:
    """(task name, id) of every message waiting for a worker."""
    out = []
    for raw in store.r.lrange(QUEUE, 0, -1):
        headers = json.loads(raw)["headers"]
        out.append((headers["task"], headers["id"]))
    return out


def give_metrics(store: JobStore, job_id: str, accs: list[float], seconds: float = 2.0) -> None:
    def change(record: JobRecord) -> None:
        record.status = JobStatus.succeeded
        record.metrics = [
            EpochMetrics(
                epoch=i + 1, train_loss=1 - a, val_loss=1.1 - a, val_acc=a, seconds=seconds
            )
            for i, a in enumerate(accs)
        ]

    store.update(job_id, change)


def test_a_grid_sweep_queues_every_point_and_ranks_its_jobs(
    client: TestClient, store: JobStore
) -> None:
    r = client.post(
        "/v1/sweeps", json={"base": BASE, "grid": {"lr": [0.1, 0.5], "batch_size": [64, 128]}}
    )
    assert r.status_code == 202, r.text
    sweep = r.json()
    assert r.headers["location"] == f"/v1/sweeps/{sweep['id']}"
    assert sweep["status"] == "queued" and sweep["varies"] == ["lr", "batch_size"]
    jobs = sweep["jobs"]
    assert sorted((j["point"]["lr"], j["point"]["batch_size"]) for j in jobs) == [
        (0.1, 64),
        (0.1, 128),
        (0.5, 64),
        (0.5, 128),
    ]
    assert all(j["spec"]["epochs"] == 2 and j["spec"]["train_limit"] == 500 for j in jobs)
    assert sorted(i for _, i in queued_tasks(store)) == sorted(j["id"] for j in jobs)
    assert {store.get(j["id"]).sweep_id for j in jobs} == {sweep["id"]}

    by_lr_bs = {(j["point"]["lr"], j["point"]["batch_size"]): j["id"] for j in jobs}
    give_metrics(store, by_lr_bs[(0.1, 64)], [0.5, 0.6], seconds=3.0)
    give_metrics(store, by_lr_bs[(0.5, 128)], [0.7, 0.65], seconds=1.0)
    board = client.get(f"/v1/sweeps/{sweep['id']}").json()
    assert [j["id"] for j in board["jobs"][:2]] == [by_lr_bs[(0.5, 128)], by_lr_bs[(0.1, 64)]]
    top = board["jobs"][0]
    assert (top["best_val_acc"], top["best_epoch"], top["epochs_done"]) == (0.7, 1, 2)
    assert top["seconds_per_epoch"] == 1.0 and board["status"] == "running"
    assert [j["best_val_acc"] for j in board["jobs"][2:]] == [None, None]  # not trained yet: last
    fastest = client.get(f"/v1/sweeps/{sweep['id']}?sort=seconds_per_epoch").json()["jobs"][0]
    assert fastest["id"] == by_lr_bs[(0.5, 128)]
    assert client.get("/v1/sweeps").json()["sweeps"][0]["jobs"][0]["id"] == top["id"]


def test_a_random_search_draws_the_same_points_for_the_same_seed(client: TestClient) -> None:
    body = {
        "base": BASE,
        "random": {
            "n": 5,
            "seed": 7,
            "space": {"lr": {"min": 0.001, "max": 1, "log": True}, "optimizer": ["sgd", "adamw"]},
        },
    }
    first = client.post("/v1/sweeps", json=body).json()
    again = client.post("/v1/sweeps", json=body).json()
    points = sorted((j["point"]["lr"], j["point"]["optimizer"]) for j in first["jobs"])
    assert points == sorted((j["point"]["lr"], j["point"]["optimizer"]) for j in again["jobs"])
    assert len(points) == 5 and all(0.001 <= lr <= 1 for lr, _ in points)
    assert {o for _, o in points} <= {"sgd", "adamw"}


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (
            {"base": BASE, "grid": {"lr": [0.1, 20]}},
            422,
            ["point 1", "'lr': 20", "less than or equal to 10"],
        ),
        (
            {"base": {"model": "vgg"}, "grid": {"input_size": [224, 28]}},
            422,
            ["point 1", "does not fit vgg"],
        ),
        (
            {"base": BASE, "grid": {"lr": [0.1] * 9, "seed": list(range(8))}},
            422,
            ["9 × 8", "more than 64"],
        ),
        ({"base": BASE, "grid": {"device": ["cpu"]}}, 422, ["cannot vary device"]),
        ({"base": BASE, "grid": {"lr": []}}, 422, ["has no values"]),
        ({"base": BASE}, 422, ['exactly one of "grid" or "random"']),
        (
            {"base": BASE, "random": {"n": 2, "space": {"lr": {"min": 1, "max": 0.1}}}},
            422,
            ["below max"],
        ),
        (
            {"base": {**BASE, "init_from": "0000000000000000:best"}, "grid": {"lr": [0.1]}},
            422,
            ["grid point 0: init_from", "has no best checkpoint"],
        ),
    ],
)
def test_a_bad_sweep_is_refused_before_anything_is_queued(
    client: TestClient, store: JobStore, body: dict[str, Any], status: int, words: list[str]
) -> None:
    assert_problem(client.post("/v1/sweeps", json=body), status, *words)
    assert queued_tasks(store) == [] and store.count_by_status()["queued"] == 0


def test_a_sweep_past_the_queue_limit_is_a_429_and_queues_nothing(
    make_client: Callable[..., TestClient], store: JobStore
) -> None:
    client = make_client(max_queued_jobs=5)
    client.post("/v1/jobs", json=BASE)
    r = client.post("/v1/sweeps", json={"base": BASE, "grid": {"seed": [1, 2, 3, 4, 5]}})
    assert_problem(
        r, 429, "1 jobs and evaluations are queued and this request adds 5, the limit is 5"
    )
    assert r.headers["retry-after"]
    assert store.count_by_status()["queued"] == 1 and len(queued_tasks(store)) == 1
    assert client.get("/v1/sweeps").json()["sweeps"] == []


def test_a_sweep_retried_with_its_idempotency_key_is_the_same_sweep(client: TestClient) -> None:
    body = {"base": BASE, "grid": {"lr": [0.1, 0.2]}}
    headers = {"Idempotency-Key": "sweep-1"}
    first = client.post("/v1/sweeps", json=body, headers=headers)
    again = client.post("/v1/sweeps", json=body, headers=headers)
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"]
    assert len(client.get("/v1/sweeps").json()["sweeps"]) == 1


def test_cancelling_a_sweep_cancels_its_unfinished_jobs(
    client: TestClient, store: JobStore
) -> None:
    sweep = client.post("/v1/sweeps", json={"base": BASE, "grid": {"seed": [1, 2, 3]}}).json()
    done = sweep["jobs"][0]["id"]
    give_metrics(store, done, [0.6])
    r = client.post(f"/v1/sweeps/{sweep['id']}/cancel")
    assert r.status_code == 202
    statuses = {j["id"]: j["status"] for j in r.json()["jobs"]}
    assert statuses.pop(done) == "succeeded" and set(statuses.values()) == {"cancelled"}
    assert r.json()["status"] == "cancelled"
    assert_problem(client.get("/v1/sweeps/0123456789abcdef"), 404, "no sweep")


def test_init_from_must_name_a_checkpoint_of_the_same_network(
    client: TestClient, settings: Settings, store: JobStore
) -> None:
    ckpt = save(CheckpointStore.from_settings(settings), lenet(), job_id=JOB_A, epoch=3)
    r = client.post(
        "/v1/jobs", json={**BASE, "init_from": f"{JOB_A}:best", "continue_epochs": True}
    )
    assert r.status_code == 202, r.text
    job = r.json()
    assert (job["parent_checkpoint"], job["epoch_offset"]) == (ckpt.id, 3)
    assert job["spec"]["init_from"] == f"{JOB_A}:best"
    body = assert_problem(
        client.post("/v1/jobs", json={**BASE, "input_size": 32, "init_from": ckpt.id}),
        422,
        "differs in input_size 28 (this job: 32)",
    )
    assert body["differs"] == ["input_size"]
    assert_problem(
        client.post("/v1/jobs", json={**BASE, "init_from": "lenet:newest"}), 422, "init_from"
    )
    assert_problem(
        client.post("/v1/jobs", json={**BASE, "continue_epochs": True}), 422, "set init_from"
    )
    assert_problem(
        client.post("/v1/jobs", json={**BASE, "init_from": "resnet18:best"}), 422, "no checkpoint"
    )


def test_compare_draws_the_differing_fields_of_several_jobs(
    client: TestClient, store: JobStore
) -> None:
    a = client.post("/v1/jobs", json={**BASE, "lr": 0.1}).json()["id"]
    b = client.post("/v1/jobs", json={**BASE, "lr": 0.5, "optimizer": "adamw"}).json()["id"]
    give_metrics(store, a, [0.4, 0.5, 0.55])
    give_metrics(store, b, [0.6, 0.7])
    r = client.get(f"/v1/jobs/compare?ids={a},{b}&metric=val_acc")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["differing_fields"] == ["lr", "optimizer"]
    labels = {s["id"]: s["label"] for s in body["jobs"]}
    assert labels == {a: "lr=0.1, optimizer=sgd", b: "lr=0.5, optimizer=adamw"}
    assert [s["points"] for s in body["jobs"]] == [
        [[1, 0.4], [2, 0.5], [3, 0.55]],
        [[1, 0.6], [2, 0.7]],
    ]
    png = client.get(f"/v1/jobs/compare.png?ids={a},{b}")
    assert png.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(png.content))
    colours = {tuple(c) for c in np.asarray(image.convert("RGB")).reshape(-1, 3)[::97]}
    assert image.size == (640, 400) and len(colours) > 5
    assert client.get(f"/v1/jobs/compare.svg?ids={a}").text.startswith("<?xml")
    assert_problem(client.get("/v1/jobs/compare?ids=nothex"), 422, "not a job id")
    assert_problem(
        client.get(f"/v1/jobs/compare?ids={a}&sweep=0123456789abcdef"), 422, "one of the two"
    )
    assert_problem(client.get("/v1/jobs/compare?ids=0123456789abcdef"), 404)


def test_a_checkpoint_without_a_matrix_says_how_to_get_one_and_evaluate_queues_it(
    client: TestClient, settings: Settings, store: JobStore
) -> None:
    ckpt = save(CheckpointStore.from_settings(settings), lenet(), job_id=JOB_A)
    assert_problem(client.get(f"/v1/checkpoints/{ckpt.id}/evaluation"), 404, "evaluate")
    assert_problem(client.get(f"/v1/checkpoints/{ckpt.id}/confusion.png"), 404, "evaluate")
    r = client.post(f"/v1/checkpoints/{ckpt.id}/evaluate", json={"limit": 100})
    assert r.status_code == 202, r.text
    evaluation = r.json()
    assert r.headers["location"] == f"/v1/evaluations/{evaluation['id']}"
    assert (evaluation["status"], evaluation["limit"]) == ("queued", 100)
    assert queued_tasks(store) == [("cnnserve.evaluate", evaluation["id"])]
    assert client.get(r.headers["location"]).json()["status"] == "queued"
    assert_problem(client.get("/v1/evaluations/eval-0000000000000000"), 404)


def test_evaluations_count_against_the_owners_quota_and_the_queue_limit_as_jobs_do(
    make_client: Callable[..., TestClient], settings: Settings, store: JobStore, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.toml"
    alice = {"Authorization": f"Bearer {add_key(keys, 'alice', ['train'], max_active_jobs=2)[0]}"}
    bob = {"Authorization": f"Bearer {add_key(keys, 'bob', ['train'])[0]}"}
    ckpts = CheckpointStore.from_settings(settings)
    mine = save(ckpts, lenet(), job_id=JOB_A, owner="alice").id
    bobs = save(ckpts, lenet(), job_id="b" * 16, owner="bob").id
    client = make_client(api_keys_file=keys, max_queued_jobs=4)
    evaluate = f"/v1/checkpoints/{mine}/evaluate"

    first = [client.post(evaluate, json={"limit": 100}, headers=alice) for _ in range(2)]
    assert [r.status_code for r in first] == [202, 202]
    refused = client.post(evaluate, json={"limit": 100}, headers=alice)
    assert_problem(
        refused, 429, "alice has 2 jobs and evaluations queued or running", "max_active_jobs"
    )
    assert refused.headers["retry-after"] and refused.json()["limit"] == "max_active_jobs"
    # a job shares the quota with them
    assert_problem(client.post("/v1/jobs", json=BASE, headers=alice), 429, "max_active_jobs")
    assert client.get("/v1/whoami", headers=alice).json()["limits"]["active_jobs"] == 2

    # the global queue limit counts them too: bob fills what is left of it
    bob_evaluate = f"/v1/checkpoints/{bobs}/evaluate"
    assert client.post(bob_evaluate, json={}, headers=bob).status_code == 202
    bob_job = client.post("/v1/jobs", json=BASE, headers=bob)
    assert bob_job.status_code == 202
    assert_problem(
        client.post(bob_evaluate, json={}, headers=bob), 429, "4 jobs and evaluations are queued"
    )
    assert len(queued_tasks(store)) == 4  # nothing refused was sent

    # a worker starts one of alice's and finishes it: the queue has room again, then her quota
    evaluations = EvaluationStore(store.r)
    done = evaluations.get(first[0].json()["id"])
    assert done is not None
    done.status = JobStatus.running
    evaluations.put(done)
    assert client.post(bob_evaluate, json={}, headers=bob).status_code == 202
    assert client.post(evaluate, json={}, headers=alice).status_code == 429
    done.status = JobStatus.succeeded
    evaluations.put(done)
    assert_problem(client.post(evaluate, json={}, headers=alice), 429, "are queued")  # the queue
    cancelled = client.post(f"/v1/jobs/{bob_job.json()['id']}/cancel", headers=bob)
    assert cancelled.status_code == 202, cancelled.text
    assert client.post(evaluate, json={}, headers=alice).status_code == 202


def test_a_checkpoint_with_a_matrix_answers_per_class_scores_and_a_heatmap(
    client: TestClient, settings: Settings
) -> None:
    store = CheckpointStore.from_settings(settings)
    matrix = [
        [90 if i == j else (10 if j == (i + 1) % 10 else 0) for j in range(10)] for i in range(10)
    ]
    saved = store.save(
        job_id=JOB_A,
        epoch=1,
        model=lenet(),
        manifest_fields={
            "model": "lenet",
            "input_size": 28,
            "preprocessing": {"resize": 28},
            "metrics": {"val_acc": 0.9},
            "confusion_matrix": matrix,
        },
    )
    body = client.get(f"/v1/checkpoints/{saved.manifest.id}/evaluation").json()
    assert body["confusion_matrix"] == matrix and body["classes"] == list(CLASSES)
    assert body["accuracy"] == 0.9 and body["images"] == 1000 and body["source"] == "training"
    first = body["per_class"][0]
    assert first["class"] == "t-shirt/top" and first["recall"] == 0.9 and first["precision"] == 0.9
    assert body["macro"]["f1"] == pytest.approx(0.9)
    png = client.get(f"/v1/checkpoints/{saved.manifest.id}/confusion.png")
    assert png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (720, 640)
    svg = client.get(f"/v1/checkpoints/{saved.manifest.id}/confusion.svg").text
    assert "ankle boot" in svg and "predicted class" in svg
