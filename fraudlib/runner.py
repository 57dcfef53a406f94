"""Papermill stage runner: executes the stage notebooks of one pipeline run into ``runs/<run_id>/``.

A stage is a notebook named ``NN_name.ipynb`` in the notebooks directory; stages run in ``NN``
order, so adding a stage is adding a notebook. For every run the runner

- validates the requested parameters against each notebook's ``parameters`` cell (type
  annotations, ``# help`` comments) before anything runs: ``ParameterError``; path
  parameters (``*_path``, ``*_dir``, ...) are made absolute from the caller's directory;
- checks the runs folder is writable before anything runs: ``RunSetupError`` naming it;
- runs each stage's kernel with its connection file and sockets in a private folder that is
  removed afterwards (two runs at once never share them);
- executes each stage with papermill into ``<run_dir>/NN_name.ipynb`` plus ``NN_name.html``;
  the notebook is written even when the stage fails, with the error at its top;
- passes every glued output (scrapbook) of earlier stages to later stages that declare a
  parameter of that name, ``run_dir`` to stages that declare it, and ``triton_url`` (an
  embedded Triton started once per run) to stages that declare it; explicit parameters win;
- creates the embedded MLflow store once, under a lock, before the first stage declaring
  ``experiment_name`` or ``mlflow_run_id`` (two fresh runs at once would both migrate it);
- records ``run.json`` after every stage and can resume a failed run from its failed stage;
- logs the executed notebooks to the MLflow run a stage glued as ``mlflow_run_id``.

``run_pipeline.py`` is the command line over ``run_pipeline``, ``resume_pipeline``,
``discover_stages`` and ``describe_stages``.
"""

from __future__ import annotations

import ast
import contextlib
import datetime
import difflib
import html
import importlib.metadata
import json
import os
import errno
import re
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import nbformat
import papermill as pm
import yaml
from filelock import FileLock, Timeout
from jupyter_client.manager import AsyncKernelManager
from papermill.exceptions import PapermillExecutionError
from papermill.execute import ERROR_MARKER_TAG, ERROR_STYLE
from traitlets import CaselessStrEnum, default

from fraudlib import settings

STAGE_PATTERN = "[0-9][0-9]_*.ipynb"
RUN_JSON = "run.json"
RUN_DIR_PARAMETER = "run_dir"
TRITON_URL_PARAMETER = "triton_url"
MLFLOW_RUN_ID_OUTPUT = "mlflow_run_id"
MLFLOW_ARTIFACT_PATH = "notebooks"
KERNEL_FOR_THIS_VENV = "fraudlib"  # registered by `make setup` (ipykernel install --sys-prefix)

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
_CHECKED_TYPES = ("int", "float", "bool", "str", "list", "dict")
_TRUE_WORDS, _FALSE_WORDS = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


class RunSetupError(Exception):
    """The run cannot start as asked (nothing has been executed); the CLI exits with status 2."""


class ParameterError(RunSetupError):
    """A requested parameter is declared by no selected stage or has the wrong type."""


@dataclass(frozen=True)
class Parameter:
    name: str
    type_name: str  # the annotation as written in the notebook; "" when it has none
    default: str  # source text of the default value
    help: str


@dataclass(frozen=True)
class Stage:
    number: int
    name: str
    notebook: Path
    parameters: Mapping[str, Parameter]

    @property
    def label(self) -> str:
        return f"{self.number:02d}_{self.name}"


@dataclass(frozen=True)
class RunResult:
    run_id: str
    run_dir: Path
    status: str  # SUCCEEDED or FAILED
    record: dict  # the contents of run.json
    warnings: list[str] = field(default_factory=list)


# --- stages -----------------------------------------------------------------------------------


def read_stage(notebook: Path) -> Stage:
    """The stage a notebook ``NN_name.ipynb`` defines, with its declared parameters."""
    match = re.fullmatch(r"(\d\d)_(.+)\.ipynb", notebook.name)
    if not match:
        raise RunSetupError(f"{notebook}: a stage notebook is named NN_name.ipynb (e.g. 01_preprocess.ipynb)")
    try:
        inferred = pm.inspect_notebook(notebook)
    except Exception as exc:
        raise RunSetupError(f"{notebook}: cannot read its parameters cell: {exc}") from exc
    _check_papermill_sees_every_parameter(notebook, set(inferred))
    parameters = {
        name: Parameter(
            name=name,
            type_name="" if p["inferred_type_name"] == "None" else p["inferred_type_name"],
            default=p["default"],
            help=p["help"],
        )
        for name, p in inferred.items()
    }
    return Stage(int(match.group(1)), match.group(2), notebook.resolve(), parameters)


def _check_papermill_sees_every_parameter(notebook: Path, inferred: set[str]) -> None:
    """Raises when the parameters cell assigns a name papermill's inspector did not read.

    Papermill skips, with only a log line, any line holding a second '=' (in the default or
    the help comment) or an annotation it cannot match (``str | None``); such a parameter
    would be invisible to ``papermill --help-notebook``, to validation and to chaining.
    """
    nb = nbformat.read(notebook, as_version=4)
    cell = next((c for c in nb.cells if "parameters" in c.metadata.get("tags", [])), None)
    if cell is None:
        return
    try:
        tree = ast.parse(cell.source)
    except SyntaxError as exc:
        raise RunSetupError(f"{notebook}: the parameters cell is not valid Python (line {exc.lineno}): "
                            f"{exc.msg}") from exc
    lines = cell.source.splitlines()
    unread = []
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        else:
            continue
        for target in targets:
            if isinstance(target, ast.Name) and target.id not in inferred:
                unread.append(f"line {node.lineno}: {lines[node.lineno - 1].strip()}")
    if unread:
        raise RunSetupError(
            f"{notebook}: papermill cannot read these lines of the parameters cell, so neither "
            f"`papermill --help-notebook` nor the runner sees those parameters:\n    " + "\n    ".join(unread)
            + "\n  Write each as `name: type = default  # help` with no other '=' on the line "
            "(e.g. '# empty: synthetic data', not '# empty = synthetic data') and a plain type (str, int, ...)."
        )


def discover_stages(notebooks_dir: Path) -> list[Stage]:
    """All stages in ``notebooks_dir`` (``NN_name.ipynb``), in ``NN`` order."""
    notebooks_dir = Path(notebooks_dir)
    if not notebooks_dir.is_dir():
        raise RunSetupError(f"notebooks directory {notebooks_dir} does not exist (see --notebooks-dir)")
    stages, problems = [], []
    for path in sorted(notebooks_dir.glob(STAGE_PATTERN)):
        try:
            stages.append(read_stage(path))
        except RunSetupError as exc:
            problems.append(str(exc))
    if problems:
        raise RunSetupError("\n".join(problems))
    if not stages:
        raise RunSetupError(f"no stage notebooks ({STAGE_PATTERN}) in {notebooks_dir}")
    for attribute in ("number", "name"):
        seen: dict[Any, Stage] = {}
        for stage in stages:
            other = seen.setdefault(getattr(stage, attribute), stage)
            if other is not stage:
                raise RunSetupError(
                    f"stages {other.notebook.name} and {stage.notebook.name} share the {attribute} "
                    f"{getattr(stage, attribute)!r}; rename one so each stage has its own number and name"
                )
    return stages


def select_stages(stages: list[Stage], selection: str | None) -> list[Stage]:
    """The stages a ``--stages`` value names (numbers like ``1,2`` or names), in pipeline order."""
    if not selection:
        return list(stages)
    wanted: set[str] = set()
    for item in (part.strip() for part in selection.split(",")):
        if not item:
            continue
        matches = [s for s in stages if (item.isdigit() and s.number == int(item)) or item in (s.name, s.label)]
        if not matches:
            available = ", ".join(f"{s.number} or {s.name}" for s in stages)
            raise RunSetupError(f"--stages: no stage {item!r}; available: {available}")
        wanted.add(matches[0].label)
    return [s for s in stages if s.label in wanted]


def describe_stages(stages: list[Stage]) -> str:
    """Every stage with its parameters (name, type, default, help): the pipeline's --help-notebook."""
    lines = []
    for stage in stages:
        lines.append(f"{stage.number:02d} {stage.name}  ({stage.notebook})")
        if not stage.parameters:
            lines.append("    (no parameters cell)")
        for p in stage.parameters.values():
            lines.append(f"    {p.name}: {p.type_name or 'untyped'} = {p.default}")
            if p.help:
                lines.append(f"        {p.help}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# --- parameters -------------------------------------------------------------------------------


def parse_assignments(pairs: list[str]) -> dict[str, str]:
    """``["name=value", ...]`` (``-p``) to ``{name: raw value text}``; a later name wins."""
    assignments = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            raise ParameterError(f"-p {pair!r}: expected NAME=VALUE, e.g. -p num_epochs=3")
        assignments[name] = value
    return assignments


def read_parameter_file(path: Path) -> dict[str, Any]:
    """The mapping in a ``-f`` YAML parameter file (empty file: no parameters)."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ParameterError(f"-f {path}: cannot read the parameter file: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ParameterError(f"-f {path}: not valid YAML: {exc}") from exc
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ParameterError(f"-f {path}: expected a mapping of parameter names (or stage sections), "
                             f"got {type(values).__name__}")
    return values


def _declared_type(parameter: Parameter) -> tuple[str | None, bool]:
    """(checked base type or None when unchecked, whether None is an accepted value)."""
    text = parameter.type_name.replace(" ", "")
    nullable = parameter.default == "None"
    optional = re.fullmatch(r"(?:typing\.)?Optional\[(.+)\]", text)
    if optional:
        text, nullable = optional.group(1), True
    parts = text.split("|")
    if len(parts) > 1 and "None" in parts:
        parts.remove("None")
        nullable = True
    if len(parts) != 1:
        return None, nullable
    base = re.sub(r"^typing\.", "", re.sub(r"\[.*\]$", "", parts[0])).lower()
    return (base if base in _CHECKED_TYPES else None), nullable


def _coerce(value: Any, parameter: Parameter, raw: str | None) -> Any:
    """``value`` as the parameter's declared type; ValueError when it is not one.

    ``raw`` is the text typed after ``-p name=``: a ``str`` parameter gets it verbatim (so
    ``-p seed_text=007`` stays "007" and ``-p suffix=`` is ""), every other type gets the YAML
    scalar ``value``. None passes where the annotation or the default allows it.
    """
    base, nullable = _declared_type(parameter)
    if value is None and (nullable or base is None):
        return None
    if base is None:
        return value
    if base == "str":
        if isinstance(value, str):
            return value
        if raw is not None and not isinstance(value, (list, dict)):
            return raw
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError
    if value is None:
        raise ValueError
    if base == "bool":
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if word in _TRUE_WORDS | _FALSE_WORDS:
            return word in _TRUE_WORDS
        raise ValueError
    if isinstance(value, bool):
        raise ValueError  # True is an int to Python, but never a valid count or rate
    if base == "int":
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            return int(value.strip())
        raise ValueError
    if base == "float":
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value.strip())
        raise ValueError
    if isinstance(value, {"list": list, "dict": dict}[base]):
        return value
    raise ValueError


_PATH_PARAMETER = re.compile(r"(?:.*_)?(?:path|dir|file|folder)")


def is_path_parameter(name: str) -> bool:
    """A parameter named ``*_path``, ``*_dir``, ``*_file`` or ``*_folder`` (``raw_path``,
    ``output_dir``, ...) holds a path: the runner makes a relative one absolute."""
    return bool(_PATH_PARAMETER.fullmatch(name))


def absolute_path_value(value: Any, base: Path) -> Any:
    """A path parameter's value as an absolute path: ``~`` expanded, a relative path taken from
    ``base`` (the caller's working directory). Empty values (the notebook's default) and URIs
    (``s3://...``) are left alone, as is anything but a str."""
    if not isinstance(value, str) or not value.strip() or "://" in value:
        return value
    return os.path.normpath(Path(base) / Path(value).expanduser())


def resolve_parameters(
    stages: list[Stage],
    selected: list[Stage],
    assignments: Mapping[str, str],
    file_values: Mapping[str, Any],
    file_label: str = "-f",
    base: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """The explicit parameters of each selected stage, ``{stage name: {parameter: value}}``.

    ``file_values`` is a ``-f`` file: flat names apply to every selected stage declaring them;
    a top-level key equal to a stage name with a mapping value is that stage's section (a
    section of an unselected stage is ignored). Precedence: ``-p`` > section > flat entry.
    Every problem is collected, then raised as one ``ParameterError`` naming the parameter,
    the stage(s) and the expected type.

    Path parameters (:func:`is_path_parameter`), from ``-p`` and ``-f`` alike, come out
    absolute, relative ones taken from ``base`` (default: the current working directory, i.e.
    where the user ran the command), never from the kernel's working directory (notebooks/).
    """
    base = Path(base) if base is not None else Path.cwd()
    stage_names = {s.name for s in stages}
    selected_names = {s.name for s in selected}
    errors: list[str] = []
    resolved: dict[str, dict[str, Any]] = {s.name: {} for s in selected}

    def assign(stage: Stage, name: str, value: Any, raw: str | None, source: str) -> None:
        parameter = stage.parameters[name]
        try:
            value = _coerce(value, parameter, raw)
            resolved[stage.name][name] = absolute_path_value(value, base) if is_path_parameter(name) else value
        except ValueError:
            shown = raw if raw is not None else value
            errors.append(
                f"{source}: stage {stage.label} ({stage.notebook}) declares {name!r} as "
                f"{parameter.type_name}; {shown!r} is not a valid {parameter.type_name}"
            )

    def unknown(name: str, source: str, candidates: list[Stage]) -> str:
        message = f"{source}: no selected stage declares a parameter {name!r} " \
                  f"(selected: {', '.join(s.label for s in candidates)})."
        elsewhere = [s.label for s in stages if s.name not in selected_names and name in s.parameters]
        if elsewhere:
            message += f" It is declared by {', '.join(elsewhere)}, which this run does not execute."
        else:
            known = sorted({p for s in candidates for p in s.parameters})
            close = difflib.get_close_matches(name, known, n=3)
            if close:
                message += f" Did you mean {', '.join(map(repr, close))}?"
        return message + " `run_pipeline.py --list` shows every stage's parameters."

    def apply_to_selected(name: str, value: Any, raw: str | None, source: str) -> None:
        targets = [s for s in selected if name in s.parameters]
        if not targets:
            errors.append(unknown(name, source, selected))
        for stage in targets:
            assign(stage, name, value, raw, source)

    sections = {}
    for key, value in file_values.items():
        if key in stage_names:
            if not isinstance(value, dict):
                errors.append(f"{file_label}: section {key!r} (a stage name) must be a mapping of parameters, "
                              f"got {value!r}")
            else:
                sections[key] = value
        else:
            apply_to_selected(key, value, None, f"{file_label}: {key}")
    for stage in selected:
        for name, value in sections.get(stage.name, {}).items():
            source = f"{file_label}: {stage.name}.{name}"
            if name in stage.parameters:
                assign(stage, name, value, None, source)
            else:
                errors.append(unknown(name, source, [stage]))
    for name, raw in assignments.items():
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw  # only a str parameter can take it; _coerce rejects it for the others
        apply_to_selected(name, value, raw, f"-p {name}={raw}")
    if errors:
        raise ParameterError("invalid parameters, nothing was run:\n  " + "\n  ".join(errors))
    return resolved


# --- kernel -----------------------------------------------------------------------------------


def choose_kernel(requested: str | None = None) -> str:
    """The Jupyter kernel the stages run in: ``requested`` when given, else one running this interpreter.

    ``fraudlib`` (registered in the venv by ``make setup``) when its command is this Python;
    else ``python3``, whose ``python`` command jupyter_client replaces with this interpreter.
    """
    if requested:
        return requested
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    manager = KernelSpecManager()
    here = Path(sys.executable).absolute()
    for name in (KERNEL_FOR_THIS_VENV, "python3"):
        try:
            command = manager.get_kernel_spec(name).argv[0]
        except NoSuchKernel:
            continue
        if command in {"python", f"python{sys.version_info[0]}", "python%d.%d" % sys.version_info[:2]} \
                or Path(command).absolute() == here:
            return name
    raise RunSetupError(
        f"no Jupyter kernel runs this interpreter ({here}): register one with "
        f"`{here} -m ipykernel install --sys-prefix --name {KERNEL_FOR_THIS_VENV}` or pass --kernel NAME"
    )


# --- run record -------------------------------------------------------------------------------


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def new_run_id() -> str:
    return f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def _git_state(root: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _package_versions() -> dict[str, str | None]:
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


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def write_record(run_dir: Path, record: dict) -> None:
    _write_atomic(run_dir / RUN_JSON, json.dumps(record, indent=2, default=str) + "\n")


def read_record(run_dir: Path) -> dict:
    path = run_dir / RUN_JSON
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise RunSetupError(f"no run to resume: {path} does not exist (see --runs-dir)") from exc
    except (OSError, ValueError) as exc:
        raise RunSetupError(f"cannot read {path}: {exc}") from exc


def _stage_record(stage: Stage) -> dict:
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


# --- executing one stage ----------------------------------------------------------------------


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


def _describe_exception(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


class UnixSocketKernelManager(AsyncKernelManager):
    """Stage kernels talk over Unix sockets, not over loopback TCP in plain text that any local
    user could read (ipykernel warned about it at the top of every stage's output).

    Left alone, jupyter_client names the sockets ``kernel-ipc-1`` ... ``-5`` relative to the
    working directory (the notebooks folder): two runs at once then bind the same names and
    talk to each other's kernels, and a killed run leaves the files there. ``for_folder`` gives
    a manager whose connection file and sockets live in one private folder instead.
    """

    transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc", config=True)

    @classmethod
    def for_folder(cls, folder: Path) -> type[UnixSocketKernelManager]:
        class PrivateFolderKernelManager(cls):
            @default("connection_file")
            def _private_connection_file(self) -> str:
                return str(folder / "kernel.json")  # the sockets: <folder>/kernel-ipc-1 ... -5

        return PrivateFolderKernelManager


KERNEL_RUNTIME_PREFIX = "fraud-kernels-"  # <tempdir>/fraud-kernels-<runner pid>-<random>/
_UNIX_SOCKET_PATH_MAX = 107  # sun_path on Linux, less the terminating NUL
_STALE_SOCKET = re.compile(r"kernel(-[0-9a-f-]+)?-ipc-\d+")


def kernel_runtime_folders(pid: int | None = None) -> list[Path]:
    """The kernel runtime folders of the runner process ``pid`` (all runners when None)."""
    pattern = f"{KERNEL_RUNTIME_PREFIX}{pid if pid is not None else '*'}-*"
    return sorted(p for p in Path(tempfile.gettempdir()).glob(pattern) if p.is_dir())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_stale_kernel_files(*notebooks_dirs: Path) -> list[Path]:
    """Removes what killed runs left: kernel runtime folders whose runner process is gone, and
    (from runners before the private folders) ``kernel-ipc-N`` sockets in ``notebooks_dirs``
    that no kernel listens on. Returns what it removed."""
    removed = []
    for folder in kernel_runtime_folders():
        pid = folder.name[len(KERNEL_RUNTIME_PREFIX):].split("-", 1)[0]
        try:
            owned = folder.stat().st_uid == os.getuid()
        except OSError:
            continue
        if pid.isdigit() and owned and not _pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    for path in (p for d in notebooks_dirs if Path(d).is_dir() for p in Path(d).iterdir()):
        if _STALE_SOCKET.fullmatch(path.name) and _is_dead_socket(path):
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


def _is_dead_socket(path: Path) -> bool:
    """True for a Unix socket file nothing listens on (connecting is refused)."""
    try:
        if not stat.S_ISSOCK(path.lstat().st_mode):
            return False
    except OSError:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1)
    try:
        probe.connect(str(path))
    except OSError as exc:
        return exc.errno in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        probe.close()
    return False


@contextlib.contextmanager
def kernel_runtime_folder():
    """A private folder (0700, in the system temp dir) for one kernel's connection file and
    sockets, removed afterwards; short enough for Unix socket paths."""
    folder = Path(tempfile.mkdtemp(prefix=f"{KERNEL_RUNTIME_PREFIX}{os.getpid()}-"))
    try:
        longest = folder / "kernel-ipc-99"
        if len(os.fsencode(longest)) > _UNIX_SOCKET_PATH_MAX:
            raise RunSetupError(f"the kernel socket path {longest} is longer than Unix sockets allow "
                                f"({_UNIX_SOCKET_PATH_MAX} bytes): set TMPDIR to a shorter folder")
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


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
        error = _describe_exception(exc)
        nb = nbformat.read(partial if partial.exists() else stage.notebook, as_version=4)
        error += _mark_failure(nb, error)
        _write_atomic(partial, nbformat.writes(nb))
        if isinstance(exc, KeyboardInterrupt):
            interrupted = exc
    os.replace(partial, output)
    if interrupted:
        raise interrupted
    return error


def export_html(notebook: Path, target: Path) -> None:
    from nbconvert import HTMLExporter

    with warnings.catch_warnings():  # scrapbook's glue mimetypes have no HTML form; that is expected
        warnings.filterwarnings("ignore", message="Your element with mimetype")
        body, _ = HTMLExporter().from_filename(str(notebook))
    _write_atomic(target, body)


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


def _say(progress: bool, message: str) -> None:
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


def _execute_run(
    run_dir: Path,
    record: dict,
    stages: dict[str, Stage],
    kernel_name: str,
    timeout: int | None,
    progress: bool,
) -> RunResult:
    """Runs every stage of ``record`` that has not succeeded, in order, stopping at the first failure."""
    run_warnings: list[str] = []
    outputs: dict[str, Any] = {}
    for rec in record["stages"]:
        if rec["status"] == SUCCEEDED:
            outputs.update(rec["outputs"])
    to_run = [rec for rec in record["stages"] if rec["status"] != SUCCEEDED]
    triton_url = os.environ.get("TRITON_URL") or None
    for removed in remove_stale_kernel_files(*sorted({s.notebook.parent for s in stages.values()})):
        _say(progress, f"removed {removed}, left by a killed run")
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
                        _say(progress, f"{label}: created the MLflow store {settings.mlflow_tracking_uri()}")
                except Exception as exc:  # the stage reports it in its own words
                    run_warnings.append(f"the MLflow store {settings.mlflow_tracking_uri()} was not created "
                                        f"before the stages: {_describe_exception(exc)}")
            rec.update(status=RUNNING, start=_now(), end=None, duration_s=None, error=None, outputs={})
            started = time.monotonic()
            error = None
            if TRITON_URL_PARAMETER in stage.parameters and TRITON_URL_PARAMETER not in rec["requested"]:
                try:
                    if triton_url is None:
                        _say(progress, f"{label}: starting the embedded Triton server (log: {run_dir / 'triton.log'})")
                        triton_url = _start_embedded_triton(run_dir, services)
                    parameters[TRITON_URL_PARAMETER] = triton_url
                except Exception as exc:
                    error = (f"the embedded Triton server did not start (log: {run_dir / 'triton.log'}): "
                             f"{_describe_exception(exc)}")
            rec["parameters"] = {**parameters, **rec["requested"]}
            write_record(run_dir, record)
            if error is None:
                _say(progress, f"{label}: running {stage.notebook} -> {notebook}")
                try:
                    error = execute_stage(stage, notebook, rec["parameters"], kernel_name, timeout, progress)
                except KeyboardInterrupt:
                    rec.update(status=FAILED, error="interrupted (Ctrl-C)", end=_now())
                    record.update(status=FAILED, ended=_now())
                    write_record(run_dir, record)
                    raise
            if notebook.exists():
                try:
                    export_html(notebook, run_dir / rec["html"])
                except Exception as exc:
                    run_warnings.append(f"{rec['notebook']}: HTML copy not written: {_describe_exception(exc)}")
            if error is None:
                rec["outputs"], read_warnings = read_outputs(notebook)
                run_warnings.extend(read_warnings)
                outputs.update(rec["outputs"])
            rec.update(status=FAILED if error else SUCCEEDED, error=error, end=_now(),
                       duration_s=round(time.monotonic() - started, 1))
            _say(progress, f"{label}: {rec['status']} in {rec['duration_s']} s" + (f": {error}" if error else ""))
            if error:
                for later in to_run[position:]:
                    later["status"] = SKIPPED
                break
            write_record(run_dir, record)
    record.update(status=FAILED if any(r["status"] == FAILED for r in record["stages"]) else SUCCEEDED,
                  ended=_now())
    write_record(run_dir, record)
    try:
        logged_to = log_notebooks_to_mlflow(run_dir, record)
    except Exception as exc:
        run_warnings.append(f"the notebooks were not logged to MLflow ({settings.mlflow_tracking_uri()}): "
                            f"{_describe_exception(exc)}")
    else:
        if logged_to:
            _say(progress, f"notebooks, HTML copies and run.json logged to MLflow run {logged_to} "
                           f"under {MLFLOW_ARTIFACT_PATH}/")
    return RunResult(record["run_id"], run_dir, record["status"], record, run_warnings)


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
def _exclusive(run_dir: Path):
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
) -> RunResult:
    """Validates, then executes the selected stages of ``notebooks_dir`` into ``runs_dir/<run_id>/``.

    ``stages``: ``--stages`` text (``"1,2"`` or ``"preprocess,train"``), None for all.
    ``assignments``: ``-p`` values as typed (``{"num_epochs": "3"}``). ``parameter_file``: ``-f``.
    Raises ``RunSetupError``/``ParameterError`` before anything runs; a failing stage gives a
    result with status ``failed`` (its notebook, HTML copy and run.json are written).
    """
    all_stages = discover_stages(Path(notebooks_dir))
    selected = select_stages(all_stages, stages)
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
        "started": _now(),
        "ended": None,
        "resumed": [],
        "kernel": kernel_name,
        "timeout_s": timeout,
        "cwd": str(Path.cwd()),  # relative path parameters were taken from here
        "git": _git_state(settings.project_root()),
        "versions": _package_versions(),
        "stages": [],
    }
    for stage in selected:
        rec = _stage_record(stage)
        rec["requested"] = requested[stage.name]
        record["stages"].append(rec)
    with _exclusive(run_dir):
        write_record(run_dir, record)
        _say(progress, f"run {run_id}: {len(selected)} stage(s) into {run_dir}")
        return _execute_run(run_dir, record, {s.name: s for s in selected}, kernel_name, timeout, progress)


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
) -> RunResult:
    """Continues run ``run_id`` from its first stage that did not succeed.

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
    with _exclusive(run_dir):
        record = read_record(run_dir)
        remaining = [rec for rec in record["stages"] if rec["status"] != SUCCEEDED]
        if not remaining:
            raise RunSetupError(f"run {run_id} has already succeeded: nothing to resume")
        all_stages = [read_stage(Path(rec["source"])) for rec in record["stages"]]
        stages = {s.name: s for s in all_stages if s.name in {rec["name"] for rec in remaining}}
        file_values = read_parameter_file(parameter_file) if parameter_file else {}
        overrides = resolve_parameters(all_stages, list(stages.values()), assignments or {},
                                       file_values, f"-f {parameter_file}")
        kernel_name = choose_kernel(kernel or record["kernel"])
        timeout = timeout if timeout is not None else record["timeout_s"]
        for rec in remaining:
            if rec["status"] in (FAILED, RUNNING):  # RUNNING: a runner that was killed mid-stage
                _keep_failed_attempt(run_dir, rec)
            rec.update(status=PENDING, start=None, end=None, duration_s=None, error=None, outputs={})
            rec["requested"] = {**rec["requested"], **overrides[rec["name"]]}
        record.update(status=RUNNING, ended=None, kernel=kernel_name, timeout_s=timeout)
        record["resumed"].append(_now())
        write_record(run_dir, record)
        _say(progress, f"run {run_id}: resuming at stage {remaining[0]['notebook']} in {run_dir}")
        return _execute_run(run_dir, record, stages, kernel_name, timeout, progress)


# --- after the run ----------------------------------------------------------------------------


def log_notebooks_to_mlflow(run_dir: Path, record: dict) -> str | None:
    """Logs the run's notebooks, HTML copies and run.json to the MLflow run a stage glued.

    Returns that MLflow run's id, or None when no stage glued ``mlflow_run_id``; the last
    stage that glued one wins. MLflow errors propagate (the caller reports them as a warning).
    """
    run_ids = [rec["outputs"][MLFLOW_RUN_ID_OUTPUT] for rec in record["stages"]
               if rec["outputs"].get(MLFLOW_RUN_ID_OUTPUT)]
    if not run_ids:
        return None
    from fraudlib.tracking import configure

    client = configure()
    files = sorted([*run_dir.glob(STAGE_PATTERN), *run_dir.glob("[0-9][0-9]_*.html")]) + [run_dir / RUN_JSON]
    for path in files:
        client.log_artifact(run_ids[-1], str(path), MLFLOW_ARTIFACT_PATH)
    return run_ids[-1]


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
