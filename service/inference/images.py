"""One image's bytes (or a client's pixel array) as pixels: format sniffing, bounded decoding.

The format is read from the content, never a name; the pixel count from the header, before any
pixel data is decompressed, so a decompression bomb is refused unread. What is then done to the
pixels is the checkpoint's preprocessing (`workers.preprocessing`), a stage of its own.
"""

from __future__ import annotations

import io
import logging
import re
import struct
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import ProblemError

logger = logging.getLogger(__name__)

ALLOWED_MEDIA_TYPES = "image/png, image/jpeg, image/webp, image/bmp"

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
