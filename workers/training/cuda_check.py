"""Can a worker train on a CUDA GPU here? The driver, the CUDA PyTorch was built for, and why not.

A worker started with `--device cuda` must either train on the GPU or refuse to start, saying
what is wrong and what to do: no NVIDIA driver visible (a container started without the NVIDIA
Container Toolkit), a driver too old for the CUDA that this PyTorch build carries, or a CPU-only
PyTorch. The driver is read the way `nvidia-smi` reads it (NVML for its version, the CUDA
driver API for the newest CUDA it supports), with ctypes, so that this works before and
without torch initialising CUDA.

CUDA's minor-version compatibility lets a build for CUDA 12.x run on any driver for CUDA 12.0
or newer (525.60.13+), and likewise for 13.x (580+): what matters is the major version.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

#: The oldest Linux driver for each CUDA major version (minor-version compatibility).
MIN_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}
#: PyTorch's wheel index for a driver of each CUDA major version (README: "CUDA and the driver").
WHEEL_INDEX_FOR = {12: "https://download.pytorch.org/whl/cu126"}


@dataclass(frozen=True)
class Driver:
    """The NVIDIA driver this process can see."""

    #: e.g. "535.104.05" (NVML), or None when NVML is not there.
    version: str | None
    #: The newest CUDA the driver supports, e.g. (12, 2), or None without libcuda.
    cuda: tuple[int, int] | None
    #: Why neither could be read, when neither could.
    error: str | None = None

    @property
    def visible(self) -> bool:
        return self.version is not None or self.cuda is not None

    def describe(self) -> str:
        cuda = f"CUDA {self.cuda[0]}.{self.cuda[1]}" if self.cuda else "CUDA version unknown"
        return f"{self.version or 'unknown version'} ({cuda})"


def read_driver() -> Driver:
    """The driver's version (NVML) and the CUDA version it supports (libcuda), if visible."""
    version: str | None = None
    cuda: tuple[int, int] | None = None
    errors = []
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() == 0:
            buffer = ctypes.create_string_buffer(96)
            if nvml.nvmlSystemGetDriverVersion(buffer, 96) == 0:
                version = buffer.value.decode()
            nvml.nvmlShutdown()
    except OSError as exc:
        errors.append(str(exc))
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
        number = ctypes.c_int(0)
        if libcuda.cuDriverGetVersion(ctypes.byref(number)) == 0 and number.value > 0:
            cuda = (number.value // 1000, number.value % 1000 // 10)
    except OSError as exc:
        errors.append(str(exc))
    error = None if version or cuda else "; ".join(errors) or "no NVIDIA driver answered"
    return Driver(version, cuda, error)


def _cuda_of(build: str) -> tuple[int, int]:
    major, _, minor = build.partition(".")
    return int(major), int(minor.partition(".")[0] or 0)


def cuda_problem(
    device: str,
    *,
    torch_version: str,
    torch_cuda: str | None,
    driver: Driver,
    available: bool,
    gpu_count: int,
    torch_reason: str | None = None,
) -> str | None:
    """Why a worker cannot train on `device` (`cuda` or `cuda:N`) here, with the fix; or None."""
    if torch_cuda is None:
        return (
            f"this PyTorch ({torch_version}) is a CPU-only build. Fix: install a CUDA build of "
            "torch (for the Docker image: build it without CNNSERVE_TORCH_INDEX_URL pointing "
            "at the cpu index), or start the worker with --device cpu"
        )
    major, minor = _cuda_of(torch_cuda)
    need = MIN_DRIVER.get(major, f"one for CUDA {major}.{minor}")
    requirement = (
        f"PyTorch {torch_version} is built for CUDA {torch_cuda} and needs an NVIDIA driver "
        f"{need} or newer"
    )
    if not driver.visible:
        return (
            f"no NVIDIA driver is visible here ({driver.error}); {requirement}. Fix: on a host "
            "with an NVIDIA GPU, its driver and the NVIDIA Container Toolkit, start the GPU "
            "worker with `docker compose -f docker-compose.yml -f docker-compose.gpu.yml up -d` "
            "(or `docker run --gpus all ...`); on a machine without a GPU, start the worker with "
            "--device cpu (or auto)"
        )
    if driver.cuda is not None and driver.cuda[0] < major:
        wheels = WHEEL_INDEX_FOR.get(driver.cuda[0])
        rebuild = (
            f"or rebuild the image for this driver: CNNSERVE_TORCH_INDEX_URL={wheels} in .env, "
            "then `docker compose build` (README: CUDA and the driver)"
            if wheels
            else "or build the image with a PyTorch wheel index for this driver's CUDA "
            "(CNNSERVE_TORCH_INDEX_URL; README: CUDA and the driver)"
        )
        return (
            f"the NVIDIA driver here is {driver.describe()}, too old: {requirement}. "
            f"Fix: upgrade the host's NVIDIA driver to {need} or newer, {rebuild}"
        )
    if not available:
        return (
            f"PyTorch cannot use a GPU here although the NVIDIA driver {driver.describe()} is "
            f"visible ({torch_reason or 'torch.cuda.is_available() is False'}); {requirement}. "
            "Fix: check that the GPU is passed to this container or process "
            "(NVIDIA_VISIBLE_DEVICES, CUDA_VISIBLE_DEVICES) and that `nvidia-smi` works here"
        )
    index = int(device.partition(":")[2] or 0)
    if index >= gpu_count:
        return (
            f"{device} asked for, but PyTorch sees {gpu_count} GPU(s) here "
            f"(cuda:0 to cuda:{gpu_count - 1}). Fix: start the worker with a device among them"
        )
    return None


def worker_cuda_problem(device: str) -> str | None:
    """`cuda_problem` for this process, read from the driver and the installed torch."""
    import warnings

    import torch

    driver = read_driver()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    reason = "; ".join(str(w.message).strip() for w in caught) or None
    return cuda_problem(
        device,
        torch_version=torch.__version__,
        torch_cuda=torch.version.cuda,
        driver=driver,
        available=available,
        gpu_count=torch.cuda.device_count() if available else 0,
        torch_reason=reason,
    )
