"""Executing a run: each stage notebook with papermill in its own kernel, in order; outputs
passed on by name; the services the stages share (embedded MLflow store, embedded Triton)
set up once; the notebook written even when a stage fails, with the error at its top."""

from __future__ import annotations

import contextlib
import html
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping

import nbformat
import papermill as pm
from filelock import FileLock
from papermill.exceptions import PapermillExecutionError
from papermill.execute import ERROR_MARKER_TAG, ERROR_STYLE

from fraudlib import settings
from fraudlib.runner.errors import RunSetupError
from fraudlib.runner.kernels import UnixSocketKernelManager, choose_kernel, kernel_runtime_folder, remove_stale_kernel_files
from fraudlib.runner.notebooks import Stage, discover_stages, select_stages, stage_through
from fraudlib.runner.parameters import read_parameter_file, resolve_parameters
from fraudlib.runner.records import (FAILED, PENDING, RUNNING, SKIPPED, SUCCEEDED, RunResult, check_run_folders,
                                     exclusive, new_run_id, now, package_versions, stage_record, write_atomic,
                                     write_record)
from fraudlib.runner.reports import MLFLOW_ARTIFACT_PATH, MLFLOW_RUN_ID_OUTPUT, export_html, log_notebooks_to_mlflow, write_index
from fraudlib.stages.base import git_state

RUN_DIR_PARAMETER = "run_dir"
TRITON_URL_PARAMETER = "triton_url"


def _failed_cell_index(nb: nbformat.NotebookNode) -> int | None:
    """Index of the cell running when the kernel died or timed out: the last one papermill started."""
    started = [i for i, cell in enumerate(nb.cells)
               if cell.cell_type == "code" and cell.metadata.get("papermill", {}).get("start_time")]
    return started[-1] if started else None


def _mark_failure(nb: nbformat.NotebookNode, error: str) -> str:
    """Puts ``error`` at the top of ``nb`` (and an anchor before the failing cell); returns where it failed.

    Papermill does this itself only for an exception raised inside a cell; a dead kernel or a
    cell timeout leaves a notebook that looks fine, so the runner marks it the same way.
    """
    index = _failed_cell_index(nb)
    where = ""
    if index is not None:
        first_line = nb.cells[index].source.strip().splitlines()[0] if nb.cells[index].source.strip() else ""
        where = f" in cell {index + 1} (`{first_line}`)"
        anchor = nbformat.v4.new_markdown_cell(
            f'<span id="papermill-error-cell" {ERROR_STYLE}>The stage stopped while running this cell:</span>')
        anchor.metadata["tags"] = [ERROR_MARKER_TAG]
        nb.cells.insert(index, anchor)
    link = ' <a href="#papermill-error-cell">(go to the cell)</a>' if index is not None else ""
    banner = nbformat.v4.new_markdown_cell(
        f"<span {ERROR_STYLE}>Stage failed: {html.escape(error)}{html.escape(where)}</span>{link}")
    banner.metadata["tags"] = [ERROR_MARKER_TAG]
    nb.cells.insert(0, banner)
    return where


def describe_exception(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def execute_stage(
    stage: Stage,
    output: Path,
    parameters: dict[str, Any],
    kernel_name: str,
    timeout: int | None = None,
    progress: bool = True,
) -> str | None:
    """Executes ``stage`` into ``output``; returns None on success, else the error.

    ``output`` is written even on failure, with the error visible at its top. A cell error,
    kernel death, cell timeout (``timeout`` seconds per cell) or kernel start failure are all
    failures. Papermill saves the notebook while it runs, so it executes into a hidden
    ``.partial`` file that is renamed to ``output`` once complete.
    """
    partial = output.with_name(f".{output.stem}.partial.ipynb")
    interrupted = None
    try:
        with kernel_runtime_folder() as runtime:
            pm.execute_notebook(
                stage.notebook,
                partial,
                parameters=parameters,
                kernel_name=kernel_name,
                progress_bar={"desc": stage.label} if progress else False,
                execution_timeout=timeout,
                cwd=stage.notebook.parent,  # as when the notebook is opened in JupyterLab
                kernel_manager_class=UnixSocketKernelManager.for_folder(runtime),
            )
        error = None
    except PapermillExecutionError as exc:  # papermill has already put the error at the top
        error = f"{exc.ename}: {exc.evalue} (cell In [{exc.exec_count}])"
    except (Exception, KeyboardInterrupt) as exc:  # kernel death, cell timeout, kernel start failure, Ctrl-C
        error = describe_exception(exc)
        nb = nbformat.read(partial if partial.exists() else stage.notebook, as_version=4)
        error += _mark_failure(nb, error)
        write_atomic(partial, nbformat.writes(nb))
        if isinstance(exc, KeyboardInterrupt):
            interrupted = exc
    os.replace(partial, output)
    if interrupted:
        raise interrupted
    return error


def read_outputs(notebook: Path) -> tuple[dict[str, Any], list[str]]:
    """The glued outputs of an executed notebook (JSON and text scraps), and warnings for the others."""
    import scrapbook as sb

    outputs, ignored = {}, []
    for name, scrap in sb.read_notebook(str(notebook)).scraps.items():
        if scrap.encoder in ("json", "text"):
            outputs[name] = scrap.data
        else:
            ignored.append(f"{notebook.name}: glued output {name!r} (encoder {scrap.encoder}) is not passed on: "
                            f"stages pass small JSON values and paths only")
    return outputs, ignored


# --- the run ----------------------------------------------------------------------------------


def say(progress: bool, message: str) -> None:
    if progress:
        print(message, flush=True)


MLFLOW_INIT_LOCK = ".mlflow-init.lock"
# A stage declaring one of these uses MLflow: the embedded store is created before it runs.
MLFLOW_PARAMETERS = frozenset({"experiment_name", MLFLOW_RUN_ID_OUTPUT})


def initialise_embedded_mlflow_store() -> bool:
    """Creates the embedded MLflow store (``runs/mlflow.db``: schema and default experiment)
    once, under a lock in the runs folder, before any stage runs.

    Two runs started at once on a fresh runs folder otherwise both run MLflow's schema
    migrations on the new SQLite file from their kernels, and one fails (alembic's
    ``CircularDependencyError``) or both create the experiment. A store that exists is left
    alone; an external store (``MLFLOW_TRACKING_URI`` not ``sqlite:``) too. Returns whether it
    created the store.
    """
    uri = settings.mlflow_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return False
    database = Path(uri[len("sqlite:///"):])
    database.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(settings.runs_root() / MLFLOW_INIT_LOCK), timeout=600):
        if database.exists() and database.stat().st_size > 0:
            return False  # created by an earlier run (under this lock): nothing to race on
        from fraudlib import tracking

        tracking.ensure_experiment()
        return True


def _start_embedded_triton(run_dir: Path, services: contextlib.ExitStack) -> str:
    from fraudlib.triton_server import connect_or_start

    return services.enter_context(connect_or_start("", run_dir / "triton.log")).url


def execute_run(
    run_dir: Path,
    record: dict,
    stages: dict[str, Stage],
    kernel_name: str,
    timeout: int | None,
    progress: bool,
    through: str | None = None,
) -> RunResult:
    """Runs every stage of ``record`` that has not succeeded, in order, stopping at the first
    failure; with ``through`` (a stage name) only up to that stage: the later ones stay pending
    (the run's status ``pending``) for a later call (``resume_pipeline``), e.g. one stage per
    orchestrator task, fed by the outputs recorded here."""
    run_warnings: list[str] = []
    outputs: dict[str, Any] = {}
    for rec in record["stages"]:
        if rec["status"] == SUCCEEDED:
            outputs.update(rec["outputs"])
    to_run = [rec for rec in record["stages"] if rec["status"] != SUCCEEDED]
    if through:
        to_run = to_run[:[rec["name"] for rec in to_run].index(through) + 1]
    triton_url = os.environ.get("TRITON_URL") or None
    for removed in remove_stale_kernel_files(*sorted({s.notebook.parent for s in stages.values()})):
        say(progress, f"removed {removed}, left by a killed run")
    mlflow_ready = False
    with contextlib.ExitStack() as services:  # the embedded Triton, started by the first stage needing it
        for position, rec in enumerate(to_run, start=1):
            stage = stages[rec["name"]]
            label = f"[{position}/{len(to_run)}] {stage.label}"
            notebook = run_dir / rec["notebook"]
            parameters = {name: value for name, value in outputs.items() if name in stage.parameters}
            if RUN_DIR_PARAMETER in stage.parameters:
                parameters[RUN_DIR_PARAMETER] = str(run_dir)
            if not mlflow_ready and MLFLOW_PARAMETERS & set(stage.parameters):
                mlflow_ready = True
                try:
                    if initialise_embedded_mlflow_store():
                        say(progress, f"{label}: created the MLflow store {settings.mlflow_tracking_uri()}")
                except Exception as exc:  # the stage reports it in its own words
                    run_warnings.append(f"the MLflow store {settings.mlflow_tracking_uri()} was not created "
                                        f"before the stages: {describe_exception(exc)}")
            rec.update(status=RUNNING, start=now(), end=None, duration_s=None, error=None, outputs={})
            started = time.monotonic()
            error = None
            if TRITON_URL_PARAMETER in stage.parameters and TRITON_URL_PARAMETER not in rec["requested"]:
                try:
                    if triton_url is None:
                        say(progress, f"{label}: starting the embedded Triton server (log: {run_dir / 'triton.log'})")
                        triton_url = _start_embedded_triton(run_dir, services)
                    parameters[TRITON_URL_PARAMETER] = triton_url
                except Exception as exc:
                    error = (f"the embedded Triton server did not start (log: {run_dir / 'triton.log'}): "
                             f"{describe_exception(exc)}")
            rec["parameters"] = {**parameters, **rec["requested"]}
            write_record(run_dir, record)
            if error is None:
                say(progress, f"{label}: running {stage.notebook} -> {notebook}")
                try:
                    error = execute_stage(stage, notebook, rec["parameters"], kernel_name, timeout, progress)
                except KeyboardInterrupt:
                    rec.update(status=FAILED, error="interrupted (Ctrl-C)", end=now())
                    record.update(status=FAILED, ended=now())
                    write_record(run_dir, record)
                    raise
            if notebook.exists():
                try:
                    export_html(notebook, run_dir / rec["html"])
                except Exception as exc:
                    run_warnings.append(f"{rec['notebook']}: HTML copy not written: {describe_exception(exc)}")
            if error is None:
                rec["outputs"], read_warnings = read_outputs(notebook)
                run_warnings.extend(read_warnings)
                outputs.update(rec["outputs"])
            rec.update(status=FAILED if error else SUCCEEDED, error=error, end=now(),
                       duration_s=round(time.monotonic() - started, 1))
            say(progress, f"{label}: {rec['status']} in {rec['duration_s']} s" + (f": {error}" if error else ""))
            if error:
                for later in record["stages"]:
                    if later["status"] == PENDING:
                        later["status"] = SKIPPED
                break
            write_record(run_dir, record)
            write_index(run_dir, record)
    statuses = {r["status"] for r in record["stages"]}
    status = FAILED if FAILED in statuses else PENDING if PENDING in statuses else SUCCEEDED
    record.update(status=status, ended=None if status == PENDING else now())
    write_record(run_dir, record)
    write_index(run_dir, record)
    if status == PENDING:  # logged to MLflow when the run ends
        return RunResult(record["run_id"], run_dir, status, record, run_warnings)
    try:
        logged_to = log_notebooks_to_mlflow(run_dir, record)
    except Exception as exc:
        run_warnings.append(f"the notebooks were not logged to MLflow ({settings.mlflow_tracking_uri()}): "
                            f"{describe_exception(exc)}")
    else:
        if logged_to:
            say(progress, f"notebooks, HTML reports, index.html and run.json logged to MLflow run {logged_to[0]} "
                           f"under {MLFLOW_ARTIFACT_PATH}/")
    return RunResult(record["run_id"], run_dir, record["status"], record, run_warnings)


def run_pipeline(
    notebooks_dir: Path,
    runs_dir: Path,
    *,
    stages: str | None = None,
    assignments: Mapping[str, str] | None = None,
    parameter_file: Path | None = None,
    run_id: str | None = None,
    timeout: int | None = None,
    kernel: str | None = None,
    progress: bool = True,
    through: str | None = None,
) -> RunResult:
    """Validates, then executes the selected stages of ``notebooks_dir`` into ``runs_dir/<run_id>/``.

    ``stages``: ``--stages`` text (``"1,2"`` or ``"preprocess,train"``), None for all.
    ``through``: a selected stage (number or name): run up to it, leaving the later ones
    pending for ``resume_pipeline`` (the parameters of every selected stage are checked now).
    ``assignments``: ``-p`` values as typed (``{"num_epochs": "3"}``). ``parameter_file``: ``-f``.
    Raises ``RunSetupError``/``ParameterError`` before anything runs; a failing stage gives a
    result with status ``failed`` (its notebook, HTML copy and run.json are written).
    """
    all_stages = discover_stages(Path(notebooks_dir))
    selected = select_stages(all_stages, stages)
    through = stage_through(selected, through)
    file_values = read_parameter_file(parameter_file) if parameter_file else {}
    requested = resolve_parameters(all_stages, selected, assignments or {}, file_values, f"-f {parameter_file}")
    kernel_name = choose_kernel(kernel)
    run_id = run_id or new_run_id()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", run_id):
        raise RunSetupError(f"--run-id {run_id!r}: use letters, digits, '.', '_' and '-' only")
    run_dir = Path(runs_dir).resolve() / run_id
    check_run_folders(run_dir.parent)
    try:
        run_dir.mkdir(parents=True)
    except FileExistsError as exc:
        raise RunSetupError(f"run folder {run_dir} already exists: runs are append-only; choose another "
                            f"--run-id or continue it with --resume {run_id}") from exc
    record = {
        "run_id": run_id,
        "status": RUNNING,
        "started": now(),
        "ended": None,
        "resumed": [],
        "kernel": kernel_name,
        "timeout_s": timeout,
        "cwd": str(Path.cwd()),  # relative path parameters were taken from here
        "git": git_state(),
        "versions": package_versions(),
        "stages": [],
    }
    for stage in selected:
        rec = stage_record(stage)
        rec["requested"] = requested[stage.name]
        record["stages"].append(rec)
    with exclusive(run_dir):
        write_record(run_dir, record)
        say(progress, f"run {run_id}: {len(selected)} stage(s) into {run_dir}")
        return execute_run(run_dir, record, {s.name: s for s in selected}, kernel_name, timeout, progress, through)

