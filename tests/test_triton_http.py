"""The inference wire format of fraudlib.triton_http (the exchange with a real Triton is
covered in test_triton_server.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fraudlib.triton_http import decode_response, encode_request, split_address


def test_inputs_travel_as_their_raw_bytes_after_the_json_header():
    inputs = {"x": np.arange(6, dtype=np.float32).reshape(2, 3).T,  # not contiguous
              "ids": np.array([[0, 1], [2, 3]], np.int64), "flag": np.array([True]),
              "empty": np.zeros((0, 4), np.float32)}
    header, blobs = encode_request(inputs, ["PREDICTION"])
    spec = json.loads(header)
    assert [i["name"] for i in spec["inputs"]] == ["x", "ids", "flag", "empty"]
    assert [i["datatype"] for i in spec["inputs"]] == ["FP32", "INT64", "BOOL", "FP32"]
    assert spec["inputs"][0]["shape"] == [3, 2] and spec["inputs"][3]["shape"] == [0, 4]
    assert spec["outputs"] == [{"name": "PREDICTION", "parameters": {"binary_data": True}}]
    for i, blob, array in zip(spec["inputs"], blobs, inputs.values()):
        assert i["parameters"]["binary_data_size"] == blob.nbytes == array.nbytes
        assert bytes(blob) == np.ascontiguousarray(array).tobytes()


def test_without_named_outputs_all_outputs_are_asked_for_as_binary_data():
    header, _ = encode_request({"x": np.zeros(1, np.float32)}, None)
    spec = json.loads(header)
    assert "outputs" not in spec and spec["parameters"] == {"binary_data_output": True}


def test_an_input_without_a_triton_datatype_is_named():
    with pytest.raises(ValueError, match="input names: dtype <U1"):
        encode_request({"names": np.array(["a", "b"])}, None)


def _response(outputs: dict[str, np.ndarray]) -> tuple[bytes, int]:
    header = json.dumps({"outputs": [
        {"name": n, "datatype": {"float32": "FP32", "int64": "INT64"}[str(a.dtype)], "shape": list(a.shape),
         "parameters": {"binary_data_size": a.nbytes}} for n, a in outputs.items()]}).encode()
    return header + b"".join(a.tobytes() for a in outputs.values()), len(header)


def test_outputs_are_read_back_in_order_with_their_shapes_and_dtypes():
    sent = {"PREDICTION": np.array([[0.25], [0.5]], np.float32), "ids": np.arange(6).reshape(3, 2),
            "none": np.zeros((0, 3), np.float32)}
    out = decode_response(*_response(sent))
    assert list(out) == list(sent)
    for name, array in sent.items():
        assert out[name].dtype == array.dtype and np.array_equal(out[name], array)


def test_a_truncated_response_says_which_output_is_short():
    body, header_length = _response({"PREDICTION": np.zeros((4, 1), np.float32)})
    with pytest.raises(ValueError, match="output PREDICTION: the response ends 4 bytes early"):
        decode_response(body[:-4], header_length)


@pytest.mark.parametrize("url, address", [
    ("127.0.0.1:8000", ("127.0.0.1", 8000)), ("triton.internal:8001", ("triton.internal", 8001)),
    ("[::1]:8002", ("::1", 8002)), ("localhost", ("localhost", 80)),
])
def test_addresses(url, address):
    assert split_address(url) == address


def test_a_port_that_is_not_a_number_is_named():
    with pytest.raises(ValueError, match="'80a' is not a number"):
        split_address("host:80a")
