"""Triton Inference Server: the embedded server, an external one, and one client for both.

The embedded server is the real ``tritonserver`` binary shipped in the ``nvidia-pytriton``
wheel, run on a free loopback port with explicit model control. Facts it depends on:

- The Python backend needs the stub built for the running Python; we copy it, with the
  backend library, into a backend directory of our own next to the model repository
  instead of writing into site-packages.
- The stub is linked against ``libpython3.X.so``; without this interpreter's library
  directory first on ``LD_LIBRARY_PATH`` it may load the system's libpython and then
  fail to import torch_geometric (``undefined symbol: _PyModule_Add``).
- The stub imports packages from the first Python on ``PATH``, so this venv goes first.
- numpy must stay below 2 in the serving environment (numpy 2 silently delivers
  zero-filled inputs to the bundled backend).
- The stub puts its working directory on ``sys.path``, so the server runs in a directory
  of ours (the project root's ``triton/`` folder would shadow the ``triton`` package).

An external server is reached through ``TRITON_URL`` (see :func:`connect`).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from fraudlib.triton_http import BrokenAnswer, InferConnection, InferenceRefused

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
# Triton waits this long for open client connections and in-flight requests on SIGTERM.
EXIT_TIMEOUT_S = 3
LOAD_TIMEOUT_S = 600.0
_LOG_TAIL_LINES = 25
_PORT_ATTEMPTS = 3

if int(np.__version__.split(".")[0]) >= 2:  # pragma: no cover - guarded by requirements
    raise ImportError(
        f"numpy {np.__version__} is installed; the Triton Python backend needs numpy < 2 "
        "(numpy 2 makes it deliver zero-filled inputs). Install numpy<2 in this environment.")


class TritonError(RuntimeError):
    """Triton refused a request or failed; the message says which and what to do."""


class TritonUnreachable(TritonError):
    """No Triton server answers at the given URL."""


class TritonStartError(TritonError):
    """The embedded server died or did not become ready; carries its log tail."""


# --- embedded server --------------------------------------------------------------------

def _pytriton_dist() -> Path:
    import pytriton

    dist = Path(pytriton.__file__).resolve().parent / "tritonserver"
    if not (dist / "bin" / "tritonserver").exists():
        raise TritonStartError(
            f"no tritonserver binary under {dist}: install the nvidia-pytriton wheel "
            "(pip install -r requirements.txt).")
    return dist


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_directory(dest_root: Path) -> Path:
    """A backend directory holding the Python backend with this interpreter's stub.

    Built once under ``dest_root`` (temp dir, then rename) and reused afterwards.
    """
    dist = _pytriton_dist()
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / pyver / "triton_python_backend_stub"
    if not stub.exists():
        raise TritonStartError(f"nvidia-pytriton ships no Python backend stub for Python {pyver} "
                               f"(looked for {stub}); use Python 3.8-3.13.")
    target = Path(dest_root) / f"tritonserver-backends-py{pyver}"
    if (target / "python" / stub.name).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".backends-", dir=target.parent))
    try:
        shutil.copytree(dist / "backends" / "python", tmp / "python",
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, tmp / "python" / stub.name)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "python" / stub.name).exists():  # not a concurrent builder's win
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _server_env() -> dict[str, str]:
    env = os.environ.copy()
    libs = [str(_pytriton_dist().parent.parent / "nvidia_pytriton.libs")]
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        libs.insert(0, libdir)
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(libs)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM the server when its parent dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def log_tail(log_path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """The last log lines, without the tables Triton prints at start-up."""
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    kept = [line for line in text.splitlines() if line.strip() and line[:1] not in "|+"]
    return "\n".join(kept[-lines:])


class EmbeddedTriton:
    """The bundled ``tritonserver`` on loopback, explicit model control.

    Use as a context manager, or ``start()``/``stop()``. It is also stopped at interpreter
    exit, and (Linux) when the thread that started it dies.
    """

    def __init__(self, model_repository: Path, log_path: Path, http_port: int | None = None,
                 start_timeout_s: float = START_TIMEOUT_S):
        self.model_repository = Path(model_repository).resolve()
        self.log_path = Path(log_path).resolve()
        self.http_port = http_port
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.start_to_ready_s: float | None = None

    def _command(self, port: int, backends: Path) -> list[str]:
        return [
            str(_pytriton_dist() / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            "--model-control-mode=explicit",
            "--disable-auto-complete-config",
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
            f"--backend-directory={backends}",
            "--http-address=127.0.0.1",
            f"--http-port={port}",
            "--allow-grpc=false",
            "--allow-metrics=false",
            "--allow-gpu-metrics=false",
            # A distinct shared-memory prefix lets several servers run side by side.
            f"--backend-config=python,shm-region-prefix-name=fraud{os.getpid()}_{port}_",
        ]

    def start(self) -> EmbeddedTriton:
        if self._proc is not None:
            return self
        self.model_repository.mkdir(parents=True, exist_ok=True)  # empty is a valid start
        backends = backend_directory(self.model_repository.parent)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        for attempt in range(_PORT_ATTEMPTS):
            port = self.http_port or _free_port()
            try:
                self._launch(port, backends)
                break
            except TritonStartError as e:
                # A free port can be taken between our probe and the server's bind: retry.
                port_race = not self.http_port and "already in use" in str(e)
                if not port_race or attempt == _PORT_ATTEMPTS - 1:
                    raise
        self.start_to_ready_s = time.monotonic() - t0
        return self

    def _launch(self, port: int, backends: Path) -> None:
        with open(self.log_path, "ab") as log:
            # The stub puts its working directory on sys.path: run it in our backend directory,
            # not e.g. the project root, whose triton/ folder would shadow the `triton`
            # package torch probes for (AttributeError: module 'triton' has no attribute ...).
            self._proc = subprocess.Popen(
                self._command(port, backends), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, env=_server_env(), cwd=backends,
                preexec_fn=_die_with_parent)
        atexit.register(self.stop)
        self.url = f"127.0.0.1:{port}"
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        # Short timeouts: whatever else may listen on the port must not stall the wait.
        with TritonClient(self.url, network_timeout_s=2.0, connection_timeout_s=1.0) as client:
            self._poll_ready(client)

    def _poll_ready(self, client: TritonClient) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise TritonStartError(
                    f"tritonserver exited with code {self._proc.returncode} while starting "
                    f"(repository {self.model_repository}, log {self.log_path}):\n"
                    f"{log_tail(self.log_path)}")
            if client.is_ready():
                return
            time.sleep(0.05)
        raise TritonStartError(
            f"tritonserver was not ready within {self.start_timeout_s:.0f} s "
            f"(log {self.log_path}):\n{log_tail(self.log_path)}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client(self) -> TritonClient:
        if self.url is None:
            raise TritonError("the embedded Triton is not started: call start() first.")
        return TritonClient(self.url)

    def __enter__(self) -> EmbeddedTriton:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --- client -----------------------------------------------------------------------------

def connect(url: str | None = None) -> TritonClient:
    """A client for ``url`` or ``$TRITON_URL``, checked to be live."""
    url = url or os.environ.get("TRITON_URL")
    if not url:
        raise TritonUnreachable(
            "no Triton URL: pass one, set TRITON_URL=host:port, or start the embedded server "
            "(`fraud serve`, or fraudlib.triton_server.EmbeddedTriton).")
    client = TritonClient(url)
    client.require_live()
    return client


@contextlib.contextmanager
def connect_or_start(url: str | None, log_path: Path, repository: Path | None = None,
                     http_port: int | None = None):
    """A client of the Triton at ``url`` (checked live) or, when ``url`` is empty, of an
    embedded server on ``repository`` (default: the project's) started for the duration, with
    its log at ``log_path``. Callers that honour ``$TRITON_URL`` pass it as ``url``."""
    if url:
        with connect(url) as client:
            yield client
        return
    from fraudlib import settings

    with EmbeddedTriton(repository or settings.triton_model_repository(), log_path,
                        http_port=http_port) as server, server.client() as client:
        yield client


def _strip_scheme(url: str) -> str:
    for scheme in ("http://", "https://"):
        if url.startswith(scheme):
            return url[len(scheme):]
    return url


class TritonClient:
    """The few Triton HTTP operations this project needs, with errors that explain.

    Not thread safe (nor is the underlying tritonclient): use one per thread.
    """

    def __init__(self, url: str, network_timeout_s: float = LOAD_TIMEOUT_S,
                 connection_timeout_s: float = 10.0):
        self.url = _strip_scheme(url)
        self._http = httpclient.InferenceServerClient(
            self.url, connection_timeout=connection_timeout_s, network_timeout=network_timeout_s)
        # Inference goes over its own lean connection (fraudlib.triton_http says why).
        self._infer = InferConnection(self.url, network_timeout_s, connection_timeout_s)

    def _unreachable(self, cause: BaseException) -> TritonUnreachable:
        return TritonUnreachable(
            f"Triton at {self.url} is not reachable ({type(cause).__name__}: {cause}): start it "
            "with `fraud serve` (embedded server) or set TRITON_URL to a running server.")

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InferenceServerException as e:
            if e.status() is None and "connect" in str(e).lower():
                raise self._unreachable(e) from e
            raise TritonError(f"Triton at {self.url}: {what} failed: {e.message()}") from e
        except (OSError, ConnectionError) as e:
            raise self._unreachable(e) from e

    def is_live(self) -> bool:
        try:
            return bool(self._http.is_server_live())
        except Exception:  # unreachable or not yet listening: both mean "not live"
            return False

    def is_ready(self) -> bool:
        try:
            return bool(self._http.is_server_ready())
        except Exception:
            return False

    def require_live(self) -> None:
        self._call("liveness check", self._http.is_server_live)

    def is_model_ready(self, model: str, version: int | None = None) -> bool:
        return bool(self._call(f"readiness of {model}", self._http.is_model_ready, model,
                               "" if version is None else str(version)))

    def repository_index(self) -> list[dict]:
        """Every model and version Triton knows: dicts with name, version, state, reason."""
        return list(self._call("repository index", self._http.get_model_repository_index))

    def model_config(self, model: str) -> dict:
        return self._call(f"config of {model}", self._http.get_model_config, model)

    def load_model(self, model: str, config: str | None = None) -> None:
        """Load (or reload) ``model``; ``config`` is an optional JSON override."""
        self._call(f"loading model {model}", self._http.load_model, model, config=config)

    def unload_model(self, model: str) -> None:
        self._call(f"unloading model {model}", self._http.unload_model, model,
                   unload_dependents=False)

    def infer(self, model: str, inputs: dict[str, np.ndarray], version: int | None = None,
              outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """One request; tensors travel as binary data. Returns every (or the named) output."""
        what = f"inference on {model} version {version if version is not None else '(default)'}"
        try:
            return self._infer.infer(model, inputs, version=version, outputs=outputs)
        except (InferenceRefused, BrokenAnswer) as e:
            raise TritonError(f"Triton at {self.url}: {what} failed: {e}") from e
        except TimeoutError as e:
            raise TritonError(f"Triton at {self.url}: {what} failed: no answer within "
                              f"{self._infer.network_timeout_s:g} s") from e
        except OSError as e:
            raise self._unreachable(e) from e

    def close(self) -> None:
        self._infer.close()
        self._http.close()

    def __enter__(self) -> TritonClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
