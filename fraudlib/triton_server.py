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

Control plane. Loading a model runs its code (a load request may even carry a ``model.py`` in
its body), so the embedded server restricts every API but inference, health and metadata, on
HTTP and gRPC alike, to requests that carry the header ``fraud-control-key`` (gRPC:
``triton-grpc-protocol-fraud-control-key``) with a random key drawn at each start. The key is
kept in this process and in a 0600 file under ``<runs>/triton_keys/`` (folder 0700) for the
other processes of a run (the notebook kernels, which get only the URL as a parameter), and
removed when the server stops. :class:`TritonClient` sends it on every control call: the key of
the embedded server at its URL, else ``$TRITON_CONTROL_KEY`` (an external server started with
``--http-restricted-api=...:fraud-control-key=<key>``).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

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

# The control plane: every API but inference, health and metadata needs the per-start key.
CONTROL_HEADER = "fraud-control-key"
GRPC_CONTROL_HEADER = f"triton-grpc-protocol-{CONTROL_HEADER}"  # what Triton's gRPC listener reads
RESTRICTED_APIS = ("model-repository", "model-config", "shared-memory", "statistics", "trace", "logging")
CONTROL_KEY_ENV = "TRITON_CONTROL_KEY"
# Shared-memory regions of the Python backend: /dev/shm/fraud<owner pid>_<port>_<uuid>.
SHM_DIR = Path("/dev/shm")
_SHM_NAME = re.compile(r"^fraud(\d+)_(\d+)_")

log = logging.getLogger(__name__)

if int(np.__version__.split(".")[0]) >= 2:  # pragma: no cover - guarded by requirements
    raise ImportError(
        f"numpy {np.__version__} is installed; the Triton Python backend needs numpy < 2 "
        "(numpy 2 makes it deliver zero-filled inputs). Install numpy<2 in this environment.")


class TritonError(RuntimeError):
    """Triton refused a request or failed; the message says which and what to do. ``status`` is
    the HTTP status of Triton's answer when it answered (400: the request is invalid)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


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


# --- the control key ----------------------------------------------------------------------

_KEYS: dict[str, str] = {}  # url -> key of the embedded servers this process started
_KEYS_LOCK = threading.Lock()


def key_directory() -> Path:
    from fraudlib import settings

    return settings.runs_root() / "triton_keys"


def _key_file(url: str) -> Path:
    return key_directory() / (re.sub(r"[^0-9A-Za-z.-]", "_", _strip_scheme(url).split("/", 1)[0]) + ".key")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    try:  # a zombie (killed, not yet reaped) is gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def _write_key(url: str, key: str, server_pid: int) -> Path:
    """The key in a 0600 file (folder 0700), written whole (temp file, then rename)."""
    folder = key_directory()
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.chmod(0o700)
        path = _key_file(url)
        tmp = folder / f".{path.name}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"url": url, "key": key, "server_pid": server_pid, "owner_pid": os.getpid()}, f)
        os.replace(tmp, path)
    except OSError as e:
        raise TritonStartError(f"cannot keep the Triton control key under {folder} ({e}): the runs folder "
                               "must be writable (set FRAUD_RUNS_DIR to one that is).") from e
    return path


def _read_key_file(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
        return record if isinstance(record, dict) and isinstance(record.get("key"), str) else None
    except (OSError, ValueError):
        return None


def control_key(url: str) -> str | None:
    """The key for the control plane of the Triton at ``url``: the one of the embedded server
    there (started by this process, or by another one whose key file is under the runs folder
    and whose server is still running), else ``$TRITON_CONTROL_KEY``, else None."""
    url = _strip_scheme(url).split("/", 1)[0]
    with _KEYS_LOCK:
        if url in _KEYS:
            return _KEYS[url]
    record = _read_key_file(_key_file(url))
    if record and _pid_alive(int(record.get("server_pid", 0))):
        return record["key"]
    return os.environ.get(CONTROL_KEY_ENV) or None


def running_servers() -> list[dict]:
    """The embedded servers that are up (``fraud serve``, a pipeline's, a notebook's), from their
    key files under the runs folder: ``{"url", "server_pid", "owner_pid"}`` each, by URL."""
    found = []
    with contextlib.suppress(OSError):
        for path in sorted(key_directory().glob("*.key")):
            record = _read_key_file(path)
            if record and isinstance(record.get("url"), str) and _pid_alive(int(record.get("server_pid", 0))):
                found.append({k: record.get(k) for k in ("url", "server_pid", "owner_pid")})
    return found


def clean_stale_state() -> list[Path]:
    """Remove what killed runs left behind: shared-memory regions in /dev/shm of embedded
    servers whose starting process is gone, and key files of servers that are gone. Returns
    what was removed."""
    removed = []
    uid = os.getuid()
    with contextlib.suppress(OSError):
        for entry in os.scandir(SHM_DIR):
            m = _SHM_NAME.match(entry.name)
            with contextlib.suppress(OSError):
                if m and entry.stat(follow_symlinks=False).st_uid == uid and not _pid_alive(int(m.group(1))):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    with contextlib.suppress(OSError):
        for path in key_directory().glob("*.key"):
            record = _read_key_file(path)
            if record is None or not _pid_alive(int(record.get("server_pid", 0))):
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed.append(path)
    if removed:
        log.info("removed %d leftovers of killed Triton runs: %s", len(removed),
                 ", ".join(p.name for p in removed))
    return removed


class EmbeddedTriton:
    """The bundled ``tritonserver`` on loopback (HTTP and gRPC), explicit model control, its
    control plane restricted to a key drawn at each start (see the module's docstring).

    Use as a context manager, or ``start()``/``stop()``. It is also stopped at interpreter
    exit, and (Linux) when the thread that started it dies. Starting removes the shared-memory
    regions and key files that killed runs left behind; stopping removes its own.
    """

    def __init__(self, model_repository: Path, log_path: Path, http_port: int | None = None,
                 start_timeout_s: float = START_TIMEOUT_S, grpc_port: int | None = None):
        self.model_repository = Path(model_repository).resolve()
        self.log_path = Path(log_path).resolve()
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.grpc_url: str | None = None
        self.start_to_ready_s: float | None = None
        self._key: str | None = None
        self._shm_prefix: str | None = None

    def _command(self, port: int, grpc_port: int, backends: Path) -> list[str]:
        restricted = f"{','.join(RESTRICTED_APIS)}:{CONTROL_HEADER}={self._key}"
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
            f"--http-restricted-api={restricted}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={grpc_port}",
            f"--grpc-restricted-protocol={restricted}",
            # Metrics stay off: nothing here reads them, and they would be one more listener.
            "--allow-metrics=false",
            "--allow-gpu-metrics=false",
            # A distinct shared-memory prefix lets several servers run side by side, and names the
            # process that owns the regions (clean_stale_state).
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
        ]

    def start(self) -> EmbeddedTriton:
        if self._proc is not None:
            return self
        clean_stale_state()
        self.model_repository.mkdir(parents=True, exist_ok=True)  # empty is a valid start
        backends = backend_directory(self.model_repository.parent)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        for attempt in range(_PORT_ATTEMPTS):
            port = self.http_port or _free_port()
            grpc_port = self.grpc_port or _free_port()
            try:
                self._launch(port, grpc_port, backends)
                break
            except TritonStartError as e:
                # A free port can be taken between our probe and the server's bind: retry.
                port_race = not (self.http_port and self.grpc_port) and "already in use" in str(e)
                if not port_race or attempt == _PORT_ATTEMPTS - 1:
                    raise
        self.start_to_ready_s = time.monotonic() - t0
        return self

    def _launch(self, port: int, grpc_port: int, backends: Path) -> None:
        self._key = secrets.token_urlsafe(32)
        self._shm_prefix = f"fraud{os.getpid()}_{port}_"
        url = f"127.0.0.1:{port}"
        with open(self.log_path, "ab") as log_file:
            # The stub puts its working directory on sys.path: run it in our backend directory,
            # not e.g. the project root, whose triton/ folder would shadow the `triton`
            # package torch probes for (AttributeError: module 'triton' has no attribute ...).
            self._proc = subprocess.Popen(
                self._command(port, grpc_port, backends), stdin=subprocess.DEVNULL, stdout=log_file,
                stderr=subprocess.STDOUT, env=_server_env(), cwd=backends,
                preexec_fn=_die_with_parent)
        atexit.register(self.stop)
        self.url, self.grpc_url = url, f"127.0.0.1:{grpc_port}"
        try:
            _write_key(url, self._key, self._proc.pid)
            with _KEYS_LOCK:
                _KEYS[url] = self._key
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
        self._forget()

    def _forget(self) -> None:
        """The key and the shared-memory regions of the server that exited."""
        if self.url:
            with _KEYS_LOCK:
                if _KEYS.get(self.url) == self._key:
                    del _KEYS[self.url]
            path = _key_file(self.url)
            record = _read_key_file(path)
            if record is not None and record.get("key") == self._key:
                with contextlib.suppress(OSError):
                    path.unlink()
        if self._shm_prefix:  # left behind when the server was killed
            with contextlib.suppress(OSError):
                for entry in os.scandir(SHM_DIR):
                    if entry.name.startswith(self._shm_prefix):
                        with contextlib.suppress(OSError):
                            os.unlink(entry.path)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def client(self) -> TritonClient:
        if self.url is None:
            raise TritonError("the embedded Triton is not started: call start() first.")
        return TritonClient(self.url)

    def __enter__(self) -> EmbeddedTriton:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Supervisor:
    """Keeps an embedded server serving: when ``tritonserver`` exits, or stops answering its
    liveness check ``unanswered`` times in a row, it is restarted on the same ports after
    ``backoff_s`` and ``on_start`` (e.g. load the champion and health-check it) runs again. More
    than ``max_restarts`` restarts within ``window_s`` seconds, or a failed restart, ends
    supervision with the reason. Every event is logged through ``report``."""

    def __init__(self, server: EmbeddedTriton, on_start: Callable[[EmbeddedTriton], None],
                 max_restarts: int = 3, window_s: float = 600.0, backoff_s: float = 1.0,
                 probe_every_s: float = 5.0, unanswered: int = 3,
                 report: Callable[[str], None] = print):
        self.server, self.on_start = server, on_start
        self.max_restarts, self.window_s, self.backoff_s = max_restarts, window_s, backoff_s
        self.probe_every_s, self.unanswered = probe_every_s, unanswered
        self.report = report
        self.restarts: list[float] = []  # monotonic times of the restarts
        self.reason: str | None = None  # why supervision gave up

    def _death(self, misses: int) -> str | None:
        """Why the server is no longer serving, or None while it is."""
        if not self.server.running:
            return (f"tritonserver exited with code {self.server.returncode} (log {self.server.log_path}):\n"
                    f"{log_tail(self.server.log_path, 10)}")
        if misses >= self.unanswered:
            return f"tritonserver (pid {self.server.pid}) did not answer {misses} liveness checks in a row"
        return None

    def run(self, stop: threading.Event, poll_s: float = 0.2) -> bool:
        """Supervise until ``stop`` is set (True) or supervision gives up (False, ``reason`` says
        why). The server must have been started (and ``on_start`` run) by the caller."""
        misses, next_probe = 0, time.monotonic() + self.probe_every_s
        while not stop.wait(poll_s):
            if self.server.running and time.monotonic() >= next_probe:
                with TritonClient(self.server.url, network_timeout_s=5.0, connection_timeout_s=2.0) as c:
                    misses = 0 if c.is_live() else misses + 1
                next_probe = time.monotonic() + self.probe_every_s
            why = self._death(misses)
            if why is None:
                continue
            now = time.monotonic()
            self.restarts = [t for t in self.restarts if now - t < self.window_s]
            if len(self.restarts) >= self.max_restarts:
                self.reason = (f"{why}\ngiving up: {len(self.restarts)} restarts in the last "
                               f"{self.window_s:.0f} s already")
                self.report(f"tritonserver is down: {self.reason}")
                self.server.stop()
                return False
            self.restarts.append(now)
            self.report(f"tritonserver is down: {why}\nrestarting it ({len(self.restarts)} of at most "
                        f"{self.max_restarts} in {self.window_s:.0f} s) in {self.backoff_s:g} s")
            self.server.stop()  # reaps it, removes its key and shared-memory regions
            if stop.wait(self.backoff_s):
                return True
            try:
                self.server.start()
                self.on_start(self.server)
            except Exception as e:  # noqa: BLE001 - reported, and supervision ends with it
                self.reason = f"{why}\nthe restart failed: {e}"
                self.report(f"tritonserver could not be restarted: {e}")
                self.server.stop()
                return False
            misses, next_probe = 0, time.monotonic() + self.probe_every_s
            self.report(f"tritonserver restarted (pid {self.server.pid}) at http://{self.server.url}, "
                        f"gRPC {self.server.grpc_url}")
        return True


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
                     http_port: int | None = None, grpc_port: int | None = None):
    """A client of the Triton at ``url`` (checked live) or, when ``url`` is empty, of an
    embedded server on ``repository`` (default: the project's) started for the duration, with
    its log at ``log_path``. Callers that honour ``$TRITON_URL`` pass it as ``url``."""
    if url:
        with connect(url) as client:
            yield client
        return
    from fraudlib import settings

    with EmbeddedTriton(repository or settings.triton_model_repository(), log_path,
                        http_port=http_port, grpc_port=grpc_port) as server, server.client() as client:
        yield client


def _strip_scheme(url: str) -> str:
    for scheme in ("http://", "https://"):
        if url.startswith(scheme):
            return url[len(scheme):]
    return url


class TritonClient:
    """The few Triton HTTP operations this project needs, with errors that explain.

    Each thread that uses it gets its own connections (tritonclient's gevent client cannot
    be shared between threads): e.g. two models scored side by side, a model instance being
    one thread on a CPU host.
    """

    def __init__(self, url: str, network_timeout_s: float = LOAD_TIMEOUT_S,
                 connection_timeout_s: float = 10.0, control_key: str | None = None):
        self.url = _strip_scheme(url)
        # None: looked up at each control call (control_key()), so a restarted server's new
        # key is found.
        self._control_key = control_key
        self._timeouts = (network_timeout_s, connection_timeout_s)
        self._local = threading.local()
        self._opened: list = []  # every thread's connections, closed by close()
        self._opened_lock = threading.Lock()

    def _connections(self) -> tuple[httpclient.InferenceServerClient, InferConnection]:
        """This thread's (tritonclient's client for the control calls, the lean connection
        for inference: fraudlib.triton_http says why)."""
        mine = getattr(self._local, "connections", None)
        if mine is None:
            network_timeout_s, connection_timeout_s = self._timeouts
            mine = self._local.connections = (
                httpclient.InferenceServerClient(self.url, connection_timeout=connection_timeout_s,
                                                 network_timeout=network_timeout_s),
                InferConnection(self.url, network_timeout_s, connection_timeout_s))
            with self._opened_lock:
                self._opened.append(mine)
        return mine

    @property
    def _http(self) -> httpclient.InferenceServerClient:
        return self._connections()[0]

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
            status = int(e.status()) if str(e.status() or "").isdigit() else None
            if status == 403:
                raise TritonError(
                    f"Triton at {self.url}: {what} was refused: its model-control API is restricted "
                    f"({e.message()}) and this client {'sent a key it does not accept' if self._key() else 'has no key'}"
                    f": an embedded server's key is found under {key_directory()} while it runs; for an "
                    f"external server set {CONTROL_KEY_ENV} to the key it was started with.", status) from e
            raise TritonError(f"Triton at {self.url}: {what} failed: {e.message()}", status) from e
        except (OSError, ConnectionError) as e:
            raise self._unreachable(e) from e

    def _key(self) -> str | None:
        return self._control_key or control_key(self.url)

    def _control(self, what: str, fn, *args, **kwargs):
        """A call to the restricted control plane, with the key."""
        key = self._key()
        return self._call(what, fn, *args, headers={CONTROL_HEADER: key} if key else None, **kwargs)

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
        return list(self._control("repository index", self._http.get_model_repository_index))

    def model_config(self, model: str) -> dict:
        return self._control(f"config of {model}", self._http.get_model_config, model)

    def load_model(self, model: str, config: str | None = None) -> None:
        """Load (or reload) ``model``; ``config`` is an optional JSON override."""
        self._control(f"loading model {model}", self._http.load_model, model, config=config)

    def unload_model(self, model: str) -> None:
        self._control(f"unloading model {model}", self._http.unload_model, model,
                      unload_dependents=False)

    def infer(self, model: str, inputs: dict[str, np.ndarray], version: int | None = None,
              outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """One request; tensors travel as binary data. Returns every (or the named) output."""
        what = f"inference on {model} version {version if version is not None else '(default)'}"
        try:
            return self._connections()[1].infer(model, inputs, version=version, outputs=outputs)
        except InferenceRefused as e:
            raise TritonError(f"Triton at {self.url}: {what} failed: {e}", e.status) from e
        except BrokenAnswer as e:
            raise TritonError(f"Triton at {self.url}: {what} failed: {e}") from e
        except TimeoutError as e:
            raise TritonError(f"Triton at {self.url}: {what} failed: no answer within "
                              f"{self._timeouts[0]:g} s") from e
        except OSError as e:
            raise self._unreachable(e) from e

    def close(self) -> None:
        with self._opened_lock:
            for http, infer in self._opened:
                infer.close()
                http.close()
            self._opened.clear()
        self._local = threading.local()

    def __enter__(self) -> TritonClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
