"""How an image becomes a network's input: one callable built from a checkpoint's manifest.

torchvision's way (`Weights(transforms=...)`): the manifest's `preprocessing` names the steps
and `Transform(preprocessing)` does them, for training's validation and evaluation, `/v1`
predict, `/v2` infer and explain alike, so that what a network is served cannot drift from what
it learned on. Fashion-MNIST is 28×28 uint8, light on black; the steps:

1. `native` (inference only: training's images are native already): a decoded image, gray or
   RGB of any size, as the 28×28 uint8 image Fashion-MNIST would hold.
   - Larger than 28×28 (by default: the manifest's `photos: fashion-mnist`, a request's
     `preprocess=auto`): a product photo, through the conversion that made Fashion-MNIST from
     Zalando's catalogue (Xiao, Rasul, Vollgraf 2017, §2): trim the edges within 5 % of the
     corner colour, subsample the longest edge to 28, sharpen (Gaussian, radius and σ 1),
     extend the short edge to 28 centred on the corner colour, negate (when the background is
     light, or as `invert` says), 8-bit grayscale.
   - Otherwise (28×28 or smaller, or `preprocess=none`): grayscale; invert dark-on-light
     images (`invert`); pad to a square with black (`pad_to_square`); Lanczos to 28×28 (a
     28×28 image is untouched).
2. `scale`: N×28×28 uint8 as N×1×28×28 float32, times `scale`, then `(x - mean) / std`: what
   the served graph (and `model.onnx`) takes.
3. `resize`: to the network's side `resize` (`interpolation`: bilinear, no antialias), on the
   device in training, inside the served graph at inference, so a 28×28 input reaches a 96×96
   ResNet18 exactly as a training image does.

Calling the transform on a uint8 tensor does 2 and 3 at once, on its device (training).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from workers.store.checkpoints import Preprocessing

#: Fashion-MNIST's side: every input becomes a 28×28 image before the network's own resize.
NATIVE_SIZE = 28
#: The longest edge a decoder may reduce a photo to before `native` (box averages, JPEG's DCT
#: scaling): eight output pixels per Fashion-MNIST pixel, so the trim and the subsampling to 28
#: move by a fraction of a pixel at most, and a photo is never held at full resolution.
DECODE_EDGE = 8 * NATIVE_SIZE
#: Fashion-MNIST's trim: edges within this fraction of full intensity of the corner colour.
TRIM_FUZZ = 0.05

#: Invert intensities: auto (as the manifest's `invert` says), always, never.
InvertMode = Literal["auto", "true", "false"]
#: auto: inputs larger than 28×28 are product photos (the manifest's `photos`); none: pad and
#: resize whatever the size.
PreprocessMode = Literal["auto", "none"]


def grayscale(pixels: np.ndarray) -> np.ndarray:
    """8-bit grayscale (ITU-R 601-2 luma, as PIL's "L") of gray or RGB pixels."""
    if pixels.ndim == 2:
        return pixels
    return np.asarray(Image.fromarray(pixels, "RGB").convert("L"), dtype=np.uint8)


def light_border(images: np.ndarray) -> np.ndarray:
    """Which of N×H×W grayscale images are dark on light (their border's mean is over 127):
    the dark-background rule, for one image or a batch."""
    border = np.concatenate(
        [images[:, 0, :], images[:, -1, :], images[:, :, 0], images[:, :, -1]], axis=1
    )
    result: np.ndarray = border.mean(axis=1) > 127.0
    return result


def should_invert(gray: np.ndarray, mode: InvertMode) -> bool:
    """Whether to invert one grayscale image: always, never, or (auto) when its border is
    light."""
    if mode == "true":
        return True
    if mode == "false":
        return False
    return bool(light_border(gray[None])[0])


def fashion_mnist_conversion(pixels: np.ndarray, invert: InvertMode) -> np.ndarray:
    """A product photo (gray or RGB) as a 28×28 Fashion-MNIST image, by the data set's own
    pipeline (Xiao, Rasul, Vollgraf 2017, §2); see the module's docstring."""
    mode = "L" if pixels.ndim == 2 else "RGB"
    corner = pixels[0, 0].astype(np.float64)
    # 1. trim the edges whose colour is within 5 % of full intensity of the corner's
    diff = np.abs(pixels.astype(np.float64) - corner)
    distance = diff if diff.ndim == 2 else np.sqrt((diff**2).mean(axis=2))
    rows, cols = np.nonzero(distance > TRIM_FUZZ * 255)
    if rows.size:
        pixels = pixels[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    # 2. the longest edge to 28 by subsampling: skip rows and columns over
    h, w = pixels.shape[:2]
    scale = NATIVE_SIZE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    im = Image.fromarray(pixels, mode).resize(size, Image.Resampling.NEAREST)
    # 3. sharpen with a Gaussian operator of radius and standard deviation 1.0
    im = im.filter(ImageFilter.UnsharpMask(radius=1.0, percent=100, threshold=0))
    # 4. extend the short edge to 28, the image in the centre, on the corner colour
    fill = int(corner) if mode == "L" else tuple(int(c) for c in corner)
    canvas = Image.new(mode, (NATIVE_SIZE, NATIVE_SIZE), fill)
    # an odd margin's extra pixel goes before the image, as in the data set's own images
    canvas.paste(im, ((NATIVE_SIZE - im.width + 1) // 2, (NATIVE_SIZE - im.height + 1) // 2))
    # 5-6. negate (a dark garment on a light background becomes light on black), grayscale;
    # the background becomes black, as in every training image, even when the paper was not
    # quite white (the data set's photos were on white)
    gray = grayscale(np.asarray(canvas, dtype=np.uint8)).astype(np.int16)
    background = int(grayscale(corner.astype(np.uint8)[None, None])[0, 0])
    negate = invert == "true" or (invert == "auto" and background > 127)
    if negate:
        gray, background = 255 - gray, 255 - background
    return np.clip(gray - background, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Transform:
    """A checkpoint's preprocessing, done: `Transform(manifest.preprocessing)`."""

    preprocessing: Preprocessing

    def _invert(self, mode: InvertMode) -> InvertMode:
        """A request's invert mode with `auto` decided by the manifest."""
        return self.preprocessing.invert if mode == "auto" else mode

    def native(
        self, pixels: np.ndarray, invert: InvertMode = "auto", mode: PreprocessMode = "auto"
    ) -> np.ndarray:
        """Decoded pixels (gray or RGB, any size) as the 28×28 uint8 image training would have
        seen (step 1)."""
        prep = self.preprocessing
        invert = self._invert(invert)
        h, w = pixels.shape[:2]
        if mode == "auto" and prep.photos == "fashion-mnist" and max(h, w) > NATIVE_SIZE:
            return fashion_mnist_conversion(pixels, invert)
        gray = grayscale(pixels)
        if should_invert(gray, invert):
            gray = 255 - gray
        if prep.pad_to_square:
            h, w = gray.shape
            side = max(h, w)
            if h != w:
                square = np.zeros((side, side), dtype=np.uint8)  # black: the background
                top, left = (side - h) // 2, (side - w) // 2
                square[top : top + h, left : left + w] = gray
                gray = square
        if gray.shape != (NATIVE_SIZE, NATIVE_SIZE):
            im = Image.fromarray(gray)
            gray = np.asarray(im.resize((NATIVE_SIZE, NATIVE_SIZE), Image.Resampling.LANCZOS))
        return gray

    def native_batch(self, images: np.ndarray, invert: InvertMode = "auto") -> np.ndarray:
        """`native` for a batch of 28×28 grayscale images (N×28×28 uint8), vectorised: only
        the inversion has anything to do."""
        invert = self._invert(invert)
        if invert == "false":
            return images
        if invert == "true":
            return 255 - images
        light = light_border(images)
        if not light.any():
            return images
        out = images.copy()
        out[light] = 255 - out[light]
        return out

    def scale(self, native: np.ndarray) -> np.ndarray:
        """28×28 uint8 images (N×28×28) as the float32 N×1×28×28 the served graph takes
        (step 2, on the host: a server's requests)."""
        prep = self.preprocessing
        x = native.astype(np.float32) * np.float32(prep.scale)
        if prep.mean != 0.0 or prep.std != 1.0:
            x = (x - np.float32(prep.mean)) / np.float32(prep.std)
        return x[:, None, :, :]

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """N×1×28×28 scaled images at the network's input side (step 3)."""
        size = self.preprocessing.resize
        if size == NATIVE_SIZE:
            return x
        return F.interpolate(
            x,
            size=(size, size),
            mode=self.preprocessing.interpolation,
            align_corners=False,
            antialias=False,
        )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 28×28 images (N×28×28 tensor, on any device) as the network's float input:
        steps 2 and 3 on that device, as `scale` and `resize` do them (training, evaluation)."""
        prep = self.preprocessing
        x = images.unsqueeze(1).to(torch.float32).mul_(prep.scale)
        if prep.mean != 0.0 or prep.std != 1.0:
            x = x.sub_(prep.mean).div_(prep.std)
        return self.resize(x)
