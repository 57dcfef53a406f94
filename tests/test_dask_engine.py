"""The dask preprocess engine (fraudlib.dask_engine): the same graph directory as pandas, the
reader's errors, and where it runs (a local cluster, an existing one, an unreachable one).
Real Dask processes throughout: a LocalCluster, and a `dask scheduler` with two `dask worker`s."""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest

from fraudlib import dask_engine, flow, store, synthetic, tabformer
from fraudlib.preprocess import USED_COLUMNS, preprocess
from fraudlib.stages import preprocess as stage
from fraudlib.tabformer import TabFormerFormatError, read_transactions
from test_flow import free_port

DASK = Path(sys.executable).parent / "dask"
NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.fixture(scope="module")
def cluster_address():
    """A LocalCluster of two worker processes, shared by the tests that only need some cluster."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def pandas_graph(synthetic_csv, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pandas") / "graph"
    preprocess(synthetic_csv, out)
    return out


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_dask_engine_writes_the_same_graph_directory_as_pandas(synthetic_csv, pandas_graph, cluster_address,
                                                                   tmp_path):
    summary = preprocess(synthetic_csv, tmp_path / "graph", engine="dask", scheduler_address=cluster_address)

    assert summary.engine == "dask"
    assert files_of(tmp_path / "graph") == files_of(pandas_graph)


def test_causal_features_by_card_and_by_merchant_partitions_give_the_same_graph(
        synthetic_csv, pandas_graph, cluster_address, monkeypatch, tmp_path):
    monkeypatch.setattr(dask_engine, "FEATURE_PARTITION_ROWS", 20_000)  # 30,000 rows: partitioned,
    monkeypatch.setattr(dask_engine, "FEATURE_TASK_ROWS", 7_000)  # in 5 partitions per side (3 in flight)

    preprocess(synthetic_csv, tmp_path / "graph", engine="dask", scheduler_address=cluster_address)

    assert files_of(tmp_path / "graph") == files_of(pandas_graph)


def test_blocks_of_a_file_read_as_the_whole_file(synthetic_csv, write_tabformer):
    # A first block without Errors? or Zip values (online rows): those columns have no categories there.
    lines = ["0,0,2010,1,1,10:00,$1.00,Online Transaction,11,ONLINE,,,5411,,No"] * 3000
    lines += synthetic_csv.read_text().splitlines()[1:3000]
    path = write_tabformer(lines)
    columns = tabformer.check(path, USED_COLUMNS)

    parts = [tabformer.read_block(path, start, end, columns)
             for start, end in tabformer.blocks(path, 64 << 10)]

    assert len(parts) > 3 and len(parts[0]) and parts[0]["Errors?"].isna().all()
    pd.testing.assert_frame_equal(tabformer.concat(parts), read_transactions(path, USED_COLUMNS))


def test_a_glob_of_files_is_read_as_one_file_by_both_engines(synthetic_csv, pandas_graph, cluster_address, tmp_path):
    header, *rows = synthetic_csv.read_text().splitlines()
    for i, piece in enumerate((rows[:7000], rows[7000:19000], rows[19000:])):
        (tmp_path / f"part-{i}.csv").write_text("\n".join([header, *piece]) + "\n")

    preprocess(tmp_path / "part-*.csv", tmp_path / "pandas")
    preprocess(tmp_path / "part-*.csv", tmp_path / "dask", engine="dask", scheduler_address=cluster_address)

    assert files_of(tmp_path / "dask") == files_of(tmp_path / "pandas")
    whole, parts = files_of(pandas_graph), files_of(tmp_path / "pandas")
    assert {k: v for k, v in parts.items() if k != "manifest.json"} == \
        {k: v for k, v in whole.items() if k != "manifest.json"}
    source = pd.read_json(tmp_path / "pandas" / "manifest.json", typ="series")["source"]
    assert source["files"] == ["part-0.csv", "part-1.csv", "part-2.csv"]


def test_a_file_whose_name_looks_like_a_glob_is_read_as_itself(synthetic_csv, tmp_path):
    raw = tmp_path / "transactions[2019].csv"
    raw.write_bytes(synthetic_csv.read_bytes())
    (tmp_path / "transactions2.csv").write_text("not a TabFormer file\n")  # what the pattern would match

    assert preprocess(raw, tmp_path / "graph", feature_set="blueprint").rows == 30_000
    with pytest.raises(FileNotFoundError, match="matches no file"):
        preprocess(tmp_path / "nothing-*.csv", tmp_path / "graph")


def test_in_a_glob_the_first_file_with_a_bad_row_is_named_as_pandas_names_it(synthetic_csv, cluster_address,
                                                                             tmp_path):
    header, *rows = synthetic_csv.read_text().splitlines()
    pieces = [rows[:10000], rows[10000:20000], rows[20000:]]
    pieces[1][5000] = pieces[1][5000].replace("$", "$x", 1)
    pieces[2][10] = pieces[2][10].rsplit(",", 1)[0]
    for i, piece in enumerate(pieces):
        (tmp_path / f"part-{i}.csv").write_text("\n".join([header, *piece]) + "\n")

    with pytest.raises(TabFormerFormatError) as pandas_error:
        preprocess(tmp_path / "part-*.csv", tmp_path / "graph")
    with pytest.raises(TabFormerFormatError) as dask_error:
        preprocess(tmp_path / "part-*.csv", tmp_path / "graph", engine="dask", scheduler_address=cluster_address)

    assert str(dask_error.value) == str(pandas_error.value)
    assert "part-1.csv, line 5002, column 'Amount'" in str(dask_error.value)


@pytest.mark.parametrize("name", ["card_transaction.v1.csv.gz", "transactions.tgz"])
def test_a_compressed_file_is_one_task_and_gives_the_pandas_graph(synthetic_csv, cluster_address, tmp_path, name):
    raw = tmp_path / name
    if name.endswith(".tgz"):
        with tarfile.open(raw, "w:gz") as archive:
            archive.add(synthetic_csv, arcname="card_transaction.v1.csv")
    else:
        raw.write_bytes(gzip.compress(synthetic_csv.read_bytes()))

    preprocess(raw, tmp_path / "pandas", feature_set="blueprint")
    preprocess(raw, tmp_path / "dask", feature_set="blueprint", engine="dask", scheduler_address=cluster_address)

    assert files_of(tmp_path / "dask") == files_of(tmp_path / "pandas")


def test_the_store_is_read_in_runs_of_months_per_task_into_the_same_graph(synthetic_csv, cluster_address, tmp_path,
                                                                          monkeypatch):
    store.ingest(synthetic_csv, tmp_path / "store", all_months=True)
    monkeypatch.setattr(dask_engine, "STORE_TASK_ROWS", 2_000)  # ~15 tasks of several months each
    windows = {"as_of": "2020-01", "train_months": 36, "val_months": 12, "test_months": 12}  # each with fraud

    preprocess(tmp_path / "store", tmp_path / "pandas", **windows)
    preprocess(tmp_path / "store", tmp_path / "dask", **windows, engine="dask",
               scheduler_address=cluster_address)

    assert files_of(tmp_path / "dask") == files_of(tmp_path / "pandas")


@pytest.mark.parametrize("damage", [
    lambda line: line.replace("$", "$x", 1),  # a value the reader refuses (Amount)
    lambda line: line.rsplit(",", 1)[0],  # a field short: pyarrow cannot parse the row
    lambda line: line.replace("Transaction", "").replace(",Chip ,", ",,").replace(",Swipe ,", ",,")
                     .replace(",Online ,", ",,"),  # an empty required value (Use Chip)
], ids=["bad-value", "short-row", "empty-value"])
def test_a_malformed_row_deep_in_the_file_is_named_by_file_and_line_as_pandas_does(
        synthetic_csv, write_tabformer, cluster_address, tmp_path, damage):
    lines = synthetic_csv.read_text().splitlines()[1:]
    lines[24_998] = damage(lines[24_998])  # line 25,000 of the file, in its last block
    path = write_tabformer(lines)

    with pytest.raises(TabFormerFormatError) as pandas_error:
        preprocess(path, tmp_path / "graph")
    with pytest.raises(TabFormerFormatError) as dask_error:
        preprocess(path, tmp_path / "graph", engine="dask", scheduler_address=cluster_address)

    assert str(dask_error.value) == str(pandas_error.value)
    assert "line 25000" in str(dask_error.value)
    assert not (tmp_path / "graph").exists()


def test_the_reader_error_keeps_its_facts_across_processes(synthetic_csv):
    error = TabFormerFormatError(synthetic_csv, 7, "Amount", "$x", "not an amount")

    again = pickle.loads(pickle.dumps(error))

    assert str(again) == str(error) and (again.line, again.column, again.value) == (7, "Amount", "$x")
    assert again.shifted(100).line == 107 and "line 107" in str(again.shifted(100))


def test_an_unreachable_scheduler_is_a_clear_error_before_any_work(monkeypatch, tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("FRAUD_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv(dask_engine.ADDRESS_ENV, address)

    with pytest.raises(dask_engine.ClusterError, match="cannot reach the Dask scheduler at 'tcp://127.0.0.1"):
        stage.run(stage.Params(engine="dask", synthetic_rows=5_000, run_dir=str(tmp_path / "runs" / "run-1")))

    assert not (tmp_path / "runs" / "data").exists()  # the default data was not even generated
    assert not (tmp_path / "runs" / "run-1" / "graph").exists()


def test_engine_auto_takes_dask_only_above_the_threshold(synthetic_csv, tmp_path):
    assert dask_engine.choose_engine("auto", dask_engine.AUTO_DASK_ROWS + 1) == "dask"
    assert dask_engine.choose_engine("auto", dask_engine.AUTO_DASK_ROWS) == "pandas"
    assert stage.ENGINES == dask_engine.ENGINES
    engine_help = next(f for f in dataclasses.fields(stage.Params) if f.name == "engine").metadata["help"]
    assert f"{dask_engine.AUTO_DASK_ROWS:,}" in engine_help
    with pytest.raises(ValueError, match="engine must be one of"):
        preprocess(synthetic_csv, tmp_path / "graph", engine="spark")

    assert preprocess(synthetic_csv, tmp_path / "graph", engine="auto").engine == "pandas"  # 30,000 rows


def test_the_default_cluster_is_local_sized_to_the_machine_and_spills_under_the_runs_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("FRAUD_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv(dask_engine.ADDRESS_ENV, raising=False)

    with dask_engine.cluster() as cluster:
        workers = cluster.client.scheduler_info()["workers"].values()

        assert len(workers) == len(os.sched_getaffinity(0))
        assert all(w["nthreads"] == 1 for w in workers)
        assert sum(w["memory_limit"] for w in workers) <= dask_engine._total_memory() * dask_engine.MEMORY_SHARE
        assert all(w["local_directory"].startswith(str(tmp_path / "runs" / "dask")) for w in workers)
        assert cluster.dashboard.startswith("http://127.0.0.1:") and cluster.address.startswith("tcp://127.0.0.1:")


@contextmanager
def dask_processes(tmp_path: Path, workers: int = 2):
    """A `dask scheduler` and ``workers`` `dask worker` processes on loopback: (address, the
    workers' Popen objects), all of them ready; stopped with SIGTERM, then SIGKILL, on exit."""
    address = f"tcp://127.0.0.1:{free_port()}"
    processes = []
    try:
        processes.append(subprocess.Popen(
            [str(DASK), "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
             "--dashboard-address", "127.0.0.1:0"],
            cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for i in range(workers):
            processes.append(subprocess.Popen(
                [str(DASK), "worker", address, "--nthreads", "1", "--nworkers", "1", "--host", "127.0.0.1",
                 "--no-dashboard", "--memory-limit", "2GiB", "--local-directory", str(tmp_path / f"worker-{i}")],
                cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 60
        while True:  # the scheduler listening (connect refuses a port nobody listens on at once)
            try:
                socket.create_connection(("127.0.0.1", int(address.rsplit(":", 1)[1])), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "dask scheduler did not start listening in 60 s"
                time.sleep(0.2)
        from distributed import Client

        with Client(address, timeout=60, set_as_default=False) as client:  # not dask_engine's own wait: a
            client.wait_for_workers(workers, timeout=120)  # test may shorten it, and workers start slowly
        yield address, processes[1:]
    finally:
        for process in reversed(processes):
            flow.stop_group(process, grace=10.0)


def test_the_stage_runs_on_a_dask_scheduler_and_two_worker_processes(synthetic_csv, pandas_graph, monkeypatch,
                                                                     tmp_path):
    monkeypatch.setenv("FRAUD_RUNS_DIR", str(tmp_path / "runs"))
    with dask_processes(tmp_path) as (address, _):
        outputs = stage.run(stage.Params(raw_path=str(synthetic_csv), engine="dask", scheduler_address=address,
                                         graph_dir=str(tmp_path / "graph"), run_dir=str(tmp_path / "runs" / "run-1")))

    assert files_of(tmp_path / "graph") == files_of(pandas_graph)
    assert outputs.engine == "dask" and outputs.dask_dashboard.startswith("http://127.0.0.1:")
    assert f"dask on an existing cluster at {address}, 2 workers (Dask dashboard: {outputs.dask_dashboard})" \
        in outputs.summary


def kill_when_busy(address: str, worker: subprocess.Popen) -> tuple[threading.Thread, threading.Event]:
    """A thread that SIGKILLs ``worker``'s process group (nanny and worker) as soon as any
    worker of the cluster parses a block; the event says it did."""
    killed, watching = threading.Event(), threading.Event()

    def watch() -> None:
        from distributed import Client

        with Client(address, set_as_default=False) as client:
            watching.set()
            while not killed.is_set():
                if any("read_block" in key for keys in client.processing().values() for key in keys):
                    os.killpg(worker.pid, signal.SIGKILL)  # which worker is busy does not matter
                    killed.set()
                time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    assert watching.wait(timeout=60), "the watching client did not connect"
    return thread, killed


@pytest.fixture(scope="module")
def large_csv(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("large") / "card_transaction.v1.csv"
    synthetic.generate(raw, 400_000, seed=1)  # blocks that take a while to parse
    return raw


def test_a_worker_killed_mid_run_leaves_its_blocks_to_the_other_and_the_graph_whole(large_csv, tmp_path):
    expected = preprocess(large_csv, tmp_path / "pandas", feature_set="blueprint").manifest_hash
    with dask_processes(tmp_path) as (address, workers):
        watcher, killed = kill_when_busy(address, workers[0])
        summary = preprocess(large_csv, tmp_path / "dask", feature_set="blueprint", engine="dask",
                             scheduler_address=address)
        watcher.join(timeout=5)

    assert killed.is_set() and workers[0].poll() is not None
    assert summary.manifest_hash == expected
    assert files_of(tmp_path / "dask") == files_of(tmp_path / "pandas")


def test_a_cluster_left_without_workers_mid_run_is_a_clear_error_and_nothing_is_written(large_csv, monkeypatch,
                                                                                        tmp_path):
    monkeypatch.setattr(dask_engine, "WORKER_WAIT_S", 3)
    with dask_processes(tmp_path, workers=1) as (address, workers):
        watcher, killed = kill_when_busy(address, workers[0])
        with pytest.raises(dask_engine.ClusterError, match="has had no worker for 3 s"):
            preprocess(large_csv, tmp_path / "graph", engine="dask", scheduler_address=address)
        watcher.join(timeout=5)

    assert killed.is_set() and not (tmp_path / "graph").exists()


def test_notebook_01_runs_the_dask_engine_on_a_local_cluster_from_its_kernel(synthetic_csv, pandas_graph, monkeypatch,
                                                                             tmp_path):
    import nbformat
    import papermill as pm

    from fraudlib.runner import choose_kernel

    monkeypatch.setenv("FRAUD_RUNS_DIR", str(tmp_path / "runs"))  # the kernel, and its cluster's spill folder
    monkeypatch.delenv(dask_engine.ADDRESS_ENV, raising=False)
    executed = tmp_path / "01_preprocess.ipynb"

    pm.execute_notebook(str(NOTEBOOKS / "01_preprocess.ipynb"), str(executed), kernel_name=choose_kernel(),
                        parameters={"raw_path": str(synthetic_csv), "engine": "dask",
                                    "run_dir": str(tmp_path / "runs" / "run-1")}, progress_bar=False)

    summary = nbformat.read(executed, as_version=4).cells[0].outputs[0]["data"]["text/markdown"]
    assert "| engine | dask on a LocalCluster, " in summary and "(Dask dashboard: http://127.0.0.1:" in summary
    assert (tmp_path / "runs" / "dask").is_dir()
    assert files_of(tmp_path / "runs" / "run-1" / "graph") == files_of(pandas_graph)

