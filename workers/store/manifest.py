"""What a checkpoint is: its manifest (the role torchvision's `Weights.meta` plays), the
summary a listing shows, and an evaluation kept beside it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from models import CLASSES
from workers.contracts import CHECKPOINT_ID_RE, JOB_ID_PATTERN, MODEL_NAME_PATTERN

#: A sha256 as the store records it; it names files in the local cache, so it is checked.
SHA256_PATTERN = r"^[0-9a-f]{64}$"

#: An arch as a manifest records it: [count, channels] pairs, the book's parameters of a
#: DenseNet or AnyNet as an object, a name, or none.
ManifestArch = list[list[int]] | dict[str, Any] | str | None


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
    """What a checkpoint is: the role torchvision's `Weights.meta` plays.

    The ids, the model's name and the hashes name keys in the store and files in the local
    cache, so a manifest whose fields are not of their shapes does not load (a bucket is read
    by the upgrade and by every process; what it holds is checked, never trusted)."""

    id: str = Field(pattern=CHECKPOINT_ID_RE.pattern)
    job_id: str = Field(pattern=JOB_ID_PATTERN)
    epoch: int
    model: str = Field(pattern=MODEL_NAME_PATTERN)
    arch: ManifestArch = None
    input_size: int
    in_channels: int = 1
    num_classes: int = 10
    classes: list[str] = Field(default_factory=lambda: list(CLASSES))
    preprocessing: Preprocessing
    metrics: dict[str, float] = Field(default_factory=dict)
    history: list[dict[str, Any]] = Field(default_factory=list)
    spec: dict[str, Any] = Field(default_factory=dict)
    dataset: dict[str, Any] = Field(default_factory=dict)
    weights_sha256: str = Field(pattern=SHA256_PATTERN)
    state_sha256: str | None = Field(None, pattern=SHA256_PATTERN)
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
    def arch_value(self) -> str | tuple[tuple[int, int], ...] | dict[str, Any] | None:
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
    arch: ManifestArch = Field(None, description="The arch, if the model has one.")
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
