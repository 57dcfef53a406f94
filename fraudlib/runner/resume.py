"""Resuming a run from its first stage that has not succeeded (a failed stage, or the stages a
``through`` run left pending): succeeded stages are kept and feed the later ones, a failed
attempt's notebook is kept beside (a run folder is only ever added to)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from fraudlib.runner.errors import RunSetupError
from fraudlib.runner.execution import execute_run, say
from fraudlib.runner.kernels import choose_kernel
from fraudlib.runner.notebooks import read_stage, stage_through
from fraudlib.runner.parameters import read_parameter_file, resolve_parameters
from fraudlib.runner.records import (FAILED, PENDING, RUNNING, SUCCEEDED, RunResult, check_run_folders,
                                     check_writable, exclusive, now, read_record, write_record)


def _keep_failed_attempt(run_dir: Path, rec: dict) -> None:
    """Renames a failed stage's notebook and HTML to ``NN_name.failed-<n>.*`` and records the attempt."""
    stem = Path(rec["notebook"]).stem
    n = 1
    while (run_dir / f"{stem}.failed-{n}.ipynb").exists():
        n += 1
    attempt = {key: rec[key] for key in ("status", "start", "end", "duration_s", "parameters", "error")}
    for key, suffix in (("notebook", ".ipynb"), ("html", ".html")):
        kept = run_dir / f"{stem}.failed-{n}{suffix}"
        if (run_dir / rec[key]).exists():
            os.replace(run_dir / rec[key], kept)
            attempt[key] = kept.name
    rec["previous_attempts"].append(attempt)


def resume_pipeline(
    run_id: str,
    runs_dir: Path,
    *,
    assignments: Mapping[str, str] | None = None,
    parameter_file: Path | None = None,
    timeout: int | None = None,
    kernel: str | None = None,
    progress: bool = True,
    through: str | None = None,
) -> RunResult:
    """Continues run ``run_id`` from its first stage that did not succeed (through the stage
    ``through`` names, when given: the later ones stay pending).

    Succeeded stages are kept and their outputs feed the later ones; the failed notebook is kept
    as ``NN_name.failed-<n>.ipynb``; the stage notebooks are re-read from their recorded
    sources (so a fixed notebook is picked up). ``assignments``/``parameter_file`` override the
    run's recorded explicit parameters for the stages still to run. ``timeout``/``kernel``
    default to the run's.
    """
    run_dir = Path(runs_dir).resolve() / run_id
    if not run_dir.is_dir():
        raise RunSetupError(f"no run {run_id!r} in {Path(runs_dir).resolve()} (see --runs-dir)")
    check_run_folders(Path(runs_dir).resolve())
    check_writable(run_dir, f"folder of run {run_id}")
    with exclusive(run_dir):
        record = read_record(run_dir)
        remaining = [rec for rec in record["stages"] if rec["status"] != SUCCEEDED]
        if not remaining:
            raise RunSetupError(f"run {run_id} has already succeeded: nothing to resume")
        all_stages = [read_stage(Path(rec["source"])) for rec in record["stages"]]
        stages = {s.name: s for s in all_stages if s.name in {rec["name"] for rec in remaining}}
        through = stage_through(list(stages.values()), through)  # a succeeded stage is no stage to run
        file_values = read_parameter_file(parameter_file) if parameter_file else {}
        overrides = resolve_parameters(all_stages, list(stages.values()), assignments or {},
                                       file_values, f"-f {parameter_file}")
        kernel_name = choose_kernel(kernel or record["kernel"])
        timeout = timeout if timeout is not None else record["timeout_s"]
        failed = [rec for rec in remaining if rec["status"] in (FAILED, RUNNING)]  # RUNNING: a killed runner
        for rec in remaining:
            if rec in failed:
                _keep_failed_attempt(run_dir, rec)
            rec.update(status=PENDING, start=None, end=None, duration_s=None, error=None, outputs={})
            rec["requested"] = {**rec["requested"], **overrides[rec["name"]]}
        record.update(status=RUNNING, ended=None, kernel=kernel_name, timeout_s=timeout)
        if failed:  # continuing the stages a ``through`` run left pending is no resume
            record["resumed"].append(now())
        write_record(run_dir, record)
        say(progress, f"run {run_id}: {'resuming' if failed else 'continuing'} at stage {remaining[0]['notebook']} "
                      f"in {run_dir}")
        return execute_run(run_dir, record, stages, kernel_name, timeout, progress, through)

