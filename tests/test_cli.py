"""The `fraud` command: what a user runs between pipeline runs."""

import os
import subprocess
import sys
from pathlib import Path

FRAUD = Path(sys.executable).parent / "fraud"


def fraud(*args, runs_dir):
    env = {**os.environ, "FRAUD_RUNS_DIR": str(runs_dir), "MLFLOW_DISABLE_TELEMETRY": "true"}
    for name in ("MLFLOW_TRACKING_URI", "TRITON_URL", "TRITON_MODEL_REPO"):
        env.pop(name, None)
    return subprocess.run([str(FRAUD), *args], env=env, capture_output=True, text=True, timeout=120)


def test_help_lists_every_command(tmp_path):
    done = fraud("--help", runs_dir=tmp_path)
    assert done.returncode == 0
    for command in ("status", "serve", "score", "reconcile", "generate"):
        assert command in done.stdout


def test_serve_refuses_a_repository_without_a_champion_and_says_how_to_fix_it(tmp_path):
    done = fraud("serve", runs_dir=tmp_path)
    assert done.returncode == 2
    assert "no champion" in done.stderr and "fraud reconcile" in done.stderr


def test_status_of_an_empty_project_reports_the_inconsistency(tmp_path):
    done = fraud("status", runs_dir=tmp_path)
    assert done.returncode == 1
    assert "INCONSISTENT: no champion" in done.stdout


def test_generate_writes_a_tabformer_file(tmp_path):
    out = tmp_path / "tx.csv"
    done = fraud("generate", "--rows", "3000", "--out", str(out), runs_dir=tmp_path)
    assert done.returncode == 0, done.stderr
    assert out.read_text().splitlines()[0].startswith("User,Card,Year,Month,Day,Time,Amount")


def test_score_without_a_champion_is_a_clear_error(tmp_path):
    csv = tmp_path / "new.csv"
    csv.write_text("User,Card,Year,Month,Day,Time,Amount,Use Chip,Merchant Name,Merchant City,"
                   "Merchant State,Zip,MCC,Errors?,Is Fraud?\n")
    done = fraud("score", str(csv), runs_dir=tmp_path)
    assert done.returncode == 1
    assert "no champion" in done.stderr


def test_generate_names_the_regimes_when_given_an_unknown_one(tmp_path):
    done = fraud("generate", "--rows", "3000", "--out", str(tmp_path / "tx.csv"), "--regime", "nope",
                 runs_dir=tmp_path)
    assert done.returncode == 1
    assert "unknown regime 'nope'" in done.stderr and "row_only" in done.stderr
    assert not (tmp_path / "tx.csv").exists()
