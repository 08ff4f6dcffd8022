"""`python -m bench window`: what one lent GPU window runs, each step under its own time limit.

A window is short (15 minutes of device time for the whole task, the machine's start included)
and comes once, so the plan is built to lose nothing:

1. `env`: torch, CUDA, the GPU and its driver, `nvidia-smi`.
2. `gpu-tests`: `pytest -m "gpu and not slow" -rA` over the test files that have GPU tests.
3. The seed's three networks (LeNet, VGG, ResNet-18) at the book's sizes on all 60,000 images:
   3 epochs, seed 0, with the CUDA graph and without (`--ways cnnserve,cnnserve-eager`).
4. Every other network in the model registry (`models.list_models()`, so the chapter-8
   networks appear here as they are registered), one epoch each at the book's size.

Every step's output is teed into `$OUT/window.log` (pytest's also into `gpu-tests.log`), and
`$OUT/window.json` is rewritten after every step and after every training run inside one
(`bench train` writes its report after each run); with `nvidia-smi.txt` these are the only
files the plan leaves in `$OUT` (a window brings back eight at most). The JSON holds the
steps, their limits, outcomes and durations, the GPU tests' outcomes, and each network's
report, with the reason whenever a run trained without its CUDA graph. The plan ends by
itself within `--budget` seconds (default 450): each step gets its own cap or what is left,
whichever is less, and a step that would get less than 15 s is recorded as skipped.
`--steps` reruns only the named steps.

`--dry-run` (the CPU check that the window will not fail for a missing package): the same
steps, but `pytest --collect-only` and `bench train --dry-run`, which import everything and
check every argument without training.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parents[1]
#: The seed's networks, first and with the CUDA-graph ablation.
SEED_MODELS = ("lenet", "vgg", "resnet18")
#: Seconds each step may take at most. Estimates on an H100 (the spec's eager figures: LeNet
#: 1.5 s, VGG 4.2 s, ResNet-18 6.2 s per epoch; ~10 s per process to import torch, load the
#: data and warm up): LeNet ~20 s, VGG ~40 s, ResNet-18 ~45 s for 3 graphed + 3 eager epochs;
#: a chapter-8 network ~20 s for one epoch. The caps leave about twice that.
CAPS_S = {"env": 30, "gpu-tests": 100, "lenet": 45, "vgg": 80, "resnet18": 90}
OTHER_MODEL_CAP_S = 40
DEFAULT_BUDGET_S = 450
MIN_STEP_S = 15
GPU_MARK = "pytest.mark.gpu"

ENV_SCRIPT = """
import json, platform, torch
from workers.training.cuda_check import read_driver
d = read_driver()
print(json.dumps({
    "python": platform.python_version(),
    "torch": torch.__version__,
    "torch_cuda": torch.version.cuda,
    "cuda_available": torch.cuda.is_available(),
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "driver": d.version,
    "driver_cuda": list(d.cuda) if d.cuda else None,
}))
"""


@dataclass
class Step:
    """One command of the plan, its cap, and what became of it."""

    name: str
    argv: list[str]
    cap_s: int
    #: The JSON report the command writes (`bench train --out`), merged as it grows.
    report: str | None = None
    timeout_s: float | None = None
    status: str = "pending"
    rc: int | None = None
    seconds: float | None = None


@dataclass
class Window:
    """The plan's state, as `window.json` has it."""

    dry_run: bool
    budget_s: int
    device: str
    started: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    steps: list[Step] = field(default_factory=list)
    env: dict[str, Any] = field(default_factory=dict)
    gpu_tests: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


def gpu_test_files(root: Path = ROOT) -> list[str]:
    """The test files that hold GPU tests (so collection needs nothing the others import)."""
    return sorted(
        str(path.relative_to(root))
        for path in (root / "tests").rglob("test_*.py")
        if GPU_MARK in path.read_text(errors="replace")
    )


def plan(
    python: str,
    device: str,
    parts: Path,
    data_dir: str | None,
    models: Sequence[str],
    dry_run: bool,
) -> list[Step]:
    """The window's steps in order: environment, GPU tests, the seed's networks, the rest."""
    pytest_args = ["-m", "gpu and not slow", "-p", "no:cacheprovider"]
    pytest_args += ["--collect-only", "-q"] if dry_run else ["-rA", "-q"]
    steps = [
        Step("env", [python, "-c", ENV_SCRIPT], CAPS_S["env"]),
        Step("gpu-tests", [python, "-m", "pytest", *pytest_args, *gpu_test_files()],
             CAPS_S["gpu-tests"]),
    ]  # fmt: skip
    common = ["--device", device, "--seeds", "0", "--batch-size", "128", "--no-doc", "--no-plot"]
    if data_dir:
        common += ["--fashion-mnist-dir", data_dir]
    if dry_run:
        common.append("--dry-run")
    for name in models:
        seed = name in SEED_MODELS
        ways = "cnnserve,cnnserve-eager" if seed else "cnnserve"
        report = str(parts / f"{name}.json")
        argv = [python, "-m", "bench", "train", "--models", name, "--ways", ways,
                "--epochs", "3" if seed else "1", "--out", report, *common]  # fmt: skip
        steps.append(Step(name, argv, CAPS_S.get(name, OTHER_MODEL_CAP_S), report=report))
    return steps


def ordered_models(registered: Sequence[str]) -> list[str]:
    """The seed's three first (those registered), then every other registered network."""
    return [m for m in SEED_MODELS if m in registered] + [
        m for m in registered if m not in SEED_MODELS
    ]


class Recorder:
    """Writes `window.json` whole after every change, and the combined log as lines arrive."""

    def __init__(self, window: Window, out: Path) -> None:
        self.window = window
        self.out = out
        self.log = (out / "window.log").open("a", buffering=1)
        self.lock = threading.Lock()

    def line(self, text: str, extra: TextIO | None = None) -> None:
        with self.lock:
            self.log.write(text)
            sys.stdout.write(text)
            sys.stdout.flush()
            if extra is not None:
                extra.write(text)

    def save(self) -> None:
        with self.lock:
            path = self.out / "window.json"
            tmp = path.with_name(".window.json.tmp")
            tmp.write_text(json.dumps(asdict(self.window), indent=2) + "\n")
            tmp.replace(path)

    def close(self) -> None:
        self.log.close()


def run_step(step: Step, timeout: float, rec: Recorder, env: dict[str, str]) -> None:
    """Run one step, teeing its output, merging its report as it grows; kill it at `timeout`."""
    step.timeout_s = round(timeout, 1)
    step.status = "running"
    rec.save()
    rec.line(f"\n===== {step.name} (limit {timeout:.0f} s): {' '.join(step.argv[:6])} ...\n")
    extra = (rec.out / "gpu-tests.log").open("w") if step.name == "gpu-tests" else None
    started = time.monotonic()
    proc = subprocess.Popen(
        step.argv,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
    )
    captured: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for text in proc.stdout:
            captured.append(text)
            rec.line(text, extra)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    seen = 0.0
    timed_out = False
    while proc.poll() is None:
        if time.monotonic() - started > timeout:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            break
        seen = merge_report(step, rec, seen)
        time.sleep(1)
    proc.wait()
    reader.join(timeout=10)
    if extra is not None:
        extra.close()
    step.seconds = round(time.monotonic() - started, 1)
    step.rc = proc.returncode
    step.status = "timed out" if timed_out else ("ok" if proc.returncode == 0 else "failed")
    merge_report(step, rec, 0.0)
    if step.name == "env" and step.status == "ok":
        last = [line for line in captured if line.startswith("{")]
        if last:
            rec.window.env.update(json.loads(last[-1]))
    if step.name == "gpu-tests":
        rec.window.gpu_tests = pytest_outcomes("".join(captured))
    rec.line(f"===== {step.name}: {step.status} in {step.seconds} s\n")
    rec.save()


def merge_report(step: Step, rec: Recorder, seen: float) -> float:
    """Copy the step's report into the window's when it changed since `seen` (its mtime)."""
    if step.report is None:
        return seen
    path = Path(step.report)
    try:
        mtime = path.stat().st_mtime
        if mtime == seen:
            return seen
        rec.window.train[step.name] = json.loads(path.read_text())
    except (OSError, ValueError):
        return seen
    rec.save()
    return mtime


def pytest_outcomes(output: str) -> dict[str, Any]:
    """The per-test outcomes of `-rA` (or the ids `--collect-only -q` lists) and the summary."""
    outcomes = dict(
        (m.group(2), m.group(1))
        for m in re.finditer(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+)", output, re.M)
    )
    collected = re.findall(r"^(tests/\S+::\S+)$", output, re.M)
    summary = [
        line for line in output.splitlines() if re.match(r"^=*\s*\d+ \w+.* in [\d.]+s", line)
    ]
    return {"outcomes": outcomes, "collected": collected, "summary": summary[-1:] or None}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench window",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "window-out")))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget", type=int, default=DEFAULT_BUDGET_S, help="seconds in all")
    parser.add_argument("--fashion-mnist-dir", default=os.environ.get("CNNSERVE_FASHION_MNIST_DIR"))
    parser.add_argument("--steps", default="", help="only these steps (comma-separated names)")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget

    from models import list_models

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    # each run's own report lies beside, not in $OUT: a window brings back 8 files at most
    parts = Path(tempfile.mkdtemp(prefix="cnnserve-window-"))
    steps = plan(
        sys.executable,
        args.device,
        parts,
        args.fashion_mnist_dir,
        ordered_models(list_models()),
        args.dry_run,
    )
    wanted = {s.strip() for s in args.steps.split(",") if s.strip()}
    unknown = wanted - {s.name for s in steps}
    if unknown:
        parser.error(f"--steps: no step named {sorted(unknown)}; steps: {[s.name for s in steps]}")
    window = Window(dry_run=args.dry_run, budget_s=args.budget, device=args.device, steps=steps)
    rec = Recorder(window, out)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(
            ["nvidia-smi"], capture_output=True, text=True, timeout=30, check=False
        )
        (out / "nvidia-smi.txt").write_text(smi.stdout + smi.stderr)
    rec.line(
        f"plan: {', '.join(f'{s.name} ({s.cap_s} s)' for s in steps)}; budget {args.budget} s\n"
    )
    try:
        for step in steps:
            if wanted and step.name not in wanted:
                step.status = "not asked for"
                continue
            left = deadline - time.monotonic()
            if left < MIN_STEP_S:
                step.status = f"skipped: {left:.0f} s of the budget left"
                rec.line(f"===== {step.name}: {step.status}\n")
                continue
            run_step(step, min(step.cap_s, left), rec, env)
    finally:
        rec.save()
        rec.close()
    failed = [s.name for s in steps if s.status not in ("ok", "not asked for")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
