"""Parameters of a run: ``-p``/``-f`` values read, converted to each stage's declared types,
checked against its parameters dataclass, and path values made absolute, before anything runs."""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Mapping

import yaml

from fraudlib.runner.errors import ParameterError
from fraudlib.runner.notebooks import Parameter, Stage
from fraudlib.stages.base import StageParameterError, check_value

_CHECKED_TYPES = ("int", "float", "bool", "str", "list", "dict")
_TRUE_WORDS, _FALSE_WORDS = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


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
        except ValueError:
            shown = raw if raw is not None else value
            errors.append(
                f"{source}: stage {stage.label} ({stage.notebook}) declares {name!r} as "
                f"{parameter.type_name}; {shown!r} is not a valid {parameter.type_name}"
            )
            return
        if stage.params_class is not None:
            try:
                value = check_value(stage.params_class, name, value)
            except StageParameterError as exc:
                errors.append(f"{source}: {exc}")
                return
        resolved[stage.name][name] = absolute_path_value(value, base) if is_path_parameter(name) else value

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

