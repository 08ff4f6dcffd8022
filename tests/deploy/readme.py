"""Read README.md's sections and code blocks, and match a command's output against its example."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
ELLIPSIS = "…"


def section(heading: str, text: str | None = None) -> str:
    """The body of the `## heading` section, up to the next `## ` heading."""
    text = README.read_text() if text is None else text
    match = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no '## {heading}' section"
    return match.group(1)


def blocks(body: str) -> list[tuple[str, str]]:
    """Every fenced code block in `body` as (language, content), in order."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(body)]


@dataclass
class Step:
    """One ```sh block of the walkthrough and the ```text block that shows its output."""

    command: str
    expected: str | None


def walkthrough_steps(heading: str = "Walkthrough") -> list[Step]:
    """A walkthrough's commands in order, each with the output the README promises."""
    steps: list[Step] = []
    for lang, content in blocks(section(heading)):
        if lang == "sh":
            steps.append(Step(content, None))
        elif lang == "text" and steps and steps[-1].expected is None:
            steps[-1].expected = content
    return steps


def _normal(line: str) -> str:
    return " ".join(line.split())


def output_mismatch(expected: str, actual: str) -> str | None:
    """None when `actual` shows every line of `expected` in order, else what is missing.

    Each non-empty line of `expected` must match one line of `actual` (whitespace runs
    collapsed), later than the previous match; `…` in a line stands for any text, and a line
    that is only `…` stands for any number of lines.
    """
    lines = [_normal(line) for line in actual.splitlines() if line.strip()]
    at = 0
    for want in (_normal(line) for line in expected.splitlines()):
        if not want or want == ELLIPSIS:
            continue
        pattern = re.compile(".*".join(re.escape(part) for part in want.split(ELLIPSIS)))
        while at < len(lines) and not pattern.fullmatch(lines[at]):
            at += 1
        if at == len(lines):
            return f"no line (in order) matches {want!r}"
        at += 1
    return None
