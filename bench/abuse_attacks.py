"""The attack catalogue of `bench abuse`: each attack builds one hostile request.

An attack is a named function from the server under test (`Target`: its port, a LeNet
checkpoint, a predict-scoped key and a train-scoped key) to a `RawRequest`: method, path,
headers and body as bytes, sent over a raw socket (`bench.abuse`) so the request may lie where
an HTTP client would refuse to (a declared length the body does not match, `Expect:
100-continue` with no intention to wait, headers no client sends). Payloads are built once per
run (`functools.cache`) and are the same bytes for every tree measured.

Sizes are at the default limits (`workers.settings`): 20 MiB bodies, 4096² decoded pixels,
64 images per predict call, 8 per explain call.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from PIL import Image

MAX_BODY = 20 * 1024 * 1024
MAX_PIXELS_SIDE = 4096  # max_image_pixels = 4096²
MAX_IMAGES = 64
BOUNDARY = "cnnserveabuse"
#: Just under twice the pixel limit: Pillow only warns (DecompressionBombWarning) below 2×.
UNDER_PILLOWS_ERROR = 5792


@dataclass(frozen=True)
class Target:
    """What an attack may aim at on one server."""

    port: int
    checkpoint: str
    predict_key: str
    train_key: str

    def auth(self, key: str | None) -> list[tuple[str, str]]:
        return [("Authorization", f"Bearer {key}")] if key else []


@dataclass(frozen=True)
class RawRequest:
    """One request as it goes on the wire. `Content-Length` is added from the body unless the
    headers carry one or the body is sent chunked."""

    method: str
    path: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    chunked: bool = False  # send the body in chunked transfer coding
    expect_continue: bool = False  # send the head, wait for `100 Continue` (or an answer)
    repeat: int = 1  # send it this many times, one after the other, in one measurement


@dataclass(frozen=True)
class Attack:
    name: str
    what: str
    build: Callable[[Target], RawRequest]


# --- payloads ---------------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.cache
def flat_png(side: int, mode: str = "RGB") -> bytes:
    """A `side`² PNG of one colour: a few KB that decode to side² × channels bytes."""
    out = io.BytesIO()
    Image.new(mode, (side, side), 0x7F).save(out, format="PNG", compress_level=9)
    return out.getvalue()


@functools.cache
def bit_png(width: int, height: int) -> bytes:
    """A 1-bit grayscale PNG of zeros, written row block by row block (never held decoded)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    per_block = max(1, (8 << 20) // len(row))
    packer = zlib.compressobj(9)
    idat = []
    for start in range(0, height, per_block):
        idat.append(packer.compress(row * min(per_block, height - start)))
    idat.append(packer.flush())
    signature = b"\x89PNG\r\n\x1a\n"
    return (
        signature + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(idat)) + _chunk(b"IEND", b"")
    )


@functools.cache
def ztxt_png(compressed_bytes: int = 70_000) -> bytes:
    """A 1×1 PNG with a zTXt chunk of about `compressed_bytes` that inflates ~1000-fold."""
    png = flat_png(1, "L")
    text = zlib.compress(bytes(compressed_bytes * 1030), 9)
    chunk = _chunk(b"zTXt", b"Comment\x00\x00" + text)
    return png[:-12] + chunk + png[-12:]  # before IEND


@functools.cache
def jpeg_declaring(width: int, height: int) -> bytes:
    """A 16×16 JPEG whose frame header (SOF0) declares width × height."""
    out = io.BytesIO()
    Image.new("L", (16, 16), 0x7F).save(out, format="JPEG")
    data = bytearray(out.getvalue())
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def multipart(parts: list[tuple[str, str | None, bytes]]) -> tuple[str, bytes]:
    """(Content-Type, body) of form parts (name, filename or None, content)."""
    out = io.BytesIO()
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out.write(f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n".encode())
        if filename:
            out.write(b"Content-Type: application/octet-stream\r\n")
        out.write(b"\r\n" + content + b"\r\n")
    out.write(f"--{BOUNDARY}--\r\n".encode())
    return f"multipart/form-data; boundary={BOUNDARY}", out.getvalue()


@functools.cache
def files_body(blob: bytes, count: int) -> tuple[str, bytes]:
    return multipart([("files", f"{i}.png", blob) for i in range(count)])


@functools.cache
def tiny_parts_body(limit: int = MAX_BODY - 4096) -> tuple[str, bytes]:
    """As many one-byte form fields as fit in `limit` bytes (no file: no file count applies)."""
    one = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="f"\r\n\r\nx\r\n'.encode()
    body = one * ((limit - 64) // len(one)) + f"--{BOUNDARY}--\r\n".encode()
    return f"multipart/form-data; boundary={BOUNDARY}", body


def v2_json(shape: list[int], data: bytes, datatype: str = "UINT8") -> bytes:
    """A V2 JSON infer body with `data` (already JSON) as its one input's data."""
    head = json.dumps({"name": "image", "shape": shape, "datatype": datatype})[:-1]
    return b'{"inputs":[' + head.encode() + b',"data":' + data + b"}]}"


@functools.cache
def v2_flat_zeros(images: int) -> bytes:
    count = images * 28 * 28
    return v2_json([images, 28, 28], b"[" + b"0," * (count - 1) + b"0]")


@functools.cache
def v2_binary_at_limit() -> tuple[bytes, int]:
    """A V2 binary-extension body of UINT8 28×28 images as large as the body limit allows."""
    images = (MAX_BODY - 512) // 784
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [images, 28, 28],
                    "datatype": "UINT8",
                    "parameters": {"binary_data_size": images * 784},
                }
            ]
        }
    ).encode()
    return header + bytes(images * 784), len(header)


@functools.cache
def wide_job_body(limit: int = MAX_BODY - 4096) -> bytes:
    """A job spec with as many unknown fields as fit in `limit` bytes."""
    fields = (f'"x{i}":0' for i in range(limit // 10))
    out = io.BytesIO()
    out.write(b'{"model":"lenet","epochs":1,"device":"cpu"')
    for item in fields:
        if out.tell() + len(item) + 2 > limit:
            break
        out.write(b"," + item.encode())
    out.write(b"}")
    return out.getvalue()


# --- the catalogue ----------------------------------------------------------------------------


def _predict(
    t: Target, body: tuple[str, bytes], key: str | None, what: str = "predict"
) -> RawRequest:
    content_type, data = body
    headers = [("Content-Type", content_type), *t.auth(key)]
    return RawRequest("POST", f"/v1/checkpoints/{t.checkpoint}/{what}", headers, data)


def _predict_json(t: Target, document: bytes) -> RawRequest:
    headers = [("Content-Type", "application/json"), *t.auth(t.predict_key)]
    return RawRequest("POST", f"/v1/checkpoints/{t.checkpoint}/predict", headers, document)


def _infer(t: Target, body: bytes, key: str | None, *extra: tuple[str, str]) -> RawRequest:
    headers = [("Content-Type", "application/json"), *t.auth(key), *extra]
    return RawRequest("POST", "/v2/models/lenet/infer", headers, body)


def _expect_continue(t: Target, path: str, content_type: str) -> RawRequest:
    headers = [("Content-Type", content_type), ("Expect", "100-continue")]
    headers.append(("Content-Length", str(MAX_BODY)))
    return RawRequest("POST", path, headers, bytes(MAX_BODY), expect_continue=True)


def _v2_binary(t: Target) -> RawRequest:
    body, header_length = v2_binary_at_limit()
    headers = [("Inference-Header-Content-Length", str(header_length)), *t.auth(t.predict_key)]
    return RawRequest("POST", "/v2/models/lenet/infer", headers, body)


def _smuggled_length(t: Target) -> RawRequest:
    headers = [("Content-Type", "application/json"), *t.auth(t.predict_key)]
    headers += [("Content-Length", "100"), ("Transfer-Encoding", "chunked")]
    return RawRequest("POST", "/v2/models/lenet/infer", headers, b" " * (5 << 20), chunked=True)


def _b64_images(blob: bytes, count: int) -> bytes:
    text = base64.b64encode(blob).decode()
    return json.dumps({"images": [text] * count}).encode()


def _v2_bytes(blob: bytes, count: int) -> bytes:
    text = json.dumps(base64.b64encode(blob).decode()).encode()
    return v2_json([count], b"[" + b",".join([text] * count) + b"]", "BYTES")


def _pixels_json() -> bytes:
    side = 2896  # 8.4 M pixels (under 4096²) of "0," in one JSON array: ~17 MB
    row = b"[" + b"0," * (side - 1) + b"0]"
    return b'{"pixels":[' + b",".join([row] * side) + b"]}"


def _size_lie(t: Target) -> RawRequest:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1, 28, 28],
                    "datatype": "UINT8",
                    "parameters": {"binary_data_size": 2**40},
                }
            ]
        }
    ).encode()
    headers = [("Inference-Header-Content-Length", str(len(header))), *t.auth(t.predict_key)]
    return RawRequest("POST", "/v2/models/lenet/infer", headers, header + bytes(100))


def _large_flat_count() -> int:
    return min(MAX_IMAGES, (MAX_BODY - 65536) // (len(flat_png(MAX_PIXELS_SIDE)) + 200))


ATTACKS: tuple[Attack, ...] = (
    Attack(
        "v1-4x2048-rgb-png",
        "/v1 predict, four flat 2048² RGB PNGs in one multipart request",
        lambda t: _predict(t, files_body(flat_png(2048), 4), t.predict_key),
    ),
    Attack(
        "v1-64x4096-rgb-png",
        "/v1 predict, 64 flat 4096² RGB PNGs (the image count and pixel limits, ~3 MB body)",
        lambda t: _predict(
            t, files_body(flat_png(MAX_PIXELS_SIDE), _large_flat_count()), t.predict_key
        ),
    ),
    Attack(
        "v1-png-bomb",
        "/v1 predict, a 65000² 1-bit PNG of zeros (~0.5 MB body, 4.2 G pixels)",
        lambda t: _predict(t, files_body(bit_png(65_000, 65_000), 1), t.predict_key),
    ),
    Attack(
        "v1-64x-png-under-pillow-2x",
        "/v1 predict, 64 1-bit 5792² PNGs: over the pixel limit, under Pillow's own 2× error",
        lambda t: _predict(
            t, files_body(bit_png(UNDER_PILLOWS_ERROR, UNDER_PILLOWS_ERROR), 64), t.predict_key
        ),
    ),
    Attack(
        "v1-jpeg-declares-65000",
        "/v1 predict, a 16×16 JPEG whose frame header declares 65000²",
        lambda t: _predict(t, files_body(jpeg_declaring(65_000, 65_000), 1), t.predict_key),
    ),
    Attack(
        "v1-64x-jpeg-declares-5792",
        "/v1 predict, 64 truncated JPEGs declaring 5792² (under Pillow's 2× error)",
        lambda t: _predict(
            t,
            files_body(jpeg_declaring(UNDER_PILLOWS_ERROR, UNDER_PILLOWS_ERROR), 64),
            t.predict_key,
        ),
    ),
    Attack(
        "v1-ztxt-70kb-x3",
        "/v1 predict, a 1×1 PNG with a 70 KB zTXt chunk (inflates to ~70 MB), sent 3 times",
        lambda t: replace(_predict(t, files_body(ztxt_png(), 1), t.predict_key), repeat=3),
    ),
    Attack(
        "v1-explain-64",
        "/v1 explain, 64 28×28 PNGs (the limit is 8)",
        lambda t: _predict(t, files_body(flat_png(28, "L"), 64), t.predict_key, "explain"),
    ),
    Attack(
        "v1-explain-8x4096",
        "/v1 explain, 8 flat 4096² RGB PNGs (the most it takes)",
        lambda t: _predict(t, files_body(flat_png(MAX_PIXELS_SIDE), 8), t.predict_key, "explain"),
    ),
    Attack(
        "v1-json-pixels-17mb",
        "/v1 predict, JSON `pixels`: one 2896² array of zeros (~17 MB)",
        lambda t: _predict_json(t, _pixels_json()),
    ),
    Attack(
        "v1-json-base64-64x4096",
        "/v1 predict, JSON `images`: 64 base64 flat 4096² RGB PNGs",
        lambda t: _predict_json(t, _b64_images(flat_png(MAX_PIXELS_SIDE), _large_flat_count())),
    ),
    Attack(
        "v1-multipart-tiny-parts",
        "/v1 predict, ~400,000 one-byte form fields (no files) in 20 MB",
        lambda t: _predict(t, tiny_parts_body(), t.predict_key),
    ),
    Attack(
        "v1-multipart-tiny-parts-nokey",
        "the same without a key",
        lambda t: _predict(t, tiny_parts_body(), None),
    ),
    Attack(
        "v2-json-12000x28x28",
        "/v2 infer lenet, JSON UINT8 shape [12000,28,28] (~18.8 MB of `0,`)",
        lambda t: _infer(t, v2_flat_zeros(12_000), t.predict_key),
    ),
    Attack(
        "v2-json-12000x28x28-nokey",
        "the same without a key",
        lambda t: _infer(t, v2_flat_zeros(12_000), None),
    ),
    Attack(
        "v2-json-nested-10000",
        "/v2 infer, `data` nested 10,000 arrays deep",
        lambda t: _infer(t, v2_json([1], b"[" * 10_000 + b"0" + b"]" * 10_000), t.predict_key),
    ),
    Attack(
        "v2-shape-65-dims",
        "/v2 infer, a shape of 65 dimensions",
        lambda t: _infer(t, v2_json([1] * 65, b"[0]"), t.predict_key),
    ),
    Attack(
        "v2-shape-overflow",
        "/v2 infer, shape [2^62, 2^62, 28, 28] with one element",
        lambda t: _infer(t, v2_json([2**62, 2**62, 28, 28], b"[0]"), t.predict_key),
    ),
    Attack(
        "v2-json-huge-integer",
        "/v2 infer, one 10-million-digit integer in `data`",
        lambda t: _infer(t, v2_json([1, 28, 28], b"[" + b"9" * 10_000_000 + b"]"), t.predict_key),
    ),
    Attack(
        "v2-bytes-64x4096-png",
        "/v2 infer, a BYTES tensor of 64 base64 flat 4096² RGB PNGs",
        lambda t: _infer(
            t, _v2_bytes(flat_png(MAX_PIXELS_SIDE), _large_flat_count()), t.predict_key
        ),
    ),
    Attack(
        "v2-binary-at-limit",
        "/v2 infer, a binary-extension UINT8 tensor filling the 20 MB body (26,749 images)",
        _v2_binary,
    ),
    Attack(
        "v2-binary-size-lie",
        "/v2 infer, `binary_data_size` 2^40 over a 100-byte body",
        _size_lie,
    ),
    Attack(
        "v2-expect-100-nokey",
        "/v2 infer, `Expect: 100-continue`, no key, 20 MB declared",
        lambda t: _expect_continue(t, "/v2/models/lenet/infer", "application/json"),
    ),
    Attack(
        "v1-expect-100-nokey",
        "/v1 predict, `Expect: 100-continue`, no key, 20 MB declared",
        lambda t: _expect_continue(
            t,
            f"/v1/checkpoints/{t.checkpoint}/predict",
            f"multipart/form-data; boundary={BOUNDARY}",
        ),
    ),
    Attack(
        "v2-content-length-100-chunked-5mb",
        "/v2 infer, `Content-Length: 100` and `Transfer-Encoding: chunked` with a 5 MB body",
        _smuggled_length,
    ),
    Attack(
        "job-submit-wide",
        "POST /v1/jobs, a spec with ~1.6 million unknown fields (20 MB), train key",
        lambda t: RawRequest(
            "POST",
            "/v1/jobs",
            [("Content-Type", "application/json"), *t.auth(t.train_key)],
            wide_job_body(),
        ),
    ),
    Attack(
        "job-submit-wide-nokey",
        "the same without a key",
        lambda t: RawRequest(
            "POST", "/v1/jobs", [("Content-Type", "application/json")], wide_job_body()
        ),
    ),
    Attack(
        "headers-4000",
        "GET /v1/jobs with 4,000 headers (~80 KB)",
        lambda t: RawRequest(
            "GET",
            "/v1/jobs",
            [*t.auth(t.train_key), *((f"X-Pad-{i}", "v" * 8) for i in range(4000))],
        ),
    ),
    Attack(
        "header-8mb-bearer",
        "/v2 infer with an 8 MB bearer token",
        lambda t: _infer(t, v2_json([1, 28, 28], b"[0]"), "A" * (8 << 20)),
    ),
    Attack(
        "url-8mb-query",
        "GET /v1/jobs with an 8 MB query string",
        lambda t: RawRequest("GET", "/v1/jobs?" + "a=1&" * (2 << 20), t.auth(t.train_key)),
    ),
)


def by_name() -> dict[str, Attack]:
    return {a.name: a for a in ATTACKS}
