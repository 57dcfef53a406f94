"""Papermill stage runner: executes the stage notebooks of one pipeline run into ``runs/<run_id>/``.

A stage is a notebook named ``NN_name.ipynb`` in the notebooks directory; stages run in ``NN``
order, so adding a stage is adding a notebook. One module per concern:

- :mod:`~fraudlib.runner.notebooks`: discovering the stage notebooks and reading their
  ``parameters`` cells; a notebook naming a stage module (``metadata.fraudlib.stage``) is
  checked against that module's ``Params`` dataclass;
- :mod:`~fraudlib.runner.parameters`: ``-p``/``-f`` values converted to the declared types,
  checked against the dataclass fields, path values made absolute; every problem is reported
  before anything runs (``ParameterError``);
- :mod:`~fraudlib.runner.kernels`: the Jupyter kernel, and each kernel's private runtime folder;
- :mod:`~fraudlib.runner.execution`: the run: stages in order, glued outputs passed by name
  to later stages declaring them, ``run_dir`` and ``triton_url`` (an embedded Triton started
  once) passed on, the MLflow store created once; a failed stage's notebook is written with
  the error at its top;
- :mod:`~fraudlib.runner.records`: ``run.json``, the run folder's checks and lock;
- :mod:`~fraudlib.runner.resume`: continuing a failed run from its failed stage, or a run
  executed ``through`` a stage with its next stages (one stage per orchestrator task);
- :mod:`~fraudlib.runner.reports`: HTML reports that hide code, ``index.html``, logging to MLflow.

``run_pipeline.py`` is the command line over ``run_pipeline``, ``resume_pipeline``,
``discover_stages`` and ``describe_stages``.
"""

from fraudlib.runner.errors import ParameterError, RunSetupError
from fraudlib.runner.execution import (execute_stage, initialise_embedded_mlflow_store, read_outputs,
                                       run_pipeline)
from fraudlib.runner.kernels import choose_kernel, kernel_runtime_folders, remove_stale_kernel_files
from fraudlib.runner.notebooks import STAGE_PATTERN, Stage, describe_stages, discover_stages, read_stage, select_stages
from fraudlib.runner.parameters import (absolute_path_value, is_path_parameter, parse_assignments,
                                        read_parameter_file, resolve_parameters)
from fraudlib.runner.records import (FAILED, PENDING, RUNNING, SKIPPED, SUCCEEDED, RunResult, check_writable,
                                     format_summary, read_record, write_record)
from fraudlib.runner.reports import export_html, log_notebooks_to_mlflow, write_index
from fraudlib.runner.resume import resume_pipeline

__all__ = [
    "FAILED", "PENDING", "RUNNING", "SKIPPED", "STAGE_PATTERN", "SUCCEEDED", "ParameterError", "RunResult",
    "RunSetupError", "Stage", "absolute_path_value", "check_writable", "choose_kernel", "describe_stages",
    "discover_stages", "execute_stage", "export_html", "format_summary", "initialise_embedded_mlflow_store",
    "is_path_parameter", "kernel_runtime_folders", "log_notebooks_to_mlflow", "parse_assignments",
    "read_outputs", "read_parameter_file", "read_record", "read_stage", "remove_stale_kernel_files",
    "resolve_parameters", "resume_pipeline", "run_pipeline", "select_stages", "write_index", "write_record",
]
