"""The job contract shared with the API: the job spec, statuses and Celery task names."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from models import (
    Arch,
    ArchError,
    ArchJSON,
    ModelError,
    ShapeError,
    get_model_entry,
    list_models,
    min_input_size,
    summarize,
)
from workers.settings import DEVICE_PATTERN

#: Celery task names; the API enqueues by name and never imports the engine.
TRAIN_TASK = "cnnserve.train"
EVALUATE_TASK = "cnnserve.evaluate"
QUEUE = "training"
#: Jobs that ask for a GPU (`cuda`, `cuda:N`): only workers that train on one take from it, so
#: such a job waits for a GPU worker instead of reaching a CPU worker and failing there. GPU
#: workers take from both queues; `auto` and `cpu` jobs go to `QUEUE`.
CUDA_QUEUE = "training-cuda"


def queue_for(device: str) -> str:
    """The queue of a job whose spec asks for `device`."""
    return CUDA_QUEUE if device.startswith("cuda") else QUEUE


def queues_for_worker(device: str) -> list[str]:
    """The queues a worker that trains on `device` (`cpu`, `cuda:N`) takes jobs from."""
    return [QUEUE, CUDA_QUEUE] if device.startswith("cuda") else [QUEUE]


MIN_INPUT_SIZE = 28
MAX_INPUT_SIZE = 224

# The shapes of ids and names, here once: every check of a client's string uses these.
#: A job's (or a sweep's) id: 16 hex digits, `uuid4().hex[:16]`.
ID_HEX = "[0-9a-f]{16}"
JOB_ID_PATTERN = rf"^{ID_HEX}$"
JOB_ID_RE = re.compile(JOB_ID_PATTERN)
SWEEP_ID_PATTERN = JOB_ID_PATTERN
EVALUATION_ID_PATTERN = rf"^eval-{ID_HEX}$"
#: A checkpoint id: its job's id and its epoch, `<job>-eNNN`.
CHECKPOINT_ID_RE = re.compile(rf"^(?P<job>{ID_HEX})-e(?P<epoch>[0-9]{{3}})$")
#: A registry model's name (as a filter, and in `<model>:best` and `<model>:latest`).
MODEL_NAME = "[a-z0-9_]{1,32}"
MODEL_NAME_PATTERN = rf"^{MODEL_NAME}$"
MODEL_NAME_RE = re.compile(MODEL_NAME_PATTERN)
#: A checkpoint id or alias (as `CheckpointStore.resolve` takes them): `<job>-eNNN`,
#: `<job>:best`, `<job>:latest`, `<model>:best`, `<model>:latest`.
CHECKPOINT_REF_PATTERN = (
    rf"^({ID_HEX}-e[0-9]{{3}}|{ID_HEX}:(latest|best)|{MODEL_NAME}:(latest|best))$"
)
#: Training examples in Fashion-MNIST (a `train_limit` at or above it trains on all).
TRAIN_EXAMPLES = 60000
#: Test examples in Fashion-MNIST, which validation runs on.
TEST_EXAMPLES = 10000

#: The validation context of a record read back from the job store: its spec was checked
#: when it was submitted, so loading it does not build the network again.
TRUSTED: dict[str, Any] = {"trusted": True}


@dataclass(frozen=True)
class NetworkFit:
    """What building a network at an input size tells a job spec, found once per network."""

    #: Why the network cannot take the input (None when it can).
    problem: str | None = None
    #: The BatchNorm layer with the fewest values per channel for one example, and how many.
    sparsest_norm: tuple[str, int] | None = None


@lru_cache(maxsize=512)
def network_fit(model: str, arch: str | Arch | None, input_size: int) -> NetworkFit:
    """Build `model` on the meta device at `input_size` once, and remember what it showed."""
    try:
        summary = summarize(model, (1, 1, input_size, input_size), arch=arch)
    except ArchError as exc:
        return NetworkFit(problem=f"arch: {exc}")
    except ShapeError as exc:
        smallest = min_job_input_size(model, arch)
        needs = (
            f"it needs an input_size of {smallest} or more"
            if smallest is not None
            else f"no input_size up to {MAX_INPUT_SIZE} fits it"
        )
        return NetworkFit(
            problem=f"input_size {input_size} does not fit {_network(model, arch)}: {needs} ({exc})"
        )
    except ModelError as exc:
        return NetworkFit(problem=f"input_size {input_size} does not fit {model}: {exc}")
    return NetworkFit(sparsest_norm=summary.sparsest_norm)


def min_job_input_size(model: str, arch: str | Arch | None = None) -> int | None:
    """The smallest `input_size` a job may train `model` (with `arch`) at: Fashion-MNIST's
    own 28, or the smallest side every layer takes where that is more; None if none fits."""
    smallest = min_input_size(model, arch, at_least=MIN_INPUT_SIZE)
    return smallest if smallest is not None and smallest <= MAX_INPUT_SIZE else None


def _network(model: str, arch: str | Arch | None) -> str:
    if arch is None:
        return model
    if isinstance(arch, str):
        return f"{model} (arch {arch!r})"
    return f"{model} with arch {json.dumps(get_model_entry(model).arch_json(arch))}"


def warm_network_fit() -> None:
    """Check each model's default recipe and smallest input size once, so its first submit
    (and the first model listing) is as quick as the rest.

    The first BatchNorm on the meta device imports much of torch (seconds); a process that
    takes submissions (the API) does it at start-up, off its event loop.
    """
    for name in list_models():
        network_fit(name, None, get_model_entry(name).input_size)
        min_job_input_size(name)  # what GET /v1/models lists (a bisection over sizes)


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
#: The book's constructor parameters of DenseNet or AnyNet as a JSON object; the model
#: checks them (`models.registry.ModelEntry.resolve_arch`).
ArchParams = Annotated[dict[str, Any], Field(max_length=4)]
#: Every form an arch override takes in JSON: a name, up to 8 pairs, or an object.
ArchOverride = (
    Annotated[str, Field(max_length=32)]
    | Annotated[ArchPairs, Field(min_length=1, max_length=8)]
    | ArchParams
)


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
    arch: ArchOverride | None = Field(
        None,
        description="Arch override: a named arch (vgg: 'small', 'vgg11'), [[count, channels], "
        "...] pairs (vgg, resnet18), or the book's parameters as an object (densenet: "
        '{"num_channels", "growth_rate", "arch"}; regnetx32: {"stem_channels", "arch"}); '
        "GET /v1/models lists each model's form. Default: the model's training arch.",
    )
    epochs: int = Field(10, ge=1, le=100, description="Passes over the training set.")
    batch_size: int = Field(128, ge=1, le=1024, description="Examples per SGD step.")
    lr: float | None = Field(
        None,
        gt=0,
        le=10,
        description="Learning rate; default the book's for the model (GET /v1/models).",
    )
    input_size: int | None = Field(
        None,
        ge=MIN_INPUT_SIZE,
        le=MAX_INPUT_SIZE,
        description="Images are resized to this square side; default the book's per model. "
        "Some networks need more (alexnet 65, nin 67; GET /v1/models: min_input_size).",
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
    init_from: str | None = Field(
        None,
        pattern=CHECKPOINT_REF_PATTERN,
        description="Start from this checkpoint's weights (an id or alias: <job>-eNNN, "
        "<job>:best, <job>:latest, <model>:best, <model>:latest) with a fresh optimizer and "
        "this spec's hyperparameters; it must be the same model, arch and input size.",
        examples=["lenet:best"],
    )
    continue_epochs: bool = Field(
        False,
        description="With init_from: number this job's epochs after the parent's (its curves "
        "continue the parent's), instead of from 1.",
    )
    train_limit: int | None = Field(
        None,
        ge=1,
        le=TRAIN_EXAMPLES,
        description="Train on only the first N shuffled examples.",
    )
    val_limit: int | None = Field(
        None,
        ge=1,
        le=TEST_EXAMPLES,
        description="Validate each epoch on only the first N test images (quick runs); "
        "default all 10,000.",
    )

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        if v not in list_models():
            raise ValueError(f"unknown model {v!r}; known models: {', '.join(list_models())}")
        return v

    @model_validator(mode="after")
    def _recipe_defaults(self, info: ValidationInfo) -> JobSpec:
        entry = get_model_entry(self.model)
        if self.lr is None:
            self.lr = entry.lr
        if self.input_size is None:
            self.input_size = entry.input_size
        if not (info.context or {}).get("trusted"):
            self._check_fit()
        return self

    @model_validator(mode="after")
    def _continue_needs_a_parent(self) -> JobSpec:
        if self.continue_epochs and self.init_from is None:
            raise ValueError("continue_epochs numbers epochs after init_from's; set init_from too")
        return self

    def _check_fit(self) -> None:
        """Refuse a network that cannot take the input, or a batch it cannot train on."""
        assert self.input_size is not None
        try:
            arch = self.arch_value
        except ArchError as exc:
            raise ValueError(f"arch: {exc}") from None
        fit = network_fit(self.model, arch, self.input_size)
        if fit.problem is not None:
            raise ValueError(fit.problem)
        examples = min(self.batch_size, self.train_limit or TRAIN_EXAMPLES)
        if fit.sparsest_norm is not None and fit.sparsest_norm[1] * examples == 1:
            layer = fit.sparsest_norm[0]
            what = "batch_size 1" if self.batch_size == 1 else f"train_limit {self.train_limit}"
            raise ValueError(
                f"{what} cannot train {self.model} at input_size {self.input_size}: its "
                f"BatchNorm layer {layer} would see a single value per channel, and batch "
                "statistics need at least two; use a batch of 2 or more examples, or a larger "
                "input_size"
            )

    @property
    def network_arch(self) -> ArchJSON | None:
        """The arch this spec trains, resolved to JSON (as a checkpoint's manifest has it)."""
        return get_model_entry(self.model).arch_json(self.arch_value)

    @property
    def arch_value(self) -> str | Arch | None:
        """The arch in the form `models.build_model` takes, hashable (an object resolved)."""
        if isinstance(self.arch, list):
            return tuple((int(a), int(b)) for a, b in self.arch)
        if isinstance(self.arch, dict):
            return get_model_entry(self.model).resolve_arch(self.arch)
        return self.arch
