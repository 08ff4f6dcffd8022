"""Catalogue-style product photos made from Fashion-MNIST test images, and their accuracy.

Fashion-MNIST was made from Zalando's product photos (a garment on a light background, margins,
non-square, colour, JPEG); `catalogue_photo` runs that backwards on a test image: the garment
dark on white, upscaled to hundreds of pixels, tinted, set off-centre on a larger canvas and
saved as JPEG. `python -m bench photos` classifies a few hundred such photos and the raw test
PNGs of the same images with one checkpoint over HTTP-free inference (the server's own
preprocessing and model), with `preprocess=auto` (Fashion-MNIST's conversion) and `none`.

    python -m bench photos [--checkpoint ID --data-dir DIR] [--images 300]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

logger = logging.getLogger(__name__)


def catalogue_photo(image: np.ndarray, seed: int) -> bytes:
    """A 28×28 Fashion-MNIST image as a product photo: JPEG, colour, hundreds of pixels."""
    rng = np.random.default_rng(seed)
    garment = 255 - image  # dark garment on a white background, as photographed
    scale = int(rng.integers(10, 17))
    side = 28 * scale
    big = Image.fromarray(garment).resize((side, side), Image.Resampling.BICUBIC)
    big = big.filter(ImageFilter.GaussianBlur(radius=scale / 4))  # a photo, not pixel blocks
    # colour the garment without changing its luminance: the data set's images are the
    # photos' luma, so this is the same garment, photographed in colour
    luma = np.array([0.299, 0.587, 0.114])
    hue = rng.normal(size=3)
    hue -= luma * (hue @ luma) / (luma @ luma)  # no luma component
    hue *= rng.uniform(30, 70) / np.abs(hue).max()
    paper = rng.integers(244, 256, 3).astype(np.float64)  # the studio's off-white
    gray = np.asarray(big, dtype=np.float64)[..., None]
    garment = 1 - gray / 255.0  # 1 on the garment, 0 on the background
    rgb = gray / 255.0 * paper + garment * hue[None, None, :]
    noise = rng.normal(0, 2.0, size=rgb.shape)
    rgb = np.clip(rgb + noise, 0, 255).astype(np.uint8)
    width = side + int(rng.integers(side // 5, side // 2))
    height = side + int(rng.integers(side // 3, side))  # portrait, as catalogue shots are
    canvas = Image.new("RGB", (width, height), tuple(int(c) for c in paper))
    left = int(rng.integers(0, width - side + 1))
    top = int(rng.integers(0, height - side + 1))
    canvas.paste(Image.fromarray(rgb, "RGB"), (left, top))
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=int(rng.integers(80, 95)))
    return buf.getvalue()


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def accuracy(classify: Any, blobs: list[bytes], labels: np.ndarray, batch: int = 64) -> float:
    """The share of `blobs` that `classify(list of bytes) -> class ids` gets right."""
    predicted: list[int] = []
    for i in range(0, len(blobs), batch):
        predicted.extend(int(c) for c in classify(blobs[i : i + batch]))
    return float(np.mean(np.asarray(predicted) == labels[: len(predicted)]))


def local_classifier(store_root: Path, checkpoint: str, mode: str) -> Any:
    """Classify encoded images as the server does: its decoding, preprocessing and model."""
    from bench.stores import open_store
    from service.inference.backends import load_for_inference
    from service.inference.images import decode_image
    from workers.preprocessing import Transform

    store = open_store(store_root)
    loaded = load_for_inference(store, checkpoint, backend="auto", threads=2)
    transform = Transform(loaded.manifest.preprocessing)

    def classify(blobs: list[bytes]) -> np.ndarray:
        arrays = [decode_image(b, max_pixels=4096 * 4096) for b in blobs]
        native = np.stack([transform.native(a, "auto", mode) for a in arrays])  # type: ignore[arg-type]
        return loaded.run(transform.scale(native)).argmax(axis=1)

    return classify


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench photos", description=__doc__)
    parser.add_argument("--data-dir", type=Path, required=True, help="CNNSERVE_DATA_DIR")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint id or alias")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from bench.stores import open_store
    from workers.settings import Settings
    from workers.training.data import load_fashion_mnist

    data = load_fashion_mnist(Settings(data_dir=args.data_dir))
    images = data.test_images[: args.images].numpy()
    labels = data.test_labels[: args.images].numpy()
    root = args.data_dir / "checkpoints"
    ckpt = open_store(root).resolve(args.checkpoint)  # indexed in CNNSERVE_REDIS_URL
    raw = [png(im) for im in images]
    photos = [catalogue_photo(im, seed=i) for i, im in enumerate(images)]
    result = {
        "checkpoint": ckpt,
        "images": len(images),
        "raw_png": accuracy(local_classifier(root, ckpt, "auto"), raw, labels),
        "photos_auto": accuracy(local_classifier(root, ckpt, "auto"), photos, labels),
        "photos_none": accuracy(local_classifier(root, ckpt, "none"), photos, labels),
    }
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0
