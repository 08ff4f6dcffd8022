"""Checkpoint refs to manifests: the one resolver, with the one cache.

A ref names a checkpoint: its id (`<job>-eNNN`), a job's alias (`<job>:best`, `<job>:latest`)
or a model's (`<model>:best`, `<model>:latest`); on `/v2`, a model name (a registry model or a
job id) and a version (`best`, `latest` or a checkpoint id of that model) become such a ref.
Every route that names a checkpoint resolves it here: `/v1` manifests, weights, ONNX, predict,
explain, evaluation and delete, `/v2` metadata, ready and infer (the dashboard reads through
them). Tenancy is the store's: with `within`, only that owner's checkpoints answer, and
`<model>:best` is its own best (`CheckpointStore.resolve`).

The hot calls (predict, explain, V2 ready and infer) take a resolution up to `REF_TTL_S` old,
so `<job>:latest` follows a running job within a second without a file read per request;
everything else resolves afresh, and refreshes the cache on the way.
"""

from __future__ import annotations

import time

from fastapi.concurrency import run_in_threadpool

from models import list_models
from service.inference.v2_codec import ModelNotFoundError
from workers.contracts import CHECKPOINT_ID_RE, JOB_ID_RE
from workers.store.checkpoints import CheckpointNotFoundError, CheckpointStore, Manifest

#: A ref's resolution is reused by the hot calls for at most this long (seconds).
REF_TTL_S = 1.0
REF_CACHE_SIZE = 1024


def model_kind(name: str) -> str:
    """What a V2 model name is: a registry `model` or a `job` id; a 404 for anything else."""
    if name in list_models():
        return "model"
    if JOB_ID_RE.fullmatch(name):
        return "job"
    raise ModelNotFoundError(
        f"unknown model {name!r}: use a registry model ({', '.join(list_models())}) or the id of "
        "a training job (16 hex digits)"
    )


def model_ref(name: str, version: str | None) -> str:
    """The checkpoint ref a V2 model name and version stand for (`best` by default)."""
    model_kind(name)
    v = version or "best"
    if v in ("best", "latest"):
        return f"{name}:{v}"
    if not CHECKPOINT_ID_RE.fullmatch(v):
        raise ModelNotFoundError(
            f"unknown version {v!r} of {name!r}: use best, latest or a checkpoint id "
            "(<job>-eNNN) from the model's metadata"
        )
    return v


class Resolver:
    """Resolves refs among the checkpoints of a `CheckpointStore`, remembering each for a
    moment (bounded; cleared wholesale when full)."""

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store
        self._cache: dict[str, tuple[float, Manifest]] = {}

    @staticmethod
    def _key(ref: str, within: str | None) -> str:
        return f"{within or ''}|{ref}"  # `lenet:best` is each tenant's own best

    def resolve(self, ref: str, within: str | None) -> Manifest:
        """The manifest `ref` names among `within`'s checkpoints (None: anyone's), read afresh
        (blocking: file reads); a `CheckpointNotFoundError` when none does."""
        manifest = self.store.manifest(self.store.resolve(ref, within))
        if len(self._cache) >= REF_CACHE_SIZE:
            self._cache.clear()
        self._cache[self._key(ref, within)] = (time.monotonic() + REF_TTL_S, manifest)
        return manifest

    def cached(self, ref: str, within: str | None) -> Manifest | None:
        """The manifest `ref` resolved to less than `REF_TTL_S` ago, if any."""
        entry = self._cache.get(self._key(ref, within))
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    async def manifest(self, ref: str, within: str | None, *, fresh: bool = False) -> Manifest:
        """`resolve`, off the event loop; unless `fresh`, a resolution under a second old is
        reused (the hot calls)."""
        manifest = None if fresh else self.cached(ref, within)
        if manifest is None:
            manifest = await run_in_threadpool(self.resolve, ref, within)
        return manifest

    def resolve_model(self, name: str, version: str | None, within: str | None) -> Manifest:
        """The manifest a V2 model name and version name among `within`'s checkpoints, read
        afresh (blocking); the protocol's 404 when none does."""
        try:
            manifest = self.resolve(model_ref(name, version), within)
        except CheckpointNotFoundError as exc:
            raise ModelNotFoundError(
                f"model {name!r} has no checkpoint for version {version or 'best'!r}: {exc}; "
                "train one with POST /v1/jobs"
            ) from None
        return _belongs(name, version, manifest)

    async def model_manifest(self, name: str, version: str | None, within: str | None) -> Manifest:
        """`resolve_model` off the event loop, a resolution under a second old reused (the
        hot calls)."""
        manifest = self.cached(model_ref(name, version), within)
        if manifest is None:
            return await run_in_threadpool(self.resolve_model, name, version, within)
        return _belongs(name, version, manifest)

    def forget(self, ckpt_id: str) -> None:
        """Drop every resolution to a checkpoint (it was deleted)."""
        for key, (_, manifest) in list(self._cache.items()):
            if manifest.id == ckpt_id:
                self._cache.pop(key, None)


def _belongs(name: str, version: str | None, manifest: Manifest) -> Manifest:
    """`manifest`, when it is a version of the V2 model `name` (a checkpoint id given as the
    version may be any model's); the protocol's 404 otherwise."""
    kind = model_kind(name)
    if (kind == "model" and manifest.model != name) or (kind == "job" and manifest.job_id != name):
        owner = f"a {manifest.model} checkpoint" if kind == "model" else f"job {manifest.job_id}'s"
        raise ModelNotFoundError(
            f"version {version or 'best'!r} is {owner}, not a version of {name!r}"
        )
    return manifest
