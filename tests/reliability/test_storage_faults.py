"""Storage faults: damaged checkpoint files are refused by hash; an unusable data directory
fails the job with a message that names it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from tests.service.checkpoint_helpers import JOB_A, fashion_test_set, lenet, png, save
from tests.service.checkpoint_helpers import damage as damage_file
from tests.workers.helpers import lenet_spec, statuses
from workers.contracts import JobStatus
from workers.settings import Settings
from workers.store.checkpoints import CheckpointStore
from workers.store.jobs import JobStore
from workers.training.runner import run_job

pytestmark = [pytest.mark.integration]

PROBLEM = "application/problem+json"


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


def truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def flip_a_byte(data: bytes) -> bytes:
    blob = bytearray(data)
    blob[len(blob) // 2] ^= 0xFF  # same size, one weight changed
    return bytes(blob)


@pytest.mark.parametrize("damage", [truncate, flip_a_byte], ids=["truncated", "altered"])
def test_a_damaged_checkpoint_is_refused_and_the_previous_one_still_serves(
    settings: Settings, client: TestClient, damage: object
) -> None:
    ckpts = CheckpointStore.from_settings(settings)
    model = lenet()
    save(ckpts, model, job_id=JOB_A, epoch=1, val_acc=0.7)
    save(ckpts, model, job_id=JOB_A, epoch=2, val_acc=0.6)  # latest, not best
    assert callable(damage)
    damage_file(ckpts, f"{JOB_A}-e002", "weights.safetensors", damage)
    image = png(fashion_test_set()[0][0])

    for ref in (f"{JOB_A}-e002", f"{JOB_A}:latest"):
        for r in (
            client.get(f"/v1/checkpoints/{ref}/weights"),
            client.post(f"/v1/checkpoints/{ref}/predict", files={"files": ("a.png", image)}),
        ):
            assert r.status_code == 409, r.text
            assert r.headers["content-type"].startswith(PROBLEM)
            assert "sha256" in r.json()["detail"], r.json()

    previous = f"{JOB_A}-e001"
    weights = client.get(f"/v1/checkpoints/{previous}/weights")
    assert weights.status_code == 200
    manifest = client.get(f"/v1/checkpoints/{previous}").json()
    assert hashlib.sha256(weights.content).hexdigest() == manifest["weights_sha256"]
    for ref in (previous, f"{JOB_A}:best"):
        r = client.post(f"/v1/checkpoints/{ref}/predict", files={"files": ("a.png", image)})
        assert r.status_code == 200, r.text
        assert r.json()["checkpoint"] == previous


def test_a_data_directory_that_cannot_be_written_fails_the_job_clearly(
    settings: Settings, store: JobStore, tmp_path: Path, one_thread: None
) -> None:
    # Tests run as root, for whom chmod 0555 does not stop a write; a data directory under a
    # regular file cannot be created by anyone, which is what a read-only volume looks like.
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the data directory's parent should be")
    unwritable = settings.model_copy(update={"data_dir": blocker / "data"})
    job = store.create(lenet_spec(epochs=1, train_limit=256))

    outcome = run_job(job.id, worker="inproc@test", settings=unwritable, enqueue=lambda _: None)

    record = store.get(job.id)
    assert outcome == "failed" and record.status is JobStatus.failed
    assert record.error and str(blocker) in record.error, record.error
    assert statuses(store, job.id)[-1] == {"status": "failed", "error": record.error}
    assert blocker.read_text().startswith("a file")  # nothing was written over it
