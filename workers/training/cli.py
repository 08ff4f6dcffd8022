"""`cnnserve train`: one job in this process, with a progress bar and a metrics table.

No Celery and no job record: the job's checkpoints go to the usual checkpoint store
(`CNNSERVE_CHECKPOINT_URL`, else under `CNNSERVE_DATA_DIR`) and its index in Redis, so the API
can serve them afterwards. With no Redis answering at a local `CNNSERVE_REDIS_URL` (a laptop),
it starts a private one for the run as `cnnserve up` does (its append-only file in
`data_dir/redis`, where `cnnserve up`'s private Redis finds the index again) and stops it at
the end.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, TextIO

from pydantic import ValidationError
from tqdm import tqdm

from workers.contracts import JobSpec
from workers.errors import TrainingError
from workers.local_redis import LocalRedisError, redis_for
from workers.settings import Settings, get_settings
from workers.store.checkpoints import (
    STORE_UNAVAILABLE,
    CheckpointStore,
    LineageError,
    SavedCheckpoint,
)
from workers.store.jobs import EpochMetrics, Progress, new_job_id
from workers.training.data import load_fashion_mnist
from workers.training.engine import Outcome, StopRequest, TrainOptions, train

log = logging.getLogger(__name__)


class ProgressBar:
    """Engine callbacks that drive a tqdm bar over every training batch of the job."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.bar: tqdm[Any] | None = None
        self.stream = stream or sys.stderr

    def on_progress(self, progress: Progress) -> None:
        total = progress.batches * progress.epochs
        if self.bar is None:
            self.bar = tqdm(total=total, unit="batch", file=self.stream, dynamic_ncols=True)
        done = (progress.epoch - 1) * progress.batches + progress.batch
        self.bar.update(max(0, done - self.bar.n))
        postfix = {"epoch": f"{progress.epoch}/{progress.epochs}"}
        if progress.images_per_s:
            postfix["img/s"] = f"{progress.images_per_s:,.0f}"
        self.bar.set_postfix(postfix, refresh=False)

    def on_epoch(self, metrics: EpochMetrics, saved: SavedCheckpoint) -> None:
        if self.bar is not None:
            self.bar.write(
                f"epoch {metrics.epoch}: train_loss {metrics.train_loss:.4f}  "
                f"val_loss {metrics.val_loss:.4f}  val_acc {metrics.val_acc:.4f}  "
                f"({metrics.seconds:.2f} s)  -> {saved.manifest.id}",
                file=self.stream,
            )

    def stop_requested(self) -> StopRequest | None:
        return None  # Ctrl-C raises KeyboardInterrupt instead

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def metrics_table(history: list[EpochMetrics]) -> str:
    """The per-epoch metrics as a fixed-width text table."""
    lines = [f"{'epoch':>5}  {'train_loss':>10}  {'val_loss':>8}  {'val_acc':>7}  {'seconds':>7}"]
    for m in history:
        lines.append(
            f"{m.epoch:>5}  {m.train_loss:>10.4f}  {m.val_loss:>8.4f}  {m.val_acc:>7.4f}  "
            f"{m.seconds:>7.2f}"
        )
    return "\n".join(lines)


def _parse_fields(fields: dict[str, Any]) -> dict[str, Any]:
    out = dict(fields)
    arch = out.get("arch")
    if isinstance(arch, str) and arch.strip()[:1] in ("[", "{"):
        out["arch"] = json.loads(arch)
    return out


def run_train(fields: dict[str, Any]) -> int:
    """Train one job from CLI spec fields; prints progress, then the metrics table."""
    try:
        spec = JobSpec.model_validate(_parse_fields(fields))
    except (ValidationError, json.JSONDecodeError) as exc:
        sys.stderr.write(f"invalid job spec: {exc}\n")
        return 2
    settings = get_settings()
    data_dir = settings.data_dir.expanduser().resolve()
    try:
        with redis_for(settings.redis_url, data_dir, "cnnserve train") as (redis_url, private):
            if private:
                sys.stderr.write(
                    f"no Redis answers at {settings.redis_url}: started a private one at "
                    f"{redis_url} for this run (its files in {data_dir / 'redis'})\n"
                )
            return _train(spec, settings.model_copy(update={"redis_url": redis_url}))
    except LocalRedisError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1


def _train(spec: JobSpec, settings: Settings) -> int:
    """Train `spec` with the checkpoint index in the Redis `settings` name."""
    store = CheckpointStore.from_settings(settings)
    try:
        store.ensure_indexed()
    except STORE_UNAVAILABLE as exc:
        sys.stderr.write(
            f"error: the checkpoint index (Redis at {settings.redis_url.rsplit('@', 1)[-1]}) or "
            f"store ({store.location}) is not reachable: {exc}\n"
        )
        return 1
    assert spec.input_size is not None
    try:
        lineage = store.lineage(
            spec.init_from,
            model=spec.model,
            arch=spec.network_arch,
            input_size=spec.input_size,
            continue_epochs=spec.continue_epochs,
        )
    except LineageError as exc:
        sys.stderr.write(f"invalid job spec: init_from: {exc}\n")
        return 2
    job_id = new_job_id()
    bar = ProgressBar()
    try:
        data = load_fashion_mnist(settings)
        sys.stderr.write(
            f"training {spec.model} (job {job_id}) for {spec.epochs} epoch(s), batch "
            f"{spec.batch_size}, lr {spec.lr}, input {spec.input_size}px, "
            f"{spec.train_limit or data.train_images.shape[0]} training images\n"
        )
        options = TrainOptions.from_settings(settings, spec.device)
        try:
            result = train(
                spec,
                job_id=job_id,
                data=data,
                store=store,
                options=options,
                callbacks=bar,
                init_from=lineage.parent,
                epoch_offset=lineage.epoch_offset,
            )
        except KeyboardInterrupt:
            bar.close()
            latest = store.aliases(job_id).get("latest")
            kept = f"; checkpoints kept, latest {latest}" if latest else ""
            sys.stderr.write(f"\ninterrupted{kept}\n")
            return 130
    except TrainingError as exc:
        bar.close()
        sys.stderr.write(f"error: {exc}\n")
        return 1
    finally:
        bar.close()

    sys.stdout.write(metrics_table(result.history) + "\n")
    latest = result.latest_checkpoint
    if latest:
        sys.stdout.write(
            f"device {result.device} ({result.precision}); checkpoint {latest} in "
            f"{store.location}/{job_id}; best {store.aliases(job_id).get('best')}\n"
        )
    if result.outcome is not Outcome.completed:
        sys.stderr.write(f"stopped early: {result.outcome.value}\n")
        return 1
    return 0
