"""The README's reference sections agree with the code: settings, walkthrough, compose snippet."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.readme import README, blocks, output_mismatch, section, walkthrough_steps
from workers.settings import Settings

ROOT = README.parent


def test_configuration_lists_every_setting_with_its_default() -> None:
    table = section("Configuration")
    defaults = Settings.model_construct()
    for name in Settings.model_fields:
        row = next(
            (
                line
                for line in table.splitlines()
                if line.startswith(f"| `CNNSERVE_{name.upper()}`")
            ),
            None,
        )
        assert row is not None, f"the Configuration table lacks CNNSERVE_{name.upper()}"
        default = getattr(defaults, name)
        cell = row.split("|")[2].strip()
        if isinstance(default, bool):
            assert cell == f"`{str(default).lower()}`", row
        elif default in ("", None):
            assert "empty" in cell, row
        else:
            assert cell == f"`{default}`", row


def test_the_walkthrough_covers_the_contract_endpoints() -> None:
    commands = "\n".join(step.command for step in walkthrough_steps())
    assert "curl -s http://127.0.0.1:8000/v1/models\n" in commands
    assert "/v1/models/lenet/summary?input_shape=1,1,28,28" in commands
    assert "-X POST http://127.0.0.1:8000/v1/jobs" in commands
    assert (
        """-d '{"model":"lenet","epochs":2,"train_limit":10000,"optimizer":"adamw","lr":0.01}'"""
        in commands
    )
    assert "curl -sN http://127.0.0.1:8000/v1/jobs/$JOB/events" in commands
    assert "/v1/jobs/$JOB/curves.png" in commands
    assert "-F files=@trouser.png" in commands
    assert "/v1/checkpoints/$JOB:best/predict" in commands


def test_every_walkthrough_command_shows_its_output() -> None:
    steps = walkthrough_steps()
    assert len(steps) >= 6
    for step in steps:
        assert step.expected is not None, f"no ```text output after:\n{step.command}"


def test_the_output_matcher() -> None:
    assert output_mismatch("a …\n…\nc", "a b\nx\nc\n") is None
    assert output_mismatch("c\na …", "a b\nc\n") is not None
    assert output_mismatch('{"k": …}', '{"k":  1}') is None
    assert output_mismatch("200 image/png", "404 application/json") is not None


def test_the_multi_gpu_override_is_valid_compose(tmp_path: Path) -> None:
    """The README's one-service-per-GPU override merges with docker-compose.yml."""
    snippets = [body for lang, body in blocks(section("Docker")) if lang == "yaml"]
    assert len(snippets) == 1
    override = tmp_path / "docker-compose.gpus.yml"
    override.write_text(snippets[0])
    services = yaml.safe_load(snippets[0])["services"]
    for index, name in enumerate(sorted(services)):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [
            {"driver": "nvidia", "device_ids": [str(index)], "capabilities": ["gpu"]}
        ]
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip(
            "docker-compose is not installed (Debian's docker-compose; `make test` installs it)"
        )
    result = subprocess.run(
        [binary, "--project-directory", str(ROOT), "-f", str(ROOT / "docker-compose.yml"),
         "-f", str(override), "config"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    merged = yaml.safe_load(result.stdout)["services"]
    for name in services:
        assert merged[name]["volumes"] == merged["worker"]["volumes"]
        assert merged[name]["environment"]["CNNSERVE_REDIS_URL"] == "redis://redis:6379/0"
