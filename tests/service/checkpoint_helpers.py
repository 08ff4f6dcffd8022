"""Helpers for checkpoint and predict tests: real Fashion-MNIST, a briefly trained LeNet, PNGs."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import struct
import zlib
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from models import build_model
from workers.store.checkpoint_upgrade import index_earlier_store
from workers.store.checkpoints import CheckpointStore, Manifest, Preprocessing

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
#: A manifest as cnnserve's first version wrote it (fields since dropped or made real).
FIRST_MANIFEST = Path(__file__).with_name("manifest_first_version.json")
JOB_A = "0123456789abcdef"
JOB_B = "fedcba9876543210"


def _idx(name: str) -> np.ndarray:
    raw = gzip.decompress((FASHION_MNIST / name).read_bytes())
    if raw[2] == 0x08 and raw[3] == 3:
        n, h, w = struct.unpack(">III", raw[4:16])
        return np.frombuffer(raw, np.uint8, offset=16).reshape(n, h, w).copy()
    return np.frombuffer(raw, np.uint8, offset=8).copy()


@lru_cache
def fashion_test_set() -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's 10,000 test images (uint8 N×28×28) and labels."""
    return _idx("t10k-images-idx3-ubyte.gz"), _idx("t10k-labels-idx1-ubyte.gz")


@lru_cache
def trained_lenet_state(steps: int = 60) -> dict[str, torch.Tensor]:
    """A LeNet trained for a few seconds on real training images (far above chance)."""
    images = _idx("train-images-idx3-ubyte.gz")[: steps * 64]
    labels = _idx("train-labels-idx1-ubyte.gz")[: steps * 64]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        model = build_model("lenet")
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        x = torch.from_numpy(images).float().div(255).unsqueeze(1)
        y = torch.from_numpy(labels.astype(np.int64))
        for i in range(steps):
            sl = slice(i * 64, (i + 1) * 64)
            opt.zero_grad()
            F.cross_entropy(model(x[sl]), y[sl]).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def lenet(input_size: int = 28, trained: bool = True) -> nn.Module:
    """A LeNet for `input_size` inputs, trained briefly (28×28 only) or freshly initialised."""
    torch.manual_seed(1)
    model = build_model("lenet", input_size=input_size)
    if trained and input_size == 28:
        model.load_state_dict(trained_lenet_state())
    return model.eval()


def save(
    store: CheckpointStore,
    model: nn.Module,
    *,
    job_id: str = JOB_A,
    epoch: int = 1,
    name: str = "lenet",
    input_size: int = 28,
    val_acc: float = 0.7,
    owner: str | None = None,
) -> Manifest:
    """Save a checkpoint as the training engine does (manifest with preprocessing), as a job
    of `owner`'s (a principal) would."""
    saved = store.save(
        job_id=job_id,
        epoch=epoch,
        model=model,
        manifest_fields={
            "model": name,
            "input_size": input_size,
            "preprocessing": Preprocessing(resize=input_size),
            "metrics": {"train_loss": 0.8, "val_loss": 0.7, "val_acc": val_acc},
            "spec": {"model": name, "epochs": epoch},
            "owner": owner,
        },
        keep=10,
    )
    return saved.manifest


def damage(
    store: CheckpointStore, ckpt_id: str, name: str, change: Callable[[bytes], bytes]
) -> None:
    """Rewrite one of a checkpoint's files in its store (a directory or a bucket) behind the
    store's back; with a bucket, this host's verified copies are dropped too, as on a host that
    has not read it yet."""
    job, _, epoch = ckpt_id.partition("-")
    key = f"{job}/{epoch}/{name}"
    store.blobs.put_bytes(key, change(store.blobs.get_bytes(key)))
    if store.cache is not None:
        shutil.rmtree(store.cache.root, ignore_errors=True)


def png(arr: np.ndarray) -> bytes:
    """A grayscale (or RGB) uint8 array as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def encode(arr: np.ndarray, fmt: str) -> bytes:
    """An array in a given Pillow format (WebP lossless)."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


def huge_png_header(width: int = 20000, height: int = 20000) -> bytes:
    """A tiny PNG whose header declares width×height pixels (costs nothing to make)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    # one compressed row of zeros; a decoder would need 400 MB to expand the rest
    idat = zlib.compress(b"\x00" * (width + 1))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC."""
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def text_bomb_png(chunks: int = 64, text_bytes: int = 1_000_000) -> bytes:
    """A 1×1 PNG carrying `chunks` zTXt chunks of `text_bytes` each, compressed: about 1 KB
    apiece (64 MB of text in a 64 KB file by default, within Pillow's own limits)."""
    one = png(np.zeros((1, 1), np.uint8))
    text = png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"\x00" * text_bytes, 9))
    return one[:33] + text * chunks + one[33:]  # after IHDR: read when the file is opened


def flat_png(side: int, colour: tuple[int, int, int] = (200, 40, 30)) -> bytes:
    """A side×side RGB PNG of one colour (a few KB for millions of pixels)."""
    return png(np.broadcast_to(np.asarray(colour, np.uint8), (side, side, 3)).copy())


def reference_probs(model: nn.Module, images: np.ndarray, input_size: int = 28) -> np.ndarray:
    """What training's pipeline feeds the model: x·(1/255), on-device bilinear resize."""
    x = torch.from_numpy(images).unsqueeze(1).to(torch.float32).mul_(1 / 255)
    if input_size != 28:
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", antialias=False)
    with torch.no_grad():
        return torch.softmax(model(x), dim=1).numpy()


def as_first_version_wrote_it(store: CheckpointStore, manifest: Manifest) -> None:
    """Rewrite a saved checkpoint's manifest as cnnserve's first version wrote manifests
    (`FIRST_MANIFEST`), keeping its id, epoch and weights."""
    earlier = json.loads(FIRST_MANIFEST.read_text())
    earlier.update(
        id=manifest.id,
        job_id=manifest.job_id,
        epoch=manifest.epoch,
        weights_sha256=manifest.weights_sha256,
    )
    key = f"{manifest.job_id}/e{manifest.epoch:03d}/manifest.json"
    store.blobs.put_bytes(key, json.dumps(earlier, indent=2).encode())
    # as that version left its store: nothing in the Redis index until the upgrade files it
    store.index.unfile(manifest.id, manifest.job_id)
    store.index.r.delete(store.index.indexed_key(store.location))
    filed = index_earlier_store(store)
    assert filed >= 1, filed
