"""`models` is a leaf: importing it loads torch, never the web or queue stacks."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("fastapi", "starlette", "celery", "kombu", "redis", "pydantic_settings")
OURS = ("service", "workers")


def test_import_models_pulls_in_neither_fastapi_nor_celery() -> None:
    code = (
        "import json, sys\n"
        "import models\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    loaded = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert "torch" in loaded and "models" in loaded
    assert loaded.isdisjoint(FORBIDDEN), sorted(loaded & set(FORBIDDEN))
    assert loaded.isdisjoint(OURS), sorted(loaded & set(OURS))
