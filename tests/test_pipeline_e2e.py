"""The whole pipeline, end to end, on real components: papermill kernels, the embedded
Triton server, a real MLflow store; then the `fraud` commands a user runs between runs."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_reports import browser, check_report, open_page  # noqa: F401  (browser is a fixture)

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SMALL = ["-p", "synthetic_rows=200000", "-p", "num_epochs=2", "-p", "bootstrap_samples=50"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def run(args, runs_dir, **kw):
    env = {**os.environ, "FRAUD_RUNS_DIR": str(runs_dir), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("TRITON_URL", None)
    env.pop("TRITON_MODEL_REPO", None)
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, **kw)


def pipeline(runs_dir, *extra):
    done = run([sys.executable, "run_pipeline.py", *SMALL, *extra], runs_dir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dirs = sorted((p for p in runs_dir.iterdir() if (p / "run.json").exists()),
                      key=lambda p: p.stat().st_mtime)
    return json.loads((run_dirs[-1] / "run.json").read_text()), run_dirs[-1]


def registry_state(runs_dir):
    code = ("import json; from fraudlib import registry; c = registry.champion(); "
            "print(json.dumps({'champion': c and c.version, 'triton': c and c.triton_version, "
            "'versions': [[v.version, list(v.aliases)] for v in registry.versions()]}))")
    done = run([sys.executable, "-c", code], runs_dir)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_first_run_promotes_and_leaves_an_audit_trail(runs_dir):
    record, run_dir = pipeline(runs_dir, "-p", "num_boost_round=32")
    assert record["status"] == "succeeded"
    assert all(s["status"] == "succeeded" for s in record["stages"])
    assert [s["name"] for s in record["stages"]][:4] == ["preprocess", "train", "evaluate", "deploy"]
    for stage in ("01_preprocess", "02_train", "03_evaluate", "04_deploy"):
        assert (run_dir / f"{stage}.ipynb").is_file() and (run_dir / f"{stage}.html").is_file()
    outputs = {s["name"]: s["outputs"] for s in record["stages"]}
    assert outputs["evaluate"]["decision"] == "promote"
    assert outputs["deploy"]["champion_version"] == 1
    state = registry_state(runs_dir)
    assert state["triton"] == 1 and ["champion"] == state["versions"][0][1]


def test_every_report_of_the_run_reads_first_in_a_browser_and_the_index_links_them(runs_dir, browser):
    run_dir = next(p for p in sorted(runs_dir.iterdir()) if (p / "04_deploy.html").is_file())
    record = json.loads((run_dir / "run.json").read_text())
    outputs = {s["name"]: s["outputs"] for s in record["stages"]}
    images = {"01_preprocess": 2, "02_train": 4, "03_evaluate": 2, "04_deploy": 1}
    for stage, least in images.items():
        rows = ("run", "git commit", "data manifest", "outcome") + (("decision", "reason") if stage == "03_evaluate" else ())
        facts = check_report(open_page(browser, run_dir / f"{stage}.html"), rows, min_images=least)
        assert run_dir.name in facts["text"] and outputs["preprocess"]["manifest_hash"][:16] in facts["text"]
    evaluate = open_page(browser, run_dir / "03_evaluate.html").inner_text("body")
    assert "PROMOTE" in evaluate and outputs["evaluate"]["promotion_reason"][:40] in evaluate
    index = open_page(browser, run_dir / "index.html")
    hrefs = index.evaluate("Array.from(document.links).map(a => a.getAttribute('href'))")
    for stage in images:
        assert f"{stage}.html" in hrefs and f"{stage}.ipynb" in hrefs and (run_dir / f"{stage}.html").is_file()
    mlflow_run = outputs["train"]["mlflow_run_id"]
    assert any(mlflow_run in h for h in hrefs), hrefs
    assert "Triton version serving after the run: 1" in index.inner_text("body")


def test_status_reports_a_consistent_serving_state(runs_dir):
    done = run([str(BIN / "fraud"), "status"], runs_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "champion: 1" in done.stdout and "INCONSISTENT" not in done.stdout


def test_score_prints_probabilities_for_raw_rows_in_graph_context(runs_dir, tmp_path):
    raw = next((runs_dir / "data").glob("synthetic-*.csv"))
    with open(raw, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = [r for r in reader if r[2] in ("2019", "2020")][:5]
    new = tmp_path / "new.csv"
    with open(new, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    done = run([str(BIN / "fraud"), "score", str(new), "--out", str(tmp_path / "scores.csv")], runs_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    with open(tmp_path / "scores.csv") as f:
        scored = list(csv.DictReader(f))
    assert len(scored) == 5
    probabilities = [float(r["fraud_probability"]) for r in scored if r["fraud_probability"]]
    assert probabilities and all(0.0 <= p <= 1.0 for p in probabilities)

    # In a sample of their receptive field: a smaller context, probabilities all the same.
    sampled = run([str(BIN / "fraud"), "score", str(new), "--fanout", "3"], runs_dir)
    assert sampled.returncode == 0, sampled.stdout + sampled.stderr
    assert "at most 3 edges a node and hop" in sampled.stdout
    context = [int(re.search(r"graph context: ([\d,]+) edges", d.stdout).group(1).replace(",", ""))
               for d in (done, sampled)]
    assert 5 <= context[1] < context[0]


def test_scoring_the_test_periods_rows_gives_the_batch_probabilities(runs_dir, tmp_path):
    """`fraud score` computes the rows' causal features from the champion's saved history with
    preprocessing's code, and places them in their graph: the same probabilities as the batch
    evaluation of the test graph."""
    import numpy as np
    import pandas as pd

    from fraudlib.graph_store import read_part
    from fraudlib.model_export import load_model
    from fraudlib.preprocess import read_test_rows
    from fraudlib.tabformer import read_transactions

    graph_dir = next(p / "graph" for p in runs_dir.iterdir() if (p / "graph" / "history.parquet").is_file())
    raw = next((runs_dir / "data").glob("synthetic-*.csv"))
    test_rows = read_test_rows(graph_dir)
    # Each kept row's line in the file, matched on every column (two transactions may share the
    # card, merchant, minute and amount and differ in chip or errors).
    frame = read_transactions(raw)
    key = [c for c in frame.columns if c in test_rows.columns]
    as_text = lambda f: f[key].astype(str)  # noqa: E731  (categoricals and NaN compare as text)
    position = as_text(test_rows).merge(as_text(frame).reset_index().drop_duplicates(key), on=key,
                                        how="left")["index"]
    assert position.notna().all()
    lines = raw.read_text().splitlines()
    new = tmp_path / "test_period.csv"
    new.write_text("\n".join([lines[0], *(lines[i + 1] for i in position)]) + "\n")

    done = run([str(BIN / "fraud"), "score", str(new), "--out", str(tmp_path / "scores.csv")], runs_dir)
    assert done.returncode == 0, done.stdout + done.stderr

    scored = pd.read_csv(tmp_path / "scores.csv")["fraud_probability"].to_numpy()
    version = runs_dir / "triton_repository" / "prediction_and_shapley" / "1"
    batch = np.asarray(load_model(version).predict(read_part(graph_dir, "test"))).reshape(-1)
    assert len(scored) == len(batch) > 100
    np.testing.assert_allclose(scored, batch, rtol=1e-4, atol=1e-5)


def test_second_run_compares_with_the_champion_and_one_version_serves(runs_dir):
    # Same data (same preprocessing seed), a different model: fewer boosting rounds.
    record, _ = pipeline(runs_dir, "-p", "num_boost_round=8")
    outputs = {s["name"]: s["outputs"] for s in record["stages"]}
    assert outputs["evaluate"]["champion_version"] == 1
    assert outputs["evaluate"]["challenger_version"] == 2
    expected = 2 if outputs["evaluate"]["decision"] == "promote" else 1
    assert outputs["deploy"]["champion_version"] == expected
    served = sorted(p.name for p in (runs_dir / "triton_repository" / "prediction_and_shapley").iterdir()
                    if p.name.isdigit())
    assert served == [str(expected)]
    assert registry_state(runs_dir)["triton"] == expected
