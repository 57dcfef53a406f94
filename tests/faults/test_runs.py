"""Fault campaign, runs (issue 13, items 3, 11 and 12): runs started at once, relative paths,
an unwritable runs folder.

Real run_pipeline.py processes, real kernels, real files; tiny notebooks written here, except
the slow test, which runs the real pipeline twice at once."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from fraudlib import runner

ROOT = Path(__file__).resolve().parents[2]
PROBE = """\
import json, os
import scrapbook as sb
from ipykernel.connect import get_connection_file
info = json.loads(open(get_connection_file()).read())
sb.glue("kernel", {"ip": info["ip"], "transport": info["transport"],
                   "connection_file": os.path.abspath(get_connection_file()), "cwd": os.getcwd()})
"""


def notebook(path: Path, parameters: str, *code: str) -> Path:
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(parameters)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, *(nbformat.v4.new_code_cell(source) for source in code)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def probe_pipeline(directory: Path, seconds: float = 0.0) -> Path:
    """01_probe (glues where its kernel's connection and socket files are), 02_wait (sleeps)."""
    notebook(directory / "01_probe.ipynb", 'note: str = ""  # unused', PROBE)
    notebook(directory / "02_wait.ipynb",
             f'seconds: float = {seconds}  # how long to sleep\npid_file: str = ""  # where to write the pid',
             "import os, time\nif pid_file:\n    open(pid_file, 'w').write(str(os.getpid()))\ntime.sleep(seconds)")
    return directory


def environment(runs: Path) -> dict[str, str]:
    env = {**os.environ, "FRAUD_RUNS_DIR": str(runs), "MLFLOW_DISABLE_TELEMETRY": "true"}
    for name in ("MLFLOW_TRACKING_URI", "TRITON_URL", "TRITON_MODEL_REPO"):
        env.pop(name, None)
    return env


def start_runner(args: list[str], runs: Path, cwd: Path = ROOT) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "run_pipeline.py"), "--no-progress", *args],
                            cwd=cwd, env=environment(runs), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def record(runs: Path, run_id: str) -> dict:
    return json.loads((runs / run_id / "run.json").read_text())


def sockets_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_socket() or "ipc" in p.name)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    for name, value in environment(tmp_path / "runs").items():
        monkeypatch.setenv(name, value)
    for name in ("MLFLOW_TRACKING_URI", "TRITON_URL", "TRITON_MODEL_REPO"):
        monkeypatch.delenv(name, raising=False)


# --- item 3: kernel connection and socket files -------------------------------------------------


def test_stage_kernels_keep_their_socket_files_out_of_the_notebooks_folder_and_clean_up(tmp_path):
    notebooks = probe_pipeline(tmp_path / "notebooks")

    result = runner.run_pipeline(notebooks, tmp_path / "runs", run_id="one", progress=False)

    assert result.status == runner.SUCCEEDED, result.record
    kernel = result.record["stages"][0]["outputs"]["kernel"]
    assert kernel["transport"] == "ipc"
    assert Path(kernel["cwd"]) == notebooks.resolve()  # the kernel still works where the notebook is
    sockets = Path(kernel["ip"])
    assert sockets.is_absolute() and notebooks.resolve() not in sockets.parents, kernel
    assert Path(kernel["connection_file"]).parent == sockets.parent  # one private folder per kernel
    assert not sockets.parent.exists()  # removed with the kernel
    assert sorted(p.name for p in notebooks.iterdir()) == ["01_probe.ipynb", "02_wait.ipynb"]


def test_two_runners_started_at_once_on_the_same_notebooks_both_succeed(tmp_path):
    notebooks = probe_pipeline(tmp_path / "notebooks", seconds=2)
    runs = tmp_path / "runs"

    runners = [start_runner(["--notebooks-dir", str(notebooks), "--run-id", f"run{i}"], runs) for i in (1, 2)]
    outputs = [p.communicate(timeout=300)[0] for p in runners]

    assert [p.returncode for p in runners] == [0, 0], outputs
    kernels = [record(runs, f"run{i}")["stages"][0]["outputs"]["kernel"] for i in (1, 2)]
    assert kernels[0]["ip"] != kernels[1]["ip"]  # no shared socket names
    assert sockets_in(notebooks) == []


def test_stale_kernel_sockets_left_in_the_notebooks_folder_are_removed(tmp_path):
    notebooks = probe_pipeline(tmp_path / "notebooks")
    stale = notebooks / "kernel-ipc-3"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(stale))
    listener.close()  # the socket file stays, no process listens: what a killed kernel leaves

    result = runner.run_pipeline(notebooks, tmp_path / "runs", run_id="one", progress=False)

    assert result.status == runner.SUCCEEDED
    assert not stale.exists()


def test_runtime_folder_of_a_killed_runner_is_removed_by_the_next_run(tmp_path):
    notebooks = probe_pipeline(tmp_path / "notebooks", seconds=120)
    runs = tmp_path / "runs"
    pid_file = tmp_path / "kernel.pid"
    killed = start_runner(["--notebooks-dir", str(notebooks), "--run-id", "killed", "-p", f"pid_file={pid_file}"],
                          runs)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until stage 2 (the sleeping one) runs
        stages = record(runs, "killed")["stages"] if (runs / "killed" / "run.json").exists() else []
        if stages and stages[1]["status"] == "running":
            break
        time.sleep(0.2)
    else:
        killed.kill()
        pytest.fail("stage 2 of the run to kill never started: " + killed.communicate()[0])
    while not pid_file.exists() and time.monotonic() < deadline:  # the kernel of stage 2 is up
        time.sleep(0.2)
    folders = runner.kernel_runtime_folders(killed.pid)
    killed.kill()
    killed.wait()
    try:
        os.kill(int(pid_file.read_text()), 9)  # the orphaned kernel, as a kill -9 of the group would
    except (OSError, ValueError):
        pass
    assert folders, "the runner's kernel runtime folder was not found while it ran"

    result = runner.run_pipeline(notebooks, runs, stages="1", run_id="next", progress=False)

    assert result.status == runner.SUCCEEDED
    assert not any(folder.exists() for folder in folders)


# --- item 3, whole pipeline -----------------------------------------------------------------------

SMALL = ["-p", "synthetic_rows=200000", "-p", "num_epochs=2", "-p", "bootstrap_samples=50",
         "-p", "num_boost_round=8"]


def registry_state(runs: Path) -> dict:
    code = ("import json; from fraudlib import registry; c = registry.champion(); "
            "print(json.dumps({'champion': c and c.version, 'triton': c and c.triton_version, "
            "'versions': [[v.version, sorted(v.aliases)] for v in registry.versions()]}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environment(runs), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_two_whole_pipelines_started_at_once_both_finish_with_one_champion(tmp_path):
    runs = tmp_path / "runs"
    notebooks = ROOT / "notebooks"
    before = sockets_in(notebooks)

    started = time.monotonic()
    runners = [start_runner([*SMALL, "--run-id", f"run{i}"], runs) for i in (1, 2)]
    outputs = [p.communicate(timeout=1800)[0] for p in runners]
    wall = time.monotonic() - started

    records = [record(runs, f"run{i}") for i in (1, 2)]
    errors = [f"{r['run_id']} {s['name']}: {s['error']}" for r in records for s in r["stages"] if s["error"]]
    assert [p.returncode for p in runners] == [0, 0], errors or [o[-3000:] for o in outputs]
    assert all(r["status"] == "succeeded" for r in records)
    outputs_by_run = [{s["name"]: s["outputs"] for s in r["stages"]} for r in records]
    state = registry_state(runs)
    champions = [v for v, aliases in state["versions"] if "champion" in aliases]
    assert champions == [state["champion"]] and state["triton"] == state["champion"], state
    assert sockets_in(notebooks) == before  # no kernel files added next to the notebooks
    assert not runner.kernel_runtime_folders(runners[0].pid) and not runner.kernel_runtime_folders(runners[1].pid)
    # the repository lock serialised the two promotions: the deploy stages did not overlap
    deploys = sorted((s["start"], s["end"]) for r in records for s in r["stages"] if s["name"] == "deploy")
    print(f"two pipelines at once: {wall:.0f} s wall; decisions "
          f"{[o['evaluate'].get('decision') for o in outputs_by_run]}; deploys {deploys}; registry {state}")


# --- item 11: relative path parameters ----------------------------------------------------------

READ_PATHS = """\
import os
import scrapbook as sb
sb.glue("seen", {"raw_path": raw_path, "raw_text": open(raw_path).read() if raw_path else None,
                 "output_dir": output_dir, "greeting": greeting, "cwd": os.getcwd()})
if output_dir:
    os.makedirs(output_dir, exist_ok=True)
    open(os.path.join(output_dir, "written.txt"), "w").write("here")
"""


def paths_pipeline(directory: Path) -> Path:
    notebook(directory / "01_paths.ipynb",
             'raw_path: str = ""  # input file\noutput_dir: str = ""  # where to write\n'
             'greeting: str = "hi"  # not a path', READ_PATHS)
    return directory


def test_relative_path_parameters_are_resolved_against_the_callers_directory(tmp_path):
    notebooks = paths_pipeline(tmp_path / "notebooks")
    caller = tmp_path / "caller"
    (caller / "data").mkdir(parents=True)
    (caller / "data" / "in.csv").write_text("the caller's file")
    runs = tmp_path / "runs"

    done = start_runner(["--notebooks-dir", str(notebooks), "--run-id", "rel", "-p", "raw_path=data/in.csv",
                         "-p", "output_dir=out", "-p", "greeting=data/in.csv"], runs, cwd=caller)
    output = done.communicate(timeout=300)[0]

    assert done.returncode == 0, output
    stage = record(runs, "rel")["stages"][0]
    seen = stage["outputs"]["seen"]
    assert seen["raw_text"] == "the caller's file"
    assert seen["raw_path"] == str(caller / "data" / "in.csv")  # absolute, as recorded
    assert (caller / "out" / "written.txt").is_file() and not (notebooks / "out").exists()
    assert seen["greeting"] == "data/in.csv"  # only path parameters (*_path, *_dir, *_file) change
    assert stage["requested"]["raw_path"] == stage["parameters"]["raw_path"] == str(caller / "data" / "in.csv")
    assert stage["requested"]["output_dir"] == str(caller / "out")
    assert record(runs, "rel")["cwd"] == str(caller)


def test_relative_paths_in_a_parameter_file_are_resolved_against_the_callers_directory(tmp_path):
    notebooks = paths_pipeline(tmp_path / "notebooks")
    caller = tmp_path / "caller"
    caller.mkdir()
    (caller / "in.csv").write_text("from -f")
    (caller / "params.yaml").write_text("raw_path: in.csv\npaths:\n  output_dir: ./out\n")

    result_dir = tmp_path / "runs"
    done = start_runner(["--notebooks-dir", str(notebooks), "--run-id", "f", "-f", "params.yaml"], result_dir,
                        cwd=caller)
    output = done.communicate(timeout=300)[0]

    assert done.returncode == 0, output
    seen = record(result_dir, "f")["stages"][0]["outputs"]["seen"]
    assert seen["raw_text"] == "from -f" and seen["output_dir"] == str(caller / "out")


def test_a_relative_raw_path_reaches_the_real_preprocess_stage_as_the_callers_file(tmp_path):
    from fraudlib import synthetic

    caller = tmp_path / "caller"
    caller.mkdir()
    synthetic.generate(caller / "raw.csv", 20_000, seed=0)
    runs = tmp_path / "runs"

    done = start_runner(["--stages", "preprocess", "--run-id", "pre", "-p", "raw_path=raw.csv",
                         "-p", "use_gpu=false"], runs, cwd=caller)
    output = done.communicate(timeout=600)[0]

    assert done.returncode == 0, output
    stage = record(runs, "pre")["stages"][0]
    assert stage["parameters"]["raw_path"] == str(caller / "raw.csv")


# --- item 12: a runs folder that cannot be written ------------------------------------------------
#
# The test process may run as root, where chmod stops nothing: each way of making a folder
# unwritable is tried where it works here, and the one that always works (a runs folder whose
# parent is a regular file) runs everywhere.


def _chattr(flag: str, path: Path) -> bool:
    return shutil.which("chattr") is not None and subprocess.run(
        ["chattr", flag, str(path)], capture_output=True).returncode == 0


def _unshare_works() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "true"], capture_output=True).returncode == 0


def unwritable_runs(how: str, tmp_path: Path):
    """(runs folder, command prefix, cleanup) for one way of making the runs folder unwritable."""
    runs = tmp_path / "runs"
    if how == "parent-is-a-file":
        (tmp_path / "afile").write_text("not a folder")
        return tmp_path / "afile" / "runs", [], lambda: None
    runs.mkdir()
    if how == "immutable":  # chattr +i: refused even to root (EPERM)
        if not _chattr("+i", runs):
            pytest.skip("chattr +i does not work here")
        return runs, [], lambda: _chattr("-i", runs)
    if how == "read-only-mount":  # a read-only bind mount in a private mount namespace (EROFS)
        if not _unshare_works():
            pytest.skip("unshare -rm (user and mount namespaces) is not permitted here")
        return runs, ["unshare", "-rm", "sh", "-c", f'mount --bind -o ro "{runs}" "{runs}" && exec "$@"', "sh"], \
            lambda: None
    if how == "chmod":
        if os.geteuid() == 0:
            pytest.skip("chmod does not stop root from writing")
        runs.chmod(0o555)
        return runs, [], lambda: runs.chmod(0o755)
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["parent-is-a-file", "immutable", "read-only-mount", "chmod"])
def test_unwritable_runs_folder_is_named_before_any_stage_runs(tmp_path, how):
    notebooks = probe_pipeline(tmp_path / "notebooks")
    runs, prefix, cleanup = unwritable_runs(how, tmp_path)
    try:
        done = subprocess.run(
            [*prefix, sys.executable, str(ROOT / "run_pipeline.py"), "--notebooks-dir", str(notebooks),
             "--no-progress"], cwd=ROOT, env=environment(runs), capture_output=True, text=True, timeout=300)
    finally:
        cleanup()

    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert f"runs folder {runs} is not writable" in done.stderr, done.stderr
    assert "nothing was run" in done.stderr
    assert "01_probe" not in done.stdout + done.stderr  # no stage started
    if how == "parent-is-a-file":
        assert f"{tmp_path / 'afile'} is a file, not a folder" in done.stderr


def test_unwritable_triton_repository_under_the_runs_folder_is_named_before_any_stage_runs(tmp_path):
    notebooks = probe_pipeline(tmp_path / "notebooks")
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "triton_repository").write_text("a file where the model repository should be")

    done = start_runner(["--notebooks-dir", str(notebooks)], runs)
    output = done.communicate(timeout=300)[0]

    assert done.returncode == 2, output
    assert f"{runs / 'triton_repository'} is not writable" in output and "Traceback" not in output


def test_resume_into_an_unwritable_run_folder_is_named_before_any_stage_runs(tmp_path):
    notebooks = probe_pipeline(tmp_path / "notebooks")
    notebook(notebooks / "03_fail.ipynb", 'note: str = ""  # unused', "raise RuntimeError('deliberate')")
    runs = tmp_path / "runs"
    assert runner.run_pipeline(notebooks, runs, run_id="r", progress=False).status == runner.FAILED
    if not _chattr("+i", runs / "r"):
        pytest.skip("chattr +i does not work here")
    try:
        done = subprocess.run([sys.executable, str(ROOT / "run_pipeline.py"), "--resume", "r", "--no-progress"],
                              cwd=ROOT, env=environment(runs), capture_output=True, text=True, timeout=300)
    finally:
        _chattr("-i", runs / "r")

    assert done.returncode == 2, done.stdout + done.stderr
    assert f"folder of run r {runs / 'r'} is not writable" in done.stderr and "Traceback" not in done.stderr
    assert runner.read_record(runs / "r")["stages"][2]["status"] == "failed"  # untouched


def test_two_runners_creating_the_mlflow_store_at_once_create_it_once(tmp_path):
    """What failed the second of two whole pipelines started at once on a fresh runs folder:
    both kernels ran MLflow's schema migrations on the new mlflow.db (CircularDependencyError)."""
    code = "from fraudlib import runner; print(runner.initialise_embedded_mlflow_store())"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=environment(tmp_path / "runs"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    done = [p.communicate(timeout=300) for p in procs]

    assert [p.returncode for p in procs] == [0, 0], done
    assert sorted(out.strip().splitlines()[-1] for out, _ in done) == ["False", "True"]
