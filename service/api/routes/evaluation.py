"""A checkpoint's per-class evaluation: its confusion matrix, per-class scores and heatmap, and
`POST .../evaluate` to have a worker evaluate any checkpoint (those written before training
kept the matrix, or on the first N test images)."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from models import CLASSES
from service.access.audit import audit_target
from service.access.auth import Allow, CallerDep
from service.api.deps import CeleryDep, CheckpointStoreDep, ResolvedManifest, SettingsDep
from service.api.plots import PLOT_RESPONSE, PlotFormat, plot_response, render_confusion
from service.api.problems import problem_responses
from service.api.schemas import EXAMPLE_ID
from service.errors import (
    ProblemError,
)
from service.jobs import control as job_control
from workers.contracts import EVALUATION_ID_PATTERN
from workers.store.checkpoints import CheckpointStore, Manifest
from workers.store.evaluations import (
    ClassScores,
    EvaluationRecord,
    EvaluationStore,
    new_evaluation_id,
    per_class,
)

logger = logging.getLogger(__name__)

router = APIRouter(tags=["checkpoints"])


class NoEvaluationError(ProblemError):
    """A checkpoint without a confusion matrix (written before they were kept)."""

    status = 404
    slug = "no-evaluation"
    title = "No evaluation yet"


class EvaluationNotFoundError(ProblemError):
    status = 404
    slug = "evaluation-not-found"
    title = "Evaluation not found"


class Averages(BaseModel):
    """Unweighted means over the classes."""

    precision: float
    recall: float
    f1: float


class Evaluation(BaseModel):
    """How a checkpoint does on each class of the test set."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "checkpoint": EXAMPLE_ID,
                    "source": "training",
                    "images": 10000,
                    "classes": list(CLASSES),
                    "confusion_matrix": [
                        [800 if i == j else 20 for j in range(10)] for i in range(10)
                    ],
                    "per_class": [
                        {
                            "class": "t-shirt/top",
                            "precision": 0.82,
                            "recall": 0.8,
                            "f1": 0.81,
                            "accuracy": 0.96,
                            "support": 1000,
                        }
                    ],
                    "accuracy": 0.8,
                    "macro": {"precision": 0.8, "recall": 0.8, "f1": 0.8},
                }
            ]
        }
    )

    checkpoint: str
    source: str = Field(
        description="'training': the validation pass after the checkpoint's epoch (its val_acc); "
        "'evaluate': a later POST .../evaluate."
    )
    images: int = Field(description="Test images the matrix counts.")
    classes: list[str]
    confusion_matrix: list[list[int]] = Field(
        description="Rows: true class, columns: predicted class, in `classes` order."
    )
    per_class: list[ClassScores]
    accuracy: float = Field(description="The matrix's diagonal over its sum.")
    macro: Averages


def _evaluation(store: CheckpointStore, manifest: Manifest) -> Evaluation:
    matrix, source = manifest.confusion_matrix, "training"
    if matrix is None:
        stored = store.evaluation(manifest.id)
        if stored is None:
            raise NoEvaluationError(
                f"checkpoint {manifest.id} was written before confusion matrices were kept, and "
                f"has not been evaluated since: POST /v1/checkpoints/{manifest.id}/evaluate "
                "queues an evaluation on a worker; poll the evaluation it answers, then ask again"
            )
        matrix, source = stored.confusion_matrix, "evaluate"
    scores = per_class(matrix, manifest.classes)
    n = sum(map(sum, matrix))
    k = len(scores)
    return Evaluation(
        checkpoint=manifest.id,
        source=source,
        images=n,
        classes=manifest.classes,
        confusion_matrix=matrix,
        per_class=scores,
        accuracy=sum(matrix[i][i] for i in range(len(matrix))) / max(n, 1),
        macro=Averages(
            precision=sum(s.precision for s in scores) / k,
            recall=sum(s.recall for s in scores) / k,
            f1=sum(s.f1 for s in scores) / k,
        ),
    )


_NO_EVALUATION = "checkpoint 0123456789abcdef-e002 was written before confusion matrices were kept"


@router.get(
    "/checkpoints/{ref}/evaluation",
    summary="Per-class evaluation of a checkpoint",
    description="The confusion matrix of the checkpoint's epoch on the test set (kept by "
    "training's validation pass; its accuracy is the checkpoint's val_acc), per-class "
    "precision, recall, F1 and one-vs-rest accuracy with the class names, and macro averages. "
    "A checkpoint written before matrices were kept answers from a later `POST .../evaluate`, "
    "or a 404 that says so.",
    response_model=Evaluation,
    dependencies=[Allow("read")],
    responses=problem_responses(401, 403, 404, 409, s404=_NO_EVALUATION),
)
def get_evaluation(manifest: ResolvedManifest, store: CheckpointStoreDep) -> Evaluation:
    return _evaluation(store, manifest)


_HEATMAP_DESCRIPTION = (
    "The confusion matrix as a labelled heatmap: true class down, predicted class across, the "
    "count in each cell, shaded by its share of the true class."
)


@router.get(
    "/checkpoints/{ref}/confusion.{format:plot}",
    summary="Draw a checkpoint's confusion matrix as PNG or SVG",
    description=_HEATMAP_DESCRIPTION,
    response_class=Response,
    responses={**PLOT_RESPONSE, **problem_responses(401, 403, 404, 409, s404=_NO_EVALUATION)},
    dependencies=[Allow("read")],
)
def confusion(
    manifest: ResolvedManifest, store: CheckpointStoreDep, format: PlotFormat
) -> Response:
    evaluation = _evaluation(store, manifest)
    title = f"{manifest.model} · {manifest.id} · accuracy {evaluation.accuracy:.3f}"
    body = render_confusion(evaluation.confusion_matrix, evaluation.classes, format, title=title)
    return plot_response(body, format)


class EvaluateRequest(BaseModel):
    """What to evaluate the checkpoint on."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"limit": 1000}]})

    limit: int | None = Field(
        None, ge=1, le=10000, description="Only the first N test images (default: all 10,000)."
    )


async def _evaluations(request: Request) -> EvaluationStore:
    return EvaluationStore(request.app.state.job_store.r)


EvaluationsDep = Annotated[EvaluationStore, Depends(_evaluations)]


@router.post(
    "/checkpoints/{ref}/evaluate",
    status_code=202,
    summary="Evaluate a checkpoint on the test set",
    description="Queues the evaluation on a training worker (it is GPU work) and answers 202 "
    "with it and its `Location`; poll that until `succeeded`, then "
    "`GET /v1/checkpoints/{ref}/evaluation` answers from it. Needs the train scope. It shares "
    "the training queue with jobs, so it counts against the queue limit and the caller's "
    "`max_active_jobs` (queued + running) like a job: a 429 with `Retry-After` past either.",
    response_model=EvaluationRecord,
    dependencies=[Allow("train", audit_as="checkpoint.evaluate")],
    responses=problem_responses(
        401,
        403,
        404,
        409,
        422,
        429,
        503,
        s429="alice has 2 jobs and evaluations queued or "
        "running; its limit (max_active_jobs) is 2; retry in 30 s, when one has finished",
    ),
)
def evaluate_checkpoint(
    request: Request,
    caller: CallerDep,
    manifest: ResolvedManifest,
    celery: CeleryDep,
    settings: SettingsDep,
    evaluations: EvaluationsDep,
    body: EvaluateRequest | None = None,
) -> Response:
    record = EvaluationRecord(
        id=new_evaluation_id(),
        checkpoint=manifest.id,
        limit=body.limit if body else None,
        owner=caller.owner,
    )
    audit_target(request, record.id)
    job_control.queue_evaluation(evaluations, celery, settings, record, caller)
    return Response(
        record.model_dump_json(),
        status_code=202,
        media_type="application/json",
        headers={"Location": f"/v1/evaluations/{record.id}"},
    )


EvaluationId = Annotated[
    str,
    Path(
        pattern=EVALUATION_ID_PATTERN,
        description="An evaluation id as POST .../evaluate answered it.",
        examples=["eval-0123456789abcdef"],
    ),
]


@router.get(
    "/evaluations/{evaluation_id}",
    summary="Follow an evaluation",
    description="queued, running, then succeeded (with the accuracy on the evaluated images) "
    "or failed (with why). Records are kept 7 days; the result stays with the checkpoint.",
    response_model=EvaluationRecord,
    dependencies=[Allow("read")],
    responses=problem_responses(401, 403, 404, 422),
)
async def get_evaluation_record(
    evaluation_id: EvaluationId, caller: CallerDep, evaluations: EvaluationsDep
) -> EvaluationRecord:
    record = await run_in_threadpool(evaluations.get, evaluation_id)
    if record is None or not caller.sees(record.owner):
        raise EvaluationNotFoundError(f"no evaluation {evaluation_id!r} (records are kept 7 days)")
    return record
