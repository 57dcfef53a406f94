"""What a reviewer opens: each executed notebook as an HTML report that reads first (code
hidden, with a link to the notebook that keeps it; no stderr noise), the run's ``index.html``
linking the reports, the MLflow run and the serving Triton version, and the same files logged
to MLflow."""

from __future__ import annotations

import html
import warnings
from pathlib import Path
from urllib.parse import quote

import nbformat

from fraudlib import settings
from fraudlib.runner.notebooks import STAGE_PATTERN
from fraudlib.runner.records import RUN_JSON, write_atomic

INDEX = "index.html"
MLFLOW_RUN_ID_OUTPUT = "mlflow_run_id"
MLFLOW_ARTIFACT_PATH = "notebooks"
SERVING_VERSION_OUTPUT = "champion_version"  # the Triton version that serves after a stage
_WIDGET = "application/vnd.jupyter.widget-view+json"


def report_notebook(nb: nbformat.NotebookNode, notebook_name: str) -> nbformat.NotebookNode:
    """``nb`` as a reader sees it: stderr streams (library warnings, log lines, progress bars)
    and widget outputs dropped, and a line after the first cell saying where the code is."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs
                            if not (o.output_type == "stream" and o.name == "stderr")
                            and not (o.output_type == "display_data" and _WIDGET in o.get("data", {}))]
    where = nbformat.v4.new_markdown_cell(
        f"<small>This report hides the code: the executed notebook "
        f'<a href="{quote(notebook_name)}">{html.escape(notebook_name)}</a> keeps it (open it in JupyterLab '
        f'with the "Python (fraudlib)" kernel). <a href="{INDEX}">All reports of this run</a>.</small>')
    nb.cells.insert(1 if nb.cells else 0, where)
    return nb


def export_html(notebook: Path, target: Path) -> None:
    """The HTML report of an executed notebook (see :func:`report_notebook`), code hidden."""
    from nbconvert import HTMLExporter

    nb = report_notebook(nbformat.read(notebook, as_version=4), notebook.name)
    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    with warnings.catch_warnings():  # scrapbook's glue mimetypes have no HTML form; that is expected
        warnings.filterwarnings("ignore", message="Your element with mimetype")
        body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": notebook.stem}})
    write_atomic(target, body)


def mlflow_run_link(run_id: str, experiment_id: str | None) -> tuple[str | None, str]:
    """(URL of the MLflow run's page, how to open it). A server's URL links directly; for the
    embedded store the page is served by ``mlflow ui`` on it."""
    uri = settings.mlflow_tracking_uri()
    page = f"#/experiments/{experiment_id}/runs/{run_id}" if experiment_id else ""
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}", f"MLflow server {uri}"
    return (f"http://127.0.0.1:5000/{page}",
            f"start the UI first: <code>mlflow ui --backend-store-uri {html.escape(uri)}</code>")


def write_index(run_dir: Path, record: dict, mlflow_experiment_id: str | None = None) -> Path:
    """``<run_dir>/index.html``: the run's status, its stage reports and notebooks, the MLflow
    run and the Triton version serving afterwards."""
    rows = []
    for rec in record["stages"]:
        links = [f'<a href="{quote(rec[key])}">{label}</a>' for key, label in (("html", "report"), ("notebook", "notebook"))
                 if (run_dir / rec[key]).exists()]
        links += [f'<a href="{quote(a["html"])}">failed attempt</a>' for a in rec.get("previous_attempts", [])
                  if a.get("html")]
        outputs = ", ".join(f"{k}={v}" for k, v in rec["outputs"].items() if not isinstance(v, (dict, list)))
        rows.append(f"<tr><td>{rec['number']:02d} {html.escape(rec['name'])}</td><td>{rec['status']}</td>"
                    f"<td>{rec['duration_s'] if rec['duration_s'] is not None else '-'} s</td>"
                    f"<td>{' · '.join(links) or '-'}</td>"
                    f"<td>{html.escape(rec['error'] or outputs)}</td></tr>")
    facts = [f"status: <b>{record['status']}</b>", f"git commit: <code>{record['git'].get('commit')}</code>"
             + (" (uncommitted changes)" if record["git"].get("dirty") else "")]
    runs = [rec["outputs"][MLFLOW_RUN_ID_OUTPUT] for rec in record["stages"] if rec["outputs"].get(MLFLOW_RUN_ID_OUTPUT)]
    if runs:
        url, how = mlflow_run_link(runs[-1], mlflow_experiment_id)
        facts.append(f'MLflow run: <a href="{url}">{runs[-1]}</a> ({how})')
    served = [rec["outputs"][SERVING_VERSION_OUTPUT] for rec in record["stages"]
              if rec["outputs"].get(SERVING_VERSION_OUTPUT) is not None]
    if served:
        facts.append(f"Triton version serving after the run: <b>{served[-1]}</b> "
                     f"(model {settings.TRITON_MODEL_NAME}, repository {html.escape(str(settings.triton_model_repository()))})")
    body = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>run {html.escape(record['run_id'])}</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:.3em .8em;border-bottom:1px solid #ddd;text-align:left}}</style>
</head><body>
<h1>Run {html.escape(record['run_id'])}</h1>
<ul>{''.join(f'<li>{f}</li>' for f in facts)}</ul>
<table><tr><th>stage</th><th>status</th><th>duration</th><th>open</th><th>outputs / error</th></tr>
{''.join(rows)}
</table>
<p><a href="{RUN_JSON}">run.json</a>: parameters, outputs, timings and package versions of every stage.</p>
</body></html>
"""
    write_atomic(run_dir / INDEX, body)
    return run_dir / INDEX


def log_notebooks_to_mlflow(run_dir: Path, record: dict) -> tuple[str, str] | None:
    """Logs the run's notebooks, HTML reports, index.html and run.json to the MLflow run a stage
    glued as ``mlflow_run_id``.

    Returns (that run's id, its experiment id), or None when no stage glued one; the last
    stage that glued one wins. MLflow errors propagate (the caller reports them as a warning).
    """
    run_ids = [rec["outputs"][MLFLOW_RUN_ID_OUTPUT] for rec in record["stages"]
               if rec["outputs"].get(MLFLOW_RUN_ID_OUTPUT)]
    if not run_ids:
        return None
    from fraudlib.tracking import configure

    client = configure()
    experiment_id = client.get_run(run_ids[-1]).info.experiment_id
    write_index(run_dir, record, experiment_id)
    files = sorted([*run_dir.glob(STAGE_PATTERN), *run_dir.glob("[0-9][0-9]_*.html")])
    for path in [*files, run_dir / INDEX, run_dir / RUN_JSON]:
        client.log_artifact(run_ids[-1], str(path), MLFLOW_ARTIFACT_PATH)
    return run_ids[-1], experiment_id
