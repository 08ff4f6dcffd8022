"""The import rules of docs/architecture.md, held over the source tree's import graph.

Every `import` and `from ... import` of `models/`, `workers/` and `service/` counts, at module
level or inside a function (a lazy import is still a dependency), and so does each package
whose `__init__` an import runs. A rule names what may not be reached, directly or through
other modules of ours; a failure names the chain.
"""

from __future__ import annotations

import ast
import re
from collections import deque
from functools import cache
from pathlib import Path

import pytest

from tests.deploy.readme import section

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "workers", "service")
ROUTES = "service.api.routes"


@cache
def modules() -> dict[str, Path]:
    """Every module of ours by dotted name (a package by its own name)."""
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _ours(name: str) -> list[str]:
    """`name` and the packages above it, those that are modules of ours."""
    parts = name.split(".")
    return [m for i in range(1, len(parts) + 1) if (m := ".".join(parts[:i])) in modules()]


@cache
def imports(module: str) -> frozenset[str]:
    """The modules of ours that importing `module` runs directly."""
    path = modules()[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.update(_ours(alias.name))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.update(_ours(base))
            for alias in node.names:  # `from service.inference import pipeline`
                if f"{base}.{alias.name}" in modules():
                    found.update(_ours(f"{base}.{alias.name}"))
    found.discard(module)
    return frozenset(found)


def chain(start: str, forbidden: str, *, direct: bool = False) -> list[str] | None:
    """The import chain from `start` to a module in (or equal to) `forbidden`, if any."""
    seen = {start: [start]}
    queue = deque([start])
    while queue:
        module = queue.popleft()
        for target in sorted(imports(module)):
            if target == forbidden or target.startswith(f"{forbidden}."):
                return [*seen[module], target]
            if target not in seen and not direct:
                seen[target] = [*seen[module], target]
                queue.append(target)
    return None


def under(package: str) -> list[str]:
    return sorted(m for m in modules() if m == package or m.startswith(f"{package}."))


RULES = [
    # (what, may not import, why)
    ("models", "workers", "models is a leaf: the networks import torch only"),
    ("models", "service", "models is a leaf: the networks import torch only"),
    ("workers", "service", "workers never imports the service"),
    ("service.inference", "service.api", "the pipeline knows no HTTP routing"),
    ("service.inference", "service.cli", "the pipeline knows no command line"),
    ("service.api.fastpath", ROUTES, "the fast path runs the pipeline, not the routes"),
    ("service.api", "workers.training", "the API never imports the training engine"),
    ("service.inference", "workers.training", "the API never imports the training engine"),
    ("service.access", "workers.training", "the API never imports the training engine"),
    ("service.jobs", "workers.training", "the API never imports the training engine"),
    ("workers.store", "workers.training", "the stores the API reads pull in no training"),
]


@pytest.mark.parametrize(("package", "forbidden", "why"), RULES)
def test_import_rules(package: str, forbidden: str, why: str) -> None:
    broken = [found for m in under(package) if (found := chain(m, forbidden))]
    assert not broken, f"{why}: " + "; ".join(" → ".join(c) for c in broken)


def test_no_route_module_imports_another() -> None:
    routes = [m for m in under(ROUTES) if m != ROUTES]
    assert len(routes) > 10, routes  # the rule is looking at the routes
    broken = [
        f"{m} → {t}" for m in routes for t in sorted(imports(m)) if t.startswith(f"{ROUTES}.")
    ]
    assert not broken, "route modules import the pipeline, never each other: " + "; ".join(broken)


def test_the_graph_sees_lazy_and_from_package_imports() -> None:
    """The rules above can fail: the graph finds the imports they must catch."""
    assert "service.inference.pipeline" in imports("service.api.fastpath")  # from pkg import mod
    assert "workers.training.runner" in imports("workers.tasks")  # inside a task function
    assert chain("service.api.app", ROUTES) is not None  # the app includes every router


def test_the_readme_layout_and_docs_architecture_match_the_tree() -> None:
    layout = section("Layout")
    named = set(re.findall(r"^\| `([^`]+)`", layout, re.M))
    named |= set(re.findall(r"^\| `[^`]+`, `([^`]+)`", layout, re.M))
    assert all((ROOT / p).exists() for p in named), sorted(
        p for p in named if not (ROOT / p).exists()
    )
    page = (ROOT / "docs" / "architecture.md").read_text()
    assert "docs/architecture.md" in layout
    subpackages = {m.replace(".", "/") + "/" for m in modules() if m.count(".") == 1
                   and modules()[m].name == "__init__.py"}  # fmt: skip
    assert subpackages <= named, sorted(subpackages - named)
    rows = re.findall(r"^\| `([a-z_/]+/)` \| (.*) \|$", page, re.M)
    assert {p for p, _ in rows} >= subpackages, "docs/architecture.md lacks a package"
    stale = [
        f"{package}{name}"
        for package, owns in rows
        for name in re.findall(r"`([a-z_]+\.py|[a-z_]+/)`", owns)
        if not (ROOT / package / name).exists()
    ]
    assert not stale, f"docs/architecture.md names files that are not there: {stale}"
