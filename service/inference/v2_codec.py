"""The Open Inference Protocol's REST codec (KServe V2): bodies to tensors, tensors to bodies.

What `/v2/.../infer` speaks, as kserve/open-inference-protocol `inference_rest.md` and
Triton's `extension_binary_data.md` and `extension_classification.md` define it:

- JSON tensors: `{"name", "shape", "datatype", "data"}`, `data` flat or nested in row-major
  order; BYTES elements as strings (base64 for binary content, since JSON cannot carry it).
- The binary tensor extension, both ways: the header `Inference-Header-Content-Length` says how
  many bytes of the body are the JSON header; the rest holds each input that has
  `"parameters": {"binary_data_size": n}`, in order. Outputs asked for with
  `"binary_data": true` (or all, with the request's `"binary_data_output": true`) come back the
  same way. BYTES elements are a 4-byte little-endian length and the bytes.
- The classification extension: `"parameters": {"classification": k}` on an output returns
  its top k classes as BYTES `"score:index:label"`.

Everything a client can get wrong raises `ProtocolError` with a message saying what to send.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.errors import ProblemError

#: Datatypes of the protocol and their numpy types (BYTES: Python bytes objects).
NUMPY_TYPES: dict[str, type] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_MEDIA_TYPE = "application/octet-stream"
#: The most dimensions a tensor may have (numpy's own bound is 64; no model here takes 5).
MAX_DIMS = 16
#: JSON headers longer than this are checked first without their tensors' numeric data
#: (`_skeleton`), so an input the server refuses costs a scan of the text, not its parse.
SKELETON_FROM_BYTES = 64 * 1024
#: A tensor's numeric `data` in JSON text. No quote or backslash in the class: a match lies
#: wholly inside one string or wholly outside strings, so the text stays JSON without it.
_NUMERIC_DATA = re.compile(rb'("data"\s*:\s*)\[[-+0-9.eE,\s\[\]]*\]')

#: What a caller checks of each input (its name, datatype and shape) before its data is read:
#: raises a `ProtocolError` (or another refusal) for an input the server would not take.
InputCheck = Callable[[str, str, list[int]], None]


class ProtocolError(ProblemError):
    """A V2 request the server cannot act on; answered as `{"error": ...}` with a 400."""

    status = 400
    slug = "invalid-inference-request"
    title = "Invalid inference request"


class ModelNotFoundError(ProblemError):
    """A V2 model or version name that names no checkpoint (404)."""

    status = 404
    slug = "model-not-found"
    title = "Model not found"


@dataclass
class Tensor:
    """One input tensor as sent: its data as a numpy array of its shape (BYTES: objects)."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestedOutput:
    """An output the client asked for, and how it wants it."""

    name: str
    binary: bool = False
    classification: int | None = None


@dataclass
class InferRequest:
    """A parsed inference request."""

    inputs: list[Tensor]
    outputs: list[RequestedOutput] | None
    id: str | None = None
    binary_output: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputTensor:
    """One output to send: name, datatype, shape and its values (BYTES: a list of bytes)."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | list[bytes]
    binary: bool


# --- requests ------------------------------------------------------------------------------


def _header_size(body: bytes, header_length: str) -> int:
    """The JSON header's length that `Inference-Header-Content-Length` gives."""
    try:
        size = int(header_length)
    except ValueError:
        raise ProtocolError(
            f"{HEADER_LENGTH} must be the byte length of the JSON header, got "
            f"{header_length[:40]!r}"
        ) from None
    if not 0 < size <= len(body):
        raise ProtocolError(
            f"{HEADER_LENGTH} is {size} but the body has {len(body)} bytes; it must count "
            "the JSON header at the start of the body"
        )
    return size


def _header(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON header and the binary rest of a body."""
    size = len(body) if header_length is None else _header_size(body, header_length)
    try:
        header = json.loads(body[:size])
    except RecursionError:
        raise ProtocolError(
            "the request's JSON header is nested too deeply to read; send tensors' data flat "
            "or nested as deep as their shape"
        ) from None
    except (UnicodeDecodeError, ValueError) as exc:
        hint = (
            f"; a body with binary tensors needs the {HEADER_LENGTH} header"
            if header_length is None
            else ""
        )
        raise ProtocolError(f"the request's JSON header cannot be read ({exc}){hint}") from None
    if not isinstance(header, dict):
        raise ProtocolError('the request must be a JSON object with "inputs"')
    return header, body[size:]


def _parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise ProtocolError(f'{where}: "parameters" must be an object')
    return params


def _shape(raw: Any, where: str) -> list[int]:
    if not isinstance(raw, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw
    ):
        raise ProtocolError(f'{where}: "shape" must be a list of non-negative integers')
    if len(raw) > MAX_DIMS:
        raise ProtocolError(
            f'{where}: "shape" has {len(raw)} dimensions; this server takes at most {MAX_DIMS}'
        )
    return list(raw)


def _flatten(data: Any, shape: list[int], where: str) -> list[Any]:
    """Nested lists in row-major order, flattened (a flat list stays as it is), one level at a
    time: no recursion, and no deeper than the shape has dimensions."""
    if not isinstance(data, list):
        return [data]
    level: list[Any] = data
    for _ in range(len(shape) - 1):  # the outermost list is the first dimension
        if not any(isinstance(x, list) for x in level):
            return level
        flat: list[Any] = []
        for x in level:
            if isinstance(x, list):
                flat.extend(x)
            else:
                flat.append(x)
        level = flat
    if any(isinstance(x, list) for x in level):
        raise ProtocolError(f"{where}: data is nested deeper than its shape {shape}")
    return level


def _bytes_elements(buf: bytes, count: int, where: str) -> list[bytes]:
    out: list[bytes] = []
    offset = 0
    while offset < len(buf):
        if offset + 4 > len(buf):
            raise ProtocolError(f"{where}: a BYTES element's 4-byte length is cut off")
        (n,) = struct.unpack_from("<I", buf, offset)
        offset += 4
        if offset + n > len(buf):
            raise ProtocolError(f"{where}: a BYTES element is longer than the data sent")
        out.append(bytes(buf[offset : offset + n]))
        offset += n
    if len(out) != count:
        raise ProtocolError(f"{where}: the shape holds {count} elements but {len(out)} were sent")
    return out


def _json_bytes(values: list[Any], where: str) -> list[bytes]:
    out = []
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise ProtocolError(f"{where}: BYTES element {i} must be a string")
        text = v.partition(",")[2] if v.startswith("data:") else v
        try:  # images in JSON come base64-encoded; plain text stays text
            out.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            out.append(v.encode())
    return out


def _is_element(value: Any, datatype: str) -> bool:
    if datatype == "BOOL":
        return isinstance(value, bool)
    return isinstance(value, int | float) and not isinstance(value, bool)


def _tensor(
    raw: Any, index: int, rest: memoryview, offset: int, check: InputCheck | None = None
) -> tuple[Tensor, int]:
    where = f"input {index}"
    if not isinstance(raw, dict):
        raise ProtocolError(f"{where} must be an object with name, shape, datatype and data")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ProtocolError(f'{where}: "name" must be a non-empty string')
    where = f"input {name!r}"
    datatype = raw.get("datatype")
    if datatype != "BYTES" and datatype not in NUMPY_TYPES:
        known = ", ".join(["BYTES", *NUMPY_TYPES])
        raise ProtocolError(f'{where}: "datatype" {datatype!r} is not one of {known}')
    shape = _shape(raw.get("shape"), where)
    if check is not None:  # before a byte of its data is read
        check(name, datatype, shape)
    count = math.prod(shape)
    params = _parameters(raw, where)
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ProtocolError(f'{where}: "binary_data_size" must be a byte count')
        if offset + size > len(rest):
            raise ProtocolError(
                f"{where}: binary_data_size is {size} but only {len(rest) - offset} bytes of "
                "binary data are left in the body"
            )
        buf = rest[offset : offset + size]
        offset += size
        if datatype == "BYTES":
            data = np.array(_bytes_elements(bytes(buf), count, where), dtype=object)
        else:
            item = np.dtype(NUMPY_TYPES[datatype]).itemsize
            if size != count * item:
                raise ProtocolError(
                    f"{where}: shape {shape} of {datatype} needs {count * item} bytes, "
                    f"binary_data_size is {size}"
                )
            data = np.frombuffer(buf, dtype=np.dtype(NUMPY_TYPES[datatype]).newbyteorder("<"))
    else:
        if "data" not in raw:
            raise ProtocolError(f'{where}: no "data" and no binary_data_size')
        values = _flatten(raw["data"], shape, where)
        if len(values) != count:
            raise ProtocolError(
                f"{where}: shape {shape} holds {count} elements but data has {len(values)}"
            )
        if datatype == "BYTES":
            data = np.array(_json_bytes(values, where), dtype=object)
        else:
            if not all(_is_element(v, datatype) for v in values):
                kind = "true/false" if datatype == "BOOL" else "JSON numbers"
                raise ProtocolError(f"{where}: {datatype} data must be {kind}")
            data = np.asarray(values, dtype=np.float64)
    return Tensor(name, datatype, shape, data.reshape(shape), params), offset


def _requested(raw: Any, index: int) -> RequestedOutput:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise ProtocolError(f'output {index} must be an object with a "name"')
    params = _parameters(raw, f"output {raw['name']!r}")
    k = params.get("classification")
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        raise ProtocolError(
            f"output {raw['name']!r}: classification must be a count of classes (1 or more)"
        )
    return RequestedOutput(raw["name"], bool(params.get("binary_data", False)), k)


def _skeleton(body: bytes, check: InputCheck) -> None:
    """`check` each input's datatype and shape as a JSON header states them, reading the
    header without its tensors' numeric data (a linear scan, then a parse of what is left).
    Says nothing of what it cannot read: `parse_request` reports that."""
    skeleton = _NUMERIC_DATA.sub(rb"\1[]", body)
    if len(skeleton) * 4 > len(body):  # mostly not numbers (base64 images): one parse will do
        return
    try:
        header = json.loads(skeleton)
    except (RecursionError, UnicodeDecodeError, ValueError):
        return
    inputs = header.get("inputs") if isinstance(header, dict) else None
    for raw in inputs if isinstance(inputs, list) else []:
        name = raw.get("name") if isinstance(raw, dict) else None
        if not isinstance(name, str) or not name:
            return
        datatype = raw.get("datatype")
        if datatype != "BYTES" and datatype not in NUMPY_TYPES:
            return
        check(name, datatype, _shape(raw.get("shape"), f"input {name!r}"))


def parse_request(
    body: bytes,
    header_length: str | None,
    check: InputCheck | None = None,
    max_values: int | None = None,
) -> InferRequest:
    """An inference request from a raw body (JSON, or JSON and binary tensors); `check` sees
    each input's name, datatype and shape before its data is decoded, and a JSON part of more
    than `max_values` values (counted by its commas) is refused before it is parsed: parsing
    numbers holds the interpreter, whatever thread does it (blocking: a big JSON body is worth
    a thread)."""
    json_size = len(body) if header_length is None else _header_size(body, header_length)
    if max_values is not None:  # first: a count is ten times cheaper than the skeleton's scan
        values = body.count(b",", 0, json_size) + 1
        if values > max_values:
            raise ProtocolError(
                f"the JSON holds about {values} values (as many as {values // 784} 28×28 "
                f"images), more than the {max_values} this server parses in one request; send "
                "fewer images, the tensor in the binary extension "
                "(Inference-Header-Content-Length), or BYTES images"
            )
    if check is not None and json_size > SKELETON_FROM_BYTES:
        _skeleton(body[:json_size], check)
    header, rest = _header(body, header_length)
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError('"inputs" must be a non-empty list of tensors')
    params = _parameters(header, "the request")
    binary = memoryview(rest)
    offset = 0
    tensors = []
    for i, raw in enumerate(inputs):
        tensor, offset = _tensor(raw, i, binary, offset, check)
        tensors.append(tensor)
    if offset != len(binary):
        raise ProtocolError(
            f"the body has {len(binary) - offset} bytes of binary data that no input's "
            "binary_data_size accounts for"
        )
    outputs = header.get("outputs")
    if outputs is not None and not isinstance(outputs, list):
        raise ProtocolError('"outputs" must be a list of {"name": ...} objects')
    request_id = header.get("id")
    return InferRequest(
        inputs=tensors,
        outputs=[_requested(o, i) for i, o in enumerate(outputs)] if outputs else None,
        id=request_id if isinstance(request_id, str) else None,
        binary_output=bool(params.get("binary_data_output", False)),
        parameters=params,
    )


# --- responses -----------------------------------------------------------------------------


def serialize_bytes(values: Sequence[bytes]) -> bytes:
    """BYTES elements in the binary extension's layout: a 4-byte LE length, then the bytes."""
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def encode_response(
    model_name: str, model_version: str, request_id: str | None, outputs: list[OutputTensor]
) -> tuple[bytes, dict[str, str]]:
    """The response body and its extra headers (binary outputs after the JSON header)."""
    described: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for out in outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        if out.datatype == "BYTES":
            values = list(out.data)
            if out.binary:
                blob = serialize_bytes(values)
            else:
                entry["data"] = [v.decode() for v in values]
        else:
            array = np.asarray(out.data)
            if out.binary:
                blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            else:
                entry["data"] = array.ravel().tolist()
        if out.binary:
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        described.append(entry)
    reply: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        reply["id"] = request_id
    reply["outputs"] = described
    head = json.dumps(reply, separators=(",", ":")).encode()
    if not blobs:
        return head, {}
    return head + b"".join(blobs), {HEADER_LENGTH: str(len(head))}
