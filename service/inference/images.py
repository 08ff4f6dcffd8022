"""One image's bytes (or a client's pixel array) as pixels: format sniffing, bounded decoding.

The format is read from the content, never a name; the pixel count from the header, before any
pixel data is decompressed, so a decompression bomb is refused unread. A large image is reduced
as it is decoded (JPEG's DCT scaling, a box reduction for the others), in uint8, to a size the
caller names, so that a photo never lives at full resolution longer than its decoder needs, and
never as floats; PNG text chunks, which nothing here reads, are bounded. What is then done to
the pixels is the checkpoint's preprocessing (`workers.preprocessing`), a stage of its own.
"""

from __future__ import annotations

import io
import logging
import re
import struct
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from service.errors import ProblemError

logger = logging.getLogger(__name__)

ALLOWED_MEDIA_TYPES = "image/png, image/jpeg, image/webp, image/bmp"

# decode_image refuses anything over the limit itself; Pillow's warning would only add noise
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

#: The PNG text (tEXt, zTXt, iTXt) one decode may expand, in all and per chunk. Pillow's
#: defaults (64 MiB in all) let a 74 KB zTXt upload cost 0.2 s of zlib work; nothing here
#: reads the text, and a PNG with more is refused. Process-wide: only ever lowered.
MAX_PNG_TEXT_BYTES = 1024 * 1024
PngImagePlugin.MAX_TEXT_CHUNK = min(PngImagePlugin.MAX_TEXT_CHUNK, MAX_PNG_TEXT_BYTES)
PngImagePlugin.MAX_TEXT_MEMORY = min(PngImagePlugin.MAX_TEXT_MEMORY, MAX_PNG_TEXT_BYTES)
#: Modes Pillow's `reduce` takes; the others are widened to one of these first.
REDUCIBLE_MODES = frozenset({"L", "LA", "La", "RGB", "RGBA", "RGBa", "CMYK", "I", "F"})
#: Output rows reduced at a time, so that the reduction's copies are a strip's, not an image's.
REDUCE_STRIP_ROWS = 16


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


def decode_image(
    data: bytes, *, max_pixels: int, index: int | None = None, reduce_to: int | None = None
) -> np.ndarray:
    """Decode an uploaded image to uint8 pixels, refusing bombs unread: H×W for a grayscale
    image, H×W×3 (RGB) for a colour one.

    The format is taken from the content, never a file name. The pixel count comes from the
    header that `Image.open` reads, before any pixel data is decompressed. With `reduce_to`,
    an image whose longest edge is at least twice that is reduced by a whole factor while it
    is decoded, its longest edge staying at least `reduce_to`.
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
        raise _unreadable(
            f"the data starts like a {fmt} but its header is damaged ({exc}); re-export the image",
            fmt,
            exc,
            index,
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
            if reduce_to is not None and fmt == "JPEG" and max(width, height) >= 2 * reduce_to:
                factor = max(width, height) // reduce_to
                im.draft(None, (width // factor, height // factor))  # DCT scaling: 1/2 to 1/8
            im.load()
            return _to_array(im, reduce_to)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise _unreadable(
                f"the {fmt} could not be decoded ({exc}); the file is truncated or corrupt",
                fmt,
                exc,
                index,
            ) from None


def _unreadable(detail: str, fmt: str, exc: Exception, index: int | None) -> ImageInputError:
    """The 422 for an image Pillow could not read (`detail`), or whose text chunks are over
    the bound."""
    if "MAX_TEXT" in str(exc):
        return ImageInputError(
            f"the {fmt}'s text chunks (metadata) expand to more than the {MAX_PNG_TEXT_BYTES} "
            "bytes this server reads; strip its metadata and send it again",
            index=index,
        )
    return ImageInputError(detail, index=index)


def reduced_image(im: Image.Image, edge: int | None) -> Image.Image:
    """A loaded image reduced by the largest whole factor that keeps its longest edge at least
    `edge` (box averages, in its own 8- or 32-bit mode, a strip at a time), or the image
    itself."""
    factor = max(im.size) // edge if edge else 1
    if factor < 2:
        return im
    if im.mode not in REDUCIBLE_MODES:
        if im.mode == "P":
            wide = "RGBA" if "transparency" in im.info else "RGB"
        else:
            wide = {"1": "L", "PA": "RGBA"}.get(im.mode, "I" if im.mode.startswith("I") else "RGB")
        im = im.convert(wide)
    # in strips of whole boxes: Pillow's reduce copies an RGBA image whole (premultiplied)
    width, height = im.size
    reduced = Image.new(im.mode, (-(-width // factor), -(-height // factor)))
    rows = REDUCE_STRIP_ROWS * factor
    for top in range(0, height, rows):
        strip = im.crop((0, top, width, min(height, top + rows))).reduce(factor)
        reduced.paste(strip, (0, top // factor))
    reduced.info = dict(im.info)  # its EXIF orientation among it: turned upright after
    return reduced


def _to_array(im: Image.Image, reduce_to: int | None = None) -> np.ndarray:
    """The pixels of a loaded image, upright, transparency on white: gray H×W or RGB H×W×3,
    reduced first (`reduced_image`) when `reduce_to` allows."""
    sixteen_bit = im.mode.startswith("I;16")
    im = reduced_image(im, reduce_to)
    im = ImageOps.exif_transpose(im) or im
    if im.mode.startswith("I"):
        arr = np.asarray(im, dtype=np.float32)
        peak = 65535.0 if sixteen_bit else max(float(arr.max()), 1.0)
        return np.clip(arr * np.float32(255.0 / peak), 0, 255).round().astype(np.uint8)
    if im.mode == "F":
        return np.clip(np.asarray(im, dtype=np.float32), 0, 255).round().astype(np.uint8)
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
    arr = np.asarray(rows, dtype=np.float32)  # every 0–255 integer exactly, half of float64
    if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 255:
        raise ImageInputError(
            "pixel values must be numbers from 0 to 255 (grayscale, 0 = black)", index=index
        )
    return arr.round().astype(np.uint8)
