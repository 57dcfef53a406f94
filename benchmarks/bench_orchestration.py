"""Orchestration overhead (docs/benchmarks.md): a lifecycle through Prefect (the on-ingest
deployment on a real local server, served as `make schedule` serves it) against the bare runner
running the same runs (the monitor run, then the four stages).

    .venv/bin/python benchmarks/bench_orchestration.py [--repeat 3]

The stage notebooks are tiny stand-ins (a parameters cell and a glue each), so the difference
is what Prefect adds: pickup of the triggered run, the flow's process, task and state updates.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat

from fraudlib import flow, settings, store, synthetic

ROOT = Path(__file__).resolve().parent.parent
STAGES = {
    "01_preprocess": 'raw_path: str = ""  # x\nas_of: str = ""  # x\ntrain_months: int = 12  # x\n'
                     'val_months: int = 1  # x\ntest_months: int = 1  # x\n',
    "02_train": 'graph_dir: str = ""  # x\n',
    "03_evaluate": 'model_dir: str = ""  # x\n',
    "04_deploy": 'decision: str = ""  # x\n',
    "05_monitor": 'store_dir: str = ""  # x\nmonth: str = ""  # x\nauprc_drop_alert: float = 0.1  # x\n'
                  'psi_alert: float = 0.2  # x\n',
}
GLUE = {"01_preprocess": "graph_dir", "02_train": "model_dir", "03_evaluate": "decision", "05_monitor": "alert"}


def notebooks(folder: Path) -> Path:
    folder.mkdir()
    for name, parameters in STAGES.items():
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        cell = nbformat.v4.new_code_cell(parameters + 'run_dir: str = ""  # x')
        cell.metadata["tags"] = ["parameters"]
        glue = f"import scrapbook as sb\nsb.glue({GLUE[name]!r}, '')" if name in GLUE else "pass"
        nb.cells = [cell, nbformat.v4.new_code_cell(glue)]
        nbformat.write(nb, folder / f"{name}.ipynb")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-orchestration-", dir=settings.runs_root()))
    processes = []
    try:
        nbs, runs, root = notebooks(work / "notebooks"), work / "runs", work / "store"
        raw = work / "raw.csv"
        synthetic.generate(raw, 30_000, seed=0)
        store.replay(raw, "2019-06", 1, root)
        window = {"raw_path": str(root), "as_of": "2019-07", "train_months": "12", "val_months": "1",
                  "test_months": "1"}
        monitor = {"store_dir": str(root), "month": "2019-06", "auprc_drop_alert": "0.1", "psi_alert": "0.2"}
        # The bare runner as a scheduler would start it (a cron job): a fresh Python process that
        # runs the monitor run, then the four stages; the flow's runs start cold too (serve starts a
        # process per flow run).
        bare = []
        for i in range(args.repeat):
            code = (f"from pathlib import Path; from fraudlib import runner, flow; "
                    f"runner.run_pipeline(Path({str(nbs)!r}), Path({str(runs)!r}), stages='monitor', "
                    f"assignments={monitor!r}, run_id='bare{i}-monitor', progress=False); "
                    f"runner.run_pipeline(Path({str(nbs)!r}), Path({str(runs)!r}), stages=flow.LIFECYCLE_STAGES, "
                    f"assignments={window!r}, run_id='bare{i}', progress=False)")
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
            bare.append(time.perf_counter() - started)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = flow.local_environment(port, work / "prefect") | {"PREFECT_UI_ENABLED": "false"}
        processes.append(flow.start_server(env, work / "server.log"))
        defaults = json.dumps({"notebooks_dir": str(nbs), "runs_dir": str(runs)})
        with open(work / "serve.log", "ab") as log:
            processes.append(subprocess.Popen([sys.executable, "-m", "fraudlib.flow", "serve", "--parameters", defaults],
                                              env={**os.environ, **env}, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        code = f"""
import json, sys, time
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from fraudlib import flow
with get_client(sync_client=True) as client:
    for _ in range(120):
        try:
            client.read_deployment_by_name(flow.FLOW_NAME + "/" + flow.ON_INGEST); break
        except Exception:
            time.sleep(0.5)
    walls = []
    for i in range({args.repeat + 1}):  # the first run warms the serve process
        started = time.perf_counter()
        run = run_deployment(flow.FLOW_NAME + "/" + flow.ON_INGEST, parameters={{"store_dir": {str(root)!r}}},
                             timeout=0, as_subflow=False)
        while not (state := client.read_flow_run(run.id).state).is_final():
            time.sleep(0.1)
        assert state.is_completed(), state.message
        walls.append(time.perf_counter() - started)
        fr = client.read_flow_run(run.id)
        print("pickup", (fr.start_time - fr.created).total_seconds(), "run", fr.total_run_time.total_seconds(),
              "end-to-end", walls[-1], file=sys.stderr)
print(json.dumps(walls[1:]))
"""
        done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, cwd=ROOT, capture_output=True,
                              text=True, timeout=1200)
        assert done.returncode == 0, done.stderr[-3000:]
        prefect = json.loads(done.stdout.strip().splitlines()[-1])
        print("\n".join(line for line in done.stderr.splitlines() if line.startswith("pickup")))
        print(f"bare runner, fresh process (monitor run + 4 stages): median {statistics.median(bare):.2f} s  {[round(b, 2) for b in bare]}")
        print(f"through Prefect (trigger -> completed): median {statistics.median(prefect):.2f} s  "
              f"{[round(p, 2) for p in prefect]}")
        print(f"overhead: {statistics.median(prefect) - statistics.median(bare):.2f} s")
    finally:
        # The serve process first (it hung > 60 s on SIGTERM once its server was gone), and
        # SIGKILL after a grace period: the figures are printed, the work folder must go.
        for p in reversed(processes):
            flow.stop_group(p)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
