"""Inference requests to Triton over one persistent HTTP/1.1 connection.

The KServe v2 protocol with Triton's binary tensor extension: a JSON header followed by the
raw bytes of every input, and the same shape back. Written on the standard library's socket
because on a one-transaction request the client is a large part of the cost: tritonclient's
HTTP client (geventhttpclient on a gevent hub) spends about 0.5 ms of CPU per request, this
one about 0.2 ms. On a 2-core machine the client, Triton and the model's Python stub share the
cores, so the client's CPU time also delays the server: single-transaction p50 through the
embedded Triton went from 1.34-1.47 to 1.06-1.09 ms (docs/benchmarks.md, "Serving through
Triton").

Control-plane calls (load, unload, repository index, readiness) stay on tritonclient.
"""

from __future__ import annotations

import json
import socket
from urllib.parse import quote

import numpy as np

# Triton datatypes that travel as raw little-endian bytes (BYTES, variable length, is not used here).
DTYPES = {
    "BOOL": np.dtype(np.bool_), "INT8": np.dtype(np.int8), "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64), "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16), "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}
_TRITON_DTYPE = {dtype: name for name, dtype in DTYPES.items()}
_ONE_SEND = 1 << 16  # requests up to this size go out in one send (one TCP segment on loopback)
_RECV = 1 << 16
_MAX_HEAD = 1 << 16  # an answer's status line and headers; Triton's are a few hundred bytes


class InferenceRefused(Exception):
    """Triton answered, with an error status (a bad request, an unknown model, a model error)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class BrokenAnswer(Exception):
    """An HTTP 200 answer whose outputs cannot be read, or lack one that was asked for."""


def split_address(url: str) -> tuple[str, int]:
    """``host:port`` (no scheme; a path after it is ignored) as a socket address; no port means
    HTTP's 80. IPv6 addresses with a port are written in brackets: ``[::1]:8000``."""
    url = url.split("/", 1)[0]
    if url.count(":") > 1 and "]" not in url:  # a bare IPv6 address
        return url, 80
    host, sep, port = url.rpartition(":")
    if not sep or "]" in port:  # no port, or the tail of a bracketed IPv6 address
        host, port = url, "80"
    if not port.isdigit():
        raise ValueError(f"Triton URL {url!r}: the port {port!r} is not a number")
    return host.strip("[]") or "127.0.0.1", int(port)


def encode_request(inputs: dict[str, np.ndarray], outputs: list[str] | None) -> tuple[bytes, list]:
    """The JSON header and the raw bytes of each input, in order."""
    specs, blobs = [], []
    for name, array in inputs.items():
        array = np.ascontiguousarray(array)
        if array.dtype not in _TRITON_DTYPE:
            raise ValueError(f"input {name}: dtype {array.dtype} has no Triton binary datatype")
        blob = array.reshape(-1).view(np.uint8).data
        specs.append({"name": name, "shape": list(array.shape), "datatype": _TRITON_DTYPE[array.dtype],
                      "parameters": {"binary_data_size": blob.nbytes}})
        blobs.append(blob)
    request: dict = {"inputs": specs}
    if outputs is None:
        request["parameters"] = {"binary_data_output": True}
    else:
        request["outputs"] = [{"name": n, "parameters": {"binary_data": True}} for n in outputs]
    return json.dumps(request, separators=(",", ":")).encode(), blobs


def decode_response(body: bytes | bytearray, header_length: int) -> dict[str, np.ndarray]:
    """Every output of a response body: the binary tensors after its JSON header."""
    header = json.loads(bytes(body[:header_length]))
    out, offset = {}, header_length
    for spec in header.get("outputs", []):
        name, shape, datatype = spec["name"], spec["shape"], spec["datatype"]
        if datatype not in DTYPES:
            raise ValueError(f"output {name}: datatype {datatype} is not supported by this client")
        size = spec.get("parameters", {}).get("binary_data_size")
        if size is None:  # every output is asked for as binary data
            raise ValueError(f"output {name}: the response has no binary data for it")
        if offset + size > len(body):
            raise ValueError(f"output {name}: the response ends {offset + size - len(body)} bytes early")
        out[name] = np.frombuffer(body, DTYPES[datatype], count=size // DTYPES[datatype].itemsize,
                                  offset=offset).reshape(shape)
        offset += size
    return out


class InferConnection:
    """One keep-alive connection for inference requests; not thread safe (one per thread).

    A request that finds the kept connection closed by the server (a restart, an idle timeout)
    is sent again once on a new connection: inference has no side effects.
    """

    def __init__(self, url: str, network_timeout_s: float, connection_timeout_s: float):
        self.address = split_address(url)
        self.url = url.split("/", 1)[0]
        self.network_timeout_s = network_timeout_s
        self.connection_timeout_s = connection_timeout_s
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._answered = False  # whether any byte of the current answer arrived

    def infer(self, model: str, inputs: dict[str, np.ndarray], version: int | None = None,
              outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Every output (or the named ones) of ``model`` (its ``version``, else the server's
        choice) for ``inputs``. Raises InferenceRefused when Triton answers with an error,
        BrokenAnswer when its answer cannot be read, OSError when it cannot be reached or is
        not an HTTP server."""
        header, blobs = encode_request(inputs, outputs)
        path = f"/v2/models/{quote(model, safe='')}"
        if version is not None:
            path += f"/versions/{int(version)}"
        length = len(header) + sum(b.nbytes for b in blobs)
        head = (f"POST {path}/infer HTTP/1.1\r\nHost: {self.url}\r\n"
                f"Content-Type: application/octet-stream\r\n"
                f"Inference-Header-Content-Length: {len(header)}\r\nContent-Length: {length}\r\n\r\n"
                ).encode()
        parts = [head + header, *blobs]
        reused = self._sock is not None
        try:
            try:
                status, headers, body = self._exchange(parts)
            except ConnectionError:
                if not reused or self._answered:
                    raise
                # The kept connection had gone stale (closed or reset before any answer):
                # once more on a new one.
                self.close()
                status, headers, body = self._exchange(parts)
        except BaseException:
            self.close()  # a timeout or an interrupt leaves the stream in an unknown state
            raise
        if self._buf or headers.get(b"connection", b"").lower() == b"close":
            self.close()  # bytes beyond the answer: a stream out of step is never reused
        if status != 200:
            try:
                message = json.loads(bytes(body))["error"]
            except (ValueError, KeyError, TypeError):
                message = bytes(body[:500]).decode(errors="replace") or f"HTTP status {status}"
            raise InferenceRefused(status, message)
        try:
            out = decode_response(body, int(headers.get(b"inference-header-content-length", len(body))))
        except (ValueError, KeyError, TypeError) as error:
            raise BrokenAnswer(f"its answer could not be read ({type(error).__name__}: {error})") from error
        missing = [name for name in outputs or () if name not in out]
        if missing:
            raise BrokenAnswer(f"its answer lacks the outputs asked for: {', '.join(missing)}")
        return out

    def _exchange(self, parts: list) -> tuple[int, dict[bytes, bytes], bytearray]:
        self._answered = False
        if self._sock is None:
            self._connect()
        sock = self._sock
        if sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts) <= _ONE_SEND:
            sock.sendall(b"".join(parts))
        else:
            for part in parts:
                sock.sendall(part)
        status, headers = self._read_head()
        try:  # Triton's HTTP server always sends it
            length = int(headers[b"content-length"])
        except (KeyError, ValueError):
            length = -1
        if length < 0:
            raise ConnectionError(f"the answer to an inference request (HTTP status {status}) has no valid "
                                  f"Content-Length: is this address a Triton server?")
        return status, headers, self._read_exact(length)

    def _connect(self) -> None:
        try:
            sock = socket.create_connection(self.address, timeout=self.connection_timeout_s)
        except TimeoutError:
            raise ConnectionError(f"no connection within {self.connection_timeout_s:g} s") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.network_timeout_s)
        self._sock, self._buf = sock, bytearray()

    def _fill(self) -> None:
        chunk = self._sock.recv(_RECV)
        if not chunk:
            raise ConnectionError("Triton closed the connection " + (
                "in the middle of an answer" if self._answered else "before answering"))
        self._answered = True
        self._buf += chunk

    def _check_http(self) -> None:
        """Fails as soon as the first bytes show the answer is not HTTP (another service)."""
        if len(self._buf) >= 5 and not self._buf.startswith(b"HTTP/"):
            first_line = bytes(self._buf.split(b"\r\n", 1)[0][:80])
            raise ConnectionError(f"the answer is not HTTP ({first_line!r}): is this address a Triton server?")

    def _read_head(self) -> tuple[int, dict[bytes, bytes]]:
        while (end := self._buf.find(b"\r\n\r\n")) < 0:
            self._check_http()
            if len(self._buf) > _MAX_HEAD:
                raise ConnectionError(f"the answer's headers exceed {_MAX_HEAD} bytes: is this address a "
                                      f"Triton server?")
            self._fill()
        self._check_http()
        lines = bytes(self._buf[:end]).split(b"\r\n")
        del self._buf[:end + 4]
        try:
            status = int(lines[0].split(None, 2)[1])
        except (IndexError, ValueError):
            raise ConnectionError(f"the answer's status line is not HTTP ({lines[0][:80]!r})") from None
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(b":")
            headers[key.strip().lower()] = value.strip()
        return status, headers

    def _read_exact(self, n: int) -> bytearray:
        """The next ``n`` bytes: what is buffered, then received straight into the result."""
        body = bytearray(n)
        have = min(len(self._buf), n)
        body[:have] = self._buf[:have]
        del self._buf[:have]
        view = memoryview(body)
        while have < n:
            got = self._sock.recv_into(view[have:])
            if not got:
                raise ConnectionError("Triton closed the connection in the middle of an answer")
            have += got
        return body

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock, self._buf = None, bytearray()
