"""Issue 13, item 1: Triton's model-control and repository API is closed to anyone without the
per-start key, on HTTP and gRPC; inference, health and metadata stay open; every listener is
on loopback; the pipeline's own processes (given only the URL) still stage and promote.

All against the real embedded tritonserver, with a real load request that carries its own
``model.py`` (Triton would run it) as the attack.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from fraudlib import settings
from fraudlib.triton_repo import PUBLIC_MODEL, health_check_inputs
from fraudlib.triton_server import (CONTROL_HEADER, CONTROL_KEY_ENV, GRPC_CONTROL_HEADER, EmbeddedTriton,
                                    TritonClient, TritonError, control_key)

TINY_MODEL = Path(__file__).parent.parent / "triton_models" / PUBLIC_MODEL
PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    mp = pytest.MonkeyPatch()
    mp.setenv("FRAUD_RUNS_DIR", str(root))
    for name in ("TRITON_URL", "TRITON_MODEL_REPO", CONTROL_KEY_ENV):
        mp.delenv(name, raising=False)
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def server(runs):
    shutil.copytree(TINY_MODEL, runs / "repository" / PUBLIC_MODEL)
    with EmbeddedTriton(runs / "repository", runs / "triton.log") as triton:
        with triton.client() as c:
            c.load_model(PUBLIC_MODEL)
        yield triton


def request(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    host, port = url.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def evil_load_body(marker: Path) -> bytes:
    """A load request whose file override is a model.py that writes ``marker`` when Triton runs it."""
    code = (f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
            "class TritonPythonModel:\n    def execute(self, requests):\n        return []\n")
    config = {"name": "evil", "backend": "python", "max_batch_size": 0,
              "input": [{"name": "IN", "data_type": "TYPE_FP32", "dims": [1]}],
              "output": [{"name": "OUT", "data_type": "TYPE_FP32", "dims": [1]}]}
    return json.dumps({"parameters": {"config": json.dumps(config),
                                      "file:1/model.py": base64.b64encode(code.encode()).decode()}}).encode()


RESTRICTED = [
    ("POST", f"/v2/repository/models/{PUBLIC_MODEL}/load", b"{}"),
    ("POST", f"/v2/repository/models/{PUBLIC_MODEL}/unload", b"{}"),
    ("POST", "/v2/repository/index", b"{}"),
    ("GET", f"/v2/models/{PUBLIC_MODEL}/config", None),
    ("GET", "/v2/models/stats", None),
    ("GET", "/v2/systemsharedmemory/status", None),
    ("POST", "/v2/systemsharedmemory/region/x/register", b'{"key": "/x", "offset": 0, "byte_size": 8}'),
    ("GET", "/v2/trace/setting", None),
    ("GET", "/v2/logging", None),
]


def test_a_load_with_a_model_py_in_its_body_is_refused_and_nothing_runs(server, tmp_path):
    marker = tmp_path / "pwned"
    status, body = request(server.url, "POST", "/v2/repository/models/evil/load", evil_load_body(marker))
    assert status == 403 and CONTROL_HEADER.encode() in body
    status, _ = request(server.url, "POST", "/v2/repository/models/evil/load", evil_load_body(marker),
                        {CONTROL_HEADER: "guessed"})
    assert status == 403
    assert not marker.exists()
    assert request(server.url, "GET", "/v2/models/evil/ready")[0] != 200


@pytest.mark.parametrize("method, path, body", RESTRICTED, ids=[f"{m} {p}" for m, p, _ in RESTRICTED])
def test_every_control_endpoint_needs_the_key(server, method, path, body):
    assert request(server.url, method, path, body)[0] == 403
    assert request(server.url, method, path, body, {CONTROL_HEADER: "wrong"})[0] == 403


def test_the_champion_is_still_served_after_the_refused_unload(server):
    request(server.url, "POST", f"/v2/repository/models/{PUBLIC_MODEL}/unload", b"{}")
    assert request(server.url, "GET", f"/v2/models/{PUBLIC_MODEL}/ready")[0] == 200


def test_inference_health_and_metadata_stay_open(server):
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{PUBLIC_MODEL}/ready", "/v2",
                 f"/v2/models/{PUBLIC_MODEL}"):
        assert request(server.url, "GET", path)[0] == 200, path
    with TritonClient(server.url, control_key="not the key") as anyone:  # inference sends no key
        out = anyone.infer(PUBLIC_MODEL, health_check_inputs(TINY_MODEL / "config.pbtxt"), outputs=["PREDICTION"])
    assert out["PREDICTION"].shape == (6, 1)


def test_grpc_serves_on_loopback_under_the_same_restriction(server):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    assert server.grpc_url.startswith("127.0.0.1:")
    with grpcclient.InferenceServerClient(server.grpc_url) as g:
        assert g.is_server_ready() and g.is_model_ready(PUBLIC_MODEL)  # what the blueprint client waits on
        with pytest.raises(InferenceServerException, match="restricted"):
            g.load_model(PUBLIC_MODEL)
        with pytest.raises(InferenceServerException, match="restricted"):
            g.get_model_repository_index()
        with pytest.raises(InferenceServerException, match="restricted"):
            g.unload_model(PUBLIC_MODEL, headers={GRPC_CONTROL_HEADER: "wrong"})
        g.get_model_repository_index(headers={GRPC_CONTROL_HEADER: control_key(server.url)})
        x = health_check_inputs(TINY_MODEL / "config.pbtxt")
        inputs = []
        for name, array in x.items():
            inputs.append(grpcclient.InferInput(name, list(array.shape),
                                                {np.float32: "FP32", np.int64: "INT64", np.bool_: "BOOL"}[array.dtype.type]))
            inputs[-1].set_data_from_numpy(array)
        assert g.infer(PUBLIC_MODEL, inputs).as_numpy("PREDICTION").shape == (6, 1)


def _listening(pid: int) -> list[str]:
    """host:port of every TCP socket the process listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:  # the server closed this descriptor while we listed them
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, family in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                address, port = fields[1].split(":")
                raw = bytes.fromhex(address)  # little-endian 32-bit words
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                host = ipaddress.ip_address(raw)
                if family == 6 and host.ipv4_mapped:  # gRPC binds 127.0.0.1 as ::ffff:127.0.0.1
                    host = host.ipv4_mapped
                found.append(f"{host}:{int(port, 16)}")
    return found


def test_every_listener_is_on_loopback_and_there_is_no_metrics_port(server):
    listening = _listening(server.pid)
    assert sorted(listening) == sorted([server.url, server.grpc_url])


def test_the_key_is_drawn_at_each_start_kept_0600_and_removed_at_stop(runs, tmp_path):
    (tmp_path / "repo").mkdir()
    keys = []
    for _ in range(2):
        with EmbeddedTriton(tmp_path / "repo", tmp_path / "triton.log") as triton:
            folder = settings.runs_root() / "triton_keys"
            files = [p for p in folder.iterdir() if triton.url.replace(":", "_") in p.name]
            assert len(files) == 1
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700
            assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
            keys.append(json.loads(files[0].read_text())["key"])
            assert len(keys[-1]) >= 32
            assert keys[-1] not in os.environ.values()
        assert not files[0].exists()
    assert keys[0] != keys[1]


CHILD = """
import json, sys
from pathlib import Path
from fraudlib.triton_repo import TritonRepository
from fraudlib.triton_server import TritonClient, TritonError
url, repo_root, package = sys.argv[1:4]
repo = TritonRepository(Path(repo_root), TritonClient(url))
try:
    version = repo.stage(Path(package))
    repo.promote(version)
    print(json.dumps({"champion": repo.state().champion, "health": repo.health_check().ok}))
except TritonError as e:
    print(json.dumps({"error": str(e)}))
"""


def _child(url: str, repo: Path, package: Path, env: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, url, str(repo), str(package)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=PROJECT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_another_process_given_only_the_url_stages_and_promotes(runs, tmp_path):
    """As a notebook kernel does: the URL is its parameter, the key comes from the 0600 file."""
    with EmbeddedTriton(tmp_path / "repo", tmp_path / "triton.log") as triton:
        env = {k: v for k, v in os.environ.items() if k != CONTROL_KEY_ENV}
        assert _child(triton.url, triton.model_repository, TINY_MODEL, env) == {"champion": 1, "health": True}


def test_an_external_server_takes_its_key_from_TRITON_CONTROL_KEY(runs, tmp_path):
    """A process that finds no key file (another runs folder: an external server) is refused
    until it is given the key through the environment."""
    with EmbeddedTriton(tmp_path / "repo", tmp_path / "triton.log") as triton:
        env = {**os.environ, "FRAUD_RUNS_DIR": str(tmp_path / "elsewhere")}
        env.pop(CONTROL_KEY_ENV, None)
        refused = _child(triton.url, triton.model_repository, TINY_MODEL, env)
        assert "restricted" in refused["error"] and CONTROL_KEY_ENV in refused["error"]
        env[CONTROL_KEY_ENV] = control_key(triton.url)
        assert _child(triton.url, triton.model_repository, TINY_MODEL, env) == {"champion": 1, "health": True}


def test_the_client_error_says_the_api_is_restricted(server):
    with TritonClient(server.url, control_key="wrong") as c, pytest.raises(TritonError, match="restricted") as e:
        c.repository_index()
    assert e.value.status == 403 and CONTROL_KEY_ENV in str(e.value)


def test_docker_compose_binds_to_loopback_with_the_control_api_restricted():
    compose = yaml.safe_load((PROJECT / "triton" / "docker-compose.yml").read_text())
    service = compose["services"]["triton"]
    assert all(str(port).startswith("127.0.0.1:") for port in service["ports"]), service["ports"]
    command = " ".join(service["command"])
    assert "--http-restricted-api=model-repository,model-config,shared-memory,statistics,trace,logging:" \
           f"{CONTROL_HEADER}=${{{CONTROL_KEY_ENV}:?" in command
    assert "--grpc-restricted-protocol=model-repository,model-config,shared-memory,statistics,trace,logging:" \
           f"{CONTROL_HEADER}=${{{CONTROL_KEY_ENV}:?" in command
