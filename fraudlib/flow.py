"""The lifecycle over time on Prefect 3: a flow, its deployments, and the local server.

One flow run = one month of the lifecycle: monitor the champion on the newest sealed month of
the transaction store (``notebooks/05_monitor.ipynb``), then retrain on rolling windows ending
with that month and evaluate and promote or reject (the four stage notebooks). The notebooks stay
the unit of work and the audit record: both steps go through the papermill runner into
``runs/<run_id>/`` exactly as ``run_pipeline.py`` does; the Prefect flow run is named after the
pipeline's run id, so the run folder, the MLflow runs and the flow run share one name.

* Each stage is a Prefect task (the UI shows the task runs ``monitor``, ``preprocess``,
  ``train``, ``evaluate``, ``deploy``); the four stages' tasks are one runner run: the first
  creates it, each later one continues it with its next stage, fed by the recorded outputs.
* A failed stage is retried once by Prefect, continuing the same run with ``--resume``.
* Never two lifecycles at once: the deployments have a concurrency limit of 1, the serve
  process runs one flow at a time, and the flow holds the global concurrency limit
  ``fraud-lifecycle`` (1 slot) while it works, which also covers workers on other hosts.
* Deployments: ``monthly`` (cron, default 06:00 on the 2nd: after the month is ingested) and
  ``on-ingest`` (no schedule; ``fraud ingest --trigger`` starts it).
* An alert (AUPRC drop or PSI over the limit) makes the flow run end in the state ``Alert``
  (a completed state) with the reason as its message.

``python -m fraudlib.flow schedule`` (``make schedule``) starts a real Prefect server on
loopback with its home and database under ``<runs>/prefect`` and analytics off, then serves the
deployments until Ctrl-C (which does not pause them). ``PREFECT_API_URL`` is required by every
client call here: without it Prefect would start an ephemeral server of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import prefect
from prefect.concurrency.sync import concurrency
from prefect.states import Completed

from fraudlib import settings, store

FLOW_NAME = "fraud-lifecycle"
MONTHLY, ON_INGEST = "monthly", "on-ingest"
DEFAULT_CRON = "0 6 2 * *"  # 06:00 on the 2nd of each month: after the month's data is ingested
CONCURRENCY_LIMIT = "fraud-lifecycle"
LIFECYCLE_STAGES = "preprocess,train,evaluate,deploy"
MONITOR_STAGE = "monitor"
DEFAULT_PORT = 4200
ALERT_STATE = "Alert"


class OrchestrationError(RuntimeError):
    """The orchestration cannot do what was asked (no server, a failed stage); says why."""


# --- the local server ---------------------------------------------------------------------------

def local_environment(port: int = DEFAULT_PORT, home: Path | None = None) -> dict[str, str]:
    """The environment of a local Prefect server and its clients: loopback, home and database
    under ``<runs>/prefect``, analytics off."""
    home = home or settings.runs_root() / "prefect"
    return {"PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_EPHEMERAL_ENABLED": "false",  # a client without the server fails, never starts its own
            "PREFECT_RUNNER_POLL_FREQUENCY": "2",  # serve picks a triggered run up within 2 s (default 10)
            "PREFECT_UI_ENABLED": os.environ.get("PREFECT_UI_ENABLED", "true")}


def start_server(env: dict[str, str], log: Path, timeout: float = 90.0) -> subprocess.Popen:
    """Start ``prefect server start`` with ``env`` (``local_environment``) and wait until it answers."""
    Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start"],
                                   env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise OrchestrationError(f"the Prefect server exited with status {process.returncode} at start; "
                                     f"its log: {log}")
        try:
            check_server(env["PREFECT_API_URL"], timeout=2.0)
            return process
        except OrchestrationError:
            time.sleep(0.5)
    process.terminate()
    raise OrchestrationError(f"the Prefect server did not answer within {timeout:.0f} s; its log: {log}")


def stop_group(process: subprocess.Popen, grace: float = 30.0) -> None:
    """Stop a process started with ``start_new_session`` and every process of its group: SIGTERM,
    then SIGKILL if it is still there after ``grace`` seconds (a Prefect worker or ``serve``
    drains its flow runs first: > 30 s seen under load)."""
    try:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    except ProcessLookupError:  # the group was already gone
        process.wait(timeout=30)


def api_url() -> str:
    """The Prefect API's URL as Prefect's client sees it (its settings are read when Prefect is
    imported: set ``PREFECT_API_URL`` before starting Python)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise OrchestrationError("PREFECT_API_URL is not set: start the local server with `make schedule` and "
                                 f"export PREFECT_API_URL=http://127.0.0.1:{DEFAULT_PORT}/api (or the orchestration "
                                 "host's URL)")
    return url


def check_server(url: str | None = None, timeout: float = 5.0) -> None:
    """Raise OrchestrationError unless the Prefect server at ``url`` (``$PREFECT_API_URL``) answers."""
    import httpx

    url = url or api_url()
    try:
        response = httpx.get(f"{url.rstrip('/')}/health", timeout=timeout)
    except httpx.HTTPError as error:
        raise OrchestrationError(f"the Prefect server at {url} is unreachable ({type(error).__name__}: {error}); "
                                 "start it with `make schedule` or fix PREFECT_API_URL") from None
    if response.status_code != 200:
        raise OrchestrationError(f"the Prefect server at {url} answered {response.status_code} to /health")


# --- the flow -----------------------------------------------------------------------------------

def _outputs(record: dict, stage: str) -> dict:
    return next((rec["outputs"] for rec in record["stages"] if rec["name"] == stage), {})


def _failure(result) -> str:
    failed = [f"{rec['number']:02d}_{rec['name']}: {rec['error']}" for rec in result.record["stages"]
              if rec["status"] == "failed"]
    return f"run {result.run_id} failed ({'; '.join(failed) or result.status}); see {result.run_dir}"


def run_stage(run_id: str, stage: str, stages: str, assignments: dict[str, str], notebooks_dir: str,
              runs_dir: str) -> dict:
    """Run ``stage`` as part of pipeline run ``run_id`` (its ``stages``) through the runner: the
    first stage creates the run (every stage recorded, the later ones pending, ``assignments``
    checked for all), a later one continues it (``--resume --through``) fed by the earlier
    stages' recorded outputs, as one ``run_pipeline.py`` run would be; after a failed attempt
    the same call resumes from the failed stage. The run record, or OrchestrationError."""
    from fraudlib import runner

    runs = Path(runs_dir)
    if (runs / run_id).is_dir():
        result = runner.resume_pipeline(run_id, runs, progress=False, through=stage)
    else:
        result = runner.run_pipeline(Path(notebooks_dir), runs, stages=stages, assignments=assignments,
                                     run_id=run_id, progress=False, through=stage)
    if result.status == runner.FAILED:
        raise OrchestrationError(_failure(result))
    return result.record


def next_month(month: str) -> str:
    return store.month_text(store.month_key(month) + 1)


@prefect.task(name="stage", task_run_name="{stage}", retries=1, retry_delay_seconds=1)
def stage_task(run_id: str, stage: str, stages: str, assignments: dict[str, str], notebooks_dir: str,
               runs_dir: str) -> dict:
    """One stage of a pipeline run; Prefect's retry continues the same run from the failed stage."""
    return run_stage(run_id, stage, stages, assignments, notebooks_dir, runs_dir)


@prefect.flow(name=FLOW_NAME)
def lifecycle(store_dir: str = "", as_of: str = "", train_months: int = 12, val_months: int = 1,
              test_months: int = 1, parameters: dict | None = None, monitor: bool = True,
              auprc_drop_alert: float = 0.1, psi_alert: float = 0.2, notebooks_dir: str = "",
              runs_dir: str = ""):
    """Monitor the champion on the newest month, then retrain on the windows before ``as_of``
    (default: the month after the newest sealed one) and promote or reject. ``parameters``:
    further pipeline parameters (``-p``)."""
    from prefect.runtime import flow_run

    store_dir = store_dir or str(store.store_root())
    sealed = store.months(store_dir)
    if not sealed:
        raise OrchestrationError(f"the transaction store {store_dir} is empty: ingest a month first "
                                 "(fraud ingest FILE)")
    as_of = as_of or next_month(sealed[-1])
    month = store.month_text(store.month_key(as_of) - 1)
    run_id = f"{as_of}-{str(flow_run.id or uuid.uuid4())[:8]}"
    _rename_flow_run(run_id)
    notebooks_dir = notebooks_dir or str(settings.project_root() / "notebooks")
    runs_dir = runs_dir or str(settings.runs_root())
    alert = ""
    with concurrency(CONCURRENCY_LIMIT, occupy=1):
        if monitor:
            record = stage_task(f"{run_id}-monitor", MONITOR_STAGE, MONITOR_STAGE,
                                {"store_dir": store_dir, "month": month, "auprc_drop_alert": str(auprc_drop_alert),
                                 "psi_alert": str(psi_alert)}, notebooks_dir, runs_dir)
            alert = _outputs(record, MONITOR_STAGE).get("alert", "")
        window = {"raw_path": store_dir, "as_of": as_of, "train_months": str(train_months),
                  "val_months": str(val_months), "test_months": str(test_months)}
        assignments = {**window, **{k: str(v) for k, v in (parameters or {}).items()}}
        for stage in LIFECYCLE_STAGES.split(","):  # one task each, all in run ``run_id``
            record = stage_task(run_id, stage, LIFECYCLE_STAGES, assignments, notebooks_dir, runs_dir)
    decision = _outputs(record, "evaluate").get("decision", "")
    prefect.get_run_logger().info("run %s: as_of %s, decision %s%s", run_id, as_of, decision or "-",
                                  f"; ALERT: {alert}" if alert else "")
    result = {"run_id": run_id, "as_of": as_of, "month": month, "decision": decision, "alert": alert}
    if alert:
        return Completed(name=ALERT_STATE, message=alert, data=result)
    return result


def _rename_flow_run(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if flow_run.id:
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, name=name)


def ensure_concurrency_limit() -> None:
    """Create the global concurrency limit (1 slot) the flow holds, if the server lacks it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(CONCURRENCY_LIMIT)
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=CONCURRENCY_LIMIT, limit=1))


def deployments(cron: str = DEFAULT_CRON, parameters: dict | None = None) -> list:
    """The two deployments (served by ``serve``): monthly on ``cron`` and on ingest, each
    with a concurrency limit of 1."""
    parameters = parameters or {}
    return [lifecycle.to_deployment(MONTHLY, cron=cron, concurrency_limit=1, parameters=parameters,
                                    description="retrain monthly on rolling windows, after the month's data is ingested"),
            lifecycle.to_deployment(ON_INGEST, concurrency_limit=1, parameters=parameters,
                                    description="started by `fraud ingest --trigger`")]


def serve(cron: str = DEFAULT_CRON, parameters: dict | None = None) -> None:
    """Serve both deployments in this process, one flow run at a time, until interrupted
    (the deployments stay active when it stops)."""
    from prefect import serve as prefect_serve

    check_server()
    ensure_concurrency_limit()
    prefect_serve(*deployments(cron, parameters), limit=1, pause_on_shutdown=False)


def trigger_on_ingest(store: str, parameters: dict | None = None) -> str:
    """Start a run of the on-ingest deployment without waiting; its flow run id."""
    check_server()
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    try:
        run = run_deployment(f"{FLOW_NAME}/{ON_INGEST}", parameters={"store_dir": store, **(parameters or {})},
                             timeout=0, as_subflow=False)
    except ObjectNotFound:
        raise OrchestrationError(f"the Prefect server at {api_url()} has no deployment {FLOW_NAME}/{ON_INGEST}: "
                                 "start `make schedule` (or `python -m fraudlib.flow serve`) first") from None
    return str(run.id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fraudlib.flow", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("schedule", help="start a local Prefect server (loopback, under <runs>/prefect) and serve")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--cron", default=DEFAULT_CRON)
    p = sub.add_parser("serve", help="serve the deployments on the server at $PREFECT_API_URL")
    p.add_argument("--cron", default=DEFAULT_CRON)
    p.add_argument("--parameters", type=json.loads, default=None,
                   help='default flow parameters as JSON, e.g. \'{"parameters": {"num_epochs": 4}}\'')
    p = sub.add_parser("deploy", help="register the deployments for a work pool (split machines: the GPU host's worker runs them)")
    p.add_argument("--pool", required=True)
    p.add_argument("--cron", default=DEFAULT_CRON)
    args = parser.parse_args(argv)
    try:
        if args.command == "schedule":
            env = local_environment(args.port)
            server = start_server(env, settings.runs_root() / "prefect" / "server.log")
            print(f"Prefect server on {env['PREFECT_API_URL']} (UI http://127.0.0.1:{args.port}); "
                  f"home {env['PREFECT_HOME']}; serving {FLOW_NAME}/{MONTHLY} ({args.cron}) and "
                  f"{FLOW_NAME}/{ON_INGEST}; Ctrl-C stops both")
            # Serving in a child process: Prefect reads its settings when imported, before this
            # process knew the server's environment.
            serving = subprocess.Popen([sys.executable, "-m", "fraudlib.flow", "serve", "--cron", args.cron],
                                       env={**os.environ, **env}, start_new_session=True)
            # Ctrl-C: `serve` stops on SIGTERM (it ignores SIGINT), leaving the deployments active.
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, lambda *_: serving.terminate())
            try:
                return serving.wait()
            finally:
                for process in (serving, server):
                    stop_group(process)
        elif args.command == "serve":
            serve(args.cron, args.parameters)
        else:
            deploy_to_pool(args.pool, args.cron)
    except OrchestrationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130
    return 0


def deploy_to_pool(pool: str, cron: str = DEFAULT_CRON) -> None:
    """Register both deployments for work pool ``pool`` (a ``process`` pool on the GPU host,
    whose worker runs them from this checkout's path there)."""
    check_server()
    ensure_concurrency_limit()
    source = lifecycle.from_source(str(settings.project_root()), entrypoint="fraudlib/flow.py:lifecycle")
    for name, schedule in ((MONTHLY, cron), (ON_INGEST, None)):
        source.deploy(name, work_pool_name=pool, cron=schedule, concurrency_limit=1, build=False, push=False)


if __name__ == "__main__":
    sys.exit(main())
