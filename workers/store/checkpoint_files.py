"""A checkpoint's files: their keys, how they are staged and put in the store, and how they are
read back verified (from the store's own disk, or through the local cache for a bucket).

Keys in the store (`workers.store.blobs`), made only from ids checked against strict patterns,
so no client string ever becomes a key:

    <job_id>/e<epoch:03d>/weights.safetensors   the model's state_dict
    <job_id>/e<epoch:03d>/state.pt              optimizer + RNG state (loaded weights_only)
    <job_id>/e<epoch:03d>/manifest.json         a `Manifest`, naming the others' sha256
    <job_id>/e<epoch:03d>/evaluation.json       a `StoredEvaluation`, when one was made
    <job_id>/e<epoch:03d>/onnx/<name>.onnx      the graph ONNX Runtime serves, once exported
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import platform
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from workers.contracts import CHECKPOINT_ID_RE, JOB_ID_RE
from workers.store.blobs import BlobNotFoundError, Blobs, LocalBlobs, StoreUnavailableError
from workers.store.cache import CacheVerifyError, DiskCache, sha256_file
from workers.store.checkpoint_errors import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    JobNotOursError,
)
from workers.store.manifest import Manifest

log = logging.getLogger(__name__)

WEIGHTS = "weights.safetensors"
STATE = "state.pt"
MANIFEST = "manifest.json"
EVALUATION_FILE = "evaluation.json"


def checkpoint_id(job_id: str, epoch: int) -> str:
    return f"{job_id}-e{epoch:03d}"


def parts(ckpt_id: str) -> tuple[str, str]:
    """A checkpoint id's job and epoch folder (`e002`); not found for anything else."""
    m = CHECKPOINT_ID_RE.match(ckpt_id)
    if not m:
        raise CheckpointNotFoundError(ckpt_id, f"{ckpt_id!r} is not a checkpoint id")
    return m["job"], f"e{m['epoch']}"


def key(ckpt_id: str, name: str) -> str:
    job, epoch = parts(ckpt_id)
    return f"{job}/{epoch}/{name}"


def folder(ckpt_id: str) -> str:
    job, epoch = parts(ckpt_id)
    return f"{job}/{epoch}/"


def weights_name(sha256: str) -> str:
    """The cache's name for a weights file (by content, so jobs that share weights share it)."""
    return f"weights/{sha256}.safetensors"


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


@dataclass(frozen=True)
class StagedCheckpoint:
    """A checkpoint written to local disk and not yet published (nobody can see it)."""

    manifest: Manifest
    directory: Path
    manifest_sha256: str


class CheckpointFiles:
    """The files of checkpoints in one store (a directory or a bucket), read verified, through
    `cache` for a bucket."""

    def __init__(self, blobs: Blobs, cache: DiskCache | None) -> None:
        self.blobs = blobs
        self.cache = cache

    # writing
    def staging_dir(self) -> Path:
        """A fresh local directory for files being made, on the file system they go to."""
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
        state: dict[str, Any] | None,
    ) -> StagedCheckpoint:
        """Write a checkpoint's weights, resume state and manifest to a staging directory."""
        if not JOB_ID_RE.match(job_id):
            raise CheckpointNotFoundError(job_id, f"{job_id!r} is not a job id")
        directory = self.staging_dir()
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

    def put_staged(
        self, staged: StagedCheckpoint, still_ours: Callable[[], bool] | None = None
    ) -> None:
        """Put a staged checkpoint's files in the store, its manifest last (may be called
        again after a failure: a local store has moved what it already took). With
        `still_ours`, asked before each file: a worker that lost the job meanwhile puts no
        more of them (`JobNotOursError`)."""
        ckpt_id = staged.manifest.id
        for name in (WEIGHTS, STATE, MANIFEST):
            path = staged.directory / name
            if still_ours is not None and not still_ours():
                raise JobNotOursError(f"checkpoint {ckpt_id}: the job is another worker's now")
            if path.is_file():
                self.blobs.put_file(key(ckpt_id, name), path)

    def pinned(self, path: Path) -> tuple[Path, Callable[[], None]]:
        """A hard link to `path` in a fresh staging directory, and what releases it: it stays
        readable however the file is evicted from a cache another process shares, or deleted,
        until released (a download streams from it). `FileNotFoundError` when `path` is gone
        already; the file itself where hard links cannot be made."""
        folder: Path | None = None
        try:
            folder = self.staging_dir()
            pin = folder / path.name
            os.link(path, pin)
        except FileNotFoundError:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            if path.exists():  # the staging directory could not be made: the file itself
                return path, lambda: None
            raise
        except OSError:  # no room or no right to stage, another file system, no hard links
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            return path, lambda: None
        return pin, lambda: shutil.rmtree(folder, ignore_errors=True)

    def keep_staged_weights(self, staged: StagedCheckpoint) -> None:
        """What this process just wrote is what it will read: keep it in the cache, verified."""
        if self.cache is not None and (staged.directory / WEIGHTS).is_file():
            self.cache.adopt(
                staged.directory / WEIGHTS, weights_name(staged.manifest.weights_sha256)
            )

    @staticmethod
    def discard(staged: StagedCheckpoint) -> None:
        """Drop a staged checkpoint's local files (published or given up)."""
        shutil.rmtree(staged.directory, ignore_errors=True)

    def remove(self, ckpt_id: str) -> None:
        """Remove a checkpoint's files (it is unfiled already: only space is lost if this
        fails)."""
        try:
            self.blobs.delete_prefix(folder(ckpt_id))
        except StoreUnavailableError as exc:
            log.warning("files of checkpoint %s left in the store: %s", ckpt_id, exc)

    # reading
    def read_through(self, file_key: str, cache_name: str, sha: str) -> Path:
        """A verified local file of `file_key`: the store's own (local) or the cache's copy."""
        local = self.blobs.local_path(file_key)
        if local is not None:
            try:
                found = sha256_file(local)
            except FileNotFoundError:
                raise CheckpointCorruptError(f"{file_key} is missing from the store") from None
            if found != sha:
                raise CheckpointCorruptError(f"{file_key} does not match its recorded sha256")
            return local
        assert self.cache is not None
        try:
            return self.cache.get(cache_name, sha, lambda dest: self.blobs.download(file_key, dest))
        except BlobNotFoundError:
            raise CheckpointCorruptError(f"{file_key} is missing from the store") from None
        except CacheVerifyError as exc:
            raise CheckpointCorruptError(f"{file_key} does not match its recorded {exc}") from None

    def verified_weights(self, ckpt_id: str, manifest: Manifest) -> Path:
        """A local file of the checkpoint's weights, checked against the manifest's sha256."""
        sha = manifest.weights_sha256
        try:
            return self.read_through(key(ckpt_id, WEIGHTS), weights_name(sha), sha)
        except CheckpointCorruptError as exc:
            if "missing" in str(exc):
                raise CheckpointCorruptError(
                    f"checkpoint {ckpt_id}: its weights file is missing"
                ) from None
            raise CheckpointCorruptError(
                f"checkpoint {ckpt_id}: its weights do not match the manifest's sha256 "
                "(the file was altered or truncated); use another checkpoint"
            ) from None

    @staticmethod
    def read_weights(ckpt_id: str, path: Path) -> dict[str, torch.Tensor]:
        """A safetensors file as a state_dict on the CPU (never unpickled)."""
        try:
            return load_file(str(path), device="cpu")
        except SafetensorError as exc:  # e.g. a pickle (never unpickled) in the weights' place
            raise CheckpointCorruptError(
                f"checkpoint {ckpt_id}: its weights file is not a safetensors file ({exc})"
            ) from exc

    def read_state(self, ckpt_id: str, manifest: Manifest) -> dict[str, Any]:
        """The resume state, verified and loaded without unpickling code."""
        if manifest.state_sha256 is None:
            raise CheckpointCorruptError(f"checkpoint {ckpt_id} has no resume state")
        state_key = key(ckpt_id, STATE)
        path = self.blobs.local_path(state_key)
        staging = None
        try:
            if path is None:  # not cached: read once, by the worker that resumes
                staging = self.staging_dir()
                path = staging / STATE
                with contextlib.suppress(BlobNotFoundError):
                    self.blobs.download(state_key, path)
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
