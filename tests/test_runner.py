"""The papermill stage runner, on tiny real notebooks executed in real kernels (tests/notebooks/)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from fraudlib import runner

ROOT = Path(__file__).resolve().parent.parent
TEST_NOTEBOOKS = Path(__file__).resolve().parent / "notebooks"


def make_pipeline(directory: Path, *stages: str | tuple[str, str]) -> Path:
    """A notebooks folder of test notebooks as stages numbered in the order given.

    A stage is a test notebook's name, or (test notebook, stage name) to use one notebook twice.
    """
    directory.mkdir(parents=True)
    for number, stage in enumerate(stages, start=1):
        source, name = (stage, stage) if isinstance(stage, str) else stage
        shutil.copy(TEST_NOTEBOOKS / f"{source}.ipynb", directory / f"{number:02d}_{name}.ipynb")
    return directory


def load_cli():
    spec = importlib.util.spec_from_file_location("run_pipeline", ROOT / "run_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stage_records(run_dir: Path) -> dict[str, dict]:
    return {s["name"]: s for s in json.loads((run_dir / "run.json").read_text())["stages"]}


def cell_sources(notebook: Path) -> list[str]:
    return [cell.source for cell in nbformat.read(notebook, as_version=4).cells]


@pytest.fixture(autouse=True)
def isolated_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("FRAUD_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("TRITON_URL", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def failed_run(tmp_path_factory):
    """A run of produce -> fail -> consume that failed at its second stage."""
    base = tmp_path_factory.mktemp("failed_run")
    notebooks = make_pipeline(base / "notebooks", "produce", "fail", "consume")
    result = runner.run_pipeline(notebooks, base / "runs", run_id="failed", progress=False)
    return result


# --- parameters: validated before anything runs ----------------------------------------------


def test_unknown_parameter_stops_the_run_before_any_stage_and_suggests_the_close_name(tmp_path):
    notebooks = make_pipeline(tmp_path / "notebooks", "produce", "consume")
    with pytest.raises(runner.ParameterError) as error:
        runner.run_pipeline(notebooks, tmp_path / "runs", assignments={"mesage": "hi"}, progress=False)
    assert "'mesage'" in str(error.value) and "'message'" in str(error.value)
    assert not (tmp_path / "runs").exists()


def test_value_of_the_wrong_type_is_reported_with_parameter_stage_and_declared_type(tmp_path):
    notebooks = make_pipeline(tmp_path / "notebooks", "produce", "consume")
    with pytest.raises(runner.ParameterError) as error:
        runner.run_pipeline(notebooks, tmp_path / "runs", assignments={"count": "ten", "ratio": "[1]"},
                            progress=False)
    message = str(error.value)
    assert "'count'" in message and "01_produce" in message and "int" in message and "'ten'" in message
    assert "'ratio'" in message and "02_consume" in message and "float" in message
    assert not (tmp_path / "runs").exists()


def test_parameter_declared_only_by_an_unselected_stage_is_unknown(tmp_path):
    notebooks = make_pipeline(tmp_path / "notebooks", "produce", "consume")
    with pytest.raises(runner.ParameterError, match="declared by 02_consume, which this run does not execute"):
        runner.run_pipeline(notebooks, tmp_path / "runs", stages="1", assignments={"shout": "true"},
                            progress=False)


def test_command_line_exits_2_on_invalid_parameters_and_creates_no_run(tmp_path):
    notebooks = make_pipeline(tmp_path / "notebooks", "produce")
    done = subprocess.run(
        [sys.executable, str(ROOT / "run_pipeline.py"), "--notebooks-dir", str(notebooks),
         "--runs-dir", str(tmp_path / "runs"), "-p", "count=ten"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert "'count'" in done.stderr and "01_produce" in done.stderr and "int" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_command_line_values_are_read_as_yaml_and_converted_to_the_declared_types(tmp_path):
    stages = runner.discover_stages(make_pipeline(tmp_path / "notebooks", "produce", "consume"))
    resolved = runner.resolve_parameters(stages, stages, {
        "greeting": "007", "count": "3", "ratio": "1", "shout": "yes", "tags": "[a, 2]", "options": "{k: 1}",
    }, {})
    assert resolved["produce"] == {"greeting": "007", "count": 3}
    assert resolved["consume"] == {"ratio": 1.0, "shout": True, "tags": ["a", 2], "options": {"k": 1}}
    assert isinstance(resolved["consume"]["ratio"], float)
    assert runner.resolve_parameters(stages, stages, {"greeting": ""}, {})["produce"] == {"greeting": ""}


def test_parameter_file_sections_target_one_stage_flat_entries_every_declaring_stage_and_p_wins(tmp_path):
    stages = runner.discover_stages(make_pipeline(tmp_path / "notebooks", "produce", "fail", "consume"))
    selected = runner.select_stages(stages, "produce,consume")
    file_values = {
        "count": "4",  # a quoted number still converts to the declared int
        "message": "from the file",
        "consume": {"ratio": 0.25, "message": "from the section"},
        "fail": {"should_raise": False},  # a section of an unselected stage is ignored
    }
    resolved = runner.resolve_parameters(stages, selected, {"ratio": "0.75"}, file_values)
    assert resolved == {"produce": {"count": 4}, "consume": {"message": "from the section", "ratio": 0.75}}


def test_parameter_file_section_naming_a_parameter_its_stage_lacks_is_rejected(tmp_path):
    stages = runner.discover_stages(make_pipeline(tmp_path / "notebooks", "produce", "consume"))
    with pytest.raises(runner.ParameterError, match=r"consume\.greeting.*'greeting'"):
        runner.resolve_parameters(stages, stages, {}, {"consume": {"greeting": "hi"}}, "-f params.yaml")


def test_parameter_line_papermill_cannot_read_is_reported_instead_of_silently_dropped(tmp_path):
    notebooks = make_pipeline(tmp_path / "notebooks", "produce")
    nb = nbformat.read(notebooks / "01_produce.ipynb", as_version=4)
    nb.cells[1].source += "\nsuffix: str = \"\"  # text after the message; empty = none"
    nbformat.write(nb, notebooks / "01_produce.ipynb")
    with pytest.raises(runner.RunSetupError, match=r"01_produce.ipynb: papermill cannot read(.|\n)*line 4: suffix"):
        runner.discover_stages(notebooks)


def test_stages_are_selected_by_number_or_name_in_pipeline_order(tmp_path):
    stages = runner.discover_stages(make_pipeline(tmp_path / "notebooks", "produce", "fail", "consume"))
    assert [s.label for s in runner.select_stages(stages, "3,1")] == ["01_produce", "03_consume"]
    assert [s.label for s in runner.select_stages(stages, "consume,fail")] == ["02_fail", "03_consume"]
    with pytest.raises(runner.RunSetupError, match="no stage 'train'"):
        runner.select_stages(stages, "train")


def test_list_shows_every_stage_with_parameter_types_defaults_and_help(tmp_path, capsys):
    notebooks = make_pipeline(tmp_path / "notebooks", "produce", "consume")
    assert load_cli().main(["--notebooks-dir", str(notebooks), "--list"]) == 0
    listing = capsys.readouterr().out
    assert "01 produce" in listing and "02 consume" in listing
    assert "count: int = 2" in listing and "how many times to repeat it" in listing
    assert "tags: list = []" in listing


@pytest.mark.parametrize("command, chosen", [(sys.executable, "fraudlib"), ("/elsewhere/bin/python", "python3")])
def test_fraudlib_kernel_is_chosen_only_when_it_runs_this_interpreter(tmp_path, monkeypatch, command, chosen):
    spec_dir = tmp_path / "jupyter" / "kernels" / "fraudlib"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [command, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python (fraudlib)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    assert runner.choose_kernel() == chosen


# --- executing: chaining, records, failures ---------------------------------------------------


def test_outputs_chain_to_later_stages_explicit_parameters_win_and_only_selected_stages_run(tmp_path):
    notebooks = make_pipeline(tmp_path / "notebooks", "produce", "fail", "consume")
    result = runner.run_pipeline(notebooks, tmp_path / "runs", stages="produce,consume",
                                 assignments={"count": "3", "count_used": "99"}, progress=False)

    assert result.status == runner.SUCCEEDED
    stages = stage_records(result.run_dir)
    assert list(stages) == ["produce", "consume"]
    assert stages["produce"]["outputs"]["message"] == "hello hello hello"
    assert stages["produce"]["outputs"]["produced_in"] == str(result.run_dir)  # run_dir was passed
    assert stages["consume"]["outputs"]["echo"] == "hello hello hello"  # chained from produce
    assert stages["consume"]["outputs"]["seen"]["count_used"] == 99  # -p beats produce's glued 3
    for name in ("01_produce", "03_consume"):
        assert (result.run_dir / f"{name}.ipynb").is_file() and (result.run_dir / f"{name}.html").is_file()
    assert not (result.run_dir / "02_fail.ipynb").exists()
    record = json.loads((result.run_dir / "run.json").read_text())
    assert record["status"] == "succeeded" and record["ended"]
    assert set(record["versions"]) >= {"python", "numpy", "pandas", "torch", "torch_geometric", "xgboost",
                                       "mlflow", "papermill", "tritonclient"}
    assert set(record["git"]) == {"commit", "dirty"}
    assert all(s["status"] == "succeeded" and s["duration_s"] is not None for s in stages.values())


def test_stage_kernels_talk_over_unix_sockets_not_plain_text_tcp(tmp_path, capfd):
    result = runner.run_pipeline(make_pipeline(tmp_path / "notebooks", "transport"), tmp_path / "runs",
                                 progress=False)

    assert result.status == runner.SUCCEEDED
    assert stage_records(result.run_dir)["transport"]["outputs"]["transport"] == "ipc"
    assert "without encryption" not in capfd.readouterr().err


def test_failing_stage_notebook_and_html_are_written_with_the_error_at_the_top(failed_run):
    notebook = failed_run.run_dir / "02_fail.ipynb"
    assert "An Exception was encountered" in cell_sources(notebook)[0]
    assert "deliberate failure" in (failed_run.run_dir / "02_fail.html").read_text()


def test_failed_stage_fails_the_run_and_later_stages_are_skipped(failed_run):
    assert failed_run.status == runner.FAILED
    stages = stage_records(failed_run.run_dir)
    assert [s["status"] for s in stages.values()] == ["succeeded", "failed", "skipped"]
    assert "ValueError: deliberate failure" in stages["fail"]["error"]
    assert json.loads((failed_run.run_dir / "run.json").read_text())["status"] == "failed"
    assert not (failed_run.run_dir / "03_consume.ipynb").exists()


def test_kernel_death_fails_the_run_with_a_non_zero_exit_and_the_error_at_the_top(tmp_path, capsys):
    notebooks = make_pipeline(tmp_path / "notebooks", "kill_kernel", "consume")
    runs = tmp_path / "runs"
    code = load_cli().main(["--notebooks-dir", str(notebooks), "--runs-dir", str(runs), "--run-id", "dies",
                            "--no-progress"])

    assert code == 1
    stages = stage_records(runs / "dies")
    assert stages["kill_kernel"]["status"] == "failed" and "DeadKernelError" in stages["kill_kernel"]["error"]
    assert stages["consume"]["status"] == "skipped"
    sources = cell_sources(runs / "dies" / "01_kill_kernel.ipynb")
    assert "Stage failed: DeadKernelError" in sources[0]
    anchor = next(i for i, s in enumerate(sources) if 'id="papermill-error-cell"' in s)
    assert "os._exit" in sources[anchor + 1]  # the anchor sits right before the cell that killed it
    assert (runs / "dies" / "01_kill_kernel.html").is_file()
    assert "kill_kernel" in capsys.readouterr().out  # the summary table


def test_cell_running_past_the_timeout_is_a_failure(tmp_path):
    notebooks = make_pipeline(tmp_path / "notebooks", "sleep", "consume")
    result = runner.run_pipeline(notebooks, tmp_path / "runs", timeout=1, progress=False)

    assert result.status == runner.FAILED
    stages = stage_records(result.run_dir)
    assert "CellTimeoutError" in stages["sleep"]["error"] and stages["consume"]["status"] == "skipped"
    assert "Stage failed: CellTimeoutError" in cell_sources(result.run_dir / "01_sleep.ipynb")[0]


def test_resume_reruns_from_the_failed_stage_keeps_the_failed_notebook_and_earlier_outputs(failed_run, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(failed_run.run_dir, runs / "failed")
    produce_before = stage_records(runs / "failed")["produce"]

    result = runner.resume_pipeline("failed", runs, assignments={"should_raise": "false"}, progress=False)

    assert result.status == runner.SUCCEEDED
    stages = stage_records(runs / "failed")
    assert stages["produce"] == produce_before  # not re-run
    assert stages["fail"]["status"] == "succeeded" and stages["fail"]["parameters"]["should_raise"] is False
    assert stages["fail"]["previous_attempts"][0]["notebook"] == "02_fail.failed-1.ipynb"
    assert "deliberate failure" in stages["fail"]["previous_attempts"][0]["error"]
    assert "An Exception was encountered" in cell_sources(runs / "failed" / "02_fail.failed-1.ipynb")[0]
    assert (runs / "failed" / "02_fail.failed-1.html").is_file()
    assert stages["consume"]["outputs"]["echo"] == produce_before["outputs"]["message"]


def test_a_run_through_a_stage_leaves_the_rest_pending_and_resume_continues_it_stage_by_stage(tmp_path):
    notebooks = make_pipeline(tmp_path / "notebooks", "produce", "consume")
    runs = tmp_path / "runs"

    first = runner.run_pipeline(notebooks, runs, run_id="r", assignments={"count": "2"}, through="produce",
                                progress=False)

    assert first.status == runner.PENDING and first.record["ended"] is None
    assert [s["status"] for s in first.record["stages"]] == ["succeeded", "pending"]
    assert not (runs / "r" / "02_consume.ipynb").exists()
    with pytest.raises(runner.RunSetupError, match="--through: no stage 'produce'"):
        runner.resume_pipeline("r", runs, through="produce", progress=False)  # it has run already

    second = runner.resume_pipeline("r", runs, through="consume", progress=False)

    assert second.status == runner.SUCCEEDED and second.record["ended"]
    stages = stage_records(runs / "r")
    assert stages["produce"] == first.record["stages"][0]  # kept, not run again
    assert stages["consume"]["outputs"]["echo"] == "hello hello"  # fed by the first call's outputs
    assert second.record["resumed"] == []  # continuing a pending run is no resume after a failure


def test_a_failure_before_the_through_stage_skips_every_later_stage_as_a_whole_run_does(tmp_path):
    notebooks = make_pipeline(tmp_path / "notebooks", "produce", "fail", "consume")
    result = runner.run_pipeline(notebooks, tmp_path / "runs", through="fail", progress=False)
    assert result.status == runner.FAILED and result.record["ended"]
    assert [s["status"] for s in result.record["stages"]] == ["succeeded", "failed", "skipped"]


def test_command_line_through_exits_0_and_says_how_to_continue(tmp_path, capsys):
    cli = load_cli()
    notebooks = make_pipeline(tmp_path / "notebooks", "produce", "consume")
    assert cli.main(["--notebooks-dir", str(notebooks), "--run-id", "c", "--through", "1", "--no-progress"]) == 0
    assert "continue with: python run_pipeline.py --resume c" in capsys.readouterr().err
    assert cli.main(["--resume", "c", "--no-progress"]) == 0
    assert json.loads((tmp_path / "runs" / "c" / "run.json").read_text())["status"] == "succeeded"
    assert cli.main(["--notebooks-dir", str(notebooks), "--through", "produce,consume"]) == 2


def test_resuming_a_succeeded_run_is_refused(tmp_path):
    run_dir = tmp_path / "runs" / "done"
    run_dir.mkdir(parents=True)
    runner.write_record(run_dir, {"run_id": "done", "status": "succeeded",
                                  "stages": [{"name": "produce", "status": "succeeded"}]})
    with pytest.raises(runner.RunSetupError, match="already succeeded"):
        runner.resume_pipeline("done", tmp_path / "runs", progress=False)


# --- services and MLflow ----------------------------------------------------------------------


def test_executed_notebooks_html_and_run_json_are_logged_to_the_glued_mlflow_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from fraudlib.tracking import configure

    client = configure()
    experiment = client.create_experiment("runner-test", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow_run_id = client.create_run(experiment).info.run_id
    notebooks = make_pipeline(tmp_path / "notebooks", "record_mlflow_run")

    result = runner.run_pipeline(notebooks, tmp_path / "runs", assignments={"mlflow_run_id": mlflow_run_id},
                                 progress=False)

    assert result.status == runner.SUCCEEDED and result.warnings == []
    logged = {Path(a.path).name for a in client.list_artifacts(mlflow_run_id, "notebooks")}
    assert logged == {"01_record_mlflow_run.ipynb", "01_record_mlflow_run.html", "index.html", "run.json"}


def test_failing_to_log_to_mlflow_is_a_warning_and_the_run_still_succeeds(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'a_file' / 'mlflow.db'}")  # unusable store
    notebooks = make_pipeline(tmp_path / "notebooks", "record_mlflow_run")

    result = runner.run_pipeline(notebooks, tmp_path / "runs", assignments={"mlflow_run_id": "0123abcd"},
                                 progress=False)

    assert result.status == runner.SUCCEEDED
    assert len(result.warnings) == 2  # the store could not be created before the stage, nor logged to after
    assert "MLflow store" in result.warnings[0] and "not created" in result.warnings[0]
    assert "not logged to MLflow" in result.warnings[1]


def test_embedded_triton_is_started_once_and_its_url_passed_to_stages_declaring_triton_url(tmp_path, monkeypatch):
    pytest.importorskip("fraudlib.triton_server")
    monkeypatch.setenv("TRITON_MODEL_REPO", str(tmp_path / "triton_repository"))
    (tmp_path / "triton_repository").mkdir()
    notebooks = make_pipeline(tmp_path / "notebooks", ("needs_triton", "first"), ("needs_triton", "second"))

    result = runner.run_pipeline(notebooks, tmp_path / "runs", progress=False)

    assert result.status == runner.SUCCEEDED, stage_records(result.run_dir)
    stages = stage_records(result.run_dir)
    urls = {s["outputs"]["served_by"] for s in stages.values()}
    assert len(urls) == 1 and urls.pop().startswith("127.0.0.1:")
    assert all(s["outputs"]["server_live"] for s in stages.values())
    assert (result.run_dir / "triton.log").is_file()


# --- path parameters ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, is_path", [
    ("raw_path", True), ("output_dir", True), ("graph_dir", True), ("model_dir", True), ("run_dir", True),
    ("example_graph_dir", True), ("pid_file", True), ("path", True), ("greeting", False),
    ("triton_url", False), ("directory_count", False), ("feature_set", False),
])
def test_path_parameters_are_recognised_by_name(name, is_path):
    assert runner.is_path_parameter(name) is is_path


def test_path_values_become_absolute_from_the_base_and_the_rest_are_left_alone(tmp_path):
    assert runner.absolute_path_value("data/in.csv", tmp_path) == str(tmp_path / "data" / "in.csv")
    assert runner.absolute_path_value("../x", tmp_path / "a") == str(tmp_path / "x")
    assert runner.absolute_path_value("/abs/file.csv", tmp_path) == "/abs/file.csv"
    assert runner.absolute_path_value("~/f.csv", tmp_path) == str(Path.home() / "f.csv")
    for unchanged in ("", "s3://bucket/key", None, 3):
        assert runner.absolute_path_value(unchanged, tmp_path) == unchanged
