"""Preprocessing's dask engine: where it runs, and the input read in parallel partitions.

Where: a ``LocalCluster`` sized to this machine (one single-threaded worker process per core,
``MEMORY_SHARE`` of the memory split between them, spilling under ``<runs>/dask``; every
listener on loopback), or an existing cluster whose scheduler ``scheduler_address`` or
``$DASK_SCHEDULER_ADDRESS`` names. An existing cluster is reached, and must have a worker,
before any work starts; otherwise :class:`ClusterError` says so. Its workers read the input
by path: they must see the same files (a shared filesystem).

What: the input as the compact frame ``tabformer.read_transactions`` gives, equal to what the
pandas engine reads (same values, dtypes, categories in order of first appearance), so the
rest of preprocessing writes the same graph directory. A plain CSV is cut into line-aligned
blocks of ``BLOCK_BYTES`` that workers parse and validate with the one reader
(``tabformer.read_block``), holding one block's text at a time; a compressed file is one
task (a gzip stream cannot be cut); the Parquet store is one task per month. Errors are the
pandas engine's, naming the file and line: a block's error is placed in its file, and among
several the one the pandas engine meets first is raised (``_first_error``). The causal
features of a stream above ``FEATURE_PARTITION_ROWS`` rows are computed by the workers on
partitions by card and by merchant (``causal_features``), of at most ``FEATURE_TASK_ROWS``
rows, sent as workers free up; the rest of preprocessing runs in the calling process on the
frame it gathered. A task whose worker dies is retried by Dask on
another worker; when it cannot be, :class:`ClusterError` says so. Nothing is written here:
preprocessing writes its output only once it is complete.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import socket
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd

from fraudlib import features, settings, store, tabformer

ENGINES = ("pandas", "dask", "auto")
ADDRESS_ENV = "DASK_SCHEDULER_ADDRESS"
AUTO_DASK_ROWS = 50_000_000  # engine="auto" takes dask above this many (estimated) input rows
BLOCK_BYTES = 64 << 20  # CSV bytes per task: a worker holds one block's text and arrow table
MIN_BLOCK_BYTES = 256 << 10
MEMORY_SHARE = 0.5  # of this machine's memory for the local workers; the rest for the driver
CONNECT_TIMEOUT_S = 10
WORKER_WAIT_S = 30
FEATURE_PARTITION_ROWS = 32_000_000  # a stream above this many rows: causal features on the workers, partitioned
STORE_TASK_ROWS = 4_000_000  # store rows per read task, about (consecutive whole months)
FEATURE_TASK_ROWS = 8_000_000  # stream rows per causal-feature task, about (a task's memory follows its rows)

logger = logging.getLogger(__name__)


class ClusterError(RuntimeError):
    """The Dask cluster cannot be used (unreachable, no workers, workers dying); says which
    address and what to do. Raised before anything is written."""


@dataclass(frozen=True)
class Cluster:
    client: object  # distributed.Client
    address: str
    dashboard: str  # the dashboard's link ("" when the cluster serves none)
    description: str  # for the stage's summary


def choose_engine(engine: str, estimated_rows: int) -> str:
    """``engine``, with ``auto`` resolved by the input's size."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "auto":
        return "dask" if estimated_rows > AUTO_DASK_ROWS else "pandas"
    return engine


def address_of(scheduler_address: str = "") -> str:
    """The existing cluster asked for: the parameter, else ``$DASK_SCHEDULER_ADDRESS``; "" for a local one."""
    return scheduler_address or os.environ.get(ADDRESS_ENV, "")


@contextmanager
def cluster(scheduler_address: str = "") -> Iterator[Cluster]:
    """A client of the existing cluster (``address_of``) or of a new LocalCluster sized to
    this machine, closed (the local cluster stopped) on exit."""
    from distributed import Client, LocalCluster

    address = address_of(scheduler_address)
    if address:
        client = connect(address)
        description = f"an existing cluster at {address}, {len(client.scheduler_info()['workers'])} workers"
        local = None
    else:
        workers = len(os.sched_getaffinity(0))
        memory = int(_total_memory() * MEMORY_SHARE / workers)
        spill = settings.runs_root() / "dask"
        spill.mkdir(parents=True, exist_ok=True)
        try:
            local = LocalCluster(n_workers=workers, threads_per_worker=1, memory_limit=memory, processes=True,
                                 local_directory=str(spill), host="127.0.0.1", dashboard_address="127.0.0.1:0",
                                 silence_logs=logging.WARNING)
        except RuntimeError as error:
            raise ClusterError(
                f"could not start a local Dask cluster ({error}). Its workers are Python processes that import "
                "the main module: a script running preprocess with engine='dask' must guard its entry point "
                "with `if __name__ == \"__main__\":`; or point scheduler_address at a running cluster") from None
        client = Client(local, set_as_default=False)
        description = (f"a LocalCluster, {workers} workers x 1 thread, {memory / 2**30:.1f} GiB each, "
                       f"spill under {spill}")
    dashboard = client.dashboard_link or ""
    logger.info("Dask: %s; dashboard %s", description, dashboard or "none")
    try:
        yield Cluster(client, client.scheduler.address, dashboard, description)
    finally:
        client.close()
        if local is not None:
            local.close()


def connect(address: str):
    """A client of the scheduler at ``address`` with at least one worker, else ClusterError."""
    from distributed import Client

    hint = (f"start it (`dask scheduler`, then `dask worker {address}`), fix scheduler_address / "
            f"${ADDRESS_ENV}, or leave both empty for a local cluster; nothing was read or written")
    try:
        _probe(address)  # a refused port fails at once (a Client would retry until its timeout)
    except (OSError, ValueError, TypeError) as error:  # refused, timed out, not an address
        raise ClusterError(f"cannot reach the Dask scheduler at {address!r} ({error}); {hint}") from None
    try:
        client = Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except Exception as error:  # something else listens there (its bytes are no Dask message)
        raise ClusterError(f"no Dask scheduler answers at {address!r} ({type(error).__name__}: "
                           f"{str(error)[:200]}); {hint}") from None
    try:
        client.wait_for_workers(1, timeout=WORKER_WAIT_S)
    except (OSError, TimeoutError) as error:
        client.close()
        raise ClusterError(f"the Dask scheduler at {address!r} has no worker after {WORKER_WAIT_S} s ({error}); "
                           f"{hint}") from None
    return client


def _probe(address: str) -> None:
    """A TCP connection to a tcp:// or tls:// scheduler address (other schemes: the Client's
    own connect), so an unreachable one fails before a Client is made: a Client that never
    connected still tries to close when collected, and waits for it."""
    from distributed.comm.addressing import parse_address, parse_host_port

    scheme, location = parse_address(address)
    if scheme in ("tcp", "tls"):
        socket.create_connection(parse_host_port(location), timeout=CONNECT_TIMEOUT_S).close()


def read_files(cluster: Cluster, files: Sequence[Path], columns: Sequence[str]) -> pd.DataFrame:
    """The TabFormer files (in order) as one compact frame, parsed by the cluster's workers."""
    columns = [c for c in tabformer.COLUMNS if c in columns]
    plans = [_plan(cluster, Path(f), columns) for f in files]
    parts = []
    for path, file_columns, futures, error in plans:  # the first file's error first, as the pandas engine
        parts += _gather(cluster, path, file_columns, futures, error)
    return tabformer.concat(parts)


def read_store(cluster: Cluster, root: Path, columns: Sequence[str], before: str | None = None) -> pd.DataFrame:
    """The store's sealed months (before ``before``) as one compact frame, a task per run of
    consecutive months of about ``STORE_TASK_ROWS`` rows. At most two tasks per worker are in
    flight, and each result is fetched (and let go by its worker) in order: the workers never
    hold the whole store decoded (a task per month, all gathered at once, passed 11 GB at 100M)."""
    book = store.ledger(root)["months"]
    chosen = [m for m in sorted(book) if before is None or store.month_key(m) < store.month_key(before)]
    if not chosen:
        return store.read(root, columns, before=before)  # raises its StoreError
    runs, rows = [[]], 0
    for month in chosen:
        if runs[-1] and rows + book[month]["rows"] > STORE_TASK_ROWS:
            runs.append([])
            rows = 0
        runs[-1].append(month)
        rows += book[month]["rows"]
    parts, pending = [], deque()
    for run in runs:
        if len(pending) >= 2 * _workers(cluster):
            parts.append(_fetched(cluster, pending.popleft()))
        pending.append(cluster.client.submit(store.read, root, columns, since=run[0],
                                             before=store.month_text(store.month_key(run[-1]) + 1), pure=False))
    while pending:
        parts.append(_fetched(cluster, pending.popleft()))
    return tabformer.concat(parts)


def _fetched(cluster: Cluster, future) -> pd.DataFrame:
    part = _own_memory(results(cluster, [future])[0])
    future.release()
    trim_heap()  # the fetched copy's pages (a task's months: ~100 MB) back to the system
    return part


def trim_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere
    nothing): numpy's freed temporaries otherwise stay in the process's memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def causal_features(cluster: Cluster, stream: features.Stream, rows: np.ndarray,
                    label_delay_days: int) -> np.ndarray:
    """``features.compute(stream, rows, label_delay_days)``, by the workers on partitions of
    the stream: by card for the card and pair features, by merchant for the merchant ones.

    Each causal feature of a row reads only earlier rows of its card, its card-merchant pair
    or its merchant, and the amount statistics are exact integer sums, so a partition holding
    all rows of its cards (or merchants) gives the whole stream's values bit for bit (the
    tests compare the graph directories). Each task computes its side's features only
    (``features.compute(groupings=...)``: one sort and one sweep per task), with no worker
    sorting more than ``FEATURE_TASK_ROWS`` rows (about ``FEATURE_PARTITION_ROWS`` when that
    is smaller). A stream of at most ``FEATURE_PARTITION_ROWS`` rows is one pass here.
    """
    if len(stream) <= FEATURE_PARTITION_ROWS:
        return features.compute(stream, rows, label_delay_days)
    parts = -(-len(stream) // min(FEATURE_PARTITION_ROWS, FEATURE_TASK_ROWS))
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows), len(features.NAMES)), dtype=np.float32)
    # One partition per worker at a time, plus one cut ahead: a partition is cut (and sent) only
    # when a worker is free for it, so no worker holds more than two partitions and the driver
    # one (every partition sent at once held the whole stream twice over on the workers).
    pending = deque()
    for side, key in (("card", stream.card), ("merchant", stream.merchant)):
        part = _partition(key, parts)
        row_part = part[rows]
        for p in range(parts):
            if len(pending) > _workers(cluster):
                _collect(cluster, out, *pending.popleft())
            members = np.flatnonzero(part == p)
            mine = np.flatnonzero(row_part == p)
            # The partition and its query rows in one piece (rows in the task's graph make it large).
            [data] = cluster.client.scatter([(stream.take(members), np.searchsorted(members, rows[mine]))], hash=False)
            del members
            pending.append((mine, features.GROUPING_COLUMNS[side], data, cluster.client.submit(
                _feature_columns, data, label_delay_days, side, pure=False)))
        del part, row_part
    while pending:
        _collect(cluster, out, *pending.popleft())
    return out


def _partition(key: np.ndarray, parts: int) -> np.ndarray:
    """Each row's partition: a multiplicative hash of its key (wrapping is fine), computed in
    slices (no int64 temporary of the stream's length)."""
    out = np.empty(len(key), dtype=np.uint16 if parts <= 1 << 16 else np.int64)
    step = 1 << 22
    for start in range(0, len(key), step):
        out[start:start + step] = (key[start:start + step].astype(np.int64) * 2654435761) % parts
    return out


def _collect(cluster: Cluster, out: np.ndarray, mine: np.ndarray, columns: list[int], data, future) -> None:
    out[np.ix_(mine, columns)] = results(cluster, [future])[0]
    future.release()
    data.release()


def _feature_columns(data: tuple[features.Stream, np.ndarray], label_delay_days: int, side: str) -> np.ndarray:
    stream, rows = data
    return features.compute(stream, rows, label_delay_days, groupings=(side,))[:, features.GROUPING_COLUMNS[side]]


def _plan(cluster: Cluster, path: Path, columns: list[str]):
    """(path, its columns, [(block start or None for the whole file, future)], or the error
    the pandas engine raises before parsing it)."""
    try:
        columns = tabformer.check(path, columns)
    except tabformer.TabFormerFormatError as error:  # raised when its turn comes (file order)
        return path, columns, [], error
    submit = cluster.client.submit
    if not tabformer.splittable(path):
        return path, columns, [(None, submit(tabformer.read_transactions, path, columns, pure=False))], None
    size = max(MIN_BLOCK_BYTES, min(BLOCK_BYTES, path.stat().st_size // (2 * _workers(cluster)) + 1))
    ranges = tabformer.blocks(path, size)
    if not ranges:
        return path, columns, [], tabformer.no_rows_error(path)
    return path, columns, [(start, submit(tabformer.read_block, path, start, end, columns, pure=False))
                           for start, end in ranges], None


def _gather(cluster: Cluster, path: Path, columns: list[str], futures, error) -> list[pd.DataFrame]:
    """The file's parts in order, each fetched as soon as it is ready (the workers let go of
    it), or the error the pandas engine raises for the file once every part has finished."""
    if error is not None:
        raise error
    parts, failed = [], []
    for start, future in futures:
        problem = _finished(cluster, future).exception()
        if problem is not None:
            failed.append((start, problem))
        elif not failed:
            parts += map(_own_memory, results(cluster, [future]))
        future.release()
    if failed:
        raise _first_error(cluster, path, columns, failed)
    if sum(len(p) for p in parts) == 0:
        raise tabformer.no_rows_error(path)
    return parts


def _own_memory(part: pd.DataFrame) -> pd.DataFrame:
    """``part`` (fetched from a worker) with each column in its own memory map. Fetched, its
    columns are megabyte-sized heap allocations: once the concatenation freed them glibc kept
    their pages, and the driver's memory stayed at twice the frame (50M rows: 3.7 GB for a
    1.55 GB frame). A map goes back to the system when freed."""
    columns = {}
    for name in list(part.columns):
        column = part.pop(name)
        if isinstance(column.dtype, pd.CategoricalDtype):
            columns[name] = pd.Categorical.from_codes(_mapped(column.array.codes), dtype=column.dtype, validate=False)
        else:
            columns[name] = _mapped(column.to_numpy())
    return pd.DataFrame(columns, copy=False)


def _mapped(array: np.ndarray) -> np.ndarray:
    if array.dtype.hasobject:  # Python objects cannot live in a map (none in a compact frame)
        return array
    out = np.frombuffer(mmap.mmap(-1, max(array.nbytes, 1)), dtype=array.dtype, count=len(array))
    out[:] = array
    return out


def results(cluster: Cluster, futures) -> list:
    """The futures' results, in order; ClusterError when their workers die or the cluster is
    left without any worker."""
    from distributed import KilledWorker

    try:
        return [_finished(cluster, future).result() for future in futures]
    except KilledWorker as error:
        raise _killed(cluster, error) from None


def _finished(cluster: Cluster, future):
    """``future`` once it is done, or ClusterError after WORKER_WAIT_S without any worker (a
    task waits for a worker forever: an existing cluster whose workers all died)."""
    alone_since = None
    while not future.done():
        try:
            future.exception(timeout=1)
        except TimeoutError:
            if cluster.client.scheduler_info()["workers"]:
                alone_since = None
            elif alone_since is None:
                alone_since = time.monotonic()
            elif time.monotonic() - alone_since > WORKER_WAIT_S:
                raise ClusterError(f"the Dask cluster at {cluster.address} has had no worker for {WORKER_WAIT_S} s "
                                   "while work was waiting; nothing was written. Start workers and run again") from None
    return future


def _killed(cluster: Cluster, error: BaseException) -> ClusterError:
    return ClusterError(f"Dask workers of {cluster.address} died running a task ({error}); nothing was "
                        "written. Give the workers more memory (or fewer threads each) and run again")


def _first_error(cluster: Cluster, path: Path, columns: list[str],
                 failed: list[tuple[int | None, BaseException]]) -> BaseException:
    """Among the blocks' errors, the one the pandas engine raises reading the whole file: a
    parse error (the file's first bad record, found by a rescan) before any value check;
    then the empty required values, column by column; then the values, column by column
    (for Amount: malformed before out of range); each the first in the file."""
    from distributed import KilledWorker

    for start, error in failed:
        if isinstance(error, KilledWorker):
            return _killed(cluster, error)
        if start is None or not isinstance(error, tabformer.TabFormerFormatError):
            if start is not None and isinstance(error, tabformer.PARSE_ERRORS):
                return tabformer.locate_error(path, columns, error)
            return error  # the whole-file reader's own error, or not about the input

    def rank(item):
        start, error = item
        column = tabformer.COLUMNS.index(error.column) if error.column in tabformer.COLUMNS else -1
        return (error.problem != "empty value in a required column", column,
                error.problem.startswith("amount out of range"), start)

    start, error = min(failed, key=rank)
    return error.shifted(tabformer.newlines_before(path, start) - 1)


def _workers(cluster: Cluster) -> int:
    return max(1, len(cluster.client.scheduler_info()["workers"]))


def _total_memory() -> int:
    import psutil

    return psutil.virtual_memory().total
