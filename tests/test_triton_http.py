"""The inference wire format of fraudlib.triton_http, and how the client copes with broken
answers. The exchange with a real Triton is covered in test_triton_server.py; the broken answers,
which a real Triton does not give, come from a scripted fake server (`fake_server`)."""

from __future__ import annotations

import json
import socket
import threading

import numpy as np
import pytest

from fraudlib.triton_http import decode_response, encode_request, split_address
from fraudlib.triton_server import TritonClient, TritonError, TritonUnreachable


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
    ("[::1]:8002", ("::1", 8002)), ("localhost", ("localhost", 80)), ("host:8000/", ("host", 8000)),
    ("host:8000/some/path", ("host", 8000)), ("::1", ("::1", 80)),
])
def test_addresses(url, address):
    assert split_address(url) == address


def test_a_port_that_is_not_a_number_is_named():
    with pytest.raises(ValueError, match="'80a' is not a number"):
        split_address("host:80a")


class fake_server:
    """A listener on loopback that answers each request (read whole, by its Content-Length) with
    the next of ``answers`` (bytes), and closes the connection after the last one; counts
    connections and requests."""

    def __init__(self, answers: list[bytes]):
        self.answers, self.connections, self.requests = list(answers), 0, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(30)
        self.url = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.listener.close()
        self.thread.join(timeout=30)

    def _serve(self):
        while self.answers:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.settimeout(30)
                data = b""
                while self.answers:
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    if b"\r\n\r\n" not in data:
                        break
                    head, _, data = data.partition(b"\r\n\r\n")
                    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                      if line.lower().startswith(b"content-length")))
                    while len(data) < length:
                        data += conn.recv(65536)
                    data = data[length:]
                    self.requests += 1
                    conn.sendall(self.answers.pop(0))
            # the client closed, or the answers ran out: then this connection closes too


def _http(body: bytes, header_length: int | None = None) -> bytes:
    extra = b"" if header_length is None else b"Inference-Header-Content-Length: %d\r\n" % header_length
    return b"HTTP/1.1 200 OK\r\n" + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body


_INPUTS = {"x": np.ones((1, 2), np.float32)}


def test_an_answer_whose_header_is_not_json_is_an_error_that_says_so():
    with fake_server([_http(b"{not json", header_length=9)]) as server:
        with pytest.raises(TritonError, match="inference on m version .default. failed: its answer could not be "
                                              "read .JSONDecodeError"):
            TritonClient(server.url).infer("m", _INPUTS)


def test_an_answer_without_an_output_asked_for_is_an_error_that_names_it():
    body, header_length = _response({"OTHER": np.zeros((1, 1), np.float32)})
    with fake_server([_http(body, header_length)]) as server:
        with pytest.raises(TritonError, match="lacks the outputs asked for: PREDICTION"):
            TritonClient(server.url).infer("m", _INPUTS, outputs=["PREDICTION"])


def test_an_answer_cut_in_the_middle_is_not_sent_again():
    body, header_length = _response({"PREDICTION": np.zeros((4, 1), np.float32)})
    whole = _http(body, header_length)
    with fake_server([_http(*_response({"PREDICTION": np.ones((1, 1), np.float32)})), whole[:-8]]) as server:
        client = TritonClient(server.url)
        assert client.infer("m", _INPUTS)["PREDICTION"].tolist() == [[1.0]]
        with pytest.raises(TritonUnreachable, match="closed the connection in the middle of an answer"):
            client.infer("m", _INPUTS)  # on the kept connection, which had answered before
    assert server.requests == 2 and server.connections == 1


def test_bytes_beyond_an_answer_retire_the_connection():
    one = _http(*_response({"PREDICTION": np.full((1, 1), 0.5, np.float32)}))
    with fake_server([one + b"HTTP/1.1 503 Stray\r\n\r\n", one]) as server:
        client = TritonClient(server.url)
        assert client.infer("m", _INPUTS)["PREDICTION"].tolist() == [[0.5]]
        assert client.infer("m", _INPUTS)["PREDICTION"].tolist() == [[0.5]]  # not the stray 503
    assert server.connections == 2
