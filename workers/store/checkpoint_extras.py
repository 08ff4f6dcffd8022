"""What is kept beside a published checkpoint: its evaluation and its exported ONNX graphs.

Each is a file in the checkpoint's folder whose sha256 the index records on the checkpoint's
entry (`evaluation_sha256`, `onnx:{name}`), only while the checkpoint is still filed: one
deleted meanwhile takes the new file with it. Reads are checked against that sha256.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from workers.store.blobs import BlobNotFoundError
from workers.store.cache import sha256_file
from workers.store.checkpoint_errors import CheckpointCorruptError, CheckpointNotFoundError
from workers.store.checkpoint_files import EVALUATION_FILE, key
from workers.store.manifest import Manifest, StoredEvaluation

if TYPE_CHECKING:
    from workers.store.checkpoints import CheckpointStore

log = logging.getLogger(__name__)


def save_evaluation(store: CheckpointStore, evaluation: StoredEvaluation) -> None:
    """Keep an evaluation beside its checkpoint (replacing an earlier one)."""
    ckpt_id = evaluation.checkpoint
    file_key = key(ckpt_id, EVALUATION_FILE)
    store.ensure_indexed()
    if not store.index.field(ckpt_id, "job")[0]:
        raise CheckpointNotFoundError(ckpt_id)
    raw = evaluation.model_dump_json(indent=2).encode()
    store.blobs.put_bytes(file_key, raw)
    if not store.index.annotate(ckpt_id, "evaluation_sha256", hashlib.sha256(raw).hexdigest()):
        store.files.remove(ckpt_id)  # deleted meanwhile: take the evaluation with it
        raise CheckpointNotFoundError(ckpt_id)


def evaluation(store: CheckpointStore, ckpt_id: str) -> StoredEvaluation | None:
    """The evaluation stored beside a checkpoint, if one was made (and is intact)."""
    file_key = key(ckpt_id, EVALUATION_FILE)
    store.ensure_indexed()
    _, sha = store.index.field(ckpt_id, "evaluation_sha256")
    if not sha:
        return None
    try:
        raw = store.blobs.get_bytes(file_key)
    except BlobNotFoundError:
        return None
    if hashlib.sha256(raw).hexdigest() != sha:
        log.warning("checkpoint %s: its evaluation fails its sha256; ignored", ckpt_id)
        return None  # damaged: evaluate again
    try:
        return StoredEvaluation.model_validate_json(raw)
    except ValidationError:
        return None


def onnx_path(
    store: CheckpointStore, manifest: Manifest, name: str, export: Callable[[Path], None]
) -> Path:
    """A local file of the checkpoint's exported graph `name` (see `CheckpointStore.onnx_path`)."""
    ckpt_id = manifest.id
    file_key = key(ckpt_id, f"onnx/{name}")
    store.ensure_indexed()
    filed, sha = store.index.field(ckpt_id, f"onnx:{name}")
    if not filed:
        raise CheckpointNotFoundError(ckpt_id)
    if sha:
        try:
            return store.files.read_through(file_key, f"onnx/{name}", sha)
        except CheckpointCorruptError:
            log.warning("checkpoint %s: exported graph %s unusable; exporting again", ckpt_id, name)
    staging = store.files.staging_dir()
    try:
        made = staging / name
        export(made)
        sha = sha256_file(made)
        store.blobs.put_file(file_key, made)
        if not store.index.annotate(ckpt_id, f"onnx:{name}", sha):
            store.files.remove(ckpt_id)  # deleted meanwhile: take the graph with it
            raise CheckpointNotFoundError(ckpt_id)
        if store.cache is not None:
            return store.cache.adopt(made, f"onnx/{name}")
        path = store.blobs.local_path(file_key)
        assert path is not None
        return path
    finally:
        shutil.rmtree(staging, ignore_errors=True)
