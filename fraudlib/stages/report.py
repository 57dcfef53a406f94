"""What a stage notebook calls around its one stage call: the summary at the top of the report,
whole tables, plots, the glue of the outputs, and no library noise (warnings, log lines,
progress bars) in the audit report."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from IPython.display import HTML, DisplayHandle, Image, Markdown, display

from fraudlib.stages.base import glue_values

_NOISY_LOGGERS = ("mlflow", "alembic", "urllib3", "py.warnings", "matplotlib", "numexpr")


def quiet() -> None:
    """Keeps library warnings, log lines and progress bars out of the report (fraudlib's own
    warnings still show)."""
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module="fraudlib")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    os.environ["TQDM_DISABLE"] = "1"
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def start() -> DisplayHandle:
    """The report's first output: a placeholder the stage's summary replaces when it has run."""
    quiet()
    return display(Markdown("*The stage's summary appears here once it has run.*"), display_id=True)


def parameters(params) -> None:
    """The values the stage runs with, as a folded table (the code, and so the parameters cell,
    is hidden in the HTML report)."""
    import dataclasses
    import html

    rows = "".join(f"<tr><td><code>{f.name}</code></td><td><code>{html.escape(repr(getattr(params, f.name)))}</code></td>"
                   f"<td>{html.escape(f.metadata.get('help', ''))}</td></tr>" for f in dataclasses.fields(params))
    display(HTML(f"<details><summary>Parameters of this run ({type(params).__module__}.Params)</summary>"
                 f"<table><tr><th>name</th><th>value</th><th>meaning</th></tr>{rows}</table></details>"))


def finish(handle: DisplayHandle, outputs) -> None:
    """Writes the stage's summary into the report's first output (and where it ran, for a
    notebook opened in JupyterLab)."""
    handle.update(Markdown(outputs.summary))


def glue(outputs) -> None:
    """Glues the stage's outputs (its Outputs fields) for the runner and the next stage."""
    import scrapbook as sb

    for name, value in glue_values(outputs).items():
        sb.glue(name, value)


def notes(lines) -> None:
    """Shows the stage's notes (how the models were compared, what was repaired) as prose."""
    text = "\n".join(f"- {line}" for line in lines if line)
    if text:
        display(Markdown(text))


def frame(rows: list[dict]):
    """Rows (dicts) as a table for :func:`table`."""
    import pandas as pd

    return pd.DataFrame(rows)


def table(frame, formats: dict | None = None) -> None:
    """Shows ``frame`` whole (no row, column or width truncation)."""
    import pandas as pd

    for option in ("display.max_rows", "display.max_columns", "display.width", "display.max_colwidth"):
        pd.set_option(option, None)
    display(frame.style.format(formats) if formats else frame)


def image(path: Path | str | None) -> None:
    """Shows a plot the stage saved (nothing when it made none)."""
    if path:
        display(Image(filename=str(path)))
