"""The `fraud` command: what a user runs between pipeline runs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TABFORMER_HEADER

FRAUD = Path(sys.executable).parent / "fraud"
COMMANDS = ("status", "serve", "score", "reconcile", "generate", "ingest", "replay")
ROW = "0,0,2019,1,2,06:21,$134.09,Swipe Transaction,3527213246127876953,La Verne,CA,91750.0,5300,"


def fraud(*args, runs_dir):
    env = {**os.environ, "FRAUD_RUNS_DIR": str(runs_dir), "MLFLOW_DISABLE_TELEMETRY": "true"}
    for name in ("MLFLOW_TRACKING_URI", "TRITON_URL", "TRITON_MODEL_REPO"):
        env.pop(name, None)
    return subprocess.run([str(FRAUD), *args], env=env, capture_output=True, text=True, timeout=120)


def test_help_lists_every_command(tmp_path):
    done = fraud("--help", runs_dir=tmp_path)
    assert done.returncode == 0
    for command in COMMANDS:
        assert command in done.stdout


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_every_command_tells_its_version(tmp_path, command):
    done = fraud(*([command] if command else []), "--version", runs_dir=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "fraud (fraudlib) 0.1.0"


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
    csv.write_text(TABFORMER_HEADER.rsplit(",", 1)[0] + "\n" + ROW + "\n")  # new rows: no label
    done = fraud("score", str(csv), runs_dir=tmp_path)
    assert done.returncode == 1
    assert "no champion" in done.stderr
    assert not (tmp_path / "serve").exists()  # no server was started to learn it


def test_score_rejects_a_bad_file_naming_line_and_column_before_any_server_starts(tmp_path):
    csv = tmp_path / "new.csv"
    csv.write_text(TABFORMER_HEADER + "\n" + ROW + ",No\n" + ROW.replace("06:21", "6h21") + ",No\n")
    done = fraud("score", str(csv), runs_dir=tmp_path)
    assert done.returncode == 1
    assert f"{csv}, line 3, column 'Time'" in done.stderr and "6h21" in done.stderr
    assert not (tmp_path / "serve").exists() and not (tmp_path / "mlflow.db").exists()


def test_score_refuses_an_output_it_cannot_write_before_reading_anything(tmp_path):
    for out, why in (("scores.txt", "must end in .csv or .parquet"), ("nowhere/scores.csv", "does not exist")):
        done = fraud("score", str(tmp_path / "missing.csv"), "--out", str(tmp_path / out), runs_dir=tmp_path)
        assert done.returncode == 1 and why in done.stderr, done.stderr


def test_score_refuses_a_fanout_below_one_edge(tmp_path):
    done = fraud("score", str(tmp_path / "missing.csv"), "--fanout", "0", runs_dir=tmp_path)
    assert done.returncode == 2 and "--fanout: must be a whole number >= 1, got 0" in done.stderr


def test_status_reports_an_unreachable_triton_and_exits_non_zero(tmp_path):
    done = fraud("status", "--triton-url", "127.0.0.1:9", runs_dir=tmp_path)
    assert done.returncode != 0
    assert "TRITON UNAVAILABLE: 127.0.0.1:9" in done.stdout and "not reachable" in done.stdout
    assert not list(tmp_path.iterdir())  # status only reads


def test_verbose_logs_the_steps_on_stderr_and_the_answer_stays_on_stdout(tmp_path):
    csv = tmp_path / "new.csv"
    csv.write_text(TABFORMER_HEADER.rsplit(",", 1)[0] + "\n" + ROW + "\n")
    quiet = fraud("score", str(csv), runs_dir=tmp_path)
    loud = fraud("score", str(csv), "--verbose", runs_dir=tmp_path)
    assert "rows valid" not in quiet.stderr
    assert "DEBUG" in loud.stderr or "INFO fraudlib.cli: " in loud.stderr
    assert f"{csv}: 1 rows valid (no labels)" in loud.stderr


def test_generate_names_the_regimes_when_given_an_unknown_one(tmp_path):
    done = fraud("generate", "--rows", "3000", "--out", str(tmp_path / "tx.csv"), "--regime", "nope",
                 runs_dir=tmp_path)
    assert done.returncode == 1
    assert "unknown regime 'nope'" in done.stderr and "row_only" in done.stderr
    assert not (tmp_path / "tx.csv").exists()


def test_status_says_why_a_version_was_rejected_in_the_words_of_whoever_rejected_it():
    from fraudlib import cli, registry

    def version(tag, reason="challenger auprc 0.50 vs champion 0.60 ...: reject"):
        return registry.RegistryVersion(3, "run", 3, None, (), rejected=tag, reason=reason)

    assert cli._rejection(version(registry.NOT_BETTER)) == "challenger auprc 0.50 vs champion 0.60 ...: reject"
    for tag in ("rolled back: the health check failed", "dropped by reconcile: the run that staged it did not finish "
                "deploying it", "replaced: evaluated again by the same training run"):
        assert cli._rejection(version(tag, reason="challenger auprc 0.70 vs champion 0.60 ...: promote")) == tag
