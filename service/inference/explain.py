"""Explanations of predictions: Integrated Gradients (Captum) on the 28×28 input, and heatmaps.

Attributions are taken on the network's class score (the logit) of the predicted class, from a
black baseline (Fashion-MNIST's background) to the image, with the network's own resize inside
the path, so each of the 784 input pixels gets its share of the score. The heatmap draws
positive attribution in red and negative in blue over the preprocessed input the network saw.
"""

from __future__ import annotations

import io
import time

import numpy as np
import torch
from captum.attr import IntegratedGradients
from PIL import Image, ImageDraw, ImageFont

from service.errors import ServiceUnavailableError
from service.inference.backends import InferenceNet

METHOD = "integrated_gradients"
#: Each panel of a heatmap: the 28×28 input at this many screen pixels per input pixel.
PANEL_SCALE = 8
CAPTION_HEIGHT = 22


def attribute(
    module: InferenceNet,
    x: np.ndarray,
    targets: np.ndarray,
    *,
    steps: int,
    deadline: float,
) -> np.ndarray:
    """Integrated Gradients of each image's target class score: N×28×28 float32.

    One image at a time, so a request that would run past `deadline` (a `time.monotonic()`
    value) stops with a 503 that says how to ask for less.
    """
    ig = IntegratedGradients(module.logits)
    out = np.zeros((len(x), x.shape[-2], x.shape[-1]), dtype=np.float32)
    for i in range(len(x)):
        if time.monotonic() > deadline:
            raise ServiceUnavailableError(
                f"explaining took longer than this server allows; {i} of {len(x)} images were "
                "done: send fewer images per request, or ask for a smaller checkpoint",
                headers={"Retry-After": "1"},
            )
        image = torch.from_numpy(np.ascontiguousarray(x[i : i + 1], dtype=np.float32))
        attr = ig.attribute(
            image,
            baselines=torch.zeros_like(image),
            target=int(targets[i]),
            n_steps=steps,
            internal_batch_size=steps,
        )
        out[i] = attr.detach().numpy()[0, 0]
    return out


def _panel(image: np.ndarray, attribution: np.ndarray, caption: str) -> Image.Image:
    gray = np.clip(image, 0.0, 1.0)[..., None].repeat(3, axis=2)
    peak = float(np.abs(attribution).max()) or 1.0
    a = (attribution / peak)[..., None]
    red, blue = np.array([1.0, 0.1, 0.1]), np.array([0.1, 0.3, 1.0])
    color = np.where(a >= 0, red, blue)
    alpha = 0.75 * np.abs(a)
    rgb = (gray * (1 - alpha) + color * alpha) * 255
    side = image.shape[0] * PANEL_SCALE
    panel = Image.new("RGB", (side, side + CAPTION_HEIGHT), (255, 255, 255))
    picture = Image.fromarray(rgb.round().astype(np.uint8), "RGB")
    panel.paste(picture.resize((side, side), Image.Resampling.NEAREST), (0, 0))
    draw = ImageDraw.Draw(panel)
    draw.text((4, side + 3), caption, fill=(0, 0, 0), font=ImageFont.load_default(size=14))
    return panel


def heatmap_png(images: np.ndarray, attributions: np.ndarray, captions: list[str]) -> bytes:
    """One panel per image, side by side: the input in gray, attribution in red and blue."""
    panels = [_panel(images[i, 0], attributions[i], captions[i]) for i in range(len(images))]
    width = sum(p.width for p in panels) + 4 * (len(panels) - 1)
    sheet = Image.new("RGB", (width, panels[0].height), (255, 255, 255))
    left = 0
    for p in panels:
        sheet.paste(p, (left, 0))
        left += p.width + 4
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    return buf.getvalue()
