"""`GET /v1/whoami`: who the API takes the caller for, and what it may do (the dashboard asks)."""

from __future__ import annotations

from anyio import to_thread
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from service.access.auth import Allow, CallerDep
from service.access.keys import KeyRing
from service.api.deps import JobStoreDep
from service.api.problems import problem_responses

router = APIRouter(tags=["access"])


class Limits(BaseModel):
    """The caller's quotas (null: no limit) and how much of the job quota is in use."""

    max_active_jobs: int | None = Field(
        description="Queued + running jobs at most (evaluations count as jobs)."
    )
    active_jobs: int | None = Field(description="Its jobs and evaluations queued or running now.")
    max_sweep_jobs: int = Field(description="Jobs in one sweep at most.")
    predict_rate: str | None = Field(
        description="Predict, explain and V2 infer calls, e.g. 20/second."
    )


class WhoAmI(BaseModel):
    """The caller as the API sees it."""

    principal: str | None = Field(description="The key's principal; null without a key.")
    key_id: str | None = Field(description="The id of the key sent (never the key).")
    scopes: list[str] = Field(description="What it may do: read, predict, train, admin.")
    sees: str = Field(
        description="Whose jobs and checkpoints it reads: `own`, `all` (an admin, public reads, "
        "or a server without keys) or `nothing` (no key where one is needed)."
    )
    keys_required: bool = Field(description="Whether this server needs API keys at all.")
    public_read: bool
    public_predict: bool
    limits: Limits


@router.get(
    "/whoami",
    summary="Who am I",
    description="The principal of the key sent (or none), its scopes, whether it sees only its "
    "own jobs and checkpoints, and its quotas. Answers without a key too (saying what is "
    "public); a wrong key is a 401.",
    dependencies=[Allow("any")],
    # a key is optional here: `{}` beside the scheme says so to the docs and to clients
    openapi_extra={"security": [{}]},
    responses=problem_responses(401),
)
async def whoami(request: Request, caller: CallerDep, store: JobStoreDep) -> WhoAmI:
    settings = request.app.state.settings
    ring: KeyRing = request.app.state.key_ring
    p = caller.principal
    named = p.name is not None
    everyone = not ring.configured or p.admin or settings.public_read
    active = await to_thread.run_sync(store.count_active, p.name) if p.name else None
    return WhoAmI(
        principal=p.name,
        key_id=p.key_id,
        scopes=["read", "predict", "train", "admin"] if p.admin else p.scope_list(),
        sees="all" if everyone else ("own" if named else "nothing"),
        keys_required=ring.configured,
        public_read=settings.public_read,
        public_predict=settings.public_predict,
        limits=Limits(
            max_active_jobs=p.max_active_jobs if named else settings.max_active_jobs,
            active_jobs=active,
            max_sweep_jobs=p.max_sweep_jobs
            if named and p.max_sweep_jobs
            else settings.max_sweep_jobs,
            predict_rate=p.predict_rate if named else settings.predict_rate,
        ),
    )
