"""The decode stage: a request's images as decoded pixels, within the server's limits.

- `/v1` predict and explain: multipart file parts named `files` (small bodies parsed in one
  pass, larger ones streamed through Starlette's form parser), or JSON with base64 `images` or
  raw `pixels` arrays;
- `/v2` infer: a pixel tensor (`[N, 28, 28]` or `[N, 1, 28, 28]`, UINT8 or FP32) or BYTES
  `[N]` of encoded images (the codec, `service.inference.v2_codec`, has parsed the body).

Each encoded image is decoded by `service.inference.images.decode_image` (format by content,
bombs refused unread), one at a time (`decoded_files`), reduced as it is decoded; what a
request's images may declare in all is checked from their headers before any is decoded
(`check_request_pixels`). What is done to the pixels next is the preprocess stage's
(`workers.preprocessing`), kept apart so that decoding can change on its own.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from service.errors import (
    BadRequestError,
    PayloadTooLargeError,
    ProblemError,
)
from service.inference.images import (
    ALLOWED_MEDIA_TYPES,
    ImageInputError,
    ImageTooLargeError,
    declared_pixels,
    decode_image,
    pixels_to_array,
)
from service.inference.v2_codec import InputCheck, ProtocolError, Tensor
from workers.preprocessing import DECODE_EDGE, NATIVE_SIZE
from workers.settings import Settings

#: Multipart bodies up to this size are read whole and parsed in one pass by python-multipart's
#: parser, without Starlette's form (a spooled temporary file per part, a form object, an
#: await per chunk); bigger ones stream through Starlette's form parser.
INLINE_MULTIPART_BYTES = 256 * 1024
#: V2 pixel tensors' datatypes.
PIXEL_TYPES = ("UINT8", "FP32")

#: (field name, whether it is a file upload, content) of one multipart part.
Part = tuple[str, bool, bytes]


class TooManyImagesError(ProblemError):
    """More images in one request than the server takes."""

    status = 413
    slug = "too-many-images"
    title = "Too many images"


class TooManyPixelsError(ProblemError):
    """A request whose images declare more pixels in all than the server decodes for one."""

    status = 413
    slug = "too-many-pixels"
    title = "Too many pixels"


class UnsupportedBodyError(ProblemError):
    """A predict body that is neither multipart nor JSON."""

    status = 415
    slug = "unsupported-media-type"
    title = "Unsupported Media Type"


def too_many(count: int | None, limit: int, does: str = "takes") -> TooManyImagesError:
    sent = f"{count} images" if count is not None else f"more than {limit} images"
    return TooManyImagesError(
        f"{sent} in one request; this server {does} at most {limit}: "
        "split them over several requests",
        limit=limit,
    )


#: The setting that bounds the pixels of one request, named in its refusals.
REQUEST_PIXELS_SETTING = "CNNSERVE_MAX_REQUEST_PIXELS"


def check_request_pixels(declared: Sequence[int | None], settings: Settings) -> None:
    """Refuse (413) a request whose images declare more pixels in all than
    `max_request_pixels`; an unreadable header counts nothing (its decode refuses it)."""
    total, limit = sum(d or 0 for d in declared), settings.max_request_pixels
    if total > limit:
        raise TooManyPixelsError(
            f"the {len(declared)} images declare {total} pixels in all, more than the {limit} "
            f"this server decodes for one request ({REQUEST_PIXELS_SETTING}); send fewer or "
            "smaller images (28×28 is enough)",
            limit=limit,
            setting=REQUEST_PIXELS_SETTING,
        )


class TooManyValuesError(ProblemError):
    """A JSON body with more numbers than a request's images can be."""

    status = 413
    slug = "too-many-values"
    title = "Too many values in a JSON body"


#: Numbers a JSON body may carry per image the request may hold: two 28×28 images' worth.
#: Parsing JSON numbers holds the interpreter (on whatever thread), about 4 million floats a
#: second here: 64 images' worth is 25 ms; the 20 MB body limit alone let through 4 million
#: (a second) and, as pixel arrays, 2 GB of Python objects. Bigger images go as files.
JSON_VALUES_PER_IMAGE = 2 * 28 * 28


def check_json_values(body: bytes, settings: Settings) -> None:
    """Refuse (413) a JSON body that holds more values than `JSON_VALUES_PER_IMAGE` for each
    image a request may have, counted (its commas: a linear scan, microseconds a megabyte)
    before it is parsed."""
    limit = settings.max_images_per_request * JSON_VALUES_PER_IMAGE
    values = body.count(b",") + 1
    if values > limit:
        raise TooManyValuesError(
            f"the JSON body holds about {values} values, more than the {limit} this server "
            f"parses in one request ({JSON_VALUES_PER_IMAGE} per image it takes); send pixels "
            "as 28×28 arrays, larger images as files (multipart, or base64 PNG in JSON), or "
            "V2 tensors in the binary extension",
            limit=limit,
        )


@dataclass(frozen=True)
class Inputs:
    """A request's images before decoding: encoded files, or the pixel arrays a JSON body
    carried (one of the two)."""

    files: list[bytes] = field(default_factory=list)
    pixels: list[np.ndarray] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files) + len(self.pixels)


# --- what /v1 predict and explain read --------------------------------------------------------


class PredictJSON(BaseModel):
    """A JSON predict body: base64 images or raw 0–255 grayscale pixel arrays (one of them)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"images": ["iVBORw0KGgoAAAANSUhEUgAAABwAAAAcCAAAAABXZoBIAAAA..."]},
                {"pixels": [[0, 0, 12, 255], [0, 40, 200, 255], [0, 0, 0, 0], [0, 0, 0, 0]]},
            ]
        },
    )

    images: list[str] | None = Field(
        None,
        description="Base64 PNG/JPEG/WebP/BMP files (a `data:image/...;base64,` prefix is fine).",
    )
    pixels: list[list[list[float]]] | list[list[float]] | None = Field(
        None,
        description="One 2-D grayscale array (rows of 0–255 values, 0 = black) or a list of them.",
    )


#: The OpenAPI request body of predict and explain.
PREDICT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "Images as multipart file parts named `files` (repeat the field for "
        "several), or JSON with base64 `images` or raw `pixels`.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": f"Image files ({ALLOWED_MEDIA_TYPES}).",
                        }
                    },
                }
            },
            "application/json": {
                "schema": PredictJSON.model_json_schema(),
                "examples": {
                    "pixels": {
                        "summary": "A 4×4 grayscale array",
                        "value": {
                            "pixels": [
                                [0, 0, 12, 255],
                                [0, 40, 200, 255],
                                [0, 0, 0, 0],
                                [0, 0, 0, 0],
                            ]
                        },
                    },
                    "images": {
                        "summary": "Base64-encoded PNG files",
                        "value": {"images": ["iVBORw0KGgoAAAANSUhEUgAAABwAAAAc..."]},
                    },
                },
            },
        },
    }
}


def body_kind(content_type: str) -> Literal["multipart", "json"] | None:
    """Which of the two predict bodies a Content-Type declares (None: neither)."""
    media_type = content_type.split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        return "multipart"
    if media_type == "application/json" or media_type.endswith("+json"):
        return "json"
    return None


def unsupported_body(content_type: str) -> UnsupportedBodyError:
    media_type = content_type.split(";")[0].strip().lower()
    return UnsupportedBodyError(
        f"the body is {media_type or 'untyped'}; send multipart/form-data with image "
        'files in the \'files\' field, or application/json with "images" or "pixels"'
    )


def _unreadable(reason: str) -> BadRequestError:
    return BadRequestError(
        f"the multipart body could not be read ({reason}); send the images as "
        "multipart/form-data file parts named 'files'"
    )


def multipart_parts(content_type: str, body: bytes, max_files: int) -> list[Part]:
    """The parts of a multipart body held in memory; more than `max_files` files is a 413."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise _unreadable("no boundary in the Content-Type")
    parts: list[Part] = []
    files = 0
    headers: dict[bytes, bytes] = {}
    name: list[bytes] = []
    value: list[bytes] = []
    data: list[bytes] = []

    def on_part_begin() -> None:
        headers.clear()
        data.clear()

    def on_header_field(chunk: bytes, start: int, end: int) -> None:
        name.append(chunk[start:end])

    def on_header_value(chunk: bytes, start: int, end: int) -> None:
        value.append(chunk[start:end])

    def on_header_end() -> None:
        headers[b"".join(name).lower()] = b"".join(value)
        name.clear()
        value.clear()

    def on_part_data(chunk: bytes, start: int, end: int) -> None:
        data.append(chunk[start:end])

    def on_part_end() -> None:
        nonlocal files
        _, disposition = parse_options_header(headers.get(b"content-disposition", b""))
        is_file = b"filename" in disposition
        files += is_file
        if files > max_files:
            raise too_many(None, max_files)
        field = disposition.get(b"name", b"").decode("utf-8", "replace")
        parts.append((field, is_file, b"".join(data)))

    callbacks: Any = {
        "on_part_begin": on_part_begin,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
    }
    parser = MultipartParser(boundary, callbacks)
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise _unreadable(str(exc) or "malformed") from None
    return parts


async def _form_parts(request: Request, max_files: int) -> list[Part]:
    """The parts of a (large) multipart body, streamed through Starlette's form parser."""
    try:
        form = await request.form(max_files=max_files, max_fields=max_files + 16)
    except PayloadTooLargeError:
        raise  # the body limit's own 413, not a malformed body
    except StarletteHTTPException as exc:
        if "Too many files" in str(exc.detail):
            raise too_many(None, max_files) from None
        raise _unreadable(str(exc.detail)) from None
    try:
        parts: list[Part] = []
        for field, item in form.multi_items():
            if isinstance(item, UploadFile):
                parts.append((field, True, await item.read()))
            else:
                parts.append((field, False, item.encode()))
        return parts
    finally:
        await form.close()


async def multipart_files(request: Request, settings: Settings) -> list[bytes]:
    """The image files of a multipart request (its body within the body limit, as every
    body is)."""
    limit = settings.max_images_per_request
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) <= INLINE_MULTIPART_BYTES:
        body = await request.body()
        parts = multipart_parts(request.headers.get("content-type", ""), body, limit)
    else:
        parts = await _form_parts(request, limit)
    return upload_blobs(parts)


def upload_blobs(parts: list[Part]) -> list[bytes]:
    """The image files of a multipart body's parts (each a file part named `files`)."""
    uploads = [(is_file, content) for field, is_file, content in parts if field == "files"]
    if not uploads:
        names = sorted({field for field, _, _ in parts})
        raise BadRequestError(
            "no images: send each image as a multipart file part named 'files'"
            + (f" (got fields {names})" if names else "")
        )
    for i, (is_file, _) in enumerate(uploads):
        if not is_file:
            raise ImageInputError(
                "the 'files' part is a text field, not a file upload; "
                "attach it as a file (curl -F 'files=@image.png')",
                index=i,
            )
    return [content for _, content in uploads]


def decoded_files(blobs: list[bytes], settings: Settings) -> Iterator[np.ndarray]:
    """Encoded images as pixels (gray H×W or RGB H×W×3 uint8), each within the pixel limit,
    decoded one at a time as they are asked for, and reduced as they are decoded (its longest
    edge to no less than `DECODE_EDGE`)."""
    for i, b in enumerate(blobs):
        yield decode_image(b, max_pixels=settings.max_image_pixels, index=i, reduce_to=DECODE_EDGE)


def declared_files(blobs: list[bytes], settings: Settings) -> list[int | None]:
    """The pixels each encoded image's header declares (nothing decoded), each within the
    image limit and all within the request's budget (`check_request_pixels`)."""
    declared = [declared_pixels(b) for b in blobs]
    for i, pixels in enumerate(declared):
        if pixels is not None and pixels > settings.max_image_pixels:  # one image's limit first
            raise ImageTooLargeError(
                f"the image declares {pixels} pixels, more than the {settings.max_image_pixels} "
                "this server decodes; downscale it first (28×28 is enough)",
                index=i,
            )
    check_request_pixels(declared, settings)
    return declared


def _b64(text: str, index: int) -> bytes:
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError(
            "not valid base64; send the file's bytes base64-encoded (RFC 4648)", index=index
        ) from None


def json_inputs(body: bytes, settings: Settings) -> Inputs:
    """The images of a JSON predict body, counted, not decoded: base64 files as bytes, pixel
    arrays within the request's pixel budget (blocking: JSON and base64)."""
    check_json_values(body, settings)
    try:
        payload = PredictJSON.model_validate_json(body)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors, body=None) from None
    limit = settings.max_images_per_request
    if (payload.images is None) == (payload.pixels is None):
        raise BadRequestError(
            'send exactly one of "images" (base64 files) or "pixels" (0–255 arrays)'
        )
    if payload.images is not None:
        if not payload.images:
            raise BadRequestError('"images" is empty; send at least one base64 image')
        if len(payload.images) > limit:
            raise too_many(len(payload.images), limit)
        return Inputs(files=[_b64(s, i) for i, s in enumerate(payload.images)])
    pixels: Any = payload.pixels
    if not pixels or not pixels[0] or any(not a for a in pixels[0] if isinstance(a, list)):
        raise BadRequestError('"pixels" is empty; send a 2-D array or a list of them')
    arrays = pixels if isinstance(pixels[0][0], list) else [pixels]
    if len(arrays) > limit:
        raise too_many(len(arrays), limit)
    check_request_pixels([len(a) * len(a[0]) if a else 0 for a in arrays], settings)
    return Inputs(
        pixels=[
            pixels_to_array(a, max_pixels=settings.max_image_pixels, index=i)
            for i, a in enumerate(arrays)
        ]
    )


# --- what /v2 infer reads ---------------------------------------------------------------------


def v2_input(tensors: list[Tensor]) -> Tensor:
    """The one input of a V2 request (pixels or encoded images)."""
    if len(tensors) != 1:
        names = ", ".join(repr(t.name) for t in tensors)
        raise ProtocolError(
            f"this model takes one input (pixels or encoded images); got {len(tensors)}: {names}"
        )
    return tensors[0]


def _pixel_shape(name: str, shape: list[int], max_images: int) -> list[int]:
    """A pixel tensor's shape as N×28×28, N within the limit; the protocol's 400 otherwise."""
    sent = shape
    if len(shape) == 4 and shape[1] == 1:
        shape = [shape[0], shape[2], shape[3]]
    if len(shape) != 3 or shape[1:] != [NATIVE_SIZE, NATIVE_SIZE]:
        raise ProtocolError(
            f"input {name!r} has shape {sent}; send [N, 28, 28] or "
            "[N, 1, 28, 28] grayscale pixels (or BYTES [N] of encoded images)"
        )
    if not 1 <= shape[0] <= max_images:
        raise ProtocolError(
            f"input {name!r} holds {shape[0]} images; this server takes 1 to {max_images} "
            "per request"
        )
    return shape


def _images_shape(name: str, shape: list[int], max_images: int) -> None:
    """A BYTES tensor's shape: [N], N within the limit; the protocol's 400 otherwise."""
    if len(shape) != 1 or not 1 <= shape[0] <= max_images:
        raise ProtocolError(
            f"input {name!r}: BYTES images come as shape [N] with N from 1 to "
            f"{max_images}; got {shape}"
        )


def v2_input_check(max_images: int) -> InputCheck:
    """What a V2 input must be, checked from its datatype and shape before its data is read:
    pixels (`PIXEL_TYPES`) of N×28×28 or N×1×28×28, or BYTES [N], N from 1 to `max_images`."""

    def check(name: str, datatype: str, shape: list[int]) -> None:
        if datatype in PIXEL_TYPES:
            _pixel_shape(name, shape, max_images)
        elif datatype == "BYTES":
            _images_shape(name, shape, max_images)
        else:
            raise ProtocolError(
                f"input {name!r} is {datatype}; send UINT8 or FP32 pixels, or BYTES images"
            )

    return check


def pixel_tensor(tensor: Tensor, max_images: int) -> np.ndarray:
    """A V2 pixel tensor as N×28×28 uint8 (values checked, shape checked)."""
    shape = _pixel_shape(tensor.name, tensor.shape, max_images)
    data = tensor.data.reshape(shape)
    if data.dtype == np.uint8:  # binary UINT8: every value is a pixel already
        return np.ascontiguousarray(data)
    values = data.astype(np.float64, copy=False)
    if not np.isfinite(values).all() or values.min() < 0 or values.max() > 255:
        raise ProtocolError(
            f"input {tensor.name!r}: {tensor.datatype} pixels must be 0 to 255 (0 = black, as "
            "Fashion-MNIST)"
        )
    return values.round().astype(np.uint8)


def encoded_images(tensor: Tensor, max_images: int) -> list[bytes]:
    """A V2 BYTES tensor's encoded images (shape [N], N within the limit)."""
    _images_shape(tensor.name, tensor.shape, max_images)
    return list(tensor.data.reshape(-1))
