"""The checkpoint index in Redis: `<model>:best|latest`, job aliases and listings without reading
a manifest, one rule for "best", kept right through saves, pruning, racing deletes, files
removed by hand and an upgrade from a store an earlier version wrote."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from models import build_model
from workers.settings import Settings
from workers.store.checkpoints import (
    CheckpointNotFoundError,
    CheckpointStore,
    Preprocessing,
    SavedCheckpoint,
)

JOBS = ["a" * 16, "b" * 16, "c" * 16]


def save(
    store: CheckpointStore,
    job: str,
    epoch: int,
    val_acc: float,
    model: str = "lenet",
    keep: int = 2,
    owner: str | None = None,
) -> SavedCheckpoint:
    size = 28 if model == "lenet" else 32
    torch.manual_seed(epoch)
    return store.save(
        job_id=job,
        epoch=epoch,
        model=build_model(model, input_size=size),
        manifest_fields={
            "model": model,
            "input_size": size,
            "preprocessing": Preprocessing(resize=size),
            "metrics": {"train_loss": 1.0, "val_loss": 1.0, "val_acc": val_acc},
            "owner": owner,
        },
        keep=keep,
    )


@pytest.fixture
def store(checkpoint_store: CheckpointStore) -> CheckpointStore:
    return checkpoint_store


def test_save_reports_the_aliases_and_what_it_kept(store: CheckpointStore) -> None:
    accs = [0.5, 0.8, 0.6, 0.7]
    saved = [save(store, JOBS[0], e, acc) for e, acc in enumerate(accs, start=1)]

    last = saved[-1]
    assert (last.latest, last.best) == (f"{JOBS[0]}-e004", f"{JOBS[0]}-e002")
    # keep=2 keeps the last two epochs and the best
    assert last.kept == [f"{JOBS[0]}-e002", f"{JOBS[0]}-e003", f"{JOBS[0]}-e004"]
    assert store.aliases(JOBS[0]) == {"latest": last.latest, "best": last.best}
    assert [c.id for c in store.list(job_id=JOBS[0])] == list(reversed(last.kept))
    # the pruned epoch's files are gone from the store, not only from the index
    assert not any(k.startswith(f"{JOBS[0]}/e001/") for k in store.blobs.list_keys())
    with pytest.raises(CheckpointNotFoundError):
        store.manifest(f"{JOBS[0]}-e001")


def test_best_ties_go_to_the_newest_everywhere_and_a_delete_does_not_move_them(
    store: CheckpointStore,
) -> None:
    # the review's case: 0.85, 0.85, 0.80. The newest of the two 0.85s is the best of the job
    # and of the model, and deleting the unrelated e003 changes neither (it flipped the job's
    # best to e001 while `lenet:best` stayed e002: V2 `model=<job>` and `model=lenet` disagreed)
    for epoch, acc in enumerate((0.85, 0.85, 0.80), start=1):
        save(store, JOBS[0], epoch, acc, keep=10)
    e002 = f"{JOBS[0]}-e002"
    assert store.resolve(f"{JOBS[0]}:best") == store.resolve("lenet:best") == e002

    store.delete(f"{JOBS[0]}-e003")

    assert store.resolve(f"{JOBS[0]}:best") == store.resolve("lenet:best") == e002
    assert store.resolve(f"{JOBS[0]}:latest") == store.resolve("lenet:latest") == e002
    store.delete(e002)
    assert store.resolve(f"{JOBS[0]}:best") == store.resolve("lenet:best") == f"{JOBS[0]}-e001"


def test_model_best_and_latest_span_every_job_and_follow_deletes(
    store: CheckpointStore, settings: Settings
) -> None:
    save(store, JOBS[0], 1, 0.70)
    save(store, JOBS[1], 1, 0.81)
    save(store, JOBS[2], 1, 0.81)  # as good, and newer: it wins the tie
    save(store, JOBS[2], 2, 0.99, model="resnet18")

    assert store.resolve("lenet:best") == f"{JOBS[2]}-e001"
    assert store.resolve("lenet:latest") == f"{JOBS[2]}-e001"
    assert store.resolve("resnet18:best") == store.resolve("resnet18:latest") == f"{JOBS[2]}-e002"
    store.delete(f"{JOBS[2]}-e001")
    assert store.resolve("lenet:best") == store.resolve("lenet:latest") == f"{JOBS[1]}-e001"
    store.blobs.delete_prefix(f"{JOBS[1]}/")  # removed by hand, behind the store's back
    # noticed by a process reading it next (one that keeps its manifest in memory, with a
    # bucket, notices when it reads it again): the aliases move on
    store = CheckpointStore.from_settings(settings)
    assert store.resolve("lenet:best") == f"{JOBS[0]}-e001"
    assert {c.id for c in store.list(model="lenet")} == {f"{JOBS[0]}-e001"}
    store.delete(f"{JOBS[0]}-e001")
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint of model 'lenet'"):
        store.resolve("lenet:best")
    with pytest.raises(CheckpointNotFoundError):
        store.resolve("lenet:latest")


def test_a_tenant_sees_its_own_best_latest_and_listing(store: CheckpointStore) -> None:
    save(store, JOBS[0], 1, 0.9, owner="alice")
    save(store, JOBS[1], 1, 0.7, owner="bob")
    save(store, JOBS[2], 1, 0.8)  # a server without keys

    assert store.resolve("lenet:best") == f"{JOBS[0]}-e001"
    assert store.resolve("lenet:best", within="bob") == f"{JOBS[1]}-e001"
    assert store.resolve("lenet:latest", within="alice") == f"{JOBS[0]}-e001"
    assert [c.id for c in store.list(within="bob")] == [f"{JOBS[1]}-e001"]
    assert store.list(job_id=JOBS[0], within="bob") == []
    with pytest.raises(CheckpointNotFoundError):
        store.resolve(f"{JOBS[0]}:best", within="bob")
    with pytest.raises(CheckpointNotFoundError):
        store.resolve("lenet:best", within="carol")


def test_listing_pages_newest_first_without_gaps(store: CheckpointStore) -> None:
    for i in range(7):
        save(store, f"{i:016x}", 1, 0.5)
    seen: list[str] = []
    cursor = None
    while True:
        page, cursor = store.page(limit=3, cursor=cursor)
        seen += [c.id for c in page]
        if cursor is None:
            break
    assert seen == [f"{i:016x}-e001" for i in reversed(range(7))]


def test_racing_saves_and_deletes_never_leave_an_alias_naming_a_missing_checkpoint(
    settings: Settings,
) -> None:
    # a worker saving epochs (aliases move, old epochs are pruned) while API processes delete
    # checkpoints of the same job: the aliases were read-modify-write of aliases.json before
    stores = [CheckpointStore.from_settings(settings) for _ in range(3)]
    job = JOBS[0]
    stop = threading.Event()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for epoch in range(1, 25):
                save(stores[0], job, epoch, random.Random(epoch).random(), keep=2)
        except BaseException as exc:
            errors.append(exc)
        finally:
            stop.set()

    def deleter(store: CheckpointStore, seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            aliases = store.aliases(job)
            target = aliases.get(rng.choice(["best", "latest"]))
            if target:
                with contextlib.suppress(CheckpointNotFoundError):  # the other one was first
                    store.delete(target)

    threads = [threading.Thread(target=worker)] + [
        threading.Thread(target=deleter, args=(s, i)) for i, s in enumerate(stores[1:])
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    save(stores[0], job, 25, 0.5, keep=2)  # one last save after the race
    aliases = stores[0].aliases(job)
    assert set(aliases) == {"best", "latest"}
    for ckpt_id in {*aliases.values(), *(c.id for c in stores[0].list(job_id=job))}:
        assert stores[0].manifest(ckpt_id).id == ckpt_id
        stores[0].weights_path(ckpt_id)  # its files are there and intact
    for s in stores:
        s.close()


UPGRADE = """
import sys
from workers.settings import get_settings
from workers.store.checkpoints import CheckpointStore
store = CheckpointStore.from_settings(get_settings())
found = store.ensure_indexed()
print(found, store.resolve("lenet:best"), flush=True)
"""


def test_a_store_from_before_the_redis_index_is_indexed_once_by_processes_starting_together(
    store: CheckpointStore, settings: Settings
) -> None:
    for job, acc in zip(JOBS, (0.6, 0.9, 0.7), strict=True):
        save(store, job, 1, acc)
        save(store, job, 2, acc - 0.1)
    listing = [c.model_dump() for c in store.list()]
    # as the previous version left it: no Redis index, an aliases.json per job (naming a best
    # the one rule does not pick) and the SQLite index
    store.index.r.flushdb()
    for job in JOBS:
        aliases = {"latest": f"{job}-e002", "best": f"{job}-e002"}
        store.blobs.put_bytes(f"{job}/aliases.json", json.dumps(aliases).encode())
    store.blobs.put_bytes("index.sqlite3", b"SQLite format 3\x00")

    procs = [
        subprocess.Popen(
            [sys.executable, "-c", UPGRADE],
            env=dict(os.environ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[3],
        )
        for _ in range(3)
    ]
    answers = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]
        answers.append(out.split())

    assert sorted(int(found) for found, _ in answers) == [0, 0, 6]  # one process indexed
    assert {best for _, best in answers} == {f"{JOBS[1]}-e001"}
    fresh = CheckpointStore.from_settings(settings)
    assert [c.model_dump() for c in fresh.list()] == listing
    assert fresh.aliases(JOBS[0]) == {"latest": f"{JOBS[0]}-e002", "best": f"{JOBS[0]}-e001"}
    assert not [k for k in fresh.blobs.list_keys() if k.endswith(("aliases.json", "sqlite3"))]
    assert fresh.ensure_indexed() == 0  # idempotent
    fresh.close()


def test_reading_a_store_that_does_not_exist_yet_creates_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    if settings.checkpoint_url:
        pytest.skip("a bucket prefix has no directory to create")
    store = CheckpointStore.open(tmp_path / "nowhere" / "checkpoints", redis_url=settings.redis_url)
    assert store.list() == []
    with pytest.raises(CheckpointNotFoundError):
        store.resolve("lenet:best")
    assert not (tmp_path / "nowhere").exists()
    store.close()


def test_an_indexed_store_is_not_scanned_again_at_start_however_its_directory_is_spelled(
    store: CheckpointStore, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    if settings.checkpoint_url:
        pytest.skip("a bucket has one spelling")
    save(store, JOBS[0], 1, 0.6)
    assert store.ensure_indexed() == 0  # indexed (and marked) when it was first used
    # a manifest that reached the directory behind the index's back: a scan would file it
    (stray,) = [k for k in store.blobs.list_keys() if k.endswith("manifest.json")]
    raw = store.blobs.get_bytes(stray).replace(b"aaaaaaaaaaaaaaaa", b"dddddddddddddddd")
    store.blobs.put_bytes(stray.replace("a" * 16, "d" * 16), raw)

    # the next process to start, say the API started by hand from the data dir's parent
    monkeypatch.chdir(settings.data_dir.parent)
    again = CheckpointStore.open(
        Path(settings.data_dir.name) / "checkpoints", redis_url=settings.redis_url
    )

    assert again.ensure_indexed() == 0  # the upgrade ran once: no scan at this start
    assert [c.id for c in again.list()] == [f"{JOBS[0]}-e001"]
    again.close()


@pytest.mark.parametrize(
    "forged",
    [
        {"weights_sha256": "../../../../tmp/owned"},
        {"model": "../lenet"},
        {"state_sha256": "x" * 64},
    ],
)
def test_a_manifest_whose_names_are_not_of_their_shapes_is_never_indexed(
    store: CheckpointStore, forged: dict[str, str]
) -> None:
    """What a bucket holds is read by every process (and the upgrade files all of it): a
    manifest whose hash or model name would name a file outside the local cache is refused."""
    good = save(store, JOBS[0], 1, 0.5)
    raw = json.loads(store.blobs.get_bytes(f"{JOBS[0]}/e001/manifest.json"))
    raw.update(id=f"{JOBS[1]}-e001", job_id=JOBS[1], **forged)
    store.blobs.put_bytes(f"{JOBS[1]}/e001/manifest.json", json.dumps(raw).encode())
    store.index.r.flushdb()  # as a store written by an earlier version: indexed afresh

    from workers.store.checkpoint_upgrade import index_earlier_store

    assert index_earlier_store(store) == 1
    assert [c.id for c in store.list()] == [good.manifest.id]
    with pytest.raises(CheckpointNotFoundError):
        store.resolve(f"{JOBS[1]}-e001")


def test_the_upgrade_lock_is_kept_while_listing_and_only_its_holder_renews_or_frees_it(
    store: CheckpointStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.store import checkpoint_upgrade

    for epoch in (1, 2, 3):
        save(store, JOBS[0], epoch, 0.5, keep=3)
    where, index = store.location, store.index
    lock_key = f"{index.indexed_key(where)}:lock"
    index.r.delete(index.indexed_key(where))  # as before the upgrade
    token = index.lock(where, wait_s=1)
    assert token is not None
    assert index.renew(where, token) and not index.renew(where, "another process")
    index.unlock(where, "another process")
    assert index.r.get(lock_key) == token  # not freed by another
    index.unlock(where, token)
    assert not index.r.exists(lock_key)

    # a long listing renews the lock as it goes (it lasted 60 s from before the listing)
    renewals: list[int] = []
    monkeypatch.setattr(checkpoint_upgrade, "LIST_RENEW_EVERY", 2)

    def renew(self: object, where: str, token: str) -> bool:
        renewals.append(int(index.r.ttl(lock_key)))
        return True

    monkeypatch.setattr(type(index), "renew", renew)
    index.r.flushdb()
    assert checkpoint_upgrade.index_earlier_store(store) == 3
    assert len(renewals) >= 3  # each checkpoint is two or three objects: renewed every 2


def test_a_process_given_another_store_on_the_same_redis_forgets_nothing(
    store: CheckpointStore, settings: Settings, tmp_path: Path
) -> None:
    """One API process started without the workers' CNNSERVE_CHECKPOINT_URL (or with another
    directory) finds none of the files the index names. Reading must not unfile them (it
    did: a few `lenet:best` calls emptied everyone's index); it is refused, naming both."""
    from workers.store.checkpoints import StoreUnavailableError

    best = save(store, JOBS[0], 1, 0.9).manifest.id
    elsewhere = CheckpointStore.open(tmp_path / "elsewhere", redis_url=settings.redis_url)
    try:
        reads = [lambda: elsewhere.resolve("lenet:best"), lambda: elsewhere.manifest(best)]
        reads.append(lambda: elsewhere.resolve(f"{JOBS[0]}:best"))
        for read in reads:
            with pytest.raises(StoreUnavailableError, match="CNNSERVE_CHECKPOINT_URL") as refused:
                read()
            assert store.location in str(refused.value) and "elsewhere" in str(refused.value)
    finally:
        elsewhere.close()
    assert store.resolve("lenet:best") == best  # still filed, still served

    if store.remote:
        return  # a bucket's manifests are kept in memory by their hash: nothing is read again
    # files removed behind the store's back are still forgotten by the store they were in
    store.blobs.delete_prefix(f"{JOBS[0]}/e001/")
    with pytest.raises(CheckpointNotFoundError):
        store.resolve("lenet:best")
    assert store.list() == []


def test_filing_the_same_manifest_again_keeps_its_evaluation_and_graphs(
    store: CheckpointStore,
) -> None:
    ckpt = save(store, JOBS[0], 1, 0.9).manifest.id
    store.index.annotate(ckpt, "evaluation_sha256", "e" * 64)
    store.index.annotate(ckpt, "onnx:model.onnx", "f" * 64)
    entry = store.index.entry(ckpt)
    assert entry is not None
    again = (entry.summary, 0.9, entry.manifest_sha256)
    store.index.publish_many([again], store.location)  # an upgrade run twice, say
    fields = store.index.entry(ckpt).fields  # type: ignore[union-attr]
    assert fields["evaluation_sha256"] == "e" * 64 and fields["onnx:model.onnx"] == "f" * 64
    store.index.publish_many([(entry.summary, 0.9, "0" * 64)], store.location)  # another one
    assert "evaluation_sha256" not in store.index.entry(ckpt).fields  # type: ignore[union-attr]


def test_an_upgrade_that_loses_its_lock_stops_and_marks_nothing(
    store: CheckpointStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.store import checkpoint_upgrade

    for epoch in (1, 2):
        save(store, JOBS[0], epoch, 0.5)
    store.index.r.flushdb()
    monkeypatch.setattr(checkpoint_upgrade, "LIST_RENEW_EVERY", 1)
    monkeypatch.setattr(type(store.index), "renew", lambda self, where, token: False)
    from workers.store.checkpoints import StoreUnavailableError

    with pytest.raises(StoreUnavailableError, match="lost its lock"):
        checkpoint_upgrade.index_earlier_store(store)
    assert not store.index.is_indexed(store.location)  # the lock's holder will mark it
