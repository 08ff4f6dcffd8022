"""Log lines that a logged value cannot forge, break or colour, in text and in JSON.

The values are what a client controls: a path parameter with CR/LF and a forged record after
it, ANSI escapes (7-bit and the 8-bit CSI), Unicode line separators, and very long strings.
`tests/reliability/test_abuse.py` sends the same through a real server and reads its log.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from service.access import audit
from service.api.logs import (
    JSON_FIELDS,
    MAX_LINE_CHARS,
    TEXT_FORMAT,
    SafeJsonFormatter,
    SafeTextFormatter,
)

FORGED = "2026-12-06 10:00:00,000 INFO cnnserve.audit: audit action=checkpoint.delete principal=x"
HOSTILE = [
    f"zz\n{FORGED}",
    f"zz\r{FORGED}",
    f"zz\r\n{FORGED}",
    "\x1b[2J\x1b[31mred\x1b[0m",
    "\x9b31mred",  # the 8-bit CSI
    f"zz\u2028{FORGED}",
    f"zz\x85{FORGED}",  # NEL
    "tab\there\x00nul\x7fdel",
]


@pytest.fixture
def text_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    yield from _logger(SafeTextFormatter(TEXT_FORMAT))


@pytest.fixture
def json_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    yield from _logger(SafeJsonFormatter(JSON_FIELDS, rename_fields={"levelname": "level"}))


def _logger(formatter: logging.Formatter) -> Iterator[tuple[logging.Logger, io.StringIO]]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    log = logging.getLogger("cnnserve.audit")
    log.addHandler(handler)
    before = log.level
    log.setLevel(logging.INFO)
    yield log, out
    log.removeHandler(handler)
    log.setLevel(before)


def _audit(target: str) -> None:
    audit.write(audit.AuditEntry("checkpoint.delete", None, None, target), 401)


def _no_control_characters(text: str) -> None:
    bad = [c for c in text if (ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) <= 0x9F]
    bad += [c for c in text if c in "\u2028\u2029"]
    assert not bad, f"control characters in the log: {bad!r}"


@pytest.mark.parametrize("target", HOSTILE)
def test_a_text_audit_line_stays_one_line_whatever_the_target(
    text_log: tuple[logging.Logger, io.StringIO], target: str
) -> None:
    _log, out = text_log
    _audit(target)
    text = out.getvalue()
    assert text.count("\n") == 1, text  # one record, one line
    _no_control_characters(text)
    line = text.rstrip("\n")
    assert line.startswith("20") and " cnnserve.audit: audit action=checkpoint.delete " in line
    # the forged fields are inside the quoted target, and the real outcome ends the line
    assert line.endswith(" outcome=refused status=401"), line
    assert 'target="zz' in line or 'target="' in line


def test_a_target_cannot_add_fields_to_the_audit_line(
    text_log: tuple[logging.Logger, io.StringIO],
) -> None:
    _log, out = text_log
    _audit("zz outcome=ok status=204")
    line = out.getvalue().strip()
    assert 'target="zz outcome=ok status=204" outcome=refused status=401' in line
    _audit('a"b\\')
    assert 'target="a\\"b\\\\"' in out.getvalue()


def test_a_very_long_value_is_cut_and_says_so(
    text_log: tuple[logging.Logger, io.StringIO],
) -> None:
    log, out = text_log
    _audit("x" * 100_000)
    line = out.getvalue().strip()
    assert len(line) < 400 and "more characters]" in line
    log.info("a long message %s", "y" * 100_000)
    long_line = out.getvalue().splitlines()[-1]
    assert len(long_line) <= MAX_LINE_CHARS + 100 and "more characters]" in long_line


def test_a_traceback_cannot_pass_for_a_record(
    text_log: tuple[logging.Logger, io.StringIO],
) -> None:
    log, out = text_log
    try:
        raise ValueError(f"bad ref zz\n{FORGED}\x1b[31m")
    except ValueError:
        log.exception("unhandled error on DELETE /v1/checkpoints/zz\n%s", FORGED)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("20") and "\\n2026-12-06" in lines[0]
    # every line after the record's first is indented: no forged record at the margin
    assert len(lines) > 2 and all(line.startswith("    ") for line in lines[1:]), lines
    _no_control_characters(out.getvalue())


@pytest.mark.parametrize("target", [*HOSTILE, "x" * 100_000])
def test_json_audit_lines_parse_and_keep_the_value(
    json_log: tuple[logging.Logger, io.StringIO], target: str
) -> None:
    _log, out = json_log
    _audit(target)
    text = out.getvalue()
    assert text.count("\n") == 1 and text.isascii(), text[:500]
    record = json.loads(text)
    assert record["audit"] is True and record["outcome"] == "refused" and record["status"] == 401
    if len(target) < 1000:
        assert record["target"] == target  # the value itself, escaped by JSON only
    else:
        assert len(record["target"]) < 400 and record["target"].endswith("more characters]")
