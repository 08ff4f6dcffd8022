"""The Open Inference Protocol codec: JSON and binary tensors both ways, and what it refuses."""

from __future__ import annotations

import json
import re
import struct

import numpy as np
import pytest
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from service.inference.v2_codec import (
    OutputTensor,
    ProtocolError,
    encode_response,
    parse_request,
    serialize_bytes,
)


def binary_body(header: dict[str, object], *blobs: bytes) -> tuple[bytes, str]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), str(len(head))


def test_json_data_may_be_flat_or_nested() -> None:
    pixels = np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256
    for data in (pixels.ravel().tolist(), pixels.tolist()):
        request = parse_request(
            json.dumps(
                {"inputs": [{"name": "x", "shape": [2, 28, 28], "datatype": "UINT8", "data": data}]}
            ).encode(),
            None,
        )
        (tensor,) = request.inputs
        assert tensor.data.shape == (2, 28, 28)
        assert np.array_equal(tensor.data, pixels)
    assert request.outputs is None and not request.binary_output


def test_binary_inputs_follow_the_json_header() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    floats = np.linspace(0, 255, 4, dtype=np.float32)
    header = {
        "id": "req-7",
        "inputs": [
            {
                "name": "a",
                "shape": [3, 28, 28],
                "datatype": "UINT8",
                "parameters": {"binary_data_size": pixels.nbytes},
            },
            {
                "name": "b",
                "shape": [4],
                "datatype": "FP32",
                "parameters": {"binary_data_size": floats.nbytes},
            },
        ],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}],
        "parameters": {"binary_data_output": True},
    }
    body, length = binary_body(header, pixels.tobytes(), floats.tobytes())
    request = parse_request(body, length)

    assert np.array_equal(request.inputs[0].data, pixels)
    assert np.array_equal(request.inputs[1].data, floats)
    assert request.id == "req-7" and request.binary_output
    assert request.outputs is not None and request.outputs[0].classification == 3


def test_bytes_tensors_use_tritons_layout_both_ways() -> None:
    values = [b"\x89PNG first", b"", b"third one"]
    ours = serialize_bytes(values)
    assert ours == serialize_byte_tensor(np.array(values, dtype=object)).item()
    header = {
        "inputs": [
            {
                "name": "img",
                "shape": [3],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": len(ours)},
            }
        ]
    }
    body, length = binary_body(header, ours)
    assert list(parse_request(body, length).inputs[0].data) == values

    out, headers = encode_response(
        "lenet",
        "abc-e001",
        None,
        [
            OutputTensor("label", "BYTES", [3], values, binary=True),
            OutputTensor("probabilities", "FP32", [1, 2], np.array([[0.25, 0.75]], "f4"), True),
        ],
    )
    size = int(headers["Inference-Header-Content-Length"])
    reply = json.loads(out[:size])
    first = reply["outputs"][0]["parameters"]["binary_data_size"]
    assert list(deserialize_bytes_tensor(out[size : size + first])) == values
    assert np.frombuffer(out[size + first :], "<f4").tolist() == [0.25, 0.75]


def test_json_bytes_elements_are_base64_images() -> None:
    body = json.dumps(
        {"inputs": [{"name": "img", "shape": [1], "datatype": "BYTES", "data": ["iVBORw0KGgo="]}]}
    ).encode()
    assert parse_request(body, None).inputs[0].data[0] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("body", "length", "message"),
    [
        (b"not json", None, "JSON header cannot be read"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", None, "needs the Inference-Header-Content-Length"),
        (b"[1, 2]", None, "must be a JSON object"),
        (b"{}", None, '"inputs" must be a non-empty list'),
        (b'{"inputs": []}', "99", "the body has 14 bytes"),
        (b'{"inputs": []}', "ten", "must be the byte length"),
        (
            b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1]}]}',
            None,
            "shape [2] holds 2 elements but data has 1",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ["a"]}]}',
            None,
            "FP32 data must be JSON numbers",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT4", "data": [1]}]}',
            None,
            "'INT4' is not one of",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]}',
            None,
            "non-negative integers",
        ),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}', None, 'no "data"'),
    ],
)
def test_malformed_requests_say_what_to_send(body: bytes, length: str | None, message: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(message)):
        parse_request(body, length)


def test_binary_sizes_must_add_up() -> None:
    header = {
        "inputs": [
            {"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}
        ]
    }
    short, length = binary_body(header, b"\x00" * 4)
    with pytest.raises(ProtocolError, match="only 4 bytes of binary data are left"):
        parse_request(short, length)
    extra, length = binary_body(header, b"\x00" * 12)
    with pytest.raises(ProtocolError, match="4 bytes of binary data that no input"):
        parse_request(extra, length)
    wrong = {
        "inputs": [
            {"name": "x", "shape": [3], "datatype": "FP32", "parameters": {"binary_data_size": 8}}
        ]
    }
    body, length = binary_body(wrong, b"\x00" * 8)
    with pytest.raises(ProtocolError, match="needs 12 bytes, binary_data_size is 8"):
        parse_request(body, length)
    cut = {
        "inputs": [
            {"name": "x", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}
        ]
    }
    body, length = binary_body(cut, struct.pack("<I", 10) + b"ab")
    with pytest.raises(ProtocolError, match="longer than the data sent"):
        parse_request(body, length)


# --- bounds: shapes, nesting, and a check before the data -----------------------------------


def _one_input(**tensor: object) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "datatype": "UINT8", **tensor}]}).encode()


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (_one_input(shape=[1] * 65, data=[0]), "65 dimensions"),
        (_one_input(shape=[1, 2], data=[[[0, 0]]]), "nested deeper than its shape"),
        (b'{"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], "data": '
         + b"[" * 50_000 + b"]" * 50_000 + b"}]}", "nested too deeply"),
    ],
)  # fmt: skip
def test_shapes_and_nesting_past_the_bounds_are_protocol_errors(body: bytes, says: str) -> None:
    with pytest.raises(ProtocolError, match=says):
        parse_request(body, None)


class Refused(Exception):
    pass


def test_the_check_sees_each_shape_before_its_data_is_read() -> None:
    seen: list[tuple[str, str, list[int]]] = []

    def check(name: str, datatype: str, shape: list[int]) -> None:
        seen.append((name, datatype, shape))
        if shape[0] > 2:
            raise Refused(name)

    ok = _one_input(shape=[2, 2], data=[[1, 2], [3, 4]])
    assert parse_request(ok, None, check).inputs[0].data.tolist() == [[1, 2], [3, 4]]
    assert seen == [("x", "UINT8", [2, 2])]
    # data that could never be read (wrong count, not numbers): the shape is refused first,
    # in a big header too, where the numbers are left out before anything is parsed
    for count in (9, 100_000):
        bad = _one_input(shape=[3, 2], data=["?"] + [0] * count)
        with pytest.raises(Refused):
            parse_request(bad, None, check)
    header, length = binary_body(
        {"inputs": [{"name": "b", "datatype": "UINT8", "shape": [5, 1],
                     "parameters": {"binary_data_size": 1}}]}, b"\0")  # fmt: skip
    with pytest.raises(Refused):
        parse_request(header, length, check)
