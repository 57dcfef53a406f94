"""What every stage shares: documented, validated parameter fields, outputs that glue, and the
summary a stage writes at the top of its report."""

from __future__ import annotations

import dataclasses
import subprocess
import typing
from pathlib import Path
from typing import Any, Callable

from fraudlib import settings

_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


class StageParameterError(ValueError):
    """A stage parameter has a wrong type or value; the message names the stage, field and rule."""


def param(default: Any, help: str, check: Callable[[Any], bool] | None = None, rule: str = "",
          choices: tuple | None = None) -> Any:
    """A documented parameter field: ``help`` is its ``# help`` text in the notebook;
    ``check(value)`` (described by ``rule``) or ``choices`` restrict its values."""
    if choices is not None:
        check, rule = (lambda v: v in choices), f"one of {', '.join(map(repr, choices))}"
    return dataclasses.field(default=default, metadata={"help": help, "check": check, "rule": rule})


def field_types(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def check_value(cls, name: str, value: Any) -> Any:
    """``value`` checked against field ``name`` of the Params class ``cls`` (type, then rule);
    an int is accepted for a float field (and returned as a float)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise StageParameterError(f"stage {_stage(cls)} has no parameter {name!r}; "
                                  f"its parameters: {', '.join(fields)}")
    kind = field_types(cls)[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise StageParameterError(f"stage {_stage(cls)}: parameter {name} = {value!r} must be a {kind.__name__}")
    meta = fields[name].metadata
    if meta.get("check") is not None and not meta["check"](value):
        raise StageParameterError(f"stage {_stage(cls)}: parameter {name} = {value!r} must be {meta['rule']}")
    return value


class StageParams:
    """Mixin of the frozen Params dataclasses: every field is checked when one is built."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, check_value(type(self), f.name, getattr(self, f.name)))

    @classmethod
    def from_namespace(cls, namespace: dict[str, Any]):
        """The parameters a notebook's parameters cell set (its globals), as this dataclass."""
        return cls(**{f.name: namespace[f.name] for f in dataclasses.fields(cls) if f.name in namespace})


def parameters_cell(cls) -> str:
    """The notebook's parameters cell for ``cls``: ``name: type = default  # help`` per field,
    the form papermill's ``--help-notebook`` and the runner read."""
    lines = []
    for f in dataclasses.fields(cls):
        kind = field_types(cls)[f.name].__name__
        default = f'"{f.default}"' if isinstance(f.default, str) else repr(f.default)
        lines.append(f"{f.name}: {kind} = {default}  # {f.metadata['help']}")
    return "\n".join(lines)


def glue_values(outputs) -> dict[str, Any]:
    """An Outputs dataclass as the JSON values its notebook glues (paths as text, no None)."""
    values = {}
    for f in dataclasses.fields(outputs):
        if f.metadata.get("glue") is False:
            continue
        value = getattr(outputs, f.name)
        if value is None:
            continue
        values[f.name] = str(value) if isinstance(value, Path) else value
    return values


def run_folder(run_dir: str) -> Path:
    """The stage's run folder: ``run_dir``, or ``runs/scratch`` for a notebook opened alone."""
    return settings.run_folder(run_dir)


def git_state(root: Path | None = None) -> dict[str, Any]:
    """The project's git commit and whether the work tree differs from it (None outside git)."""
    root = root or settings.project_root()

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def summary(stage: str, run_dir: Path, manifest_hash: str | None, outcome: str,
            details: list[tuple[str, str]] = ()) -> str:
    """The markdown a stage writes at the top of its report: what ran, on what, with what result."""
    git = git_state()
    commit = (git["commit"] or "unknown")[:12] + (" (with uncommitted changes)" if git["dirty"] else "")
    run_id = run_dir.name + (" (a notebook run alone)" if run_dir.name == "scratch" else "")
    rows = [("run", f"`{run_id}`"), ("git commit", f"`{commit}`"),
            ("data manifest", f"`{manifest_hash[:16]}`" if manifest_hash else "none"),
            ("outcome", outcome), *details]
    table = "\n".join(f"| {key} | {str(value).replace('|', chr(92) + '|')} |" for key, value in rows)
    return f"### {stage}: summary\n\n| | |\n|---|---|\n{table}\n"


def _stage(cls) -> str:
    return cls.__module__.rsplit(".", 1)[-1]
