"""The Celery app the API imports: durable settings, and no training engine behind it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from workers.celery_app import make_celery
from workers.contracts import QUEUE
from workers.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_the_app_is_configured_for_long_durable_jobs(settings: Settings) -> None:
    app = make_celery(settings.model_copy(update={"visibility_timeout": 12345}))
    conf = app.conf
    assert conf.broker_url == settings.redis_url and conf.result_backend == settings.redis_url
    assert conf.task_serializer == "json" and conf.accept_content == ["json"]
    assert conf.task_acks_late is True and conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options == {"visibility_timeout": 12345}
    assert conf.task_default_queue == QUEUE
    assert settings.visibility_timeout > settings.job_max_seconds  # the defaults keep this true
    app.close()


def test_enqueueing_does_not_load_the_training_engine(settings: Settings) -> None:
    code = (
        "import sys\n"
        "from workers.celery_app import app, enqueue_job\n"
        "enqueue_job(app, 'ffffffffffffffff')\n"
        "loaded = [m for m in ('workers.tasks', 'workers.training.runner', "
        "'workers.training.engine') "
        "if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
