"""The Triton model repository: the one place that knows its layout and changes it.

Layout (``root`` is the directory Triton serves; the archive lies beside it, unserved)::

    <root>/prediction_and_shapley/config.pbtxt      version_policy: specific [champion]
    <root>/prediction_and_shapley/<N>/               champion (and <N+1>/ while staged)
    <root>/prediction_and_shapley/<N>/package_config.pbtxt   the version's own config
    <root>/prediction_and_shapley_eval/config.pbtxt  private: version_policy specific [N+1]
    <root>/prediction_and_shapley_eval/<N+1> -> ../prediction_and_shapley/<N+1>
    <root>/prediction_and_shapley_eval/staged.json  who staged the challenger, when
    <root>/.lock, .lock.holder.json, .fraud_journal.json
    <root>.archive/<N>/ and <N>.json                versions that left, and why

Why the private model: Triton answers a request that names no version from the highest
version the model serves. The public model therefore only ever serves the champion, so an
unversioned request is answered by the champion at every moment; the challenger is scored
through ``prediction_and_shapley_eval`` with explicit versions. Promotion rewrites the
public policy to [N+1] and reloads: Triton keeps serving N until N+1 is ready.

Every change holds a file lock on the repository and is journalled step by step;
:meth:`TritonRepository.reconcile` brings the repository to one consistent champion after a
crash at any step (using the journal, the disk and the registry's champion), and stage,
promote, reject and rollback reconcile first.

Who is at work: the lock holder's record (``.lock.holder.json``) and the challenger's
``staged.json`` name the process (pid and its start time, and for a Jupyter kernel the process
that started it: the pipeline runner), the host, the MLflow run and the time; :meth:`lock_holder`
and :meth:`challenger_owner` say whether that process still lives, so a live pipeline is told
apart from state a crashed run left (``reconcile`` never rejects a live run's challenger).

Crash injection (tests): right after each step of stage/promote/reject/rollback is done and
journalled, and before each file of a staged copy, the repository calls :func:`crash_point`
(``"<op>.<step>"``, ``"stage.copying"``; the step names are :data:`STAGE_STEPS`,
:data:`PROMOTE_STEPS`, :data:`REJECT_STEPS`, :data:`ROLLBACK_STEPS`). It does nothing unless a
test installed a hook with :func:`set_crash_hook`, which may raise a ``BaseException`` (no
rollback handler catches it, so the repository is left exactly as a crash would leave it) or
stop the process there to be killed. No production signature carries a crash parameter.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
from filelock import FileLock, Timeout
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from fraudlib import settings
from fraudlib.graph_store import Graph, compact
from fraudlib.triton_server import TritonClient, TritonError

PUBLIC_MODEL = settings.TRITON_MODEL_NAME
EVAL_MODEL = f"{PUBLIC_MODEL}_eval"
CONFIG = "config.pbtxt"
PACKAGE_CONFIG = "package_config.pbtxt"
JOURNAL = ".fraud_journal.json"
LOCK = ".lock"
LOCK_HOLDER = ".lock.holder.json"
STAGING_PREFIX = ".staging-"
STAGED_BY = "staged.json"

STAGE_STEPS = ("version_dir_written", "eval_model_written", "eval_model_loaded")
PROMOTE_STEPS = ("challenger_checked", "public_config_written", "public_model_loaded",
                 "health_checked", "old_champion_archived", "eval_model_removed")
REJECT_STEPS = ("eval_model_removed", "challenger_archived")
# A rollback stages the previous champion from the archive, then promotes it.
ROLLBACK_STEPS = ("previous_champion_staged", *PROMOTE_STEPS)

GRAPH_INPUTS = ("x_user", "x_merchant", "edge_index_user_to_merchant", "edge_attr_user_to_merchant")
MASK_INPUTS = ("feature_mask_user", "feature_mask_merchant", "edge_feature_mask_user_to_merchant")


class RepositoryError(RuntimeError):
    """The repository cannot do what was asked; the message says why and what to do."""


class RepositoryLocked(RepositoryError):
    """Another process held the repository lock for longer than the timeout."""


class PromotionFailed(RepositoryError):
    """The new champion failed to load or its health check; the old one serves again."""


_crash_hook = None


def set_crash_hook(hook) -> None:
    """``hook(point)`` is called at every crash point (tests: pause, then be killed); None: off."""
    global _crash_hook
    _crash_hook = hook


def crash_point(point: str) -> None:
    if _crash_hook is not None:
        _crash_hook(point)


def _copy_file(src, dst):
    crash_point("stage.copying")
    return shutil.copy2(src, dst)


# --- who is at work ------------------------------------------------------------------------

def _started(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, ValueError):
        return None


def process_identity(run: str | None = None) -> dict:
    """This process as a lock holder or challenger owner records it. In a Jupyter kernel (a
    pipeline stage) the kernel's parent is recorded too: the runner that goes on to the next
    stage outlives the kernel."""
    me = {"pid": os.getpid(), "started": _started(os.getpid()), "host": socket.gethostname(),
          "run": run, "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
    parent = os.environ.get("JPY_PARENT_PID", "")
    if parent.isdigit() and int(parent) != os.getpid() and _started(int(parent)) is not None:
        me["parent_pid"], me["parent_started"] = int(parent), _started(int(parent))
    return me


def owner_alive(owner: dict) -> bool | None:
    """Whether a recorded process (or its recorded parent) still runs: None when it ran on
    another host (it cannot be checked here)."""
    if owner.get("host") not in (None, socket.gethostname()):
        return None
    for pid_key, start_key in (("pid", "started"), ("parent_pid", "parent_started")):
        pid = owner.get(pid_key)
        if not isinstance(pid, int):
            continue
        started = _started(pid)
        if started is not None and (owner.get(start_key) is None or abs(started - owner[start_key]) < 1.0):
            return True
    return False


def owned_by_this_process(owner: dict) -> bool:
    return owner.get("host") == socket.gethostname() and os.getpid() in (owner.get("pid"), owner.get("parent_pid"))


def describe_owner(owner: dict) -> str:
    """``run R (pid P, started by pid Q) on host H``."""
    pids = f"pid {owner.get('pid', '?')}"
    if owner.get("parent_pid"):
        pids += f", a kernel of pid {owner['parent_pid']}"
    run = f"run {owner['run']}" if owner.get("run") else "a run"
    return f"{run} ({pids} on {owner.get('host', '?')})"


@dataclass(frozen=True)
class HealthCheck:
    version: int | None
    model: str
    ok: bool
    reason: str


@dataclass(frozen=True)
class RepoState:
    champion: int | None
    challenger: int | None
    versions_on_disk: tuple[int, ...]
    archived: tuple[int, ...]
    # (model, version, state) as Triton reports them; None when no server was asked.
    triton: tuple[tuple[str, int, str], ...] | None
    journal: dict | None  # an unfinished transition, if any


@dataclass(frozen=True)
class ReconcileReport:
    champion: int | None
    challenger: int | None
    unfinished: dict | None  # the journal of the interrupted transition, if there was one
    actions: tuple[str, ...] = field(default_factory=tuple)
    triton_synced: bool = False
    champion_healthy: bool | None = None


# --- config.pbtxt -----------------------------------------------------------------------

def _read_config(path: Path) -> model_config_pb2.ModelConfig:
    try:
        return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except (OSError, text_format.ParseError) as e:
        raise RepositoryError(f"cannot read Triton model config {path}: {e}") from e


def _served_config(package_config: Path, name: str, version: int) -> str:
    """The version's own config, renamed and restricted to serve exactly ``version``."""
    config = _read_config(package_config)
    config.name = name
    config.version_policy.Clear()
    config.version_policy.specific.versions[:] = [version]
    return text_format.MessageToString(config)


def _policy_versions(config_path: Path) -> list[int]:
    if not config_path.exists():
        return []
    return sorted(int(v) for v in _read_config(config_path).version_policy.specific.versions)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- the serving contract's inputs -------------------------------------------------------

def graph_inputs(graph: Graph, compute_shap: bool = False) -> dict[str, np.ndarray]:
    """A graph as the serving contract's input tensors (masks when the graph has them).

    Only the nodes its edges touch are sent (``compact``): every score is the same, and the
    request no longer carries the whole node tables (10 MB for the full TabFormer graph).
    """
    graph = compact(graph)
    inputs = {
        "x_user": np.asarray(graph.x_user, dtype=np.float32),
        "x_merchant": np.asarray(graph.x_merchant, dtype=np.float32),
        "edge_index_user_to_merchant": np.asarray(graph.edge_index, dtype=np.int64),
        "edge_attr_user_to_merchant": np.asarray(graph.edge_attr, dtype=np.float32),
        "COMPUTE_SHAP": np.array([compute_shap]),
    }
    masks = (graph.feature_mask_user, graph.feature_mask_merchant, graph.feature_mask_edge)
    for name, mask in zip(MASK_INPUTS, masks):
        if mask is not None:
            inputs[name] = np.asarray(mask, dtype=np.int32)
    return inputs


def health_check_inputs(package_config: Path) -> dict[str, np.ndarray]:
    """A small fixed graph (4 users, 5 merchants, 6 edges) with the version's feature dims."""
    dims = {i.name: list(i.dims) for i in _read_config(package_config).input}
    missing = [n for n in GRAPH_INPUTS if n not in dims]
    if missing:
        raise RepositoryError(f"{package_config} lacks the serving contract inputs {missing}.")
    rng = np.random.default_rng(0)
    return {
        "x_user": rng.integers(0, 2, (4, dims["x_user"][-1])).astype(np.float32),
        "x_merchant": rng.integers(0, 2, (5, dims["x_merchant"][-1])).astype(np.float32),
        "edge_index_user_to_merchant": np.array([[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 4, 4]],
                                                dtype=np.int64),
        "edge_attr_user_to_merchant":
            rng.normal(size=(6, dims["edge_attr_user_to_merchant"][-1])).astype(np.float32),
        "COMPUTE_SHAP": np.array([False]),
    }


# --- the repository ---------------------------------------------------------------------

class TritonRepository:
    """Champion/challenger operations on one Triton model repository.

    ``client`` is the server that serves ``root``; operations that change what Triton serves
    check it is reachable before they change anything. ``state`` and ``reconcile`` also work
    without a client (disk only).
    """

    def __init__(self, root: Path, client: TritonClient | None = None,
                 archive: Path | None = None, lock_timeout_s: float = 300.0, run_id: str | None = None):
        self.root = Path(root).resolve()
        self.run_id = run_id  # the MLflow run this process works for, recorded with the lock and a staged version
        self.archive = Path(archive).resolve() if archive else self.root.with_name(
            self.root.name + ".archive")
        self.client = client
        self.lock_timeout_s = lock_timeout_s
        self.public = self.root / PUBLIC_MODEL
        self.eval = self.root / EVAL_MODEL

    # -- disk facts --

    @staticmethod
    def _numbered(folder: Path) -> list[int]:
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir())

    def _champion_on_disk(self) -> int | None:
        versions = _policy_versions(self.public / CONFIG)
        if len(versions) > 1:
            raise RepositoryError(
                f"{self.public / CONFIG} serves versions {versions}; it must serve exactly one. "
                "Run reconcile with the registry's champion version to choose.")
        return versions[0] if versions else None

    def _challenger_on_disk(self) -> int | None:
        versions = [v for v in _policy_versions(self.eval / CONFIG)
                    if (self.public / str(v)).is_dir()]
        return versions[-1] if versions else None

    def _archive_meta(self, version: int) -> dict:
        path = self.archive / f"{version}.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def _next_version(self) -> int:
        return max([0, *self._numbered(self.public), *self._numbered(self.archive)]) + 1

    def _journal(self) -> dict | None:
        path = self.root / JOURNAL
        return json.loads(path.read_text()) if path.exists() else None

    def _write_journal(self, journal: dict | None) -> None:
        path = self.root / JOURNAL
        if journal is None:
            path.unlink(missing_ok=True)
        else:
            _atomic_write(path, json.dumps(journal, indent=1))

    def _step(self, journal: dict, step: str) -> None:
        journal["steps"].append(step)
        self._write_journal(journal)
        crash_point(f"{journal['op']}.{step}")

    # -- lock --

    @contextmanager
    def _locked(self, operation: str):
        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.root / LOCK), timeout=self.lock_timeout_s, thread_local=False)
        try:
            lock.acquire()
        except Timeout:
            holder = self._holder_record()
            raise RepositoryLocked(
                f"{operation}: the Triton repository {self.root} is locked by another process "
                f"for more than {self.lock_timeout_s:.0f} s: {describe_owner(holder)} holds it for its "
                f"{holder.get('operation', '?')} since {holder.get('since', '?')} (holder: {json.dumps(holder)}). "
                "Wait for it to finish; the lock frees itself when that process ends, so there is "
                "nothing to repair while it runs.") from None
        try:
            _atomic_write(self.root / LOCK_HOLDER, json.dumps(
                {**process_identity(self.run_id), "operation": operation}))
            yield
        finally:
            (self.root / LOCK_HOLDER).unlink(missing_ok=True)
            lock.release()

    def _holder_record(self) -> dict:
        try:
            return json.loads((self.root / LOCK_HOLDER).read_text())
        except (OSError, ValueError):
            return {"operation": "?", "since": "not recorded"}

    def lock_holder(self) -> dict | None:
        """The record of the process holding the repository lock now, None when it is free.
        The lock itself says whether it is held (an OS lock, freed when its process dies), so a
        record left by a killed process is not mistaken for a live holder."""
        if not (self.root / LOCK).exists():
            return None
        lock = FileLock(str(self.root / LOCK), timeout=0, thread_local=False)
        try:
            lock.acquire()
        except Timeout:
            return self._holder_record()
        lock.release()
        return None

    def challenger_owner(self) -> dict | None:
        """Who staged the challenger (``staged.json``) with ``alive``: whether that process (or the
        pipeline runner that started it) still runs (None: another host); None without a challenger."""
        if self._challenger_on_disk() is None:
            return None
        try:
            owner = json.loads((self.eval / STAGED_BY).read_text())
        except (OSError, ValueError):
            owner = {}
        return {**owner, "alive": owner_alive(owner) if owner else False}

    def _require_client(self, operation: str) -> TritonClient:
        if self.client is None:
            raise RepositoryError(f"{operation} needs a Triton server: pass a TritonClient.")
        self.client.require_live()
        return self.client

    # -- disk moves --

    def _archive_version(self, version: int, reason: str, replaced_by: int | None = None,
                         keep_reason: bool = False) -> str:
        """Move ``<public>/<version>`` to the archive and record why it left."""
        self.archive.mkdir(parents=True, exist_ok=True)
        src, dest = self.public / str(version), self.archive / str(version)
        if dest.exists():  # versions are never reused, so this is a leftover copy: keep both
            dest = self.archive / f"{version}.dup-{time.time_ns()}"
        shutil.move(src, dest)  # a rename when the archive is on the same filesystem
        meta_path = self.archive / f"{version}.json"
        if not (keep_reason and meta_path.exists()):
            _atomic_write(meta_path, json.dumps(
                {"version": version, "reason": reason, "replaced_by": replaced_by,
                 "at": time.time()}))
        return f"archived version {version} ({reason})"

    def _restore_version(self, version: int) -> str:
        src = self.archive / str(version)
        if not src.is_dir():
            raise RepositoryError(
                f"version {version} is neither in {self.public} nor in the archive {self.archive}: "
                "it cannot serve. Check the registry's champion version.")
        self.public.mkdir(parents=True, exist_ok=True)
        shutil.move(src, self.public / str(version))
        return f"restored version {version} from the archive"

    def _write_public_config(self, version: int) -> None:
        self.public.mkdir(parents=True, exist_ok=True)
        text = _served_config(self.public / str(version) / PACKAGE_CONFIG, PUBLIC_MODEL, version)
        _atomic_write(self.public / CONFIG, text)

    def _write_eval_model(self, version: int) -> None:
        """The private evaluation model: config [version] and a link to the public version."""
        text = _served_config(self.public / str(version) / PACKAGE_CONFIG, EVAL_MODEL, version)
        tmp = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.root))
        (tmp / CONFIG).write_text(text)
        (tmp / STAGED_BY).write_text(json.dumps({
            "version": version, **process_identity(self.run_id),
            "at": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        os.symlink(Path("..") / PUBLIC_MODEL / str(version), tmp / str(version))
        shutil.rmtree(self.eval, ignore_errors=True)
        os.rename(tmp, self.eval)

    def _remove_eval_model(self) -> None:
        if self.client is not None and self._triton_has(EVAL_MODEL):
            self.client.unload_model(EVAL_MODEL)
        shutil.rmtree(self.eval, ignore_errors=True)

    def _triton_has(self, model: str) -> bool:
        return any(m["name"] == model and m.get("state") in ("READY", "LOADING")
                   for m in self.client.repository_index())

    def _triton_ready(self) -> dict[str, set[int]]:
        """Model name -> the versions Triton reports READY."""
        ready: dict[str, set[int]] = {}
        for m in self.client.repository_index():
            if m.get("state") == "READY" and m.get("version"):
                ready.setdefault(m["name"], set()).add(int(m["version"]))
        return ready

    # -- read-only operations --

    def version_dir(self, version: int) -> Path:
        """The folder of a version on disk (served or staged)."""
        path = self.public / str(version)
        if not path.is_dir():
            raise RepositoryError(f"version {version} is not in {self.public}")
        return path


    def state(self) -> RepoState:
        triton = None
        if self.client is not None:
            triton = tuple(
                (m["name"], int(m["version"]), m.get("state", ""))
                for m in self.client.repository_index()
                if m["name"] in (PUBLIC_MODEL, EVAL_MODEL) and m.get("version"))
        return RepoState(
            champion=self._champion_on_disk(), challenger=self._challenger_on_disk(),
            versions_on_disk=tuple(self._numbered(self.public)),
            archived=tuple(self._numbered(self.archive)), triton=triton, journal=self._journal())

    def _require_challenger(self, version: int, operation: str, hint: str = "") -> None:
        staged = self._challenger_on_disk()
        if version != staged:
            raise RepositoryError(f"cannot {operation} version {version}: the staged challenger in "
                                  f"{self.root} is {staged}.{hint}")

    def _model_for(self, version: int) -> str:
        if version == self._champion_on_disk():
            return PUBLIC_MODEL
        if version == self._challenger_on_disk():
            return EVAL_MODEL
        raise RepositoryError(
            f"version {version} is neither the champion ({self._champion_on_disk()}) nor the "
            f"staged challenger ({self._challenger_on_disk()}) in {self.root}: stage it first.")

    def score(self, version: int, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Score one whole graph (one request, binary tensors) with exactly ``version``.

        The graph is not split: a transaction's score depends on its neighbourhood, so
        scoring a part of the graph would change the answers.
        """
        client = self._require_client("score")
        inputs = {"COMPUTE_SHAP": np.array([False]), **inputs}
        return client.infer(self._model_for(version), inputs, version=version)

    def health_check(self, version: int | None = None) -> HealthCheck:
        """Ready, and a real inference on a small fixed graph gives one finite probability
        per edge. ``version`` defaults to the champion."""
        client = self._require_client("health check")
        version = self._champion_on_disk() if version is None else version
        if version is None:
            return HealthCheck(None, PUBLIC_MODEL, False, "no champion is served")
        model = self._model_for(version)
        return self._health_check(client, model, version)

    def _health_check(self, client: TritonClient, model: str, version: int) -> HealthCheck:
        def result(ok: bool, reason: str) -> HealthCheck:
            return HealthCheck(version, model, ok, reason)

        if not client.is_model_ready(model, version):
            return result(False, f"{model} version {version} is not ready")
        inputs = health_check_inputs(self.public / str(version) / PACKAGE_CONFIG)
        try:
            out = client.infer(model, inputs, version=version, outputs=["PREDICTION"])["PREDICTION"]
        except TritonError as e:
            return result(False, f"inference failed: {e}")
        n = inputs["edge_attr_user_to_merchant"].shape[0]
        if out is None or out.shape != (n, 1):
            return result(False, f"PREDICTION has shape {None if out is None else out.shape}, "
                                 f"expected {(n, 1)}")
        if not np.isfinite(out).all():
            return result(False, "PREDICTION holds NaN or infinite values")
        if out.min() < 0 or out.max() > 1:
            return result(False, f"PREDICTION leaves [0, 1]: {out.min()}..{out.max()}")
        return result(True, f"{n} edges scored")

    # -- changes --

    def load(self, version: int | None = None) -> None:
        """Load into Triton the model that serves ``version`` (default: the champion),
        e.g. after the server started."""
        client = self._require_client("load")
        with self._locked("load"):
            version = self._champion_on_disk() if version is None else version
            if version is None:
                raise RepositoryError(f"{self.root} has no champion to load: stage and promote one.")
            client.load_model(self._model_for(version))

    def stage(self, package_dir: Path, registry_champion_version: int | None = None) -> int:
        """Stage a model package as the challenger (version champion+1) and load it for
        evaluation. Returns its version."""
        source, package_config = self._package_version_dir(Path(package_dir))
        client = self._require_client("stage")
        with self._locked("stage"):
            self._reconcile(registry_champion_version)
            staged = self._challenger_on_disk()
            if staged is not None:
                owner = self.challenger_owner()
                by = describe_owner(owner) if owner else "a run that recorded nothing"
                if owner and owner["alive"] is not False:
                    advice = (f"{by} is still evaluating it (staged at {owner.get('at', '?')}): wait for "
                              "that run to promote or reject it, then stage again")
                else:
                    advice = (f"{by}, which staged it, is gone: run `fraud reconcile` to reject it "
                              "(reconcile with reject_challenger=True)")
                raise RepositoryError(
                    f"version {staged} is already staged as the challenger in {self.root} "
                    f"({json.dumps(owner)}): {advice}.")
            champion = self._champion_on_disk()
            version = self._next_version()
            journal = {"op": "stage", "version": version, "champion": champion,
                       "challenger": None, "steps": []}
            self._write_journal(journal)
            try:
                self.public.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{version}-", dir=self.public))
                shutil.copytree(source, tmp, dirs_exist_ok=True, copy_function=_copy_file)
                _copy_file(package_config, tmp / PACKAGE_CONFIG)
                os.rename(tmp, self.public / str(version))
                self._step(journal, "version_dir_written")
                self._write_eval_model(version)
                self._step(journal, "eval_model_written")
            except OSError as e:  # e.g. ENOSPC: a full disk
                raise self._undo_failed_stage(package_dir, version, champion,
                                              registry_champion_version, e) from e
            try:
                client.load_model(EVAL_MODEL)
            except TritonError as e:
                self._remove_eval_model()
                self._archive_version(version, "failed_load")
                self._write_journal(None)
                raise RepositoryError(f"model package {package_dir} does not load in Triton "
                                      f"(moved to {self.archive / str(version)}): {e}") from e
            self._step(journal, "eval_model_loaded")
            self._write_journal(None)
            return version

    def _undo_failed_stage(self, package_dir: Path, version: int, champion: int | None,
                           registry_champion_version: int | None, error: OSError) -> RepositoryError:
        serving = (f"version {champion} serves as before" if champion is not None
                   else "no version serves, as before")
        try:
            undone = self._reconcile(registry_champion_version).actions
            left = f"the partial copy was removed and nothing is staged ({'; '.join(undone)})"
        except OSError as again:
            left = (f"cleaning up failed too ({again}): the next run repairs it by itself, or "
                    "`fraud reconcile` does")
        return RepositoryError(f"staging {package_dir} as version {version} in {self.public} failed: "
                               f"{error}; {left}; {serving}.")

    def _package_version_dir(self, package_dir: Path) -> tuple[Path, Path]:
        config = package_dir / CONFIG
        if not config.exists():
            hint = (f" (did you mean {package_dir / PUBLIC_MODEL}?)"
                    if (package_dir / PUBLIC_MODEL / CONFIG).exists() else "")
            raise RepositoryError(f"{package_dir} is not a model package: no {CONFIG}{hint}.")
        versions = self._numbered(package_dir)
        if len(versions) != 1:
            raise RepositoryError(f"model package {package_dir} must hold exactly one version "
                                  f"directory, found {versions or 'none'}.")
        source = package_dir / str(versions[0])
        if not (source / "model.py").exists():
            raise RepositoryError(f"{source} has no model.py: not a Python-backend model version.")
        _read_config(config)  # fails early, before the repository changes
        return source, config

    def promote(self, version: int, registry_champion_version: int | None = None) -> HealthCheck:
        """Make the staged challenger ``version`` the champion.

        The challenger is health-checked through the evaluation model before the public
        model switches, and again through the public model after; Triton keeps serving the
        old champion until the new one is loaded. A failed load or health check restores the
        old champion, moves the challenger to the archive and raises
        :class:`PromotionFailed`. On success the old champion moves to the archive and
        exactly one version serves.
        """
        client = self._require_client("promote")
        with self._locked("promote"):
            self._reconcile(registry_champion_version)
            self._require_challenger(version, "promote", " Stage the model first.")
            old = self._champion_on_disk()
            journal = {"op": "promote", "version": version, "champion": old,
                       "challenger": version, "steps": []}
            self._write_journal(journal)
            return self._switch(client, journal, old, version)

    def rollback(self, registry_champion_version: int | None = None) -> HealthCheck:
        """Serve the previous champion again (the one the current champion replaced)."""
        client = self._require_client("rollback")
        with self._locked("rollback"):
            self._reconcile(registry_champion_version)
            current = self._champion_on_disk()
            if self._challenger_on_disk() is not None:
                raise RepositoryError(f"a challenger is staged in {self.root}: reject it before "
                                      "rolling back.")
            previous = self._previous_champion()
            if current is None or previous is None:
                raise RepositoryError(f"{self.root} has no previous champion to roll back to.")
            journal = {"op": "rollback", "version": previous, "champion": current,
                       "challenger": None, "steps": []}
            self._write_journal(journal)
            self._restore_version(previous)
            self._write_eval_model(previous)
            try:
                client.load_model(EVAL_MODEL)
            except TritonError as e:
                self._undo_switch(client, journal, current, previous, switched=False,
                                  check=HealthCheck(previous, EVAL_MODEL, False, f"load failed: {e}"))
            self._step(journal, "previous_champion_staged")
            return self._switch(client, journal, current, previous)

    def archive_reason(self, version: int) -> str | None:
        """Why an archived version left (``rejected``, ``replaced``, ``failed_promote``...);
        None when it is not in the archive."""
        if version not in self._numbered(self.archive):
            return None
        return self._archive_meta(version).get("reason", "unknown")

    def previous_champion(self) -> int | None:
        return self._previous_champion()

    def _previous_champion(self) -> int | None:
        """The most recently archived version that left because another replaced it."""
        replaced = [m for m in (self._archive_meta(v) for v in self._numbered(self.archive))
                    if m.get("reason") == "replaced"]
        return max(replaced, key=lambda m: m["at"])["version"] if replaced else None

    def _switch(self, client: TritonClient, journal: dict, old: int | None, new: int) -> HealthCheck:
        """Public model from ``old`` to ``new`` (loaded in the evaluation model): check it
        there, switch the public config, load, check again, archive ``old``."""
        check = self._health_check(client, EVAL_MODEL, new)
        if not check.ok:
            self._undo_switch(client, journal, old, new, switched=False, check=check)
        self._step(journal, "challenger_checked")
        self._write_public_config(new)
        self._step(journal, "public_config_written")
        try:
            client.load_model(PUBLIC_MODEL)
            self._step(journal, "public_model_loaded")
            check = self._health_check(client, PUBLIC_MODEL, new)
        except TritonError as e:
            check = HealthCheck(new, PUBLIC_MODEL, False, f"load failed: {e}")
        if not check.ok:
            self._undo_switch(client, journal, old, new, switched=True, check=check)
        self._step(journal, "health_checked")
        if old is not None:
            reason = "rolled_back" if journal["op"] == "rollback" else "replaced"
            self._archive_version(old, reason, replaced_by=new)
        self._step(journal, "old_champion_archived")
        self._remove_eval_model()
        self._step(journal, "eval_model_removed")
        self._write_journal(None)
        return check

    def _undo_switch(self, client: TritonClient, journal: dict, old: int | None, new: int,
                     switched: bool, check: HealthCheck) -> None:
        """Serve ``old`` again; the version that failed leaves for the archive."""
        if switched and old is not None:
            self._write_public_config(old)
            client.load_model(PUBLIC_MODEL)
        elif switched:
            (self.public / CONFIG).unlink(missing_ok=True)
            if self._triton_has(PUBLIC_MODEL):
                client.unload_model(PUBLIC_MODEL)
        self._remove_eval_model()
        self._archive_version(new, f"failed_{journal['op']}")
        self._write_journal(None)
        serving = f"Version {old} serves" if old is not None else "No version serves"
        raise PromotionFailed(
            f"version {new} did not become the champion of {self.root}: {check.reason}. "
            f"{serving} as before; version {new} was moved to {self.archive}.")

    def reject(self, version: int, registry_champion_version: int | None = None) -> None:
        """Drop the staged challenger ``version``: unload it and move it to the archive."""
        self._require_client("reject")
        with self._locked("reject"):
            self._reconcile(registry_champion_version)
            self._require_challenger(version, "reject")
            journal = {"op": "reject", "version": version, "champion": self._champion_on_disk(),
                       "challenger": version, "steps": []}
            self._write_journal(journal)
            self._remove_eval_model()
            self._step(journal, "eval_model_removed")
            self._archive_version(version, "rejected")
            self._step(journal, "challenger_archived")
            self._write_journal(None)

    # -- reconcile --

    def reconcile(self, registry_champion_version: int | None = None,
                  reject_challenger: bool = False, force: bool = False) -> ReconcileReport:
        """Bring the repository (and Triton, when a client is given) to one consistent
        champion after a crash at any step.

        ``registry_champion_version`` is the Triton version of the registry's champion
        (None: the registry has none). An interrupted transition is finished when the
        registry already names its new champion, and undone otherwise (an interrupted
        promotion goes back to "champion serves, challenger staged", so it can be retried).
        Without a journal the registry's champion wins over the disk.

        A staged challenger may belong to a run still evaluating it, so it stays unless
        ``reject_challenger``; even then the challenger of a run whose process still lives (see
        :meth:`challenger_owner`) stays, and the report says so, unless ``force``.
        """
        if self.client is not None:
            self.client.require_live()
        with self._locked("reconcile"):
            kept = None
            owner = self.challenger_owner() if reject_challenger and not force else None
            if owner and owner["alive"] is not False and not owned_by_this_process(owner):
                reject_challenger = False
                kept = (f"kept challenger version {self._challenger_on_disk()}: {describe_owner(owner)} is "
                        f"still evaluating it (staged at {owner.get('at', '?')}); it is rejected only once "
                        "that run is gone")
            report = self._reconcile(registry_champion_version, reject_challenger)
            if kept:
                report = dataclasses.replace(report, actions=(kept, *report.actions))
            return report

    def _target(self, registry: int | None, reject_challenger: bool = False
                ) -> tuple[int | None, int | None, dict | None]:
        champion, challenger, journal = self._journal_target(registry)
        return champion, (None if reject_challenger else challenger), journal

    def _journal_target(self, registry: int | None) -> tuple[int | None, int | None, dict | None]:
        journal = self._journal()
        if journal is None:
            champion = registry if registry is not None else self._champion_on_disk()
            challenger = self._challenger_on_disk()
            return champion, (None if challenger == champion else challenger), None
        op, version, start = journal["op"], journal["version"], journal["champion"]
        if registry is not None and registry not in (start, version):
            return registry, None, journal  # the registry moved on: follow it
        if op == "stage":
            return start, None, journal
        if op == "promote":
            return (version, None, journal) if registry == version else (start, version, journal)
        if op == "rollback":
            return (version if registry == version else start), None, journal
        return start, None, journal  # reject: finish it

    def _reconcile(self, registry: int | None, reject_challenger: bool = False) -> ReconcileReport:
        champion, challenger, unfinished = self._target(registry, reject_challenger)
        actions: list[str] = []
        # Versions that must serve come back first, so nothing is removed before it is replaced.
        for v in (champion, challenger):
            if v is not None and not (self.public / str(v)).is_dir():
                actions.append(self._restore_version(v))
        if champion is not None and _policy_versions(self.public / CONFIG) != [champion]:
            self._write_public_config(champion)
            actions.append(f"public model serves version {champion}")
        if challenger is not None and _policy_versions(self.eval / CONFIG) != [challenger]:
            self._write_eval_model(challenger)
            actions.append(f"evaluation model serves version {challenger}")
        synced, healthy = False, None
        if self.client is not None:
            # Load only what Triton does not already serve: a load right after the files
            # changed restarts the model even when nothing relevant changed.
            ready = self._triton_ready()
            if champion is not None and ready.get(PUBLIC_MODEL) != {champion}:
                self.client.load_model(PUBLIC_MODEL)
                actions.append(f"Triton loaded {PUBLIC_MODEL} version {champion}")
            elif champion is None and ready.get(PUBLIC_MODEL):
                self.client.unload_model(PUBLIC_MODEL)
                actions.append(f"Triton unloaded {PUBLIC_MODEL}")
            if challenger is not None and ready.get(EVAL_MODEL) != {challenger}:
                self.client.load_model(EVAL_MODEL)
                actions.append(f"Triton loaded {EVAL_MODEL} version {challenger}")
            synced = True
        if challenger is None and (self.eval.exists() or self.eval.is_symlink()):
            self._remove_eval_model()
            actions.append("evaluation model removed")
        if champion is None and (self.public / CONFIG).exists():
            (self.public / CONFIG).unlink()
            actions.append("public model config removed (no champion)")
        for v in self._numbered(self.public):
            if v not in (champion, challenger):
                reason = "rejected" if champion is None or v > champion else "replaced"
                actions.append(self._archive_version(v, reason, keep_reason=True))
        for leftover in [*self.public.glob(STAGING_PREFIX + "*"), *self.root.glob(STAGING_PREFIX + "*")]:
            shutil.rmtree(leftover, ignore_errors=True)
            actions.append(f"removed unfinished copy {leftover.name}")
        if unfinished is not None:
            actions.insert(0, f"unfinished {unfinished['op']} of version {unfinished['version']} "
                              f"after step {unfinished['steps'][-1] if unfinished['steps'] else '(none)'}")
            self._write_journal(None)
        if synced and champion is not None:
            healthy = self._health_check(self.client, PUBLIC_MODEL, champion).ok
        return ReconcileReport(champion, challenger, unfinished, tuple(actions), synced, healthy)
