"""What the confusion matrix costs a validation pass: `python -m bench confusion`.

The engine's validation (`workers.training.validation.Tally`: loss and the 10×10 matrix on
the device)
against the pass as it was before the matrix (loss and a count of correct predictions), over
all 10,000 test images with a freshly initialised network, in interleaved rounds in one
process; the ratio of the medians is the matrix's cost.

    python -m bench confusion [--models lenet,resnet18] [--rounds 7] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.infer import machine_info
from models import build_model, get_model_entry
from workers.preprocessing import Transform
from workers.settings import Settings
from workers.store.checkpoints import Preprocessing
from workers.training.data import load_fashion_mnist
from workers.training.validation import Tally, model_input

#: Validation batches hold about this many input pixels, as in the engine.
EVAL_PIXELS = 2**21


def _input(images: torch.Tensor, size: int) -> torch.Tensor:
    """Test images as the engine feeds them to a network of input side `size`."""
    return model_input(Transform(Preprocessing(resize=size)), images, True)


def _before(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, size: int, batch: int) -> float:
    """The validation pass without the matrix: summed loss and a count of hits."""
    loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.int64)
    for start in range(0, len(x), batch):
        logits = net(_input(x[start : start + batch], size))
        labels = y[start : start + batch]
        loss += F.cross_entropy(logits.float(), labels, reduction="sum")
        correct += (logits.argmax(dim=1) == labels).sum()
    return float(torch.stack([loss, correct.to(loss.dtype)]).tolist()[1])


def _after(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, size: int, batch: int) -> float:
    """The engine's validation pass: `Tally` with the confusion matrix."""
    tally = Tally(10, x.device)
    for start in range(0, len(x), batch):
        tally.add(net(_input(x[start : start + batch], size)), y[start : start + batch])
    return tally.scores().accuracy * len(x)


def measure(model: str, rounds: int, device: torch.device, data: Any) -> dict[str, Any]:
    size = get_model_entry(model).input_size if model == "lenet" else 32
    torch.manual_seed(0)
    net = build_model(model, input_size=size).to(device).eval()
    net.to(memory_format=torch.channels_last)
    x, y = data.test_images.to(device), data.test_labels.to(device)
    batch = max(1, min(256 if device.type == "cpu" else 2048, EVAL_PIXELS // size**2))
    times: dict[str, list[float]] = {"before": [], "after": []}
    with torch.inference_mode():
        hits = {"before": _before(net, x, y, size, batch), "after": _after(net, x, y, size, batch)}
        for _ in range(rounds):
            for name, fn in (("before", _before), ("after", _after)):
                started = time.perf_counter()
                fn(net, x, y, size, batch)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - started)
    before, after = statistics.median(times["before"]), statistics.median(times["after"])
    return {
        "model": model,
        "input_size": size,
        "images": len(x),
        "before_s": round(before, 4),
        "after_s": round(after, 4),
        "overhead_pct": round(100 * (after / before - 1), 2),
        "same_hits": hits["before"] == hits["after"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench confusion", description=__doc__)
    parser.add_argument("--models", default="lenet,resnet18")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", type=Path, default=Path("docs/bench-confusion.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_fashion_mnist(Settings())
    device = torch.device(args.device)
    runs = [measure(m, args.rounds, device, data) for m in args.models.split(",")]
    report = {"benchmark": "confusion", "machine": machine_info(), "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for r in runs:
        sys.stdout.write(
            f"{r['model']} at {r['input_size']}px, {r['images']} images: {r['before_s']} s "
            f"without the matrix, {r['after_s']} s with it ({r['overhead_pct']:+.2f} %)\n"
        )
    return 0
