"""Which checkpoint a reference names: an id, or an alias (`<job>:latest`, `<job>:best`,
`<model>:best`, `<model>:latest`), among everyone's or one owner's checkpoints; and where a job
with `init_from` starts (its lineage).

Aliases are read from the Redis index (`workers.store.checkpoint_index`): one rule for "best"
everywhere, the highest `val_acc`, ties to the newest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from workers.contracts import CHECKPOINT_ID_RE, JOB_ID_RE, MODEL_NAME_RE
from workers.store.checkpoint_errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
    LineageError,
)
from workers.store.manifest import ManifestArch

if TYPE_CHECKING:
    from workers.store.checkpoints import CheckpointStore

#: How many checkpoints an alias passes over whose files were removed by hand.
STALE_PICKS = 16


@dataclass(frozen=True)
class Lineage:
    """Where a job starts: its parent checkpoint (resolved) and the epochs it numbers after."""

    parent: str | None = None
    epoch_offset: int = 0


def resolve(store: CheckpointStore, ref: str, within: str | None = None) -> str:
    """A checkpoint id from an id or an alias (see `CheckpointStore.resolve`)."""
    found = _resolve(store, ref, within)
    if within is not None and store.owner_of(found) != within:
        if CHECKPOINT_ID_RE.match(ref):
            raise CheckpointNotFoundError(ref)
        head, _, alias = ref.partition(":")
        raise CheckpointNotFoundError(ref, f"job {head} has no {alias} checkpoint")
    return found


def _resolve(store: CheckpointStore, ref: str, within: str | None) -> str:
    if CHECKPOINT_ID_RE.match(ref):
        store.ensure_indexed()
        if not store.index.field(ref, "job")[0]:
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
        return _present(store, lambda: store.aliases(head).get(alias), ref, f"job {head}")
    if MODEL_NAME_RE.match(head):
        store.ensure_indexed()
        pick = store.index.best if alias == "best" else store.index.newest
        return _present(store, lambda: next(iter(pick(head, within)), None), ref, f"model {head!r}")
    raise CheckpointNotFoundError(ref, f"no checkpoint answers to {ref!r}")


def _present(store: CheckpointStore, pick: Callable[[], str | None], ref: str, whose: str) -> str:
    """The checkpoint `pick` names, passing over any whose files were removed by hand
    (each is unfiled by `manifest`, so the next pick is another)."""
    for _ in range(STALE_PICKS):
        found = pick()
        if not found:
            break
        try:
            store.manifest(found)
        except CheckpointNotFoundError:
            continue
        except CheckpointCorruptError:
            pass  # it exists: reading it says what is wrong
        return found
    alias = ref.partition(":")[2]
    if whose.startswith("model"):
        raise CheckpointNotFoundError(ref, f"no checkpoint of {whose} exists")
    raise CheckpointNotFoundError(ref, f"{whose} has no {alias} checkpoint")


def lineage(
    store: CheckpointStore,
    init_from: str | None,
    *,
    model: str,
    arch: ManifestArch,
    input_size: int,
    continue_epochs: bool = False,
    within: str | None = None,
) -> Lineage:
    """A job's `init_from` resolved (see `CheckpointStore.lineage`)."""
    if init_from is None:
        return Lineage()
    try:
        parent = store.manifest(resolve(store, init_from, within))
    except CheckpointError as exc:
        raise LineageError(f"{exc}; name a checkpoint that exists (GET /v1/checkpoints)") from None
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
