"""notebooks/01_preprocess.ipynb executed by papermill in a real kernel."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nbformat
import papermill as pm
import scrapbook as sb

from fraudlib import graph_store, synthetic
from fraudlib.runner import choose_kernel

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "01_preprocess.ipynb"


def test_notebook_builds_the_graph_from_synthetic_data_and_glues_its_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("FRAUD_RUNS_DIR", str(tmp_path / "runs"))  # the kernel inherits it
    run_dir = tmp_path / "runs" / "run-1"
    run_dir.mkdir(parents=True)
    executed = run_dir / "01_preprocess.ipynb"

    pm.execute_notebook(str(NOTEBOOK), str(executed), kernel_name=choose_kernel(),
                        parameters={"synthetic_rows": 20_000, "run_dir": str(run_dir)}, progress_bar=False)

    glued = sb.read_notebook(str(executed)).scraps.data_dict
    graph_dir = Path(glued["graph_dir"])
    assert graph_dir == run_dir / "graph"
    assert glued["manifest_hash"] == hashlib.sha256((graph_dir / "manifest.json").read_bytes()).hexdigest()
    assert glued["transactions"] == 20_000
    assert glued["feature_dims"] == graph_store.read_manifest(graph_dir)["dims"]
    assert glued["edges"]["test"] == graph_store.read_part(graph_dir, "test").num_edges > 0
    assert (tmp_path / "runs" / "data" / f"synthetic-v{synthetic.VERSION}-20000-seed0.csv").is_file()
    # The notebook opens with the stage's summary: run, data hash, outcome, and the input named
    # as the embedded default data (no raw_path was given).
    summary = nbformat.read(executed, as_version=4).cells[0].outputs[0]["data"]["text/markdown"]
    assert "`run-1`" in summary and glued["manifest_hash"][:16] in summary and "succeeded" in summary
    assert "embedded default data" in summary
