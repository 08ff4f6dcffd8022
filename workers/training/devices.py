"""Which device a job trains on, in which precision, and giving its memory back."""

from __future__ import annotations

import gc
import re

import torch

from workers.errors import DeviceError
from workers.settings import DEVICE_PATTERN


def requested_device(spec_device: str, worker_device: str) -> str:
    """The device a worker should train a job on: the spec's, or the worker's for `auto`."""
    if spec_device == "auto":
        return worker_device
    if spec_device == "cuda" and worker_device.startswith("cuda:"):
        return worker_device
    return spec_device


def resolve_device(request: str) -> torch.device:
    """A torch device for `auto`, `cpu`, `cuda` or `cuda:N`; a clear error if there is none."""
    if not re.fullmatch(DEVICE_PATTERN, request):
        raise DeviceError(f"unknown device {request!r}; use auto, cpu, cuda or cuda:N")
    if request == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if request == "cpu":
        return torch.device("cpu")
    # cuda or cuda:N
    if not torch.cuda.is_available():
        raise DeviceError(
            f"the job asks for device {request!r} but this worker has no usable CUDA GPU; "
            "submit it with device 'auto' or 'cpu', or start a worker on a GPU machine "
            "(`cnnserve worker --device cuda`)"
        )
    index = int(request.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(
            f"the job asks for {request!r} but this worker has {count} GPU(s) "
            f"(cuda:0 to cuda:{count - 1})"
        )
    return torch.device("cuda", index)


def describe_device(request: str) -> dict[str, str]:
    """What a worker for `request` trains on: `device` (`cpu`, `cuda:N`) and the GPU's name.

    Its heartbeat carries this, so `/readyz` and the dashboard show each worker's device.
    """
    try:
        device = resolve_device(request)
    except DeviceError as exc:
        return {"device": request, "problem": str(exc)}
    if device.type == "cuda":
        return {"device": str(device), "gpu": torch.cuda.get_device_name(device)}
    return {"device": "cpu"}


def prepare_device(request: str, precision: str) -> tuple[torch.device, torch.dtype | None]:
    """The device a run trains on, made current, and the autocast dtype for `precision`.

    `cuda:N` becomes the current device first, so what asks "the current device" (bf16
    support, CUDA graph capture, streams) asks about GPU N, not GPU 0.
    """
    device = resolve_device(request)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device, resolve_precision(precision, device)


def wait_for_device(device: torch.device) -> None:
    """Wait until the device has run every kernel queued on it so far (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting on a device (None: plain fp32)."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        has_bf16 = torch.cuda.is_bf16_supported()
        if precision == "bf16" and not has_bf16:
            raise DeviceError(f"{device} has no bf16 support; submit the job with precision fp32")
        return torch.bfloat16 if has_bf16 else None
    return torch.bfloat16 if precision == "bf16" else None


def release_memory(device: torch.device | str) -> None:
    """Collect garbage and hand cached GPU memory back to the driver."""
    gc.collect()
    if torch.device(device).type == "cuda" and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
