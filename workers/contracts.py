"""The job contract shared with the API: the job spec, statuses and Celery task names."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models import ArchError, ModelError, get_model_entry, list_models, summarize
from workers.settings import DEVICE_PATTERN

#: Celery task names; the API enqueues by name and never imports the engine.
TRAIN_TASK = "cnnserve.train"
QUEUE = "training"

MIN_INPUT_SIZE = 28
MAX_INPUT_SIZE = 224


class JobStatus(StrEnum):
    """Where a job is in its life."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


ArchPairs = list[
    Annotated[list[Annotated[int, Field(ge=1, le=2048)]], Field(min_length=2, max_length=2)]
]


class JobSpec(BaseModel):
    """What to train and how; omitted fields take the seed's recipe for the model."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"model": "lenet", "epochs": 2, "train_limit": 5000},
                {"model": "resnet18", "epochs": 10, "batch_size": 128, "device": "cuda"},
            ]
        },
    )

    model: str = Field(description="A registered model name.", examples=["lenet"])
    arch: str | ArchPairs | None = Field(
        None,
        description="Arch override: a named arch (vgg: 'small', 'vgg11') or "
        "[[count, channels], ...] pairs. Default: the model's training arch.",
        max_length=8,
    )
    epochs: int = Field(10, ge=1, le=100, description="Passes over the training set.")
    batch_size: int = Field(128, ge=1, le=1024, description="Examples per SGD step.")
    lr: float | None = Field(
        None, gt=0, le=10, description="Learning rate; default the seed's (lenet 0.1, else 0.01)."
    )
    input_size: int | None = Field(
        None,
        ge=MIN_INPUT_SIZE,
        le=MAX_INPUT_SIZE,
        description="Images are resized to this square side; default the seed's per model.",
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed for init and shuffling.")
    optimizer: Literal["sgd", "sgd_momentum", "adamw"] = Field(
        "sgd", description="Plain SGD as d2l, SGD with momentum 0.9, or AdamW."
    )
    device: str = Field(
        "auto",
        pattern=DEVICE_PATTERN,
        description="auto (a GPU if the worker has one), cpu, cuda or cuda:N.",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on GPUs that support it, fp32 on the CPU."
    )
    train_limit: int | None = Field(
        None, ge=1, le=60000, description="Train on only the first N shuffled examples."
    )

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        if v not in list_models():
            raise ValueError(f"unknown model {v!r}; known models: {', '.join(list_models())}")
        return v

    @model_validator(mode="after")
    def _recipe_defaults(self) -> JobSpec:
        entry = get_model_entry(self.model)
        if self.lr is None:
            self.lr = entry.lr
        if self.input_size is None:
            self.input_size = entry.input_size
        arch: Any = self.arch
        if isinstance(arch, list):
            arch = tuple(tuple(p) for p in arch)
        try:
            summarize(self.model, (1, 1, self.input_size, self.input_size), arch=arch)
        except ArchError as exc:
            raise ValueError(f"arch: {exc}") from exc
        except ModelError as exc:
            raise ValueError(
                f"input_size {self.input_size} does not fit {self.model}: {exc}"
            ) from exc
        return self

    @property
    def arch_value(self) -> str | tuple[tuple[int, int], ...] | None:
        """The arch in the form `models.build_model` takes."""
        if isinstance(self.arch, list):
            return tuple((int(a), int(b)) for a, b in self.arch)
        return self.arch
