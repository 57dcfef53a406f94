"""Stage notebooks: discovering ``NN_name.ipynb``, reading their parameters cells, and the
typed parameters dataclass a stage notebook names in ``metadata.fraudlib.stage``."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import nbformat
import papermill as pm

from fraudlib.runner.errors import RunSetupError

STAGE_PATTERN = "[0-9][0-9]_*.ipynb"


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
    params_class: type | None = None  # the stage's typed parameters (metadata.fraudlib.stage), if it names one

    @property
    def label(self) -> str:
        return f"{self.number:02d}_{self.name}"


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
    params_class = _params_class(notebook, parameters)
    return Stage(int(match.group(1)), match.group(2), notebook.resolve(), parameters, params_class)


def _params_class(notebook: Path, parameters: Mapping[str, Parameter]) -> type | None:
    """The ``Params`` dataclass of the stage module the notebook names in ``metadata.fraudlib.stage``
    (None when it names none), checked to declare exactly the parameters cell's names, types
    and defaults: the cell is what papermill and ``--help-notebook`` read, the dataclass what
    the stage runs with, and the two must not drift apart."""
    module_name = nbformat.read(notebook, as_version=4).metadata.get("fraudlib", {}).get("stage")
    if not module_name:
        return None
    try:
        cls = importlib.import_module(module_name).Params
    except (ImportError, AttributeError) as exc:
        raise RunSetupError(f"{notebook}: metadata.fraudlib.stage names {module_name!r}, which has no Params "
                            f"dataclass: {exc}") from exc
    from fraudlib.stages.base import field_types

    fields = {f.name: f for f in dataclasses.fields(cls)}
    types = field_types(cls)
    problems = [f"{name} is a field of {module_name}.Params but not in the parameters cell"
                for name in fields if name not in parameters]
    for name, p in parameters.items():
        if name not in fields:
            problems.append(f"{name} is in the parameters cell but not a field of {module_name}.Params")
            continue
        try:
            default = ast.literal_eval(p.default)
        except (ValueError, SyntaxError):
            default = p.default
        if p.type_name != types[name].__name__ or default != fields[name].default:
            problems.append(f"{name}: the cell says {p.type_name} = {p.default}, {module_name}.Params says "
                            f"{types[name].__name__} = {fields[name].default!r}")
    if problems:
        raise RunSetupError(f"{notebook}: the parameters cell and {module_name}.Params disagree:\n    "
                            + "\n    ".join(problems))
    return cls


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


def select_stages(stages: list[Stage], selection: str | None, option: str = "--stages") -> list[Stage]:
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
            raise RunSetupError(f"{option}: no stage {item!r}; available: {available}")
        wanted.add(matches[0].label)
    return [s for s in stages if s.label in wanted]


def stage_through(stages: list[Stage], through: str | None) -> str | None:
    """The name of the one stage a ``--through`` value names (a number or name among ``stages``)."""
    if not through:
        return None
    named = select_stages(stages, through, "--through")
    if len(named) != 1:
        raise RunSetupError(f"--through names one stage, e.g. --through train; got {through!r}")
    return named[0].name


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


