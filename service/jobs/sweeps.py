"""Sweeps: many jobs from one base spec and a grid (or random samples) over its fields.

A sweep expands to its points before anything is queued (each a full `JobSpec`, checked like
any submitted spec; a bad point is a 422 that names it), then its jobs are recorded in one
atomic step and sent through the one enqueue path (`service.jobs.control`). The sweep record
keeps the request, the points and the job ids; its status and leaderboard are read from the
jobs' records (one MGET), so a sweep of 64 costs no more than 64 jobs.

Keys (prefix `cnnserve:`): `sweep:{id}` the JSON of a `SweepRecord`; `sweeps` the sweep ids by
creation time (listing); `owner:{owner}:sweeps` the same for one principal's sweeps.
"""

from __future__ import annotations

import itertools
import math
import random
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from workers.contracts import JobSpec, JobStatus
from workers.store import job_index
from workers.store.job_index import PREFIX, Cursor
from workers.store.jobs import JobRecord, now_iso

#: Spec fields a grid or a random search may vary.
SWEEP_FIELDS = ("model", "lr", "batch_size", "optimizer", "epochs", "seed", "input_size", "arch")
INTEGER_FIELDS = ("batch_size", "epochs", "seed", "input_size")
MAX_JOBS = 64
SWEEPS = f"{PREFIX}sweeps"
SortKey = Literal["best_val_acc", "val_loss", "train_loss", "seconds_per_epoch", "epochs_done"]
#: Which way each sort key ranks (True: the highest first).
DESCENDING = {
    "best_val_acc": True,
    "val_loss": False,
    "train_loss": False,
    "seconds_per_epoch": False,
    "epochs_done": True,
}


class Range(BaseModel):
    """A continuous range to sample from (log-uniform with `log`); integers for int fields."""

    model_config = ConfigDict(extra="forbid")

    min: float
    max: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.min < self.max:
            raise ValueError(f"min ({self.min}) must be below max ({self.max})")
        if self.log and self.min <= 0:
            raise ValueError("a log range needs min > 0")
        return self


class RandomSearch(BaseModel):
    """N points drawn from a space of choices and ranges (seeded: the same request draws the
    same points)."""

    model_config = ConfigDict(extra="forbid")

    n: int = Field(ge=1, le=MAX_JOBS, description="How many points to draw.")
    space: dict[str, list[Any] | Range] = Field(
        description="Per field: a list of values to choose from, or {min, max, log}."
    )
    seed: int = Field(0, ge=0, description="Seed of the draw.")


class SweepRequest(BaseModel):
    """A base spec and what to vary: a grid (every combination) or a random search."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "base": {"model": "lenet", "epochs": 2, "train_limit": 5000},
                    "grid": {"lr": [0.1, 0.5], "batch_size": [64, 128]},
                },
                {
                    "base": {"model": "lenet", "epochs": 2, "train_limit": 5000},
                    "random": {
                        "n": 4,
                        "space": {
                            "lr": {"min": 0.01, "max": 1.0, "log": True},
                            "optimizer": ["sgd", "sgd_momentum"],
                        },
                    },
                },
            ]
        },
    )

    base: dict[str, Any] = Field(description="A job spec; the fields varied may be left out.")
    grid: dict[str, list[Any]] | None = Field(
        None, description="Per field, the values to try; every combination becomes a job."
    )
    random: RandomSearch | None = None
    name: str | None = Field(None, max_length=100, description="A label for listings.")

    @model_validator(mode="after")
    def _one_search(self) -> SweepRequest:
        if (self.grid is None) == (self.random is None):
            raise ValueError('give exactly one of "grid" or "random"')
        varied = self.grid if self.grid is not None else (self.random.space if self.random else {})
        if not varied:
            raise ValueError("the sweep varies no field: give at least one")
        unknown = sorted(set(varied) - set(SWEEP_FIELDS))
        if unknown:
            raise ValueError(
                f"cannot vary {', '.join(unknown)}; a sweep varies {', '.join(SWEEP_FIELDS)}"
            )
        for field, values in (self.grid or {}).items():
            if not values:
                raise ValueError(f"grid field {field!r} has no values")
        if self.grid is not None and math.prod(len(v) for v in self.grid.values()) > MAX_JOBS:
            sizes = " × ".join(str(len(v)) for v in self.grid.values())
            raise ValueError(f"the grid makes {sizes} jobs, more than {MAX_JOBS}; make it smaller")
        return self


class PointError(ValueError):
    """A sweep point whose spec does not pass; names the point and what is wrong."""

    def __init__(self, index: int, point: dict[str, Any], detail: str) -> None:
        self.index = index
        self.point = point
        super().__init__(f"point {index} {point}: {detail}")


def points(request: SweepRequest) -> list[dict[str, Any]]:
    """The varied fields of every job the request makes, in order."""
    if request.grid is not None:
        fields = list(request.grid)
        return [
            dict(zip(fields, combo, strict=True))
            for combo in itertools.product(*request.grid.values())
        ]
    assert request.random is not None
    rng = random.Random(request.random.seed)
    out: list[dict[str, Any]] = []
    for _ in range(request.random.n):
        point: dict[str, Any] = {}
        for field, choice in request.random.space.items():
            if isinstance(choice, Range):
                if choice.log:
                    value = math.exp(rng.uniform(math.log(choice.min), math.log(choice.max)))
                else:
                    value = rng.uniform(choice.min, choice.max)
                point[field] = round(value) if field in INTEGER_FIELDS else float(f"{value:.6g}")
            else:
                if not choice:
                    raise PointError(len(out), {}, f"{field!r} has no values to choose from")
                point[field] = rng.choice(choice)
        out.append(point)
    return out


def expand(request: SweepRequest) -> tuple[list[dict[str, Any]], list[JobSpec]]:
    """Every point and its checked spec; the first point that fails raises `PointError`."""
    found = points(request)
    specs = []
    for i, point in enumerate(found):
        try:
            specs.append(JobSpec.model_validate({**request.base, **point}))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}"
                for e in exc.errors(include_url=False)
            )
            raise PointError(i, point, problems) from None
    return found, specs


class SweepRecord(BaseModel):
    """A sweep as stored: what was asked, the points and the jobs they became."""

    id: str
    name: str | None = None
    created_at: str = Field(default_factory=now_iso)
    request: SweepRequest
    points: list[dict[str, Any]]
    job_ids: list[str]
    cancel_requested: bool = False
    owner: str | None = Field(None, description="The principal that started the sweep.")


def new_sweep_id() -> str:
    return uuid.uuid4().hex[:16]


class SweepStore:
    """Sweep records in Redis (the jobs themselves are in the job store)."""

    def __init__(self, client: Any) -> None:
        self.r: Any = client

    @staticmethod
    def _key(sweep_id: str) -> str:
        return f"{PREFIX}sweep:{sweep_id}"

    @staticmethod
    def _listing(owner: str | None) -> str:
        return SWEEPS if owner is None else f"{job_index.owner_prefix(owner)}sweeps"

    def put(self, record: SweepRecord, *, new: bool = False) -> None:
        pipe = self.r.pipeline()
        pipe.set(self._key(record.id), record.model_dump_json())
        if new:
            now = time.time()
            pipe.zadd(SWEEPS, {record.id: now})
            if record.owner is not None:
                pipe.zadd(self._listing(record.owner), {record.id: now})
        pipe.execute()

    def get(self, sweep_id: str) -> SweepRecord | None:
        raw = self.r.get(self._key(sweep_id))
        return SweepRecord.model_validate_json(raw) if raw is not None else None

    def delete(self, sweep_id: str, owner: str | None = None) -> None:
        pipe = self.r.pipeline()
        pipe.delete(self._key(sweep_id))
        pipe.zrem(SWEEPS, sweep_id)
        if owner is not None:
            pipe.zrem(self._listing(owner), sweep_id)
        pipe.execute()

    def page(
        self, limit: int, cursor: Cursor | None, owner: str | None = None
    ) -> tuple[list[SweepRecord], Cursor | None]:
        """Sweeps (of one owner's, with `owner`) newest first, a page at a time (the job
        listing's cursors)."""
        ids, after = job_index.page(self.r, self._listing(owner), limit, cursor)
        raws = self.r.mget([self._key(i) for i in ids]) if ids else []
        return [SweepRecord.model_validate_json(r) for r in raws if r is not None], after


class Entry(BaseModel):
    """One job of a sweep on its leaderboard."""

    id: str
    status: JobStatus
    point: dict[str, Any] = Field(description="The fields this job varies.")
    spec: JobSpec
    best_val_acc: float | None = Field(None, description="Its best epoch's validation accuracy.")
    best_epoch: int | None = None
    val_loss: float | None = Field(None, description="The latest epoch's validation loss.")
    train_loss: float | None = Field(None, description="The latest epoch's training loss.")
    epochs_done: int = 0
    seconds_per_epoch: float | None = Field(None, description="Mean over finished epochs.")
    best_checkpoint: str | None = None
    error: str | None = None


def entry(record: JobRecord, point: dict[str, Any]) -> Entry:
    metrics = record.metrics
    best = max(metrics, key=lambda m: m.val_acc, default=None)
    return Entry(
        id=record.id,
        status=record.status,
        point=point,
        spec=record.spec,
        best_val_acc=best.val_acc if best else None,
        best_epoch=best.epoch if best else None,
        val_loss=metrics[-1].val_loss if metrics else None,
        train_loss=metrics[-1].train_loss if metrics else None,
        epochs_done=len(metrics),
        seconds_per_epoch=sum(m.seconds for m in metrics) / len(metrics) if metrics else None,
        best_checkpoint=record.best_checkpoint,
        error=record.error,
    )


def rank(entries: list[Entry], sort: SortKey) -> list[Entry]:
    """Best first by `sort`; jobs with nothing to rank by yet come last, in sweep order."""
    scored = [e for e in entries if getattr(e, sort) is not None]
    unscored = [e for e in entries if getattr(e, sort) is None]
    scored.sort(key=lambda e: getattr(e, sort), reverse=DESCENDING[sort])
    return scored + unscored


def status(records: list[JobRecord], cancel_requested: bool) -> JobStatus:
    """A sweep's status from its jobs': running while any is unfinished and one has begun."""
    states = [r.status for r in records]
    if not all(s.finished for s in states):
        begun = any(s is not JobStatus.queued for s in states)
        return JobStatus.running if begun else JobStatus.queued
    if all(s is JobStatus.succeeded for s in states):
        return JobStatus.succeeded
    if cancel_requested or JobStatus.cancelled in states:
        return JobStatus.cancelled
    return JobStatus.failed
