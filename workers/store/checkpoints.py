"""The checkpoint store: safetensors weights, a JSON manifest and resume state per epoch, in a
store named by a URL, indexed in Redis, read through a bounded local cache.

The files live in a local directory (`data_dir/checkpoints`, the default) or an S3-compatible
bucket (`CNNSERVE_CHECKPOINT_URL=s3://bucket/prefix`; `workers.store.blobs`), laid out as
`workers.store.checkpoint_files` says.

A checkpoint is published in order: its weights and state, then its manifest, then its entry in
the Redis index (`workers.store.checkpoint_index`), which also moves the job's `latest` and
`best` and prunes old epochs in the same atomic step. Readers find checkpoints only through the
index, so one is visible only when complete, and every file read is checked against the sha256
the manifest (or the index, for the manifest itself) records. A delete unfiles the checkpoint
first, then removes its files. References (ids and aliases) are resolved by
`workers.store.checkpoint_refs`.

A checkpoint id is `<job_id>-e<epoch:03d>`; ids are made here and checked against a strict
pattern, so no client string ever becomes a key.
"""

from __future__ import annotations

import builtins
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import redis
import torch
from pydantic import ValidationError
from torch import nn

from models import build_model
from workers.contracts import CHECKPOINT_ID_RE, JOB_ID_RE
from workers.store import checkpoint_extras, checkpoint_refs
from workers.store.blobs import BlobNotFoundError, Blobs, StoreUnavailableError, open_blobs
from workers.store.cache import DiskCache, sha256_file
from workers.store.checkpoint_errors import (
    STORE_UNAVAILABLE,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
    JobNotOursError,
    LineageError,
    retry_unavailable,
)
from workers.store.checkpoint_files import (
    MANIFEST,
    CheckpointFiles,
    StagedCheckpoint,
    checkpoint_id,
    key,
    parts,
)
from workers.store.checkpoint_index import SUMMARY_FIELDS, CheckpointIndex, Cursor
from workers.store.checkpoint_refs import Lineage
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
    "JobNotOursError",
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

#: Manifests of a remote store kept parsed in memory (each checked against the index's hash).
MANIFEST_MEMORY = 512


@dataclass(frozen=True)
class SavedCheckpoint:
    """What `CheckpointStore.save` wrote: the manifest, the job's aliases and what is kept."""

    manifest: Manifest
    latest: str
    best: str
    #: The job's checkpoint ids after pruning, oldest first.
    kept: list[str]


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
        self.files = CheckpointFiles(blobs, cache)
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
        return self.files.stage(
            job_id=job_id, epoch=epoch, model=model, manifest_fields=manifest_fields, state=state
        )

    def publish(
        self,
        staged: StagedCheckpoint,
        keep: int | None = 3,
        still_ours: Callable[[], bool] | None = None,
    ) -> SavedCheckpoint:
        """Put a staged checkpoint's files in the store (manifest last), file it in the index
        with the job's aliases and pruning in one atomic step, then remove what was pruned.

        May be called again after a `STORE_UNAVAILABLE` error; the staged files stay until it
        succeeds (or `discard`). With `still_ours`, asked once the files are up, a worker
        that lost the job meanwhile (`JobNotOursError`) files nothing.
        """
        m = staged.manifest
        self.files.put_staged(staged, still_ours)
        if still_ours is not None and not still_ours():  # the upload outlived the job's lease
            raise JobNotOursError(f"checkpoint {m.id}: the job is another worker's now")
        self._ready()
        summary = m.model_dump(mode="json", include=set(SUMMARY_FIELDS))
        filed = self.index.publish(
            summary, m.metrics.get("val_acc"), staged.manifest_sha256, keep, self.location
        )
        self._forget_manifest(m.id)
        self.files.keep_staged_weights(staged)
        self.discard(staged)
        self._remove_files(filed.pruned)
        return SavedCheckpoint(m, filed.latest, filed.best, filed.kept)

    @staticmethod
    def discard(staged: StagedCheckpoint) -> None:
        """Drop a staged checkpoint's local files (published or given up)."""
        CheckpointFiles.discard(staged)

    def _remove_files(self, ckpt_ids: list[str]) -> None:
        """Remove the files of checkpoints already unfiled (pruned or deleted)."""
        for ckpt_id in ckpt_ids:
            self._forget_manifest(ckpt_id)
            self.files.remove(ckpt_id)

    def save_evaluation(self, evaluation: StoredEvaluation) -> None:
        """Keep an evaluation beside its checkpoint (replacing an earlier one)."""
        checkpoint_extras.save_evaluation(self, evaluation)

    def evaluation(self, ckpt_id: str) -> StoredEvaluation | None:
        """The evaluation stored beside a checkpoint, if one was made (and is intact)."""
        return checkpoint_extras.evaluation(self, ckpt_id)

    def onnx_path(self, manifest: Manifest, name: str, export: Callable[[Path], None]) -> Path:
        """A local file of the checkpoint's exported graph `name`: from the store (through the
        cache), else made with `export(path)` and published beside the checkpoint, so every
        process (on any host) exports it once. Checked against the sha256 the index records."""
        return checkpoint_extras.onnx_path(self, manifest, name, export)

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

    def _files_gone(self, ckpt_id: str) -> NoReturn:
        """A filed checkpoint whose manifest is not in this store. Removed behind the store's
        back: forget it, so aliases move on. But a process given another store than the one
        that published it (another `CNNSERVE_CHECKPOINT_URL` on the same Redis) must not
        forget everyone's checkpoints: it is refused, saying so, and the index stays."""
        _, published_in = self.index.field(ckpt_id, "store")
        if published_in and published_in != self.location:
            log.error(
                "checkpoint %s was published in %s, but this process reads %s",
                ckpt_id,
                published_in,
                self.location,
            )
            raise StoreUnavailableError(
                f"checkpoint {ckpt_id} is kept in {published_in}, but this process reads the "
                f"checkpoint store {self.location}: give every API process and worker on this "
                "Redis the same CNNSERVE_CHECKPOINT_URL"
            )
        self.index.unfile(ckpt_id, parts(ckpt_id)[0])
        raise CheckpointNotFoundError(
            ckpt_id, f"checkpoint {ckpt_id}'s files are gone from the store"
        )

    def manifest(self, ckpt_id: str) -> Manifest:
        """The manifest of a checkpoint id (not an alias), checked against the index's sha256."""
        file_key = key(ckpt_id, MANIFEST)
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
            raw = self.blobs.get_bytes(file_key)
        except BlobNotFoundError:
            self._files_gone(ckpt_id)
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
        parts(ckpt_id)
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
        return checkpoint_refs.resolve(self, ref, within)

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
        return checkpoint_refs.lineage(
            self,
            init_from,
            model=model,
            arch=arch,
            input_size=input_size,
            continue_epochs=continue_epochs,
            within=within,
        )

    def weights_path(self, ckpt_id: str) -> Path:
        """A local file of the checkpoint's verified safetensors weights."""
        return self.files.verified_weights(ckpt_id, self.manifest(ckpt_id))

    def load_model(
        self, ckpt_id: str, device: str | torch.device = "cpu"
    ) -> tuple[nn.Module, Manifest]:
        """Build the network from the manifest and load its verified weights, in eval mode."""
        manifest = self.manifest(ckpt_id)
        path = self.files.verified_weights(ckpt_id, manifest)
        model = build_model(
            manifest.model,
            arch=manifest.arch_value,
            input_size=manifest.input_size,
            num_classes=manifest.num_classes,
            in_channels=manifest.in_channels,
        )
        try:
            try:
                state = self.files.read_weights(ckpt_id, path)
            except FileNotFoundError:  # evicted by a process sharing the cache: fetch again
                state = self.files.read_weights(
                    ckpt_id, self.files.verified_weights(ckpt_id, manifest)
                )
            model.load_state_dict(state)
        except (RuntimeError, OSError) as exc:
            raise CheckpointCorruptError(
                f"checkpoint {ckpt_id}: weights do not load: {exc}"
            ) from exc
        return model.to(device).eval(), manifest

    def pinned(self, get: Callable[[], Path]) -> tuple[Path, Callable[[], None]]:
        """The file `get()` gives (a verified weights or ONNX file), pinned for a download
        (`CheckpointFiles.pinned`): got again if another process evicted it in between."""
        try:
            return self.files.pinned(get())
        except FileNotFoundError:
            return self.files.pinned(get())

    def load_weights(self, ckpt_id: str) -> dict[str, torch.Tensor]:
        """The verified weights of a checkpoint as a state_dict on the CPU."""
        return self.files.read_weights(ckpt_id, self.weights_path(ckpt_id))

    def load_state(self, ckpt_id: str) -> dict[str, Any]:
        """The resume state (optimizer, RNG, ...), verified and loaded without unpickling code."""
        return self.files.read_state(ckpt_id, self.manifest(ckpt_id))

    def delete(self, ckpt_id: str) -> None:
        """Unfile a checkpoint (its job's aliases move to what is left, in the same atomic
        step), then remove its files."""
        job_id, _ = parts(ckpt_id)
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
