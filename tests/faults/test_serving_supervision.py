"""Issue 13, items 4 and 6: `fraud serve` supervises tritonserver (a killed server is restarted,
each restart logged, and past the bound serve exits non-zero with the reason); `fraud status`
exits non-zero when the Triton it is pointed at does not answer; shared-memory regions that
killed runs leave in /dev/shm are removed at the next start, and a server's own at its exit.

Real processes throughout: the `fraud` command, tritonserver, an MLflow store with a champion.
"""

from __future__ import annotations

import json
import os
import queue
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

from fraudlib import graph_store, lifecycle, settings, tracking
from fraudlib.graph_store import Graph
from fraudlib.triton_repo import PUBLIC_MODEL, health_check_inputs
from fraudlib.triton_server import CONTROL_KEY_ENV, SHM_DIR, EmbeddedTriton, TritonClient

TINY_MODEL = Path(__file__).parent.parent / "triton_models" / PUBLIC_MODEL
FRAUD = Path(sys.executable).parent / "fraud"
GRAPH = health_check_inputs(TINY_MODEL / "config.pbtxt")


def _graph_dir(where: Path) -> Path:
    rng = np.random.default_rng(0)
    dims = json.loads((TINY_MODEL / "1" / "meta.json").read_text())["dims"]
    g = Graph(x_user=rng.normal(size=(30, dims["user"])).astype(np.float32),
              x_merchant=rng.normal(size=(20, dims["merchant"])).astype(np.float32),
              edge_index=np.vstack([rng.integers(0, 30, 200), rng.integers(0, 20, 200)]),
              edge_attr=rng.normal(size=(200, dims["edge"])).astype(np.float32),
              label=(rng.random(200) < 0.3).astype(np.int64), split=np.full(200, "test", dtype=object),
              user_features=[f"u{i}" for i in range(dims["user"])],
              merchant_features=[f"m{i}" for i in range(dims["merchant"])],
              edge_features=[f"e{i}" for i in range(dims["edge"])],
              feature_mask_user=np.zeros(dims["user"], np.int32),
              feature_mask_merchant=np.ones(dims["merchant"], np.int32),
              feature_mask_edge=np.full(dims["edge"], 2, np.int32))
    graph_store.write_part(where, "test", g)
    return where


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A runs folder with one champion, promoted by the real lifecycle (repository + registry)."""
    import mlflow

    root = tmp_path_factory.mktemp("runs")
    mp = pytest.MonkeyPatch()
    mp.setenv("FRAUD_RUNS_DIR", str(root))
    for name in ("MLFLOW_TRACKING_URI", "TRITON_URL", "TRITON_MODEL_REPO", CONTROL_KEY_ENV):
        mp.delenv(name, raising=False)
    graph_dir = _graph_dir(tmp_path_factory.mktemp("graph"))
    with EmbeddedTriton(settings.triton_model_repository(), root / "setup.log") as server, \
            server.client() as client:
        with mlflow.start_run(experiment_id=tracking.ensure_experiment()) as run:
            run_id = run.info.run_id
        evaluation = lifecycle.evaluate(TINY_MODEL, graph_dir, client, run_id)
        lifecycle.deploy(evaluation.decision.decision, evaluation.challenger_version,
                         evaluation.registry_version, client)
    yield root
    mp.undo()


def _env(root: Path) -> dict:
    env = {**os.environ, "FRAUD_RUNS_DIR": str(root), "MLFLOW_DISABLE_TELEMETRY": "true"}
    for name in ("MLFLOW_TRACKING_URI", "TRITON_URL", "TRITON_MODEL_REPO", CONTROL_KEY_ENV):
        env.pop(name, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line)


def _wait_for(lines: queue.Queue, words: str, timeout: float = 60.0) -> str:
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        seen.append(line)
        if words in line:
            return line
    raise AssertionError(f"no line with {words!r} within {timeout} s; saw:\n{''.join(seen)}")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _score(url: str) -> np.ndarray:
    with TritonClient(url) as c:
        return c.infer(PUBLIC_MODEL, GRAPH, outputs=["PREDICTION"])["PREDICTION"]


@pytest.mark.slow  # the `fraud` command starts in ~10 s (imports)
def test_serve_restarts_a_killed_tritonserver_then_gives_up_with_the_reason(project):
    port, grpc_port = _free_port(), _free_port()
    serve = subprocess.Popen([str(FRAUD), "serve", "--port", str(port), "--grpc-port", str(grpc_port),
                              "--max-restarts", "2"], env=_env(project), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    out, err = queue.Queue(), queue.Queue()
    for stream, q in ((serve.stdout, out), (serve.stderr, err)):
        threading.Thread(target=_lines, args=(stream, q), daemon=True).start()
    try:
        line = _wait_for(out, "serving")
        url = f"127.0.0.1:{port}"
        assert f"http://{url}" in line and f"gRPC 127.0.0.1:{grpc_port}" in line
        before = _score(url)
        pid = int(line.split("tritonserver pid ")[1].split(";")[0])
        pids = [pid]
        for restart in (1, 2):
            os.kill(pid, signal.SIGKILL)
            _wait_for(err, f"restarting it ({restart} of at most 2")
            line = _wait_for(err, "tritonserver restarted")
            pid = int(line.split("(pid ")[1].split(")")[0])
            pids.append(pid)
            np.testing.assert_array_equal(_score(url), before)  # same URL, champion loaded again
        os.kill(pid, signal.SIGKILL)
        line = _wait_for(err, "stopped serving", timeout=60)
        assert serve.wait(timeout=30) == 4
        assert "exited with code -9" in line or "exited with code" in "".join(list(err.queue)) + line
        assert not any(_alive(p) for p in pids)
        assert not [e for e in os.listdir(SHM_DIR) if e.startswith(f"fraud{serve.pid}_")]
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()


@pytest.mark.slow  # the `fraud` command starts in ~10 s (imports)
def test_serve_stops_cleanly_on_sigterm(project):
    port = _free_port()
    serve = subprocess.Popen([str(FRAUD), "serve", "--port", str(port), "--grpc-port", str(_free_port())],
                             env=_env(project), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = queue.Queue()
    threading.Thread(target=_lines, args=(serve.stdout, out), daemon=True).start()
    try:
        line = _wait_for(out, "serving")
        pid = int(line.split("tritonserver pid ")[1].split(";")[0])
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=30) == 0
        assert not _alive(pid)
        assert not [e for e in os.listdir(SHM_DIR) if e.startswith(f"fraud{serve.pid}_")]
        assert not list((project / "triton_keys").glob(f"127.0.0.1_{port}.key"))
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()


@pytest.mark.slow  # the `fraud` command starts in ~10 s (imports)
def test_status_exits_non_zero_when_the_triton_url_does_not_answer(project):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, never listening: nothing answers
        url = f"127.0.0.1:{s.getsockname()[1]}"
        done = subprocess.run([str(FRAUD), "status", "--triton-url", url], env=_env(project),
                              capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "not reachable" in done.stdout and "TRITON UNAVAILABLE" in done.stdout
    assert "INCONSISTENT" not in done.stdout  # the project itself is fine: the server is the problem


@pytest.mark.slow  # the `fraud` command starts in ~10 s (imports)
def test_status_of_a_serving_triton_exits_zero_with_the_key_from_the_runs_folder(project):
    with EmbeddedTriton(settings.triton_model_repository(), project / "status.log") as server:
        lifecycle.repository(server.client()).load()
        done = subprocess.run([str(FRAUD), "status", "--triton-url", server.url], env=_env(project),
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"triton: {PUBLIC_MODEL} v1 READY" in done.stdout


KILLED_RUN = """
import os, shutil, sys, time
from pathlib import Path
from fraudlib.triton_server import EmbeddedTriton
root = Path(sys.argv[1])
t = EmbeddedTriton(root / "repo", root / "triton.log").start()
with t.client() as c:
    c.load_model("prediction_and_shapley")
print(t.pid, flush=True)
time.sleep(600)
"""


def _shm_of(pid: int) -> list[str]:
    return [e for e in os.listdir(SHM_DIR) if e.startswith(f"fraud{pid}_")]


def test_shared_memory_of_killed_runs_is_removed_at_the_next_start(tmp_path):
    shutil.copytree(TINY_MODEL, tmp_path / "repo" / PUBLIC_MODEL)
    run = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    server_pid = int(run.stdout.readline())
    os.kill(server_pid, signal.SIGKILL)  # the server first, then the run: nobody cleans up
    run.kill()
    run.wait()
    deadline = time.monotonic() + 10
    while _alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _shm_of(run.pid)
    assert left, "the killed run left no shared memory: nothing reproduced"
    with EmbeddedTriton(tmp_path / "repo", tmp_path / "next.log"):
        assert _shm_of(run.pid) == []


def test_a_server_removes_its_shared_memory_when_it_stops_even_after_being_killed(tmp_path):
    shutil.copytree(TINY_MODEL, tmp_path / "repo" / PUBLIC_MODEL)
    mine = f"fraud{os.getpid()}_"
    with EmbeddedTriton(tmp_path / "repo", tmp_path / "a.log") as server:
        with server.client() as c:
            c.load_model(PUBLIC_MODEL)
        port = server.url.rsplit(":", 1)[1]
        assert [e for e in os.listdir(SHM_DIR) if e.startswith(f"{mine}{port}_")]
        os.kill(server.pid, signal.SIGKILL)  # it cannot clean up; stop() (at the block's end) does
        deadline = time.monotonic() + 10
        while server.running and time.monotonic() < deadline:
            time.sleep(0.1)
    assert not [e for e in os.listdir(SHM_DIR) if e.startswith(f"{mine}{port}_")]
