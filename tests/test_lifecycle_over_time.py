"""The lifecycle over time, end to end (slow, CI): six months of a synthetic file replayed into the
transaction store, each followed by a run of the on-ingest deployment on a real Prefect server
(ingest -> monitor -> preprocess -> train -> evaluate -> deploy) with the real notebooks,
MLflow store and Triton.

The file is the ``row_only`` regime: its fraud is spread over every month (the default regime's
fraud comes in campaigns, so a month's test window may hold none), 1M rows so each month of
2019 holds a few fraud rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fraudlib import flow, store, synthetic

from test_flow import STAGES, _wait_for_deployment, client_settings, free_port, task_runs, wait

ROOT = Path(__file__).resolve().parent.parent
MONTHS = ["2019-07", "2019-08", "2019-09", "2019-10", "2019-11", "2019-12"]
FAST = {"num_epochs": 4, "bootstrap_samples": 300}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("over_time")
    raw = base / "card_transaction.v1.csv"
    synthetic.generate(raw, 1_000_000, seed=0, regime="row_only")
    header, *lines = raw.read_text().splitlines()
    history = base / "history.csv"  # every month before the replay, loaded at once
    history.write_text("\n".join([header, *[l for l in lines if tuple(map(int, l.split(",", 4)[2:4])) < (2019, 7)]]) + "\n")
    root = base / "store"
    store.ingest(history, root, all_months=True)
    env = flow.local_environment(free_port(), base / "prefect") | {"PREFECT_UI_ENABLED": "false"}
    server = flow.start_server(env, base / "server.log")
    runs = base / "runs"
    serve_env = {**os.environ, **env, "FRAUD_RUNS_DIR": str(runs), "FRAUD_STORE": str(root),
                 "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    for name in ("MLFLOW_TRACKING_URI", "TRITON_URL", "TRITON_MODEL_REPO"):
        serve_env.pop(name, None)
    with open(base / "serve.log", "ab") as log:
        serving = subprocess.Popen([sys.executable, "-m", "fraudlib.flow", "serve", "--parameters",
                                    json.dumps({"parameters": FAST})], env=serve_env, cwd=ROOT,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    with client_settings(env["PREFECT_API_URL"]):
        try:
            _wait_for_deployment(base / "serve.log", serving)
            yield {"raw": raw, "store": root, "runs": runs, "env": serve_env, "base": base}
        finally:
            for p in (serving, server):
                flow.stop_group(p, grace=60)


def registry_state(world) -> dict:
    code = ("import json; from fraudlib import registry; c = registry.champion(); "
            "print(json.dumps({'champion': c and c.version, 'triton': c and c.triton_version}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=world["env"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def mlflow_run_names(world) -> set[str]:
    code = ("import json, mlflow; from fraudlib import tracking, settings; c = tracking.configure(); "
            "e = c.get_experiment_by_name(settings.EXPERIMENT_NAME); "
            "print(json.dumps([r.info.run_name for r in c.search_runs([e.experiment_id])]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=world["env"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_six_months_replayed_each_monitored_retrained_and_decided(world):
    from prefect.client.orchestration import get_client

    flow_runs, actions = [], []
    for month in MONTHS:
        # `fraud ingest FILE --trigger`, one month at a time: the replay's months as files.
        results = store.replay(world["raw"], month, 1, world["store"])
        assert results[0].added == [month]
        run = wait(flow.trigger_on_ingest(str(world["store"])), timeout=900)
        assert run.state.is_completed(), f"{month}: {run.state.name}: {run.state.message}"
        run_id = run.name
        assert run_id.startswith(store.month_text(store.month_key(month) + 1))
        record = json.loads((world["runs"] / run_id / "run.json").read_text())
        assert record["status"] == "succeeded"
        outputs = {s["name"]: s["outputs"] for s in record["stages"]}
        actions.append(outputs["deploy"]["deploy_action"])
        monitor = json.loads((world["runs"] / f"{run_id}-monitor" / "run.json").read_text())["stages"][0]["outputs"]
        assert monitor["month"] == month
        assert monitor["status"] == ("skipped" if month == MONTHS[0] else "ok" if not monitor["alert"] else "alert")
        # One champion serves after every month: the registry's and the repository's agree.
        state = registry_state(world)
        served = [p.name for p in (world["runs"] / "triton_repository" / "prediction_and_shapley").iterdir()
                  if p.name.isdigit()]
        assert served == [str(state["triton"])] and outputs["deploy"]["champion_version"] == state["triton"]
        # Each stage a task of the flow run, the four one runner run (one folder, one record).
        assert [t.name for t in task_runs(run.id)] == ["monitor", *STAGES]
        assert [s["name"] for s in record["stages"]] == STAGES
        flow_runs.append(run_id)

    assert actions[0] == "promote" and "promote" in actions and "reject" in actions, actions
    # Run folders, MLflow runs and Prefect flow runs share their names.
    assert set(flow_runs) <= mlflow_run_names(world)
    with get_client(sync_client=True) as client:
        names = {r.name for r in client.read_flow_runs()}
    assert set(flow_runs) <= names and all((world["runs"] / r).is_dir() for r in flow_runs)
    history = json.loads((world["runs"] / "monitor" / "history.json").read_text())
    assert [h["month"] for h in history] == MONTHS[1:]
