""".env.example lists every setting at its default, each with a comment, so it cannot drift."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from workers.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
ENV_EXAMPLE = ROOT / ".env.example"
ASSIGNMENT = re.compile(r"^(CNNSERVE_[A-Z0-9_]+)=(.*)$")


def _assignments() -> dict[str, tuple[str, int]]:
    found: dict[str, tuple[str, int]] = {}
    for number, line in enumerate(ENV_EXAMPLE.read_text().splitlines()):
        match = ASSIGNMENT.match(line)
        if match:
            assert match.group(1) not in found, f"{match.group(1)} is set twice"
            found[match.group(1)] = (match.group(2), number)
    return found


def test_every_setting_is_listed() -> None:
    want = {f"CNNSERVE_{name.upper()}" for name in Settings.model_fields}
    have = set(_assignments())
    assert not want - have, f".env.example lacks {sorted(want - have)}"
    assert not have - want, f".env.example sets unknown {sorted(have - want)}"


def test_every_setting_has_a_comment_above_it() -> None:
    lines = ENV_EXAMPLE.read_text().splitlines()
    for name, (_, number) in _assignments().items():
        assert number > 0 and lines[number - 1].startswith("# "), f"{name} has no comment"


def test_the_values_are_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading .env.example gives exactly the settings one gets with nothing set."""
    for key in list(os.environ):
        if key.startswith("CNNSERVE_"):
            monkeypatch.delenv(key)
    from_file = Settings(_env_file=ENV_EXAMPLE)  # type: ignore[call-arg]
    defaults = Settings()
    assert from_file.model_dump() == defaults.model_dump()
