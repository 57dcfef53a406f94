"""The embedded Triton server and the client, against the real bundled tritonserver."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fraudlib.triton_server import (EmbeddedTriton, TritonClient, TritonError, TritonStartError,
                                    TritonUnreachable, connect, connect_or_start)

TINY_MODEL = Path(__file__).parent / "triton_models" / "prediction_and_shapley"
MODEL = "prediction_and_shapley"


def tiny_inputs(n_edges: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "x_user": rng.random((4, 3), dtype=np.float32),
        "x_merchant": rng.random((5, 4), dtype=np.float32),
        "edge_index_user_to_merchant": np.stack([np.arange(n_edges) % 4,
                                                 np.arange(n_edges) % 5]).astype(np.int64),
        "edge_attr_user_to_merchant": rng.random((n_edges, 5), dtype=np.float32),
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton")
    repo = root / "repository"
    shutil.copytree(TINY_MODEL, repo / MODEL)
    with EmbeddedTriton(repo, root / "triton.log") as triton:
        yield triton


@pytest.fixture
def client(server):
    with server.client() as c:
        c.load_model(MODEL)
        yield c


def test_embedded_server_is_live_and_ready_on_loopback(server):
    assert server.url.startswith("127.0.0.1:")
    with TritonClient(server.url) as c:
        assert c.is_live() and c.is_ready()


def test_stopped_server_no_longer_answers(tmp_path):
    (tmp_path / "repo").mkdir()
    triton = EmbeddedTriton(tmp_path / "repo", tmp_path / "triton.log").start()
    url, pid = triton.url, triton.pid
    triton.stop()
    assert not triton.running
    assert not TritonClient(url).is_live()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_explicitly_loaded_model_scores_with_its_version(client):
    index = client.repository_index()
    assert {"name": MODEL, "version": "1", "state": "READY"} in index
    out = client.infer(MODEL, tiny_inputs(3), version=1)
    assert out["PREDICTION"].shape == (3, 1)
    assert np.all((out["PREDICTION"] > 0) & (out["PREDICTION"] < 1))


@pytest.mark.parametrize("bad, reason", [
    ({"x_user": np.ones((4, 2), np.float32)}, "wrong feature dims"),
    ({"x_user": np.ones((4, 3), np.float64)}, "wrong dtype"),
    ({"edge_attr_user_to_merchant": np.full((3, 5), np.nan, np.float32)}, "NaN"),
    ({"edge_index_user_to_merchant": np.array([[0, 9, 1], [0, 1, 2]], np.int64)}, "unknown node"),
])
def test_malformed_inputs_get_an_error_and_the_server_keeps_serving(client, bad, reason):
    with pytest.raises(TritonError, match=MODEL):
        client.infer(MODEL, {**tiny_inputs(3), **bad}, version=1)
    assert client.infer(MODEL, tiny_inputs(3), version=1)["PREDICTION"].shape == (3, 1)


def test_inference_answers_as_the_reference_tritonclient_does(client):
    import tritonclient.http as httpclient
    from tritonclient.utils import np_to_triton_dtype

    inputs = {**tiny_inputs(3), "COMPUTE_SHAP": np.array([True])}
    tensors = []
    for name, array in inputs.items():
        tensors.append(httpclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype)))
        tensors[-1].set_data_from_numpy(array, binary_data=True)
    with httpclient.InferenceServerClient(client.url) as reference:
        expected = reference.infer(MODEL, tensors, model_version="1")
    names = [o["name"] for o in expected.get_response()["outputs"]]
    ours = client.infer(MODEL, inputs, version=1)
    assert list(ours) == names and len(names) == 4
    for name in names:
        assert ours[name].dtype == np.float32
        np.testing.assert_array_equal(ours[name], expected.as_numpy(name))


def test_one_client_serves_several_threads_at_once(client):
    """lifecycle.evaluate scores the challenger and the champion side by side with one client:
    each thread gets its own connections (tritonclient's gevent client cannot cross threads)."""
    from concurrent.futures import ThreadPoolExecutor

    expected = [client.infer(MODEL, tiny_inputs(n), version=1)["PREDICTION"] for n in (3, 7)]

    def work(n):
        client.require_live()
        assert client.is_model_ready(MODEL, 1)
        return client.infer(MODEL, tiny_inputs(n), version=1)["PREDICTION"]

    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(work, [3, 7] * 4))
    for i, out in enumerate(got):
        np.testing.assert_array_equal(out, expected[i % 2])
    assert client.infer(MODEL, tiny_inputs(3), version=1)["PREDICTION"].shape == (3, 1)  # still usable here


def test_an_unknown_model_or_version_is_named_in_the_error(client):
    with pytest.raises(TritonError, match="inference on no_such_model version .default. failed: .*no_such_model"):
        client.infer("no_such_model", tiny_inputs(3))
    with pytest.raises(TritonError, match=f"inference on {MODEL} version 7 failed"):
        client.infer(MODEL, tiny_inputs(3), version=7)
    assert client.infer(MODEL, tiny_inputs(3), version=1)["PREDICTION"].shape == (3, 1)


def test_one_client_keeps_scoring_across_a_server_restart_on_its_port(tmp_path):
    shutil.copytree(TINY_MODEL, tmp_path / "repo" / MODEL)
    with EmbeddedTriton(tmp_path / "repo", tmp_path / "a.log") as first:
        port = int(first.url.rsplit(":", 1)[1])
        with first.client() as control:
            control.load_model(MODEL)
        c = TritonClient(first.url)
        before = c.infer(MODEL, tiny_inputs(3), outputs=["PREDICTION"])["PREDICTION"]
    with EmbeddedTriton(tmp_path / "repo", tmp_path / "b.log", http_port=port) as second:
        with second.client() as control:
            control.load_model(MODEL)
        c.infer(MODEL, tiny_inputs(3))  # the kept connection is the first server's: a new one is opened
        after = c.infer(MODEL, tiny_inputs(3), outputs=["PREDICTION"])["PREDICTION"]
    c.close()
    np.testing.assert_array_equal(before, after)


def test_unreachable_url_names_the_url_and_what_to_do():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: nothing answers
        with pytest.raises(TritonUnreachable, match=f"Triton at {url} is not reachable.*TRITON_URL"):
            connect(url)
        with pytest.raises(TritonUnreachable, match="not reachable"):
            TritonClient(url).repository_index()
        with pytest.raises(TritonUnreachable, match=f"Triton at {url} is not reachable.*TRITON_URL"):
            TritonClient(url).infer(MODEL, tiny_inputs(3))


def test_an_address_that_answers_something_other_than_http_is_named():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(30)
        url = f"127.0.0.1:{listener.getsockname()[1]}"

        def answer_like_ssh():  # an SSH server speaks first, one line, and waits
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
                conn.settimeout(30)
                conn.recv(65536)

        thread = threading.Thread(target=answer_like_ssh, daemon=True)
        thread.start()
        with pytest.raises(TritonUnreachable, match=f"Triton at {url} is not reachable.*not HTTP.*SSH-2.0"):
            TritonClient(url).infer(MODEL, tiny_inputs(3))
        thread.join(timeout=30)


def test_connect_uses_TRITON_URL(server, monkeypatch):
    monkeypatch.setenv("TRITON_URL", f"http://{server.url}")
    with connect() as c:
        assert c.url == server.url and c.is_ready()


def test_connect_without_any_url_says_how_to_get_one(monkeypatch):
    monkeypatch.delenv("TRITON_URL", raising=False)
    with pytest.raises(TritonUnreachable, match="TRITON_URL"):
        connect()


def test_connect_or_start_uses_the_given_server_and_starts_none(server, tmp_path):
    with connect_or_start(server.url, tmp_path / "unused.log", tmp_path / "unused") as c:
        assert c.url == server.url and c.is_ready()
    assert not (tmp_path / "unused.log").exists() and not (tmp_path / "unused").exists()


def test_connect_or_start_without_a_url_serves_the_repository_until_the_block_ends(tmp_path):
    shutil.copytree(TINY_MODEL, tmp_path / "repo" / MODEL)
    with connect_or_start("", tmp_path / "triton.log", tmp_path / "repo") as c:
        c.load_model(MODEL)
        assert c.infer(MODEL, tiny_inputs(2), outputs=["PREDICTION"])["PREDICTION"].shape == (2, 1)
        url = c.url
    assert (tmp_path / "triton.log").stat().st_size > 0
    assert not TritonClient(url).is_live()


def test_connect_or_start_with_an_unreachable_url_starts_nothing(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"127.0.0.1:{s.getsockname()[1]}"
        with pytest.raises(TritonUnreachable, match=url):
            with connect_or_start(url, tmp_path / "triton.log", tmp_path / "repo"):
                pass
    assert not (tmp_path / "repo").exists()


def test_server_that_cannot_start_reports_its_log(tmp_path):
    (tmp_path / "repo").mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        triton = EmbeddedTriton(tmp_path / "repo", tmp_path / "triton.log",
                                http_port=taken.getsockname()[1])
        with pytest.raises(TritonStartError, match="exited with code .*log"):
            triton.start()
    assert not triton.running


def test_missing_model_repository_is_created_empty(tmp_path):
    with EmbeddedTriton(tmp_path / "new" / "repo", tmp_path / "triton.log") as triton:
        with triton.client() as c:
            assert c.is_ready() and c.repository_index() == []


def test_server_stops_when_the_process_that_started_it_dies(tmp_path):
    (tmp_path / "repo").mkdir()
    script = (
        "import sys, time; from pathlib import Path\n"
        "from fraudlib.triton_server import EmbeddedTriton\n"
        f"t = EmbeddedTriton(Path({str(tmp_path / 'repo')!r}), Path({str(tmp_path / 'log')!r})).start()\n"
        "print(t.pid, flush=True)\n"
        "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    server_pid = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)  # no atexit, no cleanup: only the death signal is left
    parent.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _alive(server_pid):
        time.sleep(0.1)
    assert not _alive(server_pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
