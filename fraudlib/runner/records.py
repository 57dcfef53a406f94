"""The run record: ``run.json`` (status, timings, parameters, outputs and errors of every
stage, git commit, package versions), the run folder's checks and lock, and the summary table."""

from __future__ import annotations

import contextlib
import datetime
import errno
import importlib.metadata
import json
import os
import secrets
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from fraudlib import settings
from fraudlib.runner.errors import RunSetupError
from fraudlib.runner.notebooks import Stage

RUN_JSON = "run.json"
PENDING, RUNNING, SUCCEEDED, FAILED, SKIPPED = "pending", "running", "succeeded", "failed", "skipped"

# Distribution names per reported package (the first one installed is reported).
_VERSIONED_PACKAGES = {
    "numpy": ("numpy",),
    "pandas": ("pandas",),
    "torch": ("torch",),
    "torch_geometric": ("torch-geometric", "torch_geometric"),
    "xgboost": ("xgboost", "xgboost-cpu"),
    "mlflow": ("mlflow", "mlflow-skinny"),
    "papermill": ("papermill",),
    "tritonclient": ("tritonclient",),
}


@dataclass(frozen=True)
class RunResult:
    run_id: str
    run_dir: Path
    status: str  # SUCCEEDED, FAILED, or PENDING (stages left for a later call: ``through``)
    record: dict  # the contents of run.json
    warnings: list[str] = field(default_factory=list)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def new_run_id() -> str:
    return f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for package, distributions in _VERSIONED_PACKAGES.items():
        versions[package] = None
        for distribution in distributions:
            try:
                versions[package] = importlib.metadata.version(distribution)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


def write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def write_record(run_dir: Path, record: dict) -> None:
    write_atomic(run_dir / RUN_JSON, json.dumps(record, indent=2, default=str) + "\n")


def read_record(run_dir: Path) -> dict:
    path = run_dir / RUN_JSON
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise RunSetupError(f"no run to resume: {path} does not exist (see --runs-dir)") from exc
    except (OSError, ValueError) as exc:
        raise RunSetupError(f"cannot read {path}: {exc}") from exc


def stage_record(stage: Stage) -> dict:
    return {
        "name": stage.name,
        "number": stage.number,
        "notebook": f"{stage.label}.ipynb",
        "html": f"{stage.label}.html",
        "source": str(stage.notebook),
        "status": PENDING,
        "start": None,
        "end": None,
        "duration_s": None,
        "requested": {},  # explicit -p/-f parameters, kept so a resume re-applies them
        "parameters": {},  # everything passed to papermill (explicit, chained, run_dir, triton_url)
        "outputs": {},
        "error": None,
        "previous_attempts": [],
    }


def check_writable(folder: Path, what: str, create: bool = True) -> None:
    """Raises ``RunSetupError`` naming ``folder`` (and why) unless a file can be written in it.

    Writes and removes a probe file rather than trusting permission bits: root ignores those,
    while a read-only mount (EROFS) or an immutable folder (``chattr +i``) stop root too.
    ``create``: make the folder (and its parents) when missing; else a missing one passes.
    """
    folder = Path(folder)
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        elif not folder.exists():
            return
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise RunSetupError(f"the {what} {folder} is not writable ({_why_unwritable(folder, exc)}): "
                            f"nothing was run. Make it writable or choose another runs folder "
                            f"(--runs-dir or FRAUD_RUNS_DIR).") from None


def _why_unwritable(folder: Path, exc: OSError) -> str:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    reason = exc.strerror or str(exc)
    if existing != folder:
        return f"it does not exist and cannot be created in {existing}: {reason}"
    return {errno.EROFS: "on a read-only file system",
            errno.EPERM: f"{reason}: an immutable folder, chattr +i?"}.get(exc.errno, reason)


def check_run_folders(runs_dir: Path) -> None:
    """Before any stage runs: the runs folder and the stores the stages write under the runs
    root (MLflow artifacts, Triton model repository) can be written."""
    check_writable(Path(runs_dir), "runs folder")
    services = [(settings.mlflow_artifact_root(), "MLflow artifact folder"),
                (settings.triton_model_repository(), "Triton model repository")]
    for folder, what in services:
        check_writable(folder, what, create=False)


@contextlib.contextmanager
def exclusive(run_dir: Path):
    """Holds the run folder against a second runner (e.g. two resumes of one run)."""
    lock = FileLock(str(run_dir / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout as exc:
        raise RunSetupError(f"run {run_dir.name} is being executed by another runner ({run_dir / '.lock'})") from exc
    try:
        yield
    finally:
        lock.release()


def format_summary(record: dict, width: int = 70) -> str:
    """A table of the run's stages: status, duration and key outputs (or the error)."""
    rows = [("stage", "status", "duration", "outputs / error")]
    for rec in record["stages"]:
        duration = f"{rec['duration_s']:.1f} s" if rec["duration_s"] is not None else "-"
        detail = rec["error"] or ", ".join(f"{k}={v!r}" for k, v in rec["outputs"].items())
        if len(detail) > width:
            detail = detail[: width - 3] + "..."
        rows.append((f"{rec['number']:02d}_{rec['name']}", rec["status"], duration, detail))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}  {d}" for a, b, c, d in rows]
    return "\n".join([f"run {record['run_id']}: {record['status']}", *lines]) + "\n"
