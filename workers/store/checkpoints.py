"""The checkpoint store: safetensors weights, a JSON manifest and resume state per epoch, in a
store named by a URL, indexed in Redis, read through a bounded local cache.

Files (keys) in the store, a local directory (`data_dir/checkpoints`, the default) or an
S3-compatible bucket (`CNNSERVE_CHECKPOINT_URL=s3://bucket/prefix`; `workers.store.blobs`):

    <job_id>/e<epoch:03d>/weights.safetensors   the model's state_dict
    <job_id>/e<epoch:03d>/state.pt              optimizer + RNG state (loaded weights_only)
    <job_id>/e<epoch:03d>/manifest.json         a `Manifest`, naming the others' sha256
    <job_id>/e<epoch:03d>/evaluation.json       a `StoredEvaluation`, when one was made
    <job_id>/e<epoch:03d>/onnx/<name>.onnx      the graph ONNX Runtime serves, once exported

A checkpoint is published in order: its weights and state, then its manifest, then its entry in
the Redis index (`workers.store.checkpoint_index`), which also moves the job's `latest` and
`best` and prunes old epochs in the same atomic step. Readers find checkpoints only through the
index, so one is visible only when complete, and every file read is checked against the sha256
the manifest (or the index, for the manifest itself) records. A delete unfiles the checkpoint
first, then removes its files.

A checkpoint id is `<job_id>-e<epoch:03d>`; ids are made here and checked against a strict
pattern, so no client string ever becomes a key.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import logging
import pickle
import platform
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import redis
import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from models import build_model
from workers.contracts import CHECKPOINT_ID_RE, JOB_ID_RE, MODEL_NAME_RE
from workers.store.blobs import (
    BlobNotFoundError,
    Blobs,
    LocalBlobs,
    StoreUnavailableError,
    open_blobs,
)
from workers.store.cache import CacheVerifyError, DiskCache, sha256_file
from workers.store.checkpoint_index import SUMMARY_FIELDS, CheckpointIndex, Cursor
from workers.store.manifest import (
    CheckpointSummary,
    Manifest,
    ManifestArch,
    OnnxExport,
    Preprocessing,
    StoredEvaluation,
)

__all__ = [
    "CHECKPOINT_ID_RE",
    "JOB_ID_RE",
    "STORE_UNAVAILABLE",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointStore",
    "CheckpointSummary",
    "Lineage",
    "LineageError",
    "Manifest",
    "OnnxExport",
    "Preprocessing",
    "SavedCheckpoint",
    "StagedCheckpoint",
    "StoreUnavailableError",
    "StoredEvaluation",
    "checkpoint_id",
    "retry_unavailable",
    "sha256_file",
]

log = logging.getLogger(__name__)

WEIGHTS = "weights.safetensors"
STATE = "state.pt"
MANIFEST = "manifest.json"
EVALUATION_FILE = "evaluation.json"
#: Manifests of a remote store kept parsed in memory (each checked against the index's hash).
MANIFEST_MEMORY = 512
#: What a store that cannot be reached raises: the files' store, or Redis under the index.
STORE_UNAVAILABLE: tuple[type[Exception], ...] = (
    StoreUnavailableError,
    redis.ConnectionError,
    redis.TimeoutError,
)
T = TypeVar("T")


class CheckpointError(Exception):
    """Base class for checkpoint-store errors."""


class CheckpointNotFoundError(CheckpointError, LookupError):
    """No checkpoint answers to this id or alias."""

    def __init__(self, ref: str, reason: str = "") -> None:
        self.ref = ref
        super().__init__(reason or f"no checkpoint {ref!r}")


class CheckpointCorruptError(CheckpointError):
    """A checkpoint whose files do not match its manifest."""


@dataclass(frozen=True)
class SavedCheckpoint:
    """What `CheckpointStore.save` wrote: the manifest, the job's aliases and what is kept."""

    manifest: Manifest
    latest: str
    best: str
    #: The job's checkpoint ids after pruning, oldest first.
    kept: list[str]


@dataclass(frozen=True)
class StagedCheckpoint:
    """A checkpoint written to local disk and not yet published (nobody can see it)."""

    manifest: Manifest
    directory: Path
    manifest_sha256: str


class LineageError(ValueError):
    """An `init_from` that names no checkpoint, or one of another network."""

    def __init__(self, detail: str, differs: list[str] | None = None) -> None:
        self.differs = differs or []
        super().__init__(detail)


@dataclass(frozen=True)
class Lineage:
    """Where a job starts: its parent checkpoint (resolved) and the epochs it numbers after."""

    parent: str | None = None
    epoch_offset: int = 0


def versions() -> dict[str, str]:
    def ver(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "unknown"

    return {
        "cnnserve": ver("cnnserve"),
        "torch": torch.__version__,
        "torchvision": ver("torchvision"),
        "safetensors": ver("safetensors"),
        "python": platform.python_version(),
    }


def checkpoint_id(job_id: str, epoch: int) -> str:
    return f"{job_id}-e{epoch:03d}"


def retry_unavailable(
    op: Callable[[], T], *, stop: Callable[[], bool], what: str, max_delay_s: float = 10.0
) -> T:
    """`op()`, tried again (backing off) while the store is unreachable, until `stop()`."""
    delay = 0.25
    while True:
        try:
            return op()
        except STORE_UNAVAILABLE as exc:
            if stop():
                raise
            log.warning("%s: the checkpoint store is unavailable (%s); retrying", what, exc)
            time.sleep(delay)
            delay = min(delay * 2, max_delay_s)


def redis_client(url: str) -> Any:
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=2,
        socket_timeout=10,
        health_check_interval=30,
    )


class CheckpointStore:
    """Saves, finds, verifies, loads and deletes checkpoints: files in a store (a directory
    or a bucket), their index in Redis, a bounded local cache of what is read from a bucket."""

    def __init__(self, blobs: Blobs, client: Any, *, cache: DiskCache | None = None) -> None:
        self.blobs = blobs
        self.location = blobs.location
        self.remote = blobs.remote
        self.index = CheckpointIndex(client)
        self.cache = cache
        if self.remote and cache is None:
            raise ValueError("a remote checkpoint store needs a local cache directory")
        self._client = client
        self._owns_client = False
        self._indexed = False
        self._manifests: OrderedDict[str, tuple[str, Manifest]] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls,
        location: Path | str,
        *,
        redis_url: str,
        cache_dir: Path | None = None,
        cache_bytes: int = 4 * 1024**3,
        client: Any = None,
    ) -> CheckpointStore:
        """The store at `location` (a directory, or `s3://bucket/prefix`), indexed in the Redis
        at `redis_url` (through `client`, when the caller has one); files read from a bucket
        are cached under `cache_dir`."""
        remote = isinstance(location, str) and location.startswith("s3://")
        blobs = open_blobs(str(location) if remote else None, Path(location))
        cache = None
        if remote:
            if cache_dir is None:
                raise ValueError("a remote checkpoint store needs a cache directory")
            cache = DiskCache(cache_dir, cache_bytes)
        store = cls(blobs, client or redis_client(redis_url), cache=cache)
        store._owns_client = client is None
        if cache is not None:
            cache.clear_staging()
        return store

    @classmethod
    def from_settings(cls, settings: Any, client: Any = None) -> CheckpointStore:
        """The store `CNNSERVE_CHECKPOINT_URL` names (else `data_dir/checkpoints`), indexed in
        the settings' Redis (through `client`, when the caller has one)."""
        return cls.open(
            settings.checkpoint_url or settings.checkpoints_dir,
            redis_url=settings.redis_url,
            cache_dir=settings.cache_dir,
            cache_bytes=int(settings.cache_bytes),
            client=client,
        )

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    # keys (only from validated ids)
    @staticmethod
    def _parts(ckpt_id: str) -> tuple[str, str]:
        m = CHECKPOINT_ID_RE.match(ckpt_id)
        if not m:
            raise CheckpointNotFoundError(ckpt_id, f"{ckpt_id!r} is not a checkpoint id")
        return m["job"], f"e{m['epoch']}"

    def _key(self, ckpt_id: str, name: str) -> str:
        job, epoch = self._parts(ckpt_id)
        return f"{job}/{epoch}/{name}"

    def _folder(self, ckpt_id: str) -> str:
        job, epoch = self._parts(ckpt_id)
        return f"{job}/{epoch}/"

    # writing
    def save(
        self,
        *,
        job_id: str,
        epoch: int,
        model: nn.Module,
        manifest_fields: dict[str, Any],
        state: dict[str, Any] | None = None,
        keep: int = 3,
    ) -> SavedCheckpoint:
        """Write one epoch's checkpoint atomically, update `latest`/`best`, prune old ones.

        `manifest_fields` holds the Manifest fields other than id, job, epoch and hashes.
        """
        staged = self.stage(
            job_id=job_id, epoch=epoch, model=model, manifest_fields=manifest_fields, state=state
        )
        return self.publish(staged, keep=keep)

    def _staging_dir(self) -> Path:
        if self.cache is not None:
            return self.cache.staging_dir()
        assert isinstance(self.blobs, LocalBlobs)
        parent = self.blobs.root / ".staging"  # the same file system: published by rename
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=parent))

    def stage(
        self,
        *,
        job_id: str,
        epoch: int,
        model: nn.Module,
        manifest_fields: dict[str, Any],
        state: dict[str, Any] | None = None,
    ) -> StagedCheckpoint:
        """Write a checkpoint's files to local disk (a snapshot of `model` and `state` now);
        `publish` makes it visible. Blocking only for as long as local disk takes."""
        if not JOB_ID_RE.match(job_id):
            raise CheckpointNotFoundError(job_id, f"{job_id!r} is not a job id")
        directory = self._staging_dir()
        try:
            weights = directory / WEIGHTS
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
            save_file(tensors, str(weights))
            state_sha = None
            if state is not None:
                torch.save(state, directory / STATE)
                state_sha = sha256_file(directory / STATE)
            manifest = Manifest(
                id=checkpoint_id(job_id, epoch),
                job_id=job_id,
                epoch=epoch,
                weights_sha256=sha256_file(weights),
                state_sha256=state_sha,
                versions=versions(),
                **manifest_fields,
            )
            raw = manifest.model_dump_json(indent=2).encode()
            (directory / MANIFEST).write_bytes(raw)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return StagedCheckpoint(manifest, directory, hashlib.sha256(raw).hexdigest())

    def publish(self, staged: StagedCheckpoint, keep: int | None = 3) -> SavedCheckpoint:
        """Put a staged checkpoint's files in the store (manifest last), file it in the index
        with the job's aliases and pruning in one atomic step, then remove what was pruned.

        May be called again after a `STORE_UNAVAILABLE` error; the staged files stay until it
        succeeds (or `discard`).
        """
        m = staged.manifest
        for name in (WEIGHTS, STATE, MANIFEST):
            path = staged.directory / name
            if path.is_file():  # a local store moves them: gone when retried after that
                self.blobs.put_file(self._key(m.id, name), path)
        self._ready()
        summary = m.model_dump(mode="json", include=set(SUMMARY_FIELDS))
        filed = self.index.publish(summary, m.metrics.get("val_acc"), staged.manifest_sha256, keep)
        self._forget_manifest(m.id)
        if self.cache is not None and (staged.directory / WEIGHTS).is_file():
            # what this process just wrote is what it will read: keep it, verified
            self.cache.adopt(staged.directory / WEIGHTS, _weights_name(m.weights_sha256))
        self.discard(staged)
        self._remove_files(filed.pruned)
        return SavedCheckpoint(m, filed.latest, filed.best, filed.kept)

    @staticmethod
    def discard(staged: StagedCheckpoint) -> None:
        """Drop a staged checkpoint's local files (published or given up)."""
        shutil.rmtree(staged.directory, ignore_errors=True)

    def _remove_files(self, ckpt_ids: list[str]) -> None:
        """Remove the files of checkpoints already unfiled (pruned or deleted)."""
        for ckpt_id in ckpt_ids:
            self._forget_manifest(ckpt_id)
            try:
                self.blobs.delete_prefix(self._folder(ckpt_id))
            except StoreUnavailableError as exc:  # unlisted already: only space is lost
                log.warning("files of checkpoint %s left in the store: %s", ckpt_id, exc)

    def save_evaluation(self, evaluation: StoredEvaluation) -> None:
        """Keep an evaluation beside its checkpoint (replacing an earlier one)."""
        ckpt_id = evaluation.checkpoint
        key = self._key(ckpt_id, EVALUATION_FILE)
        self._ready()
        if not self.index.field(ckpt_id, "job")[0]:
            raise CheckpointNotFoundError(ckpt_id)
        raw = evaluation.model_dump_json(indent=2).encode()
        self.blobs.put_bytes(key, raw)
        if not self.index.annotate(ckpt_id, "evaluation_sha256", hashlib.sha256(raw).hexdigest()):
            self._remove_files([ckpt_id])  # deleted meanwhile: take the evaluation with it
            raise CheckpointNotFoundError(ckpt_id)

    def evaluation(self, ckpt_id: str) -> StoredEvaluation | None:
        """The evaluation stored beside a checkpoint, if one was made (and is intact)."""
        key = self._key(ckpt_id, EVALUATION_FILE)
        self._ready()
        _, sha = self.index.field(ckpt_id, "evaluation_sha256")
        if not sha:
            return None
        try:
            raw = self.blobs.get_bytes(key)
        except BlobNotFoundError:
            return None
        if hashlib.sha256(raw).hexdigest() != sha:
            log.warning("checkpoint %s: its evaluation fails its sha256; ignored", ckpt_id)
            return None  # damaged: evaluate again
        try:
            return StoredEvaluation.model_validate_json(raw)
        except ValidationError:
            return None

    def onnx_path(self, manifest: Manifest, name: str, export: Callable[[Path], None]) -> Path:
        """A local file of the checkpoint's exported graph `name`: from the store (through the
        cache), else made with `export(path)` and published beside the checkpoint, so every
        process (on any host) exports it once. Checked against the sha256 the index records."""
        ckpt_id = manifest.id
        key = self._key(ckpt_id, f"onnx/{name}")
        self._ready()
        filed, sha = self.index.field(ckpt_id, f"onnx:{name}")
        if not filed:
            raise CheckpointNotFoundError(ckpt_id)
        if sha:
            try:
                return self._read_through(key, f"onnx/{name}", sha)
            except CheckpointCorruptError:
                log.warning(
                    "checkpoint %s: exported graph %s unusable; exporting again", ckpt_id, name
                )
        staging = self._staging_dir()
        try:
            made = staging / name
            export(made)
            sha = sha256_file(made)
            self.blobs.put_file(key, made)
            if not self.index.annotate(ckpt_id, f"onnx:{name}", sha):
                self._remove_files([ckpt_id])
                raise CheckpointNotFoundError(ckpt_id)
            if self.cache is not None:
                return self.cache.adopt(made, f"onnx/{name}")
            path = self.blobs.local_path(key)
            assert path is not None
            return path
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _read_through(self, key: str, cache_name: str, sha: str) -> Path:
        """A verified local file of `key`: the store's own (local) or the cache's copy."""
        local = self.blobs.local_path(key)
        if local is not None:
            try:
                found = sha256_file(local)
            except FileNotFoundError:
                raise CheckpointCorruptError(f"{key} is missing from the store") from None
            if found != sha:
                raise CheckpointCorruptError(f"{key} does not match its recorded sha256")
            return local
        assert self.cache is not None
        try:
            return self.cache.get(cache_name, sha, lambda dest: self.blobs.download(key, dest))
        except BlobNotFoundError:
            raise CheckpointCorruptError(f"{key} is missing from the store") from None
        except CacheVerifyError as exc:
            raise CheckpointCorruptError(f"{key} does not match its recorded {exc}") from None

    # reading
    def _ready(self) -> None:
        """Index a store written by an earlier version before its first use here."""
        if not self._indexed:
            self.ensure_indexed()

    def aliases(self, job_id: str) -> dict[str, str]:
        """A job's `latest` and `best` checkpoint ids (empty before its first checkpoint)."""
        if not JOB_ID_RE.match(job_id):
            raise CheckpointNotFoundError(job_id, f"{job_id!r} is not a job id")
        self._ready()
        return self.index.aliases(job_id)

    def manifest(self, ckpt_id: str) -> Manifest:
        """The manifest of a checkpoint id (not an alias), checked against the index's sha256."""
        key = self._key(ckpt_id, MANIFEST)
        self._ready()
        filed, sha = self.index.field(ckpt_id, "manifest_sha256")
        if not filed:
            raise CheckpointNotFoundError(ckpt_id)
        if self.remote:
            with self._lock:
                known = self._manifests.get(ckpt_id)
                if known is not None and known[0] == sha:
                    self._manifests.move_to_end(ckpt_id)
                    return known[1]
        try:
            raw = self.blobs.get_bytes(key)
        except BlobNotFoundError:
            # its files were removed behind the store's back: forget it, so aliases move on
            self.index.unfile(ckpt_id, self._parts(ckpt_id)[0])
            raise CheckpointNotFoundError(
                ckpt_id, f"checkpoint {ckpt_id}'s files are gone from the store"
            ) from None
        if sha and hashlib.sha256(raw).hexdigest() != sha:
            raise CheckpointCorruptError(
                f"checkpoint {ckpt_id}: its manifest does not match the sha256 recorded when "
                "it was saved (the file was altered)"
            )
        try:
            manifest = Manifest.model_validate_json(raw)
        except ValidationError as exc:
            raise CheckpointCorruptError(
                f"checkpoint {ckpt_id}: its manifest is damaged and cannot be read"
            ) from exc
        if self.remote and sha:
            with self._lock:
                self._manifests[ckpt_id] = (sha, manifest)
                while len(self._manifests) > MANIFEST_MEMORY:
                    self._manifests.popitem(last=False)
        return manifest

    def _forget_manifest(self, ckpt_id: str) -> None:
        with self._lock:
            self._manifests.pop(ckpt_id, None)

    def list(
        self,
        *,
        job_id: str | None = None,
        model: str | None = None,
        limit: int | None = None,
        within: str | None = None,
    ) -> list[CheckpointSummary]:
        """Summaries of the checkpoints (of a job, of a model, of the owner `within`), newest
        first, from the index."""
        return self.page(job_id=job_id, model=model, limit=limit, within=within)[0]

    def page(
        self,
        *,
        job_id: str | None = None,
        model: str | None = None,
        limit: int | None = None,
        within: str | None = None,
        cursor: Cursor | None = None,
    ) -> tuple[builtins.list[CheckpointSummary], Cursor | None]:
        """One page of `list` after `cursor`, and the cursor of the next (None: the last)."""
        self._ready()
        rows, after = self.index.page(
            job_id=job_id, model=model, owner=within, limit=limit, cursor=cursor
        )
        return [CheckpointSummary.model_validate(row) for row in rows], after

    def owner_of(self, ckpt_id: str) -> str | None:
        """The principal whose job wrote a checkpoint."""
        self._parts(ckpt_id)
        self._ready()
        filed, owner = self.index.field(ckpt_id, "owner")
        if not filed:
            raise CheckpointNotFoundError(ckpt_id)
        return owner or None

    def resolve(self, ref: str, within: str | None = None) -> str:
        """A checkpoint id from an id or an alias: `<job>:latest`, `<job>:best`,
        `<model>:best`, `<model>:latest`.

        With `within`, only that owner's checkpoints answer (`<model>:best` is its best); any
        other is not found, exactly as one that does not exist.
        """
        found = self._resolve(ref, within)
        if within is not None and self.owner_of(found) != within:
            if CHECKPOINT_ID_RE.match(ref):
                raise CheckpointNotFoundError(ref)
            head, _, alias = ref.partition(":")
            raise CheckpointNotFoundError(ref, f"job {head} has no {alias} checkpoint")
        return found

    def _resolve(self, ref: str, within: str | None) -> str:
        if CHECKPOINT_ID_RE.match(ref):
            self._ready()
            if not self.index.field(ref, "job")[0]:
                raise CheckpointNotFoundError(ref)
            return ref
        head, sep, alias = ref.partition(":")
        if not sep or alias not in ("latest", "best"):
            raise CheckpointNotFoundError(
                ref,
                f"{ref!r} is neither a checkpoint id (<job>-e<NNN>) nor an alias "
                "(<job>:latest, <job>:best, <model>:best, <model>:latest)",
            )
        if JOB_ID_RE.match(head):
            return self._present(lambda: self.aliases(head).get(alias), ref, f"job {head}")
        if MODEL_NAME_RE.match(head):
            self._ready()
            pick = self.index.best if alias == "best" else self.index.newest
            return self._present(
                lambda: next(iter(pick(head, within)), None), ref, f"model {head!r}"
            )
        raise CheckpointNotFoundError(ref, f"no checkpoint answers to {ref!r}")

    def _present(self, pick: Callable[[], str | None], ref: str, whose: str) -> str:
        """The checkpoint `pick` names, passing over any whose files were removed by hand
        (each is unfiled by `manifest`, so the next pick is another)."""
        for _ in range(16):
            found = pick()
            if not found:
                break
            try:
                self.manifest(found)
            except CheckpointNotFoundError:
                continue
            except CheckpointCorruptError:
                pass  # it exists: reading it says what is wrong
            return found
        alias = ref.partition(":")[2]
        if whose.startswith("model"):
            raise CheckpointNotFoundError(ref, f"no checkpoint of {whose} exists")
        raise CheckpointNotFoundError(ref, f"{whose} has no {alias} checkpoint")

    def lineage(
        self,
        init_from: str | None,
        *,
        model: str,
        arch: ManifestArch,
        input_size: int,
        continue_epochs: bool = False,
        within: str | None = None,
    ) -> Lineage:
        """Resolve a job's `init_from` (among the checkpoints of `within`) to a checkpoint of
        the same network (model, resolved arch and input size), or a `LineageError` that names
        what differs."""
        if init_from is None:
            return Lineage()
        try:
            parent = self.manifest(self.resolve(init_from, within))
        except CheckpointError as exc:
            raise LineageError(
                f"{exc}; name a checkpoint that exists (GET /v1/checkpoints)"
            ) from None
        wanted = {"model": model, "arch": arch, "input_size": input_size}
        found = {"model": parent.model, "arch": parent.arch, "input_size": parent.input_size}
        differs = [k for k in wanted if wanted[k] != found[k]]
        if differs:
            said = ", ".join(f"{k} {found[k]!r} (this job: {wanted[k]!r})" for k in differs)
            raise LineageError(
                f"checkpoint {parent.id} differs in {said}; a job starts only from a "
                "checkpoint of the same model, arch and input size",
                differs,
            )
        return Lineage(parent.id, parent.epoch if continue_epochs else 0)

    def weights_path(self, ckpt_id: str) -> Path:
        """A local file of the checkpoint's verified safetensors weights."""
        return self._verified_weights(ckpt_id, self.manifest(ckpt_id))

    def _verified_weights(self, ckpt_id: str, manifest: Manifest) -> Path:
        key = self._key(ckpt_id, WEIGHTS)
        try:
            return self._read_through(
                key, _weights_name(manifest.weights_sha256), manifest.weights_sha256
            )
        except CheckpointCorruptError as exc:
            if "missing" in str(exc):
                raise CheckpointCorruptError(
                    f"checkpoint {ckpt_id}: its weights file is missing"
                ) from None
            raise CheckpointCorruptError(
                f"checkpoint {ckpt_id}: its weights do not match the manifest's sha256 "
                "(the file was altered or truncated); use another checkpoint"
            ) from None

    def load_model(
        self, ckpt_id: str, device: str | torch.device = "cpu"
    ) -> tuple[nn.Module, Manifest]:
        """Build the network from the manifest and load its verified weights, in eval mode."""
        manifest = self.manifest(ckpt_id)
        path = self._verified_weights(ckpt_id, manifest)
        model = build_model(
            manifest.model,
            arch=manifest.arch_value,
            input_size=manifest.input_size,
            num_classes=manifest.num_classes,
            in_channels=manifest.in_channels,
        )
        try:
            model.load_state_dict(self._read_weights(ckpt_id, path))
        except (RuntimeError, OSError) as exc:
            raise CheckpointCorruptError(
                f"checkpoint {ckpt_id}: weights do not load: {exc}"
            ) from exc
        return model.to(device).eval(), manifest

    def load_weights(self, ckpt_id: str) -> dict[str, torch.Tensor]:
        """The verified weights of a checkpoint as a state_dict on the CPU."""
        return self._read_weights(ckpt_id, self.weights_path(ckpt_id))

    @staticmethod
    def _read_weights(ckpt_id: str, path: Path) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(path), device="cpu")
        except SafetensorError as exc:  # e.g. a pickle (never unpickled) in the weights' place
            raise CheckpointCorruptError(
                f"checkpoint {ckpt_id}: its weights file is not a safetensors file ({exc})"
            ) from exc

    def load_state(self, ckpt_id: str) -> dict[str, Any]:
        """The resume state (optimizer, RNG, ...), verified and loaded without unpickling code."""
        manifest = self.manifest(ckpt_id)
        if manifest.state_sha256 is None:
            raise CheckpointCorruptError(f"checkpoint {ckpt_id} has no resume state")
        key = self._key(ckpt_id, STATE)
        path = self.blobs.local_path(key)
        staging = None
        try:
            if path is None:  # not cached: read once, by the worker that resumes
                staging = self._staging_dir()
                path = staging / STATE
                with contextlib.suppress(BlobNotFoundError):
                    self.blobs.download(key, path)
            if not path.is_file():
                raise CheckpointCorruptError(f"checkpoint {ckpt_id} has no resume state")
            if sha256_file(path) != manifest.state_sha256:
                raise CheckpointCorruptError(f"checkpoint {ckpt_id}: resume state fails its sha256")
            try:
                state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
            except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
                # weights_only refuses any object but tensors and plain containers: never run code
                raise CheckpointCorruptError(
                    f"checkpoint {ckpt_id}: its resume state holds something other than "
                    "tensors and plain values, and was refused unread"
                ) from exc
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        return state

    def delete(self, ckpt_id: str) -> None:
        """Unfile a checkpoint (its job's aliases move to what is left, in the same atomic
        step), then remove its files."""
        job_id, _ = self._parts(ckpt_id)
        self._ready()
        found, _, _ = self.index.unfile(ckpt_id, job_id)
        if not found:
            raise CheckpointNotFoundError(ckpt_id)
        self._remove_files([ckpt_id])

    # operations
    def check(self) -> str:
        """A line saying the store answers (for readiness); `StoreUnavailableError` if not."""
        return self.blobs.check()

    def ensure_indexed(self, wait_s: float = 600.0) -> int:
        """Index the checkpoints of a store written by an earlier version (its files, SQLite
        index and `aliases.json`), once per store; returns how many
        (`workers.store.checkpoint_upgrade`)."""
        from workers.store.checkpoint_upgrade import index_earlier_store

        if self._indexed:
            return 0
        found = index_earlier_store(self, wait_s)
        self._indexed = True
        return found


def _weights_name(sha256: str) -> str:
    return f"weights/{sha256}.safetensors"
