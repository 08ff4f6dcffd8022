"""The baseline: training as d2l 1.0.3 does it, for side-by-side timing with cnnserve's engine.

Faithful to `d2l.FashionMNIST` and `d2l.Trainer`: torchvision's `FashionMNIST` dataset with
`Resize` + `ToTensor`, a `DataLoader` with 4 workers, each batch moved to the device, the
loss read back to the host every batch (d2l's plotting does this), plain SGD, validation on
the test set every epoch.
"""

from __future__ import annotations

import gzip
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from models import build_model

FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclass
class D2LResult:
    """Per-epoch timings and metrics of one d2l-way run."""

    epoch_seconds: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    images_per_epoch: int = 0


def torchvision_root(fashion_mnist_dir: Path) -> Path:
    """A temporary torchvision dataset root holding the unpacked IDX files (no download)."""
    root = Path(tempfile.mkdtemp(prefix="cnnserve-d2l-"))
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in FILES:
        with (
            gzip.open(fashion_mnist_dir / f"{name}.gz", "rb") as src,
            (raw / name).open("wb") as dst,
        ):
            shutil.copyfileobj(src, dst)
    return root


def train_d2l_way(
    model_name: str,
    *,
    fashion_mnist_dir: Path,
    epochs: int,
    batch_size: int = 128,
    lr: float | None = None,
    input_size: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    train_limit: int | None = None,
    train_indices: Sequence[int] | None = None,
    val_limit: int | None = None,
    num_workers: int = 4,
) -> D2LResult:
    """Train `model_name` the d2l way and time each epoch (training and validation).

    d2l itself always trains on all 60,000 images and validates on all 10,000. For short runs
    `train_indices` (the very examples cnnserve's engine picks for the same `train_limit` and
    seed) or else `train_limit` (the first N) narrows the training set, and `val_limit`
    validates on the first N test images, as the benchmark does for both ways.
    """
    from models import get_model_entry

    entry = get_model_entry(model_name)
    size = input_size or entry.input_size
    lr = lr or entry.lr
    torch.manual_seed(seed)
    root = torchvision_root(fashion_mnist_dir)
    try:
        trans = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])
        train: torch.utils.data.Dataset[tuple[torch.Tensor, int]] = datasets.FashionMNIST(
            root=str(root), train=True, transform=trans, download=False
        )
        val = datasets.FashionMNIST(root=str(root), train=False, transform=trans, download=False)
        if train_indices is not None:
            train = Subset(train, list(train_indices))
        elif train_limit:
            train = Subset(train, range(train_limit))
        if val_limit:
            val = Subset(val, range(min(val_limit, len(val))))
        train_loader = DataLoader(train, batch_size, shuffle=True, num_workers=num_workers)
        val_loader = DataLoader(val, batch_size, shuffle=False, num_workers=num_workers)
        dev = torch.device(device)
        model = build_model(model_name, input_size=size).to(dev)
        optim = torch.optim.SGD(model.parameters(), lr=lr)
        result = D2LResult(images_per_epoch=len(train))  # type: ignore[arg-type]
        for _ in range(epochs):
            start = time.perf_counter()
            model.train()
            losses = []
            for x, y in train_loader:
                x, y = x.to(dev), y.to(dev)
                loss = F.cross_entropy(model(x), y)
                losses.append(loss.item())  # d2l's plot reads every batch's loss back
                optim.zero_grad()
                with torch.no_grad():
                    loss.backward()
                    optim.step()
            model.eval()
            correct, total = 0.0, 0
            for x, y in val_loader:
                with torch.no_grad():
                    x, y = x.to(dev), y.to(dev)
                    y_hat = model(x)
                    F.cross_entropy(y_hat, y).item()
                    correct += float((y_hat.argmax(1) == y).float().sum().item())
                    total += len(y)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            result.epoch_seconds.append(time.perf_counter() - start)
            result.train_loss.append(sum(losses) / max(len(losses), 1))
            result.val_acc.append(correct / total)
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)


__all__ = ["D2LResult", "train_d2l_way"]
