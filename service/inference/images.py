"""Image input for classification: format sniffing, bounded decoding and preprocessing.

Preprocessing matches what training feeds the network. The engine keeps Fashion-MNIST as
28×28 uint8, scales it by 1/255 and, for models with a larger input, resizes on the device with
`F.interpolate(mode="bilinear", align_corners=False, antialias=False)`. Inference brings every
input to such a 28×28 image first (`to_native`), then scales it (`scale_batch`):

- An input larger than 28×28 is, by default (`preprocess=auto`, the manifest's
  `photos: fashion-mnist`), treated as a product photo and goes through the conversion that
  made Fashion-MNIST out of Zalando's catalogue photos (Xiao, Rasul, Vollgraf 2017, §2): trim
  the edges within 5 % of the corner colour, subsample the longest edge to 28, sharpen
  (Gaussian, radius and σ 1), extend the short edge to 28 centred on the corner colour,
  negate (when the background is light, or as `invert` says), 8-bit grayscale.
- Otherwise (28×28 or smaller, or `preprocess=none`): grayscale; invert dark-on-light images
  (`invert=auto` looks at the border), since Fashion-MNIST is a light garment on black; pad to
  a square with the background colour; bring the square to 28×28 with PIL's Lanczos filter; a
  28×28 input is untouched.

Then pixels are scaled to 0..1 (and normalised by the manifest's mean/std). The bilinear resize
to the manifest's `resize` runs batched inside the inference model (see `service.inference`),
so a 28×28 input reaches a 96×96 ResNet18 exactly as a training image does.
"""

from __future__ import annotations

import io
import logging
import re
import struct
import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from service.errors import ProblemError
from workers.store.checkpoints import Preprocessing

logger = logging.getLogger(__name__)

#: Fashion-MNIST's side: every input becomes a 28×28 image before the model's own resize.
NATIVE_SIZE = 28
ALLOWED_MEDIA_TYPES = "image/png, image/jpeg, image/webp, image/bmp"

InvertMode = Literal["auto", "true", "false"]
PreprocessMode = Literal["auto", "none"]
#: Fashion-MNIST's trim: edges within this fraction of full intensity of the corner colour.
TRIM_FUZZ = 0.05

# decode_image refuses anything over the limit itself; Pillow's warning would only add noise
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageInputError(ProblemError):
    """An image (or pixel array) that cannot be classified, answered as a 422 problem."""

    status = 422
    slug = "invalid-image"
    title = "Invalid image"

    def __init__(self, detail: str, *, index: int | None = None) -> None:
        if index is None:
            super().__init__(detail)
        else:
            super().__init__(f"image {index}: {detail}", image_index=index)


class UnsupportedImageError(ImageInputError):
    """Content that is not a PNG, JPEG, WebP or BMP image (415)."""

    status = 415
    slug = "unsupported-image-format"
    title = "Unsupported image format"


class ImageTooLargeError(ImageInputError):
    """An image whose header declares more pixels than the server decodes (413)."""

    status = 413
    slug = "image-too-large"
    title = "Image too large"


def sniff_format(data: bytes) -> str | None:
    """The allowed format the bytes start with (by magic number), or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith(b"BM"):
        return "BMP"
    return None


def _describe(data: bytes) -> str:
    """A short guess at what non-image content is, for error messages."""
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "a GIF image"
    if data.startswith(b"%PDF"):
        return "a PDF document"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "a TIFF image"
    head = data[:512]
    if head and all(b in b"\t\n\r" or 32 <= b < 127 for b in head):
        return "text"
    return "unrecognised binary data"


def declared_pixels(data: bytes) -> int | None:
    """Width × height from an allowed image's header (nothing decoded), None if unreadable."""
    fmt = sniff_format(data)
    if fmt is None:
        return None
    if fmt == "PNG" and data[12:16] == b"IHDR" and len(data) >= 24:
        # the PNG standard puts IHDR first, its width and height at fixed offsets
        width, height = struct.unpack(">II", data[16:24])
        return width * height
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as im:
            width, height = im.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return width * height


def decode_image(data: bytes, *, max_pixels: int, index: int | None = None) -> np.ndarray:
    """Decode an uploaded image to uint8 pixels, refusing bombs unread: H×W for a grayscale
    image, H×W×3 (RGB) for a colour one.

    The format is taken from the content, never a file name. The pixel count comes from the
    header that `Image.open` reads, before any pixel data is decompressed.
    """
    if not data:
        raise ImageInputError("the file is empty", index=index)
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedImageError(
            f"the content is {_describe(data)}, not an image this server reads; "
            f"send PNG, JPEG, WebP or BMP ({ALLOWED_MEDIA_TYPES})",
            index=index,
        )
    # Pillow's own guard (DecompressionBombError at twice its limit) backs up the check below;
    # the limit is process-wide, so it is only ever raised here, never lowered
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        im = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as exc:
        declared = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{declared.group(1)} pixels" if declared else f"more than {2 * max_pixels} pixels"
        raise ImageTooLargeError(
            f"the {fmt} declares {size}, more than the {max_pixels} this server decodes; "
            "downscale it first (28×28 is enough)",
            index=index,
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageInputError(
            f"the data starts like a {fmt} but its header is damaged ({exc}); re-export the image",
            index=index,
        ) from None
    with im:
        width, height = im.size
        if width * height > max_pixels:
            raise ImageTooLargeError(
                f"the {fmt} is {width}×{height} = {width * height} pixels, more than the "
                f"{max_pixels} this server decodes; downscale it first (28×28 is enough)",
                index=index,
            )
        if width < 1 or height < 1:
            raise ImageInputError(f"the {fmt} has no pixels ({width}×{height})", index=index)
        try:
            im.load()
            return _to_array(im)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ImageInputError(
                f"the {fmt} could not be decoded ({exc}); the file is truncated or corrupt",
                index=index,
            ) from None


def _to_array(im: Image.Image) -> np.ndarray:
    """The pixels of a loaded image, upright, transparency on white: gray H×W or RGB H×W×3."""
    im = ImageOps.exif_transpose(im) or im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        return np.clip(arr * (255.0 / peak), 0, 255).round().astype(np.uint8)
    if im.mode == "F":
        return np.clip(np.asarray(im, dtype=np.float64), 0, 255).round().astype(np.uint8)
    has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        gray = im.mode == "LA"
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba).convert("L" if gray else "RGB")
    if im.mode in ("L", "1"):
        return np.asarray(im.convert("L"), dtype=np.uint8).copy()
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def grayscale(pixels: np.ndarray) -> np.ndarray:
    """8-bit grayscale (ITU-R 601-2 luma, as PIL's "L") of gray or RGB pixels."""
    if pixels.ndim == 2:
        return pixels
    return np.asarray(Image.fromarray(pixels, "RGB").convert("L"), dtype=np.uint8)


def pixels_to_array(rows: Sequence[Sequence[float]], *, max_pixels: int, index: int) -> np.ndarray:
    """A client's 2-D 0–255 grayscale array as uint8, with its shape and range checked."""
    height = len(rows)
    width = len(rows[0]) if height else 0
    if height == 0 or width == 0:
        raise ImageInputError("the pixel array is empty; send rows of 0–255 values", index=index)
    if any(len(r) != width for r in rows):
        raise ImageInputError(
            f"the pixel rows have different lengths (the first has {width}); "
            "send a rectangular 2-D array",
            index=index,
        )
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"the pixel array is {width}×{height}, more than {max_pixels} pixels", index=index
        )
    arr = np.asarray(rows, dtype=np.float64)
    if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 255:
        raise ImageInputError(
            "pixel values must be numbers from 0 to 255 (grayscale, 0 = black)", index=index
        )
    return arr.round().astype(np.uint8)


def should_invert(gray: np.ndarray, mode: InvertMode) -> bool:
    """Whether to invert: always, never, or (auto) when the border is light."""
    if mode == "true":
        return True
    if mode == "false":
        return False
    border = np.concatenate([gray[0, :], gray[-1, :], gray[:, 0], gray[:, -1]])
    return float(border.mean()) > 127.0


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


def to_native(
    pixels: np.ndarray,
    prep: Preprocessing,
    invert: InvertMode,
    mode: PreprocessMode = "auto",
) -> np.ndarray:
    """Decoded pixels (gray or RGB) as the 28×28 uint8 image training would have seen."""
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


def invert_where_light(batch: np.ndarray, invert: InvertMode) -> np.ndarray:
    """`to_native` for a batch of 28×28 grayscale images (N×28×28 uint8), vectorised."""
    if invert == "false":
        return batch
    if invert == "true":
        return 255 - batch
    border = np.concatenate(
        [batch[:, 0, :], batch[:, -1, :], batch[:, :, 0], batch[:, :, -1]], axis=1
    )
    light = border.mean(axis=1) > 127.0
    if not light.any():
        return batch
    out = batch.copy()
    out[light] = 255 - out[light]
    return out


def scale_batch(native: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """28×28 uint8 images (N×28×28) as the float32 N×1×28×28 tensor the model takes."""
    x = native.astype(np.float32) * np.float32(prep.scale)
    if prep.mean != 0.0 or prep.std != 1.0:
        x = (x - np.float32(prep.mean)) / np.float32(prep.std)
    return x[:, None, :, :]


def preprocess(
    pixels: np.ndarray, prep: Preprocessing, invert: InvertMode, mode: PreprocessMode = "auto"
) -> np.ndarray:
    """Decoded pixels (gray or RGB) as the float32 1×28×28 tensor the inference model takes."""
    return scale_batch(to_native(pixels, prep, invert, mode)[None], prep)[0]
