"""cnnserve's service side: the HTTP API (`service.api`), the inference pipeline
(`service.inference`), access control (`service.access`), job submission (`service.jobs`) and
the `cnnserve` command (`service.cli`); docs/architecture.md draws them."""

from __future__ import annotations

from functools import cache
from importlib.metadata import PackageNotFoundError, version


@cache
def server_version() -> str:
    """cnnserve's installed version ("0.0.0" when run from a tree that was never installed)."""
    try:
        return version("cnnserve")
    except PackageNotFoundError:
        return "0.0.0"
