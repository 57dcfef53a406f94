"""The lifecycle on Prefect: a real local Prefect server started by the test, the deployments
served by ``python -m fraudlib.flow serve``, and tiny real stage notebooks run by the real runner.

The stage notebooks here stand in for the four stages and the monitor (the real ones train a
model: tests/test_lifecycle_over_time.py runs those); they record what they were given.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from fraudlib import flow, store

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def notebook(path: Path, parameters: str, body: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    cell = nbformat.v4.new_code_cell(parameters)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell("import json, os, time\nimport scrapbook as sb\n" + body)]
    nbformat.write(nb, path)


WINDOW = ('raw_path: str = ""  # store\nas_of: str = ""  # month\ntrain_months: int = 12  # months\n'
          'val_months: int = 1  # months\ntest_months: int = 1  # months\nrun_dir: str = ""  # run folder\n')


def stage_notebooks(folder: Path) -> Path:
    """01-04 glue what the next one takes (recorded in run.json); 02 takes a second (to see
    overlap) and fails once when the file ``fail_once`` exists in the runs folder; 05 alerts
    when the file ``alert`` exists beside the store."""
    folder.mkdir()
    notebook(folder / "01_preprocess.ipynb", WINDOW,
             "sb.glue('graph_dir', os.path.join(run_dir, 'graph'))\n"
             "json.dump({'as_of': as_of, 'raw_path': raw_path, 'months': [train_months, val_months, test_months],"
             " 'start': time.time()}, open(os.path.join(run_dir, 'seen.json'), 'w'))")
    notebook(folder / "02_train.ipynb", 'graph_dir: str = ""  # graph\nrun_dir: str = ""  # run folder\n',
             "time.sleep(1.0)\nmarker = os.path.join(os.path.dirname(run_dir), 'fail_once')\n"
             "if os.path.exists(marker):\n    os.remove(marker)\n    raise RuntimeError('failing once')\n"
             "sb.glue('model_dir', graph_dir + '/model')")
    notebook(folder / "03_evaluate.ipynb", 'model_dir: str = ""  # model\nrun_dir: str = ""  # run folder\n',
             "sb.glue('decision', 'promote')")
    notebook(folder / "04_deploy.ipynb", 'decision: str = ""  # decision\nrun_dir: str = ""  # run folder\n',
             "json.dump({'end': time.time()}, open(os.path.join(run_dir, 'done.json'), 'w'))")
    notebook(folder / "05_monitor.ipynb",
             'store_dir: str = ""  # store\nmonth: str = ""  # month\nauprc_drop_alert: float = 0.1  # margin\n'
             'psi_alert: float = 0.2  # limit\nrun_dir: str = ""  # run folder\n',
             "alert = 'PSI of Amount 0.31 > 0.2' if os.path.exists(os.path.join(store_dir, '..', 'alert')) else ''\n"
             "sb.glue('alert', alert)\nsb.glue('month', month)")
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real Prefect server on loopback (home and database in a temp folder) and a serve process."""
    base = tmp_path_factory.mktemp("prefect")
    defaults = {"notebooks_dir": str(stage_notebooks(base / "notebooks")), "runs_dir": str(base / "runs")}
    env = flow.local_environment(free_port(), base / "home") | {"PREFECT_UI_ENABLED": "false"}
    process = flow.start_server(env, base / "server.log")
    serve_env = {**os.environ, **env, "FRAUD_RUNS_DIR": str(base / "runs"), "MLFLOW_DISABLE_TELEMETRY": "true",
                 "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PREFECT_WORKER_QUERY_SECONDS": "1"}
    with open(base / "serve.log", "ab") as log:
        serving = subprocess.Popen([sys.executable, "-m", "fraudlib.flow", "serve",
                                    "--parameters", json.dumps(defaults)], env=serve_env, cwd=ROOT,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    # Prefect read its settings when imported: point this process's client at the server.
    with client_settings(env["PREFECT_API_URL"]):
        try:
            _wait_for_deployment(base / "serve.log", serving)
            yield defaults
        finally:
            for p in (serving, process):
                flow.stop_group(p)


def client_settings(url: str):
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: url, PREFECT_SERVER_EPHEMERAL_ENABLED: False})


def _wait_for_deployment(log: Path, serving: subprocess.Popen, timeout: float = 90) -> None:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            assert serving.poll() is None, log.read_text()[-3000:]
            try:
                client.read_deployment_by_name(f"{flow.FLOW_NAME}/{flow.ON_INGEST}")
                return
            except Exception:
                time.sleep(0.5)
    raise AssertionError("the deployments were not served in time:\n" + log.read_text()[-3000:])


@pytest.fixture
def lifecycle_setup(server, tmp_path, synthetic_csv):
    """A store of 2019-05 and 2019-06; the flow's parameters (the served defaults run the test notebooks)."""
    root = tmp_path / "data" / "store"
    store.replay(synthetic_csv, "2019-05", 2, root)
    return {"store_dir": str(root)}


def run_and_wait(parameters: dict, timeout: float = 240):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    run = run_deployment(f"{flow.FLOW_NAME}/{flow.ON_INGEST}", parameters=parameters, timeout=0, as_subflow=False)
    return wait(run.id, timeout)


def wait(flow_run_id, timeout: float = 240):
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(flow_run_id)
            if run.state and run.state.is_final():
                return run
            time.sleep(0.5)
    raise AssertionError(f"flow run {flow_run_id} did not finish in {timeout} s")


def record(runs_dir: str, run_id: str) -> dict:
    return json.loads((Path(runs_dir) / run_id / "run.json").read_text())


def task_runs(flow_run_id) -> list:
    """The flow run's task runs, in the order they started."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted(runs, key=lambda r: r.start_time)


STAGES = ["preprocess", "train", "evaluate", "deploy"]
NOTEBOOKS = ["01_preprocess.ipynb", "02_train.ipynb", "03_evaluate.ipynb", "04_deploy.ipynb"]


def test_a_flow_run_monitors_then_runs_each_stage_as_a_task_of_one_pipeline_run(server, lifecycle_setup):
    run = run_and_wait(lifecycle_setup)
    assert run.state.is_completed(), run.state.message
    run_id = run.name  # the flow run is named after the pipeline run
    assert run_id.startswith("2019-07-")
    tasks = task_runs(run.id)
    assert [t.name for t in tasks] == ["monitor", *STAGES]
    assert all(t.state.is_completed() and t.run_count == 1 for t in tasks)
    # The four tasks are one runner run: one folder, one record, outputs chained by name.
    runs = Path(server["runs_dir"])
    assert sorted(p.name for p in runs.iterdir() if p.name.startswith(run_id)) == [run_id, f"{run_id}-monitor"]
    assert sorted(p.name for p in (runs / run_id).glob("0*.ipynb")) == NOTEBOOKS
    rec = record(server["runs_dir"], run_id)
    assert rec["status"] == "succeeded" and [s["name"] for s in rec["stages"]] == STAGES
    assert all(s["status"] == "succeeded" for s in rec["stages"]) and rec["resumed"] == []
    stages = {s["name"]: s for s in rec["stages"]}
    assert stages["train"]["parameters"]["graph_dir"] == str(runs / run_id / "graph")
    assert stages["evaluate"]["parameters"]["model_dir"] == str(runs / run_id / "graph" / "model")
    assert stages["deploy"]["parameters"]["decision"] == "promote"
    seen = json.loads((runs / run_id / "seen.json").read_text())
    assert seen["as_of"] == "2019-07" and seen["raw_path"] == lifecycle_setup["store_dir"]
    assert seen["months"] == [12, 1, 1]
    monitor = record(server["runs_dir"], f"{run_id}-monitor")
    assert [s["name"] for s in monitor["stages"]] == ["monitor"]
    assert monitor["stages"][0]["outputs"]["month"] == "2019-06"
    assert monitor["ended"] <= rec["started"]  # monitor, then the pipeline


def test_a_failed_stage_is_retried_by_resuming_the_same_run_and_an_alert_is_the_flows_state(server, lifecycle_setup):
    (Path(server["runs_dir"]) / "fail_once").touch()  # train fails on its first attempt
    (Path(lifecycle_setup["store_dir"]).parent / "alert").touch()
    run = run_and_wait(lifecycle_setup)
    assert run.state.is_completed() and run.state.name == flow.ALERT_STATE, run.state.message
    assert "PSI of Amount 0.31 > 0.2" in run.state.message
    assert [(t.name, t.run_count) for t in task_runs(run.id)] == [
        ("monitor", 1), ("preprocess", 1), ("train", 2), ("evaluate", 1), ("deploy", 1)]
    rec = record(server["runs_dir"], run.name)
    assert rec["status"] == "succeeded" and len(rec["resumed"]) == 1
    preprocess, train, *_ = rec["stages"]
    assert preprocess["status"] == "succeeded" and preprocess["previous_attempts"] == []  # kept, not run again
    assert preprocess["end"] <= rec["resumed"][0]
    failed = train["previous_attempts"][0]
    assert train["status"] == "succeeded" and failed["status"] == "failed" and "failing once" in failed["error"]
    assert train["parameters"]["graph_dir"] == preprocess["outputs"]["graph_dir"]
    assert (Path(server["runs_dir"]) / run.name / "02_train.failed-1.ipynb").is_file()


@pytest.mark.slow
def test_two_lifecycles_never_run_at_once(server, lifecycle_setup):
    from prefect.deployments import run_deployment

    runs = [run_deployment(f"{flow.FLOW_NAME}/{flow.ON_INGEST}", parameters=lifecycle_setup, timeout=0,
                           as_subflow=False) for _ in range(2)]
    done = [wait(r.id) for r in runs]
    assert all(r.state.is_completed() for r in done), [r.state.message for r in done]
    spans = sorted((record(server["runs_dir"], f"{r.name}-monitor")["started"],
                    record(server["runs_dir"], r.name)["ended"]) for r in done)
    assert spans[0][1] <= spans[1][0], spans  # the second started after the first ended


def test_fraud_ingest_trigger_starts_the_on_ingest_deployment(server, lifecycle_setup, synthetic_csv, tmp_path, capsys):
    import argparse

    header, *lines = synthetic_csv.read_text().splitlines()
    month = tmp_path / "2019-07.csv"
    month.write_text("\n".join([header, *[l for l in lines if l.split(",", 4)[2:4] == ["2019", "7"]]]) + "\n")
    parser = argparse.ArgumentParser()
    store.add_commands(parser.add_subparsers())
    args = parser.parse_args(["ingest", str(month), "--store", lifecycle_setup["store_dir"], "--trigger"])
    from prefect.client.orchestration import get_client

    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "added 2019-07" in out and "started lifecycle flow run " in out
    flow_run_id = out.split("started lifecycle flow run ")[1].split()[0]
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(flow_run_id).parameters["store_dir"] == lifecycle_setup["store_dir"]
    run = wait(flow_run_id)
    assert run.state.is_completed() and run.name.startswith("2019-08-")  # 2019-07 is now the newest month


def test_an_unreachable_server_stops_ingest_trigger_before_anything_is_written(month_store, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    store.add_commands(parser.add_subparsers())
    args = parser.parse_args(["ingest", str(month_store["file"]), "--store", str(month_store["root"]), "--trigger"])
    with client_settings(f"http://127.0.0.1:{free_port()}/api"):
        assert args.func(args) == 3
    err = capsys.readouterr().err
    assert "Prefect server at http://127.0.0.1:" in err and "unreachable" in err and "nothing was ingested" in err
    assert not (month_store["root"] / store.LEDGER).exists()
    with client_settings(""):
        assert args.func(args) == 3
    assert "PREFECT_API_URL is not set" in capsys.readouterr().err
    assert not (month_store["root"] / store.LEDGER).exists()


@pytest.fixture
def month_store(synthetic_csv, tmp_path):
    header, *lines = synthetic_csv.read_text().splitlines()
    path = tmp_path / "2019-03.csv"
    path.write_text("\n".join([header, *[l for l in lines if l.split(",", 4)[2:4] == ["2019", "3"]]]) + "\n")
    return {"file": path, "root": tmp_path / "store"}


def test_the_orchestration_compose_pins_requirements_versions_and_binds_only_to_bind_address():
    import re

    import yaml

    compose = yaml.safe_load((ROOT / "deploy" / "compose.orchestration.yml").read_text())
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", (ROOT / "requirements.txt").read_text(), re.M))
    services = compose["services"]
    assert services["prefect"]["image"].startswith(f"prefecthq/prefect:{pins['prefect']}-")
    assert services["mlflow"]["image"].endswith(f":v{pins['mlflow']}")
    assert services["prefect"]["environment"]["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    for service in services.values():
        assert all(p.startswith("${BIND_ADDRESS:-127.0.0.1}:") for p in service["ports"]), service["ports"]
    # The flow's local server keeps its database under the runs folder, on loopback, analytics off.
    env = flow.local_environment(4200, Path("/r/prefect"))
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4200/api" and env["PREFECT_SERVER_API_HOST"] == "127.0.0.1"
    assert env["PREFECT_HOME"] == "/r/prefect" and env["DO_NOT_TRACK"] == "1"


@pytest.mark.slow
def test_split_machines_a_worker_in_its_own_pool_runs_the_deployed_flow(tmp_path, synthetic_csv):
    """The GPU host's side: `python -m fraudlib.flow deploy --pool gpu` and a process worker in
    that pool (no serve process), against a server reached only through PREFECT_API_URL."""
    env = flow.local_environment(free_port(), tmp_path / "home") | {"PREFECT_UI_ENABLED": "false"}
    server = flow.start_server(env, tmp_path / "server.log")
    worker = None
    try:
        full = {**os.environ, **env, "FRAUD_RUNS_DIR": str(tmp_path / "runs"), "PREFECT_WORKER_QUERY_SECONDS": "1"}
        prefect_cli = [sys.executable, "-m", "prefect"]
        subprocess.run([*prefect_cli, "work-pool", "create", "gpu", "--type", "process"], env=full, check=True,
                       capture_output=True)
        done = subprocess.run([sys.executable, "-m", "fraudlib.flow", "deploy", "--pool", "gpu"], env=full, cwd=ROOT,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        with open(tmp_path / "worker.log", "ab") as log:
            worker = subprocess.Popen([*prefect_cli, "worker", "start", "--pool", "gpu"], env=full, cwd=ROOT,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        root = tmp_path / "store"
        store.replay(synthetic_csv, "2019-06", 1, root)
        with client_settings(env["PREFECT_API_URL"]):
            from prefect.client.orchestration import get_client

            with get_client(sync_client=True) as client:
                deployment = client.read_deployment_by_name(f"{flow.FLOW_NAME}/{flow.MONTHLY}")
                assert deployment.work_pool_name == "gpu" and deployment.schedules[0].schedule.cron == flow.DEFAULT_CRON
            parameters = {"store_dir": str(root), "notebooks_dir": str(stage_notebooks(tmp_path / "notebooks")),
                          "runs_dir": str(tmp_path / "runs")}
            run = run_and_wait(parameters)
        assert run.state.is_completed(), (tmp_path / "worker.log").read_text()[-3000:]
        assert json.loads((tmp_path / "runs" / run.name / "run.json").read_text())["status"] == "succeeded"
    finally:
        for p in (worker, server):
            if p is not None:
                flow.stop_group(p)
