"""Run README.md's walkthrough, command by command, against a real `cnnserve up`.

The commands are the ```sh blocks of the Walkthrough section, in order; each must succeed and
print what the ```text block after it shows. The only changes made to them: the port (a free
one instead of 8000), the Python that writes the sample image (this test's interpreter) and the
Fashion-MNIST directory. Shell variables a command sets (`JOB=...`) carry over to the next.
With $CNNSERVE_SCREENSHOTS set, the comparison plot the run drew is copied there, with the
sweep's leaderboard as text (the README shows docs/screenshots/compare.png from such a run).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.cli.stack import free_port
from tests.deploy.readme import output_mismatch, walkthrough_steps
from tests.deploy.stack_helpers import FASHION_MNIST_DIR, running_stack, stack_env

STEP_TIMEOUT = 300.0
ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=", re.MULTILINE)


def _adapt(command: str, port: int) -> str:
    return (
        command.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        .replace(".venv/bin/python", sys.executable)
        .replace(".venv/bin/cnnserve", str(Path(sys.executable).with_name("cnnserve")))
        .replace("/usr/share/datasets/fashion-mnist", FASHION_MNIST_DIR)
    )


def _run_step(command: str, workdir: Path, state: Path) -> subprocess.CompletedProcess[str]:
    saves = "".join(
        f"declare -p {name} >> {state}\n" for name in dict.fromkeys(ASSIGNMENT.findall(command))
    )
    script = f"set -eo pipefail\n[ -f {state} ] && source {state}\n{command}\n{saves}"
    return subprocess.run(
        ["bash", "-c", script],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT,
        check=False,
    )


def _check_beyond_the_text(command: str, stdout: str, workdir: Path) -> None:
    """What the README says in prose about a step's result, checked on the real output."""
    if "JOB=$(" in command:
        assert re.fullmatch(r"[A-Za-z0-9_-]+\n", stdout), f"not a job id: {stdout!r}"
    if "/events" in command:
        assert stdout.count("event: epoch") == 2
        assert stdout.rstrip().splitlines()[-1].startswith('data: {"status": "succeeded"')
    for picture in ("curves.png", "compare.png", "confusion.png", "why.png"):
        if f"-o {picture}" in command:
            assert (workdir / picture).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    if "/predict" in command:
        answer = json.loads(stdout)
        assert len(answer["predictions"]) == 1
        prediction = answer["predictions"][0]
        assert len(prediction["top_k"]) == 3
        assert prediction["top_k"][0]["label"] == prediction["label"]
        assert 0.0 < prediction["probability"] <= 1.0


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_readme_walkthrough_runs_as_written(tmp_path: Path) -> None:
    # the comparison continues on the walkthrough's stack, as the README says
    steps = walkthrough_steps() + walkthrough_steps("Compare the book's networks")
    assert steps, "README.md's walkthrough has no ```sh blocks"
    port = free_port()
    workdir = tmp_path / "work"
    workdir.mkdir()
    env = stack_env(tmp_path / "data", f"redis://127.0.0.1:{free_port()}/0")
    state = tmp_path / "state.sh"
    pictures = os.environ.get("CNNSERVE_SCREENSHOTS")
    with running_stack(tmp_path, env, port) as stack:
        stack.wait_up()
        for number, step in enumerate(steps, start=1):
            command = _adapt(step.command, port)
            result = _run_step(command, workdir, state)
            where = f"walkthrough step {number}:\n{command}\n--- stdout:\n{result.stdout[-3000:]}"
            assert result.returncode == 0, f"{where}\n--- stderr:\n{result.stderr[-3000:]}"
            assert step.expected is not None
            mismatch = output_mismatch(step.expected, result.stdout)
            assert mismatch is None, f"{where}\n--- README expects:\n{step.expected}\n{mismatch}"
            _check_beyond_the_text(command, result.stdout, workdir)
            if pictures and " sweep " in command:  # the table beside the picture
                (Path(pictures) / "compare-leaderboard.txt").write_text(result.stdout)
    if pictures:
        shutil.copy(workdir / "compare.png", Path(pictures) / "compare.png")
