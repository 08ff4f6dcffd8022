"""The GPU window's script, proven on the CPU in a virtual environment like the device's.

A lent GPU window comes once and is short; a missing package would waste it in its first
seconds. So the window runs here first, under the device's conditions as far as a CPU allows:

- a fresh venv that holds only the packages of the device image's list
  (`bench/device/image-packages.txt`) that this machine has, linked from the project's venv,
  and nothing else: no pydantic, Celery, redis or limits, which the device image lacks;
- the wheels `bench/device/prepare.sh` packs for the device, installed by `run.sh` as there;
- `run.sh` with DRY_RUN=1: every step of the plan, with `pytest --collect-only` for the GPU
  tests and `bench train --dry-run` (imports and arguments, no training) for the runs.

What differs, and why it does not matter here: the device has Python 3.12 and torch 2.11, this
machine 3.11 and torch 2.14.1 (no other torch is on this disk, and a download is gigabytes), so
prepare.sh packs the same packages for 3.11 (PY_VERSION) and the venv links this machine's
torch. What the window's code needs from torch is older than both (CUDA graphs, autocast,
`torch._C._cuda_clearCublasWorkspaces`), and the wheels are installed with `--no-deps`, so
nothing carried can pull in or replace the device's torch.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from models import list_models

ROOT = Path(__file__).resolve().parents[2]
DEVICE_PACKAGES = ROOT / "bench" / "device" / "image-packages.txt"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def device_packages() -> dict[str, str | None]:
    """The device image's packages (normalised names) and the versions the list gives."""
    out: dict[str, str | None] = {}
    for line in DEVICE_PACKAGES.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            out[_norm(name)] = version or None
    return out


def link_device_packages(site: Path) -> set[str]:
    """Link into `site` every distribution of this venv that the device image also has."""
    wanted = device_packages()
    linked = set()
    for dist in importlib.metadata.distributions():
        name = _norm(dist.metadata["Name"])
        if name not in wanted or name in linked:
            continue
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            source = Path(str(dist.locate_file(top)))
            target = site / top
            if source.exists() and not target.exists():
                target.symlink_to(source)
        linked.add(name)
    return linked


def test_the_device_list_names_what_the_device_image_holds() -> None:
    packages = device_packages()
    assert packages["torch"] == "2.11.0" and packages["torchvision"] == "0.26.0"
    # what the window needs beyond the image: the reason prepare.sh carries wheels
    for missing in ("pydantic", "pydantic-settings", "celery", "redis", "limits", "fastapi"):
        assert missing not in packages


def test_the_window_imports_and_collects_in_a_venv_like_the_devices(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    linked = link_device_packages(venv / "lib" / version / "site-packages")
    assert {"torch", "numpy", "safetensors", "pytest"} <= linked
    assert not linked & {"pydantic", "celery", "redis", "limits"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CNNSERVE_", "PYTHON"))}

    # as bare as the device: the window's code cannot even import its settings
    bare = subprocess.run(
        [str(python), "-c", "import workers.settings"],
        cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert bare.returncode != 0 and "No module named" in bare.stderr

    pack = tmp_path / "device"
    done = subprocess.run(
        ["bash", "bench/device/prepare.sh"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
        env={**env, "DEST": str(pack), "PY_VERSION": version.removeprefix("python"),
             "PYTHON": sys.executable},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert any(pack.glob("whl/limits-*.whl")) and any(pack.glob("whl/deprecated-*.whl"))

    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", "bench/device/run.sh"],
        cwd=ROOT, capture_output=True, text=True, timeout=480, check=False,
        env={**env, "DRY_RUN": "1", "PYTHON": str(python), "OUT": str(out),
             "DEVICE_DIR": str(pack), "SITE_DIR": str(tmp_path / "site")},
    )  # fmt: skip
    window = json.loads((out / "window.json").read_text())
    log = (out / "window.log").read_text()
    assert done.returncode == 0, log[-6000:]
    assert window["dry_run"] is True and window["budget_s"] <= 480  # 8 minutes at most

    steps = {s["name"]: s for s in window["steps"]}
    assert all(s["status"] == "ok" for s in steps.values()), steps
    # the seed's three first, then every registered network, from the registry
    models = [n for n in steps if n not in ("env", "gpu-tests")]
    assert models[:3] == ["lenet", "vgg", "resnet18"]
    assert sorted(models) == sorted(list_models())
    assert window["env"]["torch"] and window["env"]["cuda_available"] is False

    # the GPU tests collect; `gpu and not slow` leaves the compile test out
    collected = window["gpu_tests"]["collected"]
    assert any("test_sgd_steps_replay_from_a_cuda_graph" in t for t in collected), collected
    assert any("test_lenet_trains_in_bf16_on_the_gpu" in t for t in collected)
    assert not any("test_torch_compile_path" in t for t in collected)

    # every run's arguments hold: the seed's with and without the CUDA graph, 3 epochs, 1 seed
    for name in models:
        (run,) = window["train"][name]["plan"]
        seed = name in ("lenet", "vgg", "resnet18")
        assert run["ways"] == (["cnnserve", "cnnserve-eager"] if seed else ["cnnserve"])
        assert run["epochs"] == (3 if seed else 1) and run["seeds"] == [0]
        assert run["train_limit"] is None  # all 60,000 images, at the book's input size
    # every log lies in $OUT, and no more files than a window brings back
    assert "===== gpu-tests: ok" in log and (out / "gpu-tests.log").read_text()
    assert len([p for p in out.rglob("*") if p.is_file()]) <= 8
