"""The checkpoint store: safetensors weights, a JSON manifest and resume state per epoch.

Layout under `root` (the settings' `data_dir/checkpoints`):

    <job_id>/e<epoch:03d>/weights.safetensors   the model's state_dict
    <job_id>/e<epoch:03d>/manifest.json         a `Manifest`
    <job_id>/e<epoch:03d>/state.pt              optimizer + RNG state (loaded weights_only)
    <job_id>/aliases.json                       {"latest": id, "best": id}
    index.sqlite3                               every checkpoint's summary (`checkpoint_index`)

A checkpoint id is `<job_id>-e<epoch:03d>`; ids are made here and checked against a strict
pattern, so no client string ever becomes a path.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import platform
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from models import CLASSES, build_model
from workers.contracts import CHECKPOINT_ID_RE, JOB_ID_RE, MODEL_NAME_RE
from workers.store.checkpoint_index import CheckpointIndex

EVALUATION_FILE = "evaluation.json"
#: An arch as a manifest records it: [count, channels] pairs, a name, or none.
ManifestArch = list[list[int]] | str | None


class CheckpointError(Exception):
    """Base class for checkpoint-store errors."""


class CheckpointNotFoundError(CheckpointError, LookupError):
    """No checkpoint answers to this id or alias."""

    def __init__(self, ref: str, reason: str = "") -> None:
        self.ref = ref
        super().__init__(reason or f"no checkpoint {ref!r}")


class CheckpointCorruptError(CheckpointError):
    """A checkpoint whose files do not match its manifest."""


class Preprocessing(BaseModel):
    """What is done to an image before the network, in training and inference alike.

    `workers.preprocessing.Transform(preprocessing)` does it (torchvision's `Weights.transforms`);
    every field is read there. (`grayscale`, which earlier versions wrote and nothing read, is
    ignored when their manifests load: the network's `in_channels` says it.)
    """

    pad_to_square: bool = Field(
        True, description="A non-square input is padded to a square with black before resizing."
    )
    resize: int = Field(description="Square side the image is resized to.")
    interpolation: Literal["bilinear"] = Field(
        "bilinear",
        description="How the 28×28 image is resized to `resize`: bilinear without antialias, "
        "on the device in training and inside the served graph in inference.",
    )
    scale: float = Field(1 / 255, description="Pixel values are multiplied by this (to 0..1).")
    mean: float = Field(0.0, description="Subtracted after scaling.")
    std: float = Field(1.0, description="Divides after subtracting the mean.")
    invert: Literal["auto", "true", "false"] = Field(
        "auto",
        description="What a request's invert=auto means: 'auto' inverts an input whose border "
        "is light (Fashion-MNIST is light-on-dark); 'true' or 'false' always or never.",
    )
    photos: Literal["fashion-mnist", "pad-resize"] = Field(
        "fashion-mnist",
        description="What inference does to an input larger than 28×28 by default: "
        "'fashion-mnist' runs the conversion that made the data set from product photos "
        "(Xiao et al. 2017, §2: trim, subsample to 28, sharpen, centre, negate, grayscale); "
        "'pad-resize' pads to a square and resizes with Lanczos.",
    )


class OnnxExport(BaseModel):
    """The ONNX graph `GET /v1/checkpoints/{ref}/model.onnx` gives (and ONNX Runtime serves)."""

    opset: int = Field(17, description="The ONNX opset the graph is exported with.")
    input: str = Field(
        "image",
        description="N×1×28×28 float32: 28×28 grayscale pixels scaled as `preprocessing` says "
        "(0..1); the graph resizes them to the network's input itself.",
    )
    output: str = Field("probabilities", description="N×classes float32 softmax probabilities.")
    dynamic_batch: bool = Field(True, description="The batch axis N may be any size.")


class Manifest(BaseModel):
    """What a checkpoint is: the role torchvision's `Weights.meta` plays."""

    id: str
    job_id: str
    epoch: int
    model: str
    arch: list[list[int]] | str | None = None
    input_size: int
    in_channels: int = 1
    num_classes: int = 10
    classes: list[str] = Field(default_factory=lambda: list(CLASSES))
    preprocessing: Preprocessing
    metrics: dict[str, float] = Field(default_factory=dict)
    history: list[dict[str, Any]] = Field(default_factory=list)
    spec: dict[str, Any] = Field(default_factory=dict)
    dataset: dict[str, Any] = Field(default_factory=dict)
    weights_sha256: str
    state_sha256: str | None = None
    versions: dict[str, str] = Field(default_factory=dict)
    onnx: OnnxExport = Field(default_factory=OnnxExport)
    confusion_matrix: list[list[int]] | None = Field(
        None,
        description="This epoch's validation confusion matrix (rows: true class, columns: "
        "predicted); absent in checkpoints written before it was kept.",
    )
    parent: str | None = Field(
        None, description="The checkpoint this job started from (`init_from`), if any."
    )
    owner: str | None = Field(
        None, description="The principal whose job wrote it (null: a server without keys)."
    )
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())

    @property
    def arch_value(self) -> str | tuple[tuple[int, int], ...] | None:
        if isinstance(self.arch, list):
            return tuple((int(a), int(b)) for a, b in self.arch)
        return self.arch


class CheckpointSummary(BaseModel):
    """One checkpoint in a listing: what it is and how good it was."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "0123456789abcdef-e002",
                    "job_id": "0123456789abcdef",
                    "epoch": 2,
                    "model": "lenet",
                    "arch": None,
                    "input_size": 28,
                    "metrics": {"train_loss": 0.71, "val_loss": 0.69, "val_acc": 0.73},
                    "weights_sha256": "9f2c…",
                    "created_at": "2025-01-01T12:00:00+00:00",
                }
            ]
        }
    )

    id: str = Field(description="The checkpoint id, `<job>-eNNN`.")
    job_id: str = Field(description="The training job that wrote it.")
    epoch: int = Field(description="The epoch after which it was saved (1-based).")
    model: str = Field(description="The registered model name.")
    arch: list[list[int]] | str | None = Field(None, description="The arch, if the model has one.")
    input_size: int = Field(description="The square input side the network was trained at.")
    metrics: dict[str, float] = Field(description="train_loss, val_loss, val_acc of that epoch.")
    weights_sha256: str = Field(description="sha256 of the safetensors weights file.")
    created_at: str = Field(description="When it was written (ISO 8601, UTC).")
    owner: str | None = Field(None, description="The principal whose job wrote it.")


class StoredEvaluation(BaseModel):
    """A checkpoint evaluated on test images after training (`evaluation.json` beside it)."""

    checkpoint: str
    images: int = Field(description="Test images evaluated (the first N).")
    limit: int | None = Field(None, description="The limit asked for (None: all).")
    loss: float
    accuracy: float
    confusion_matrix: list[list[int]]
    device: str
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())


@dataclass(frozen=True)
class SavedCheckpoint:
    """What `CheckpointStore.save` wrote: the manifest, the job's aliases and what is kept."""

    manifest: Manifest
    latest: str
    best: str
    #: The job's checkpoint ids after pruning, oldest first.
    kept: list[str]


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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


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


class CheckpointStore:
    """Saves, finds, verifies, loads and deletes checkpoints under one directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.index = CheckpointIndex(self.root, scan=self._scan)

    # paths (only from validated ids)
    def _dir(self, ckpt_id: str) -> Path:
        m = CHECKPOINT_ID_RE.match(ckpt_id)
        if not m:
            raise CheckpointNotFoundError(ckpt_id, f"{ckpt_id!r} is not a checkpoint id")
        return self.root / m["job"] / f"e{m['epoch']}"

    def _job_dir(self, job_id: str) -> Path:
        if not JOB_ID_RE.match(job_id):
            raise CheckpointNotFoundError(job_id, f"{job_id!r} is not a job id")
        return self.root / job_id

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
        final = self._dir(checkpoint_id(job_id, epoch))
        job_dir = final.parent
        job_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=job_dir, prefix=f".tmp-{final.name}-"))
        try:
            weights = tmp / "weights.safetensors"
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
            save_file(tensors, str(weights))
            state_sha = None
            if state is not None:
                torch.save(state, tmp / "state.pt")
                state_sha = sha256_file(tmp / "state.pt")
            manifest = Manifest(
                id=checkpoint_id(job_id, epoch),
                job_id=job_id,
                epoch=epoch,
                weights_sha256=sha256_file(weights),
                state_sha256=state_sha,
                versions=versions(),
                **manifest_fields,
            )
            (tmp / "manifest.json").write_text(manifest.model_dump_json(indent=2))
            for f in tmp.iterdir():
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
            if final.exists():  # a resumed job rewrites an epoch it had not finished recording
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(job_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.index.add(manifest)
        return self._update_aliases(job_id, manifest, keep)

    def _update_aliases(self, job_id: str, manifest: Manifest, keep: int) -> SavedCheckpoint:
        aliases = self.aliases(job_id)
        aliases["latest"] = manifest.id
        best_id = aliases.get("best")
        best_acc = self.index.val_acc(best_id) if best_id else None
        if best_acc is None or manifest.metrics.get("val_acc", -1.0) >= best_acc:
            aliases["best"] = manifest.id
        _write_json_atomic(self._job_dir(job_id) / "aliases.json", aliases)
        epochs = sorted(self._epoch_ids(job_id))
        protected = {aliases["best"], aliases["latest"], *epochs[-keep:]}
        pruned = [old for old in epochs if old not in protected]
        for old in pruned:
            shutil.rmtree(self._dir(old), ignore_errors=True)
        self.index.remove(pruned)
        kept = [e for e in epochs if e in protected]
        return SavedCheckpoint(manifest, aliases["latest"], aliases["best"], kept)

    def save_evaluation(self, evaluation: StoredEvaluation) -> None:
        """Keep an evaluation beside its checkpoint (replacing an earlier one)."""
        directory = self._dir(evaluation.checkpoint)
        if not (directory / "manifest.json").is_file():
            raise CheckpointNotFoundError(evaluation.checkpoint)
        _write_json_atomic(directory / EVALUATION_FILE, evaluation.model_dump(mode="json"))

    def evaluation(self, ckpt_id: str) -> StoredEvaluation | None:
        """The evaluation stored beside a checkpoint, if one was made."""
        try:
            raw = (self._dir(ckpt_id) / EVALUATION_FILE).read_bytes()
        except FileNotFoundError:
            return None
        try:
            return StoredEvaluation.model_validate_json(raw)
        except ValidationError:
            return None  # damaged: evaluate again

    # reading
    def aliases(self, job_id: str) -> dict[str, str]:
        path = self._job_dir(job_id) / "aliases.json"
        try:
            return dict(json.loads(path.read_text()))
        except (FileNotFoundError, NotADirectoryError):  # no checkpoints (or no data dir) yet
            return {}
        except (json.JSONDecodeError, TypeError, ValueError):
            return {}

    def _epoch_ids(self, job_id: str) -> list[str]:
        job_dir = self._job_dir(job_id)
        if not job_dir.is_dir():
            return []
        return [
            f"{job_id}-{d.name}"
            for d in job_dir.iterdir()
            if d.is_dir() and re.fullmatch(r"e[0-9]{3}", d.name)
        ]

    def _job_ids(self) -> Iterator[str]:
        if not self.root.is_dir():
            return
        for d in sorted(self.root.iterdir()):
            if d.is_dir() and JOB_ID_RE.match(d.name):
                yield d.name

    def manifest(self, ckpt_id: str) -> Manifest:
        """The manifest of a checkpoint id (not an alias)."""
        path = self._dir(ckpt_id) / "manifest.json"
        try:
            return Manifest.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            raise CheckpointNotFoundError(ckpt_id) from None
        except ValidationError as exc:
            raise CheckpointCorruptError(
                f"checkpoint {ckpt_id}: its manifest is damaged and cannot be read"
            ) from exc

    def _scan(self) -> Iterator[Manifest]:
        """Every readable manifest on disk (what the index is built from, once)."""
        for jid in self._job_ids():
            for cid in sorted(self._epoch_ids(jid)):
                try:
                    yield self.manifest(cid)
                except CheckpointError:
                    continue

    def list(
        self,
        *,
        job_id: str | None = None,
        model: str | None = None,
        limit: int | None = None,
        within: str | None = None,
    ) -> list[CheckpointSummary]:
        """Summaries of the checkpoints (of a job, of a model, of the owner `within`), newest
        first, from the index.

        A checkpoint whose files were removed by hand is left out, and out of the index.
        """
        rows = self.index.summaries(job_id=job_id, model=model, limit=limit, within=within)
        present = [r for r in rows if (self._dir(r["id"]) / "manifest.json").is_file()]
        if len(present) < len(rows):
            self.index.remove({r["id"] for r in rows} - {r["id"] for r in present})
        return [CheckpointSummary.model_validate(row) for row in present]

    def owner_of(self, ckpt_id: str) -> str | None:
        """The principal whose job wrote a checkpoint (from the index, else its manifest)."""
        indexed, owner = self.index.owner(ckpt_id)
        return owner if indexed else self.manifest(ckpt_id).owner

    def resolve(self, ref: str, within: str | None = None) -> str:
        """A checkpoint id from an id or an alias: `<job>:latest`, `<job>:best`, `<model>:best`,
        `<model>:latest`.

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
            if not (self._dir(ref) / "manifest.json").is_file():
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
            target = self.aliases(head).get(alias)
            if not target:
                raise CheckpointNotFoundError(ref, f"job {head} has no {alias} checkpoint")
            return target
        if MODEL_NAME_RE.match(head):
            if alias == "best":
                return self._best_of_model(ref, head, within)
            return self._latest_of_model(ref, head, within)
        raise CheckpointNotFoundError(ref, f"no checkpoint answers to {ref!r}")

    def _best_of_model(self, ref: str, model: str, within: str | None) -> str:
        """The best checkpoint of `model` (of one owner's) by validation accuracy (newest
        among equals)."""
        while True:
            ranked = self.index.best(model, within)
            if not ranked:
                raise CheckpointNotFoundError(ref, f"no checkpoint of model {model!r} exists")
            present = [c for c in ranked if (self._dir(c) / "manifest.json").is_file()]
            if present:
                return present[0]
            # removed behind the store's back (by hand): forget them, look again
            self.index.remove(ranked)

    def _latest_of_model(self, ref: str, model: str, within: str | None) -> str:
        """The newest checkpoint of `model` (of one owner's), as `list` orders them."""
        while True:
            newest = self.index.summaries(model=model, limit=1, within=within)
            if not newest:
                raise CheckpointNotFoundError(ref, f"no checkpoint of model {model!r} exists")
            if (self._dir(newest[0]["id"]) / "manifest.json").is_file():
                return str(newest[0]["id"])
            self.index.remove({newest[0]["id"]})  # removed behind the store's back: look again

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
        """The verified safetensors file of a checkpoint."""
        return self._verified_weights(ckpt_id, self.manifest(ckpt_id))

    def _verified_weights(self, ckpt_id: str, manifest: Manifest) -> Path:
        path = self._dir(ckpt_id) / "weights.safetensors"
        if not path.is_file():
            raise CheckpointCorruptError(f"checkpoint {ckpt_id}: its weights file is missing")
        if sha256_file(path) != manifest.weights_sha256:
            raise CheckpointCorruptError(
                f"checkpoint {ckpt_id}: its weights do not match the manifest's sha256 "
                "(the file was altered or truncated); use another checkpoint"
            )
        return path

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
        path = self._dir(ckpt_id) / "state.pt"
        if manifest.state_sha256 is None or not path.is_file():
            raise CheckpointCorruptError(f"checkpoint {ckpt_id} has no resume state")
        if sha256_file(path) != manifest.state_sha256:
            raise CheckpointCorruptError(f"checkpoint {ckpt_id}: resume state fails its sha256")
        try:
            state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
            # weights_only refuses any object but tensors and plain containers: never run code
            raise CheckpointCorruptError(
                f"checkpoint {ckpt_id}: its resume state holds something other than tensors "
                "and plain values, and was refused unread"
            ) from exc
        return state

    def delete(self, ckpt_id: str) -> None:
        """Remove a checkpoint and repoint its job's aliases at what is left."""
        directory = self._dir(ckpt_id)
        if not directory.is_dir():
            raise CheckpointNotFoundError(ckpt_id)
        job_id = directory.parent.name
        shutil.rmtree(directory)
        self.index.remove([ckpt_id])
        remaining = sorted(self._epoch_ids(job_id))
        aliases = self.aliases(job_id)
        if not remaining:
            (self._job_dir(job_id) / "aliases.json").unlink(missing_ok=True)
            return
        aliases["latest"] = remaining[-1]
        ranked = [(acc, cid) for cid, acc in self.index.of_job(job_id) if cid in remaining]
        if ranked:
            aliases["best"] = max(ranked, key=lambda r: r[0])[1]
        _write_json_atomic(self._job_dir(job_id) / "aliases.json", aliases)
