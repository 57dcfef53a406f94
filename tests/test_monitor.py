"""Monitoring: PSI, drift per input column, the month-by-month history, the notebook's skip
path, and (slow) a month monitored against a real champion served by Triton (the lifecycle over
six months runs in tests/test_lifecycle_over_time.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import papermill as pm
import pytest
import scrapbook as sb

from fraudlib import monitor

ROOT = Path(__file__).resolve().parent.parent


def test_psi_is_zero_for_the_same_distribution_and_grows_with_the_shift():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=20_000)
    assert monitor.psi(reference, rng.normal(size=20_000)) < 0.01
    small, large = monitor.psi(reference, rng.normal(0.1, size=20_000)), monitor.psi(reference, rng.normal(1.0, size=20_000))
    assert 0.005 < small < 0.1 < 0.2 < large


def test_psi_of_categories_matches_the_formula_and_counts_new_categories():
    reference = np.array([0] * 50 + [1] * 50)
    current = np.array([0] * 80 + [1] * 20)
    expected = (0.8 - 0.5) * np.log(0.8 / 0.5) + (0.2 - 0.5) * np.log(0.2 / 0.5)
    assert monitor.psi(reference, current, categorical=True) == pytest.approx(expected)
    unseen = monitor.psi(reference, np.array([2] * 100), categorical=True)
    assert unseen > 1  # a category the reference never had is a large shift, not an error


def test_each_coded_input_column_is_compared_as_one_feature():
    encoders = {"edge": [{"name": "City", "kind": "binary", "width": 2},
                         {"name": "Chip", "kind": "onehot", "categories": ["a", "b"]},
                         {"name": "Amount", "kind": "robust"}]}
    rng = np.random.default_rng(1)

    def rows(city_p, amount_mean, n=5000):
        city = rng.choice(3, size=n, p=city_p) + 1
        bits = np.stack([(city >> 1) & 1, city & 1], axis=1)
        chip = np.eye(2)[rng.integers(0, 2, n)]
        return np.hstack([bits, chip, rng.normal(amount_mean, 1, n)[:, None]]).astype(np.float32)

    same = monitor.feature_drift(rows([0.5, 0.3, 0.2], 0), rows([0.5, 0.3, 0.2], 0), encoders)
    assert set(same["feature"]) == {"City", "Chip", "Amount"} and (same["psi"] < 0.02).all()
    shifted = monitor.feature_drift(rows([0.5, 0.3, 0.2], 0), rows([0.1, 0.1, 0.8], 2), encoders)
    assert list(shifted["feature"][:2]) == ["Amount", "City"] and shifted.set_index("feature")["psi"]["Chip"] < 0.02
    assert (shifted["psi"][:2] > 0.2).all()


def test_the_history_keeps_one_entry_per_month_and_marks_promotions(tmp_path):
    for month, version, auprc in (("2019-03", 1, 0.6), ("2019-04", 1, 0.5), ("2019-05", 2, 0.7), ("2019-04", 1, 0.55)):
        monitor.record(monitor.MonitorResult(month=month, status="ok", alert="", champion_version=version,
                                             auprc=auprc, reference_auprc=0.6), tmp_path)
    history = monitor.read_history(tmp_path)
    assert list(history["month"]) == ["2019-03", "2019-04", "2019-05"]
    assert list(history["auprc"]) == [0.6, 0.55, 0.7]  # the month monitored again replaced its entry
    assert list(history["promoted"]) == [False, False, True]
    assert json.loads((tmp_path / monitor.HISTORY).read_text())[0]["month"] == "2019-03"
    fig = monitor.history_plot(history)
    assert fig.axes[0].get_ylabel() == "AUPRC"


def test_the_notebook_without_a_store_says_so_at_the_top_and_glues_no_alert(tmp_path, monkeypatch):
    monkeypatch.setenv("FRAUD_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    out = tmp_path / "05_monitor.ipynb"
    pm.execute_notebook(str(ROOT / "notebooks" / "05_monitor.ipynb"), str(out), cwd=str(ROOT / "notebooks"),
                        parameters={"store_dir": str(tmp_path / "no-store"), "run_dir": str(tmp_path)},
                        kernel_name="python3", progress_bar=False)
    glued = sb.read_notebook(str(out)).scraps.data_dict
    assert glued["status"] == "skipped" and glued["alert"] == ""
    top = "".join(o.get("data", {}).get("text/markdown", "") for o in
                  __import__("nbformat").read(out, as_version=4).cells[0].outputs)
    assert "Skipped" in top and "no transactions in the store" in top


@pytest.mark.slow
def test_the_score_psi_is_against_the_champions_training_window_scored_through_the_champion(tmp_path, monkeypatch):
    from fraudlib import graph_store, registry, scoring, store, synthetic
    from fraudlib.triton_server import connect_or_start

    raw = tmp_path / "raw.csv"
    synthetic.generate(raw, 200_000, seed=0)
    env = {**os.environ, "FRAUD_RUNS_DIR": str(tmp_path / "runs"), "MLFLOW_DISABLE_TELEMETRY": "true"}
    for name in ("MLFLOW_TRACKING_URI", "TRITON_URL", "TRITON_MODEL_REPO"):
        env.pop(name, None)
        monkeypatch.delenv(name, raising=False)
    done = subprocess.run([sys.executable, "run_pipeline.py", "-p", f"raw_path={raw}", "-p", "num_epochs=2",
                           "-p", "bootstrap_samples=50", "--no-progress"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    monkeypatch.setenv("FRAUD_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    store.replay(raw, "2019-06", 1, tmp_path / "store")  # a month of the champion's test period
    graph_dir = registry.graph_dir_of(registry.champion())

    with connect_or_start(None, tmp_path / "triton.log") as client:
        from fraudlib import lifecycle

        lifecycle.repository(client).load()
        result = monitor.monitor_month(tmp_path / "store", "2019-06", client, history_dir=tmp_path)
        train = graph_store.read_part(graph_dir, "train")
        legit = train.edges((np.asarray(train.split) == "validation") & (train.label == 0))
        n_hops = int(scoring.champion_meta(client)["architecture"]["n_hops"])
        reference = monitor.reference_scores(client, graph_dir, legit, n_hops)
        month = scoring.score_transactions(client, monitor.month_rows(tmp_path / "store", "2019-06"), graph_dir)

    assert result.status in ("ok", "alert") and result.scored > 0
    assert len(reference) == min(legit.num_edges, monitor.SCORE_REFERENCE_EDGES) > 0
    assert ((reference >= 0) & (reference <= 1)).all()
    legit_month = month[(month["Is Fraud?"] == 0) & month["fraud_probability"].notna()]["fraud_probability"]
    assert result.score_psi == pytest.approx(monitor.psi(reference, legit_month.to_numpy()))
