"""The transaction store: months of TabFormer transactions as Parquet, partitioned by year and month.

New months arrive as TabFormer-format files (``fraud ingest FILE``); each is read and validated
by the one reader (``tabformer.read_transactions``: bad input names the file, line and column)
and its months are added to the store under ``$FRAUD_STORE`` or ``<runs>/store``::

    store.json                                  the ledger: sealed months, their files, content hashes
    year=2019/month=03/<content hash>.parquet   one file per month (zstd, columns as the reader gives them)

Rules (a month in the ledger is *sealed*):

* atomic: month files are written in a staging folder and renamed into place; the ledger,
  renamed into place last, is the commit point, so a crash leaves the store as it was (an
  unlisted file or a staging folder is never read and is removed by the next ingest);
* bounded memory: a plain CSV over ``CHUNK_BYTES`` (a 10 GB file of 100M rows) is read block by
  block, each block's months appended to their staged files as a row group;
* idempotent: a month whose rows hash to the sealed content is skipped (ingesting the same
  file twice adds nothing, whatever its name or compression);
* other rows for a sealed month, or a month older than the newest sealed one (months arrive in
  order), are refused unless ``replace=True``;
* a file holding several months is refused unless ``all_months=True`` (a bulk load):
  ``replay`` feeds such a file one month at a time, which is how tests and the demo make time pass.

Preprocessing reads the store like a file (``read``, ``is_store``): pass the store folder as
``raw_path``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash
from filelock import FileLock

from fraudlib import settings
from fraudlib.tabformer import (COLUMNS, PARSE_ERRORS, TabFormerFormatError, blocks, check, locate_error,
                                newlines_before, rank, read_block, read_transactions, splittable)

STORE_ENV = "FRAUD_STORE"
LEDGER = "store.json"
FORMAT = 1
_COMPRESSION = "zstd"
CHUNK_BYTES = 256 << 20  # a plain CSV over this is ingested block by block (bounded memory)
_STAGING = ".ingest-"  # an ingest's staging folder under the store's root
_CATEGORICAL = frozenset({"Use Chip", "Merchant Name", "Merchant City", "Merchant State", "Zip", "Errors?"})
_ARROW_TYPES = {"User": pa.int32(), "Card": pa.int16(), "Year": pa.int16(), "Month": pa.int8(), "Day": pa.int8(),
                "Time": pa.int16(), "Amount": pa.float64(), "Merchant Name": pa.int64(), "Zip": pa.float64(),
                "MCC": pa.int16(), "Is Fraud?": pa.int8()}
_ARROW_TYPES |= {c: pa.dictionary(pa.int32(), pa.string()) for c in _CATEGORICAL - _ARROW_TYPES.keys()}


class StoreError(ValueError):
    """The input cannot go into the store as asked; nothing was written. Says what and where."""


@dataclass
class IngestResult:
    """What one ingest did (months as ``YYYY-MM``)."""

    source: str
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)  # already sealed with the same rows
    rows: int = 0  # rows written
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return bool(self.added or self.replaced)

    def describe(self) -> str:
        # Up to 6 months by name; more (a bulk load of years) as their count and span.
        parts = [f"{what} {', '.join(months) if len(months) <= 6 else f'{len(months)} months, {_span(sorted(months))}'}"
                 for what, months in (("added", self.added), ("replaced", self.replaced),
                                      ("already ingested", self.unchanged)) if months]
        return f"{self.source}: " + ("; ".join(parts) or "nothing") + f" ({self.rows:,} rows written, {self.seconds:.2f} s)"


def store_root() -> Path:
    """``$FRAUD_STORE`` when set, else ``<runs>/store``."""
    env = os.environ.get(STORE_ENV)
    return Path(env).expanduser().resolve() if env else settings.runs_root() / "store"


def is_store(path: str | Path) -> bool:
    return (Path(path) / LEDGER).is_file()


def month_key(text: str, what: str = "month") -> int:
    """``YYYY-MM`` -> year * 12 + month - 1 (consecutive months are consecutive integers)."""
    try:
        year, month = (int(p) for p in str(text).split("-"))
        if len(str(text)) != 7 or not 1 <= month <= 12:
            raise ValueError
    except ValueError:
        raise StoreError(f"{what} {text!r} is not a month written YYYY-MM (e.g. 2019-03)") from None
    return year * 12 + month - 1


def month_text(key: int) -> str:
    return f"{key // 12:04d}-{key % 12 + 1:02d}"


def months(store: str | Path | None = None) -> list[str]:
    """The sealed months, oldest first."""
    return sorted(_read_ledger(Path(store) if store else store_root())["months"])


def ledger(store: str | Path | None = None) -> dict:
    """The ledger (``store.json``) as a dict; an empty one for a store not yet created."""
    return _read_ledger(Path(store) if store else store_root())


def content_hash(store: str | Path | None = None, before: str | None = None) -> str:
    """One hash of the sealed months' contents (those before ``before`` when given)."""
    book = ledger(store)["months"]
    limit = month_key(before, "before") if before else None
    digest = xxhash.xxh3_128()
    for month in sorted(book):
        if limit is None or month_key(month) < limit:
            digest.update(f"{month}:{book[month]['content_hash']};".encode())
    return digest.hexdigest()


def read(store: str | Path | None = None, columns: Sequence[str] = COLUMNS, before: str | None = None,
         since: str | None = None) -> pd.DataFrame:
    """The sealed months' rows (those in ``[since, before)`` when given), oldest month first,
    with the columns and dtypes ``tabformer.read_transactions`` gives (categories in order of
    first appearance, as preprocessing expects)."""
    root = Path(store) if store else store_root()
    book = _read_ledger(root)["months"]
    low = month_key(since, "since") if since else -1
    high = month_key(before, "before") if before else 1 << 40
    chosen = [m for m in sorted(book) if low <= month_key(m) < high]
    if not chosen:
        window = f" in [{since or 'start'}, {before or 'end'})" if since or before else ""
        raise StoreError(f"the transaction store {root} holds no months{window} "
                         f"(sealed: {_span(sorted(book))}); ingest data first: fraud ingest FILE")
    columns = [c for c in COLUMNS if c in columns]
    # One schema for all months: a month's dictionary index width, or an all-empty column
    # (type null), differs from another's.
    schema = pa.schema([(c, _ARROW_TYPES[c]) for c in columns])
    tables = [pq.read_table(root / book[m]["file"], columns=columns).cast(schema) for m in chosen]
    frame = pa.concat_tables(tables).to_pandas()
    for name in frame.columns:
        if isinstance(frame[name].dtype, pd.CategoricalDtype):
            frame[name] = _first_appearance(frame[name].array)
        elif name in _CATEGORICAL:  # Parquet keeps numeric categoricals (Merchant Name, Zip) as plain values
            codes, uniques = pd.factorize(frame[name].to_numpy(), sort=False)
            frame[name] = pd.Categorical.from_codes(codes.astype(np.int32), categories=uniques)
    return frame


def ingest(path: str | Path, store: str | Path | None = None, *, replace: bool = False,
           all_months: bool = False, progress: Callable[[str], None] | None = None) -> IngestResult:
    """Validate the TabFormer file ``path`` and add its months to the store (module docstring).

    A plain CSV larger than ``CHUNK_BYTES`` is read block by block, each block's months
    appended to their files as it goes: memory stays at a few blocks whatever the file's size
    (``progress``, when given, hears after each block how far it got)."""
    started = time.perf_counter()
    path = Path(path).expanduser().resolve()
    chunks = _chunks(path, progress)
    if not all_months:
        chunks = _one_month(path, chunks)
    result = _ingest_months(Path(store) if store else store_root(), str(path), chunks, replace)
    result.seconds = time.perf_counter() - started
    return result


def _chunks(path: Path, progress: Callable[[str], None] | None) -> Iterator[tuple[pd.DataFrame, bool]]:
    """(the rows, whether the file is read to its end) per block of ``path``, in file order:
    the whole file at once unless it is a plain CSV over ``CHUNK_BYTES``. The next block is
    parsed on a second thread while the caller stores this one (pyarrow's parse and the
    Parquet write let go of the GIL)."""
    columns = check(path)  # the header's errors before any block
    if not splittable(path) or path.stat().st_size <= CHUNK_BYTES:
        yield read_transactions(path), True
        return
    ranges = blocks(path, CHUNK_BYTES)
    rows, began = 0, time.perf_counter()
    with ThreadPoolExecutor(1) as pool:
        ahead = pool.submit(_block, path, *ranges[0], columns)
        for i, (start, end) in enumerate(ranges):
            part = ahead.result()  # this block's error, in file order
            if i + 1 < len(ranges):
                ahead = pool.submit(_block, path, *ranges[i + 1], columns)
            rows += len(part)
            yield part, i + 1 == len(ranges)
            if progress:
                progress(f"{path.name}: {end / ranges[-1][1]:.0%} read and stored, {rows:,} rows, "
                         f"{time.perf_counter() - began:.0f} s")


def _block(path: Path, start: int, end: int, columns: list[str]) -> pd.DataFrame:
    """``tabformer.read_block``, its errors placed in the file."""
    try:
        return read_block(path, start, end, columns)
    except TabFormerFormatError as error:
        raise error.shifted(newlines_before(path, start) - 1) from None
    except PARSE_ERRORS as error:
        raise locate_error(path, columns, error) from None


def _one_month(path: Path, chunks) -> Iterator[tuple[pd.DataFrame, bool]]:
    """``chunks``, refused (before the second month's rows are written) when they hold several months."""
    found: set[int] = set()
    for part, last in chunks:
        found |= set(np.unique(_month_keys(part)).tolist())
        if len(found) > 1:
            months_ = [month_text(k) for k in sorted(found)]
            if not last:  # a large file, refused at its first block: too large to replay in memory anyway
                raise StoreError(f"{path} holds rows of several months (at least {len(months_)}, "
                                 f"{_span(months_)}, in its first block): ingest one month per file, "
                                 "or load them all at once with --all-months")
            raise StoreError(f"{path} holds rows of {len(months_)} months ({_span(months_)}): ingest one month per "
                             f"file, feed it month by month with `fraud replay {path} --start {months_[0]} --months "
                             f"{len(months_)}`, or load them all at once with --all-months")
        yield part, last


def replay(path: str | Path, start: str, n_months: int, store: str | Path | None = None, *, replace: bool = False,
           after_each: Callable[[IngestResult], None] | None = None) -> list[IngestResult]:
    """Feed the months ``start`` .. ``start + n_months - 1`` of ``path`` into the store one at a
    time, calling ``after_each(result)`` after each month is sealed (time passing). Every month
    is checked to have rows before the first is written."""
    path = Path(path).expanduser().resolve()
    first = month_key(start, "--start")
    if isinstance(n_months, bool) or not isinstance(n_months, int) or n_months < 1:
        raise StoreError(f"--months must be an integer >= 1, got {n_months!r}")
    frame = read_transactions(path)
    keys = _month_keys(frame)
    held = np.unique(keys).tolist()
    wanted = list(range(first, first + n_months))
    empty = [month_text(k) for k in wanted if k not in held]
    if empty:
        raise StoreError(f"{path} has no rows for {', '.join(empty)} (it holds {_span([month_text(k) for k in held])}); "
                         "choose --start and --months inside it")
    root = Path(store) if store else store_root()
    results = []
    for key in wanted:
        began = time.perf_counter()
        month = frame[keys == key].reset_index(drop=True)
        result = _ingest_months(root, f"{path}#{month_text(key)}", [(month, True)], replace)
        result.seconds = time.perf_counter() - began
        results.append(result)
        if after_each:
            after_each(result)
    return results


# --- writing ------------------------------------------------------------------------------------

def _ingest_months(root: Path, source: str, chunks: Iterable[tuple[pd.DataFrame, bool]],
                   replace: bool) -> IngestResult:
    """Add the months of ``chunks`` (their rows, block by block, in file order) to the store at
    ``root``. Each month's rows go to a file in a staging folder, hashed as they come; once all
    are in, the rules decide, the new months' files are renamed into place and the ledger last."""
    root.mkdir(parents=True, exist_ok=True)
    result = IngestResult(source=source)
    with FileLock(str(root / ".lock")):
        book = _read_ledger(root)
        _remove_strays(root, book)
        sealed = {month_key(m): entry for m, entry in book["months"].items()}
        newest = max(sealed, default=None)
        staging = Path(tempfile.mkdtemp(prefix=_STAGING, dir=root))
        files: dict[int, _MonthFile] = {}
        written = []
        try:
            for part, _ in chunks:
                for key, table, hashes in _months_of(part):
                    if key not in files:
                        if not replace and key not in sealed and newest is not None and key < newest:
                            raise StoreError(f"{source}: month {month_text(key)} arrives out of order: the store "
                                             f"{root} already holds {month_text(newest)}; months are ingested oldest "
                                             "first, nothing was written. Pass --replace to insert it anyway")
                        files[key] = _MonthFile(staging / f"{key}.parquet", table.schema)
                    files[key].add(table, hashes)
            plan = []
            for key, month_file in sorted(files.items()):
                month, digest = month_text(key), month_file.close()
                if key in sealed and sealed[key]["content_hash"] == digest:
                    result.unchanged.append(month)
                    continue
                if not replace and key in sealed:
                    raise StoreError(f"{source}: month {month} is already sealed in {root} with other rows "
                                     f"({sealed[key]['rows']:,} rows from {sealed[key]['source']}); nothing was "
                                     "written. Pass --replace to replace that month")
                plan.append((key, month, digest, month_file))
            for key, month, digest, month_file in plan:
                relative = f"year={key // 12:04d}/month={key % 12 + 1:02d}/{digest[:16]}.parquet"
                target = root / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(month_file.path, target)
                written.append(target)
                (result.replaced if key in sealed else result.added).append(month)
                result.rows += month_file.rows
                book["months"][month] = {"file": relative, "rows": month_file.rows, "fraud": month_file.fraud,
                                         "content_hash": digest, "source": source,
                                         "ingested": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            if written:
                book["ingests"].append({"source": source, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                        "added": result.added, "replaced": result.replaced})
                _write_ledger(root, book)
        except BaseException:
            for target in written:  # named by content hash, never a listed file: not in the ledger
                target.unlink(missing_ok=True)
            raise
        finally:
            for month_file in files.values():
                month_file.close()
            shutil.rmtree(staging, ignore_errors=True)
        _remove_strays(root, book)  # the replaced months' old files
    return result


class _MonthFile:
    """One month's rows appended block by block to a Parquet file (one row group per block),
    and their content hash as they come: of the rows' values, not of the file (another
    compression, name or block size is the same content)."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path, self.rows, self.fraud = path, 0, 0
        self.writer = pq.ParquetWriter(path, schema, compression=_COMPRESSION)
        self.digest = xxhash.xxh3_128()
        self.digest.update(",".join(schema.names).encode())

    def add(self, table: pa.Table, hashes: np.ndarray) -> None:
        self.digest.update(hashes.tobytes())
        self.writer.write_table(table)
        self.rows += table.num_rows
        self.fraud += pc.sum(table["Is Fraud?"]).as_py() or 0

    def close(self) -> str:
        """Finish the file (once; again is a no-op); the content hash."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        return self.digest.hexdigest()


def _month_keys(frame: pd.DataFrame) -> np.ndarray:
    return frame["Year"].to_numpy().astype(np.int64) * 12 + frame["Month"].to_numpy().astype(np.int64) - 1


def _months_of(frame: pd.DataFrame) -> Iterator[tuple[int, pa.Table, np.ndarray]]:
    """(month key, its rows as an Arrow table in the readers' types, the rows' value hashes)
    per month of ``frame``, rows in frame order. One sort and one conversion per column for
    all months (a block of a large file holds hundreds): each month is a slice, and each
    string column's dictionary holds only the month's own values."""
    key = _month_keys(frame)
    order = np.argsort(key, kind="stable")
    keys, starts, counts = np.unique(key[order], return_index=True, return_counts=True)
    month = np.repeat(np.arange(len(keys)), counts)  # each sorted row's month (its position in keys)
    hashes = pd.util.hash_pandas_object(frame, index=False).to_numpy()[order]
    schema = pa.schema([(c, _ARROW_TYPES[c]) for c in frame.columns])
    columns = []  # per column: one array to slice, or a list of arrays per month
    for name in frame.columns:
        values, arrow_type = frame[name], _ARROW_TYPES[name]
        if not isinstance(values.dtype, pd.CategoricalDtype):
            columns.append(pa.array(values.to_numpy()[order], type=arrow_type))
            continue
        codes = values.array.codes[order]
        if not pa.types.is_dictionary(arrow_type):  # numeric (Merchant Name, Zip): plain values
            plain = values.array.categories.to_numpy()[np.maximum(codes, 0)]
            columns.append(pa.array(plain, type=arrow_type, mask=codes < 0))
            continue
        # Codes renumbered per month over the month's own categories: (month, code) pairs ranked.
        valid = codes >= 0
        width = int(codes.max(initial=0)) + 1
        pair = month[valid] * width + codes[valid]
        used, position = rank(pair)
        first = np.searchsorted(used, np.arange(len(keys) + 1) * width)  # each month's first used pair
        local = np.full(len(codes), -1, np.int32)
        local[valid] = position - first[month[valid]]
        dictionary = pa.array(values.array.categories.to_numpy(dtype=object), type=pa.string())
        columns.append([pa.DictionaryArray.from_arrays(
            pa.array(local[lo:lo + n], mask=local[lo:lo + n] < 0),
            dictionary.take(pa.array(used[first[m]:first[m + 1]] - m * width)))
            for m, (lo, n) in enumerate(zip(starts, counts))])
    for m, (k, lo, n) in enumerate(zip(keys, starts, counts)):
        arrays = [c[m] if isinstance(c, list) else c.slice(lo, n) for c in columns]
        yield int(k), pa.Table.from_arrays(arrays, schema=schema), hashes[lo:lo + n]


def _remove_strays(root: Path, book: dict) -> None:
    """Month files the ledger does not list (a crashed ingest, a replaced month) are removed, and
    a crashed ingest's staging folder (the caller holds the store's lock: no ingest is running)."""
    listed = {(root / e["file"]).resolve() for e in book["months"].values()}
    for path in root.glob("year=*/month=*/*"):
        if path.resolve() not in listed:
            path.unlink(missing_ok=True)
    for path in root.glob(f"{_STAGING}*"):
        shutil.rmtree(path, ignore_errors=True)


def _first_appearance(values: pd.Categorical) -> pd.Categorical:
    """The same values with only the used categories, in order of first appearance."""
    codes = values.codes
    present = codes >= 0
    new_codes, uniques = pd.factorize(codes[present], sort=False)
    out = np.full(len(codes), -1, dtype=np.int32)
    out[present] = new_codes
    return pd.Categorical.from_codes(out, categories=values.categories.take(uniques))


def _read_ledger(root: Path) -> dict:
    path = root / LEDGER
    if not path.is_file():
        return {"format": FORMAT, "months": {}, "ingests": []}
    try:
        book = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise StoreError(f"{path} is not valid JSON ({error}); the store's ledger is damaged") from None
    if book.get("format") != FORMAT:
        raise StoreError(f"{path}: store format {book.get('format')!r}, this fraudlib reads format {FORMAT}")
    return book


def _write_ledger(root: Path, book: dict) -> None:
    tmp = root / f".{LEDGER}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(book, indent=1, sort_keys=True))
    os.replace(tmp, root / LEDGER)


def _span(found: list[str]) -> str:
    if not found:
        return "none"
    return found[0] if len(found) == 1 else f"{found[0]} .. {found[-1]}"


# --- commands (wired into `fraud` by cli.build_parser) -------------------------------------------

def add_commands(subparsers) -> None:
    """Add ``fraud ingest`` and ``fraud replay`` to an argparse subparsers object."""
    p = subparsers.add_parser("ingest", help="validate a TabFormer file and add its month to the transaction store")
    p.add_argument("file", help="TabFormer-format CSV, .gz or .tgz (one month; see --all-months)")
    _store_args(p)
    p.add_argument("--all-months", action="store_true",
                   help="accept a file with rows of several months (a bulk load: a plain CSV over 256 MB is read "
                        "block by block in ~2 GB, with progress on stderr)")
    p.add_argument("--trigger", action="store_true",
                   help="then start the lifecycle deployment on the Prefect server at $PREFECT_API_URL "
                        "(checked before anything is written)")
    p.set_defaults(func=_cmd_ingest)
    p = subparsers.add_parser("replay", help="feed a file into the store one month at a time (simulated time)")
    p.add_argument("file", help="TabFormer-format CSV, .gz or .tgz")
    p.add_argument("--start", required=True, help="first month, YYYY-MM")
    p.add_argument("--months", type=int, required=True, help="number of months")
    _store_args(p)
    p.set_defaults(func=_cmd_replay)


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=None, help=f"store folder (default ${STORE_ENV} or <runs>/store)")
    p.add_argument("--replace", action="store_true", help="replace sealed months / accept a month out of order")


def _cmd_ingest(args) -> int:
    if args.trigger:
        from fraudlib import flow

        try:
            flow.check_server()
        except flow.OrchestrationError as error:
            print(f"fraud ingest: {error}; nothing was ingested", file=sys.stderr)
            return 3
    result = _run(lambda: ingest(args.file, args.store, replace=args.replace, all_months=args.all_months,
                                 progress=lambda line: print(line, file=sys.stderr, flush=True)))
    if result is None:
        return 2
    print(result.describe())
    if args.trigger and result.changed:
        from fraudlib import flow

        try:
            run_id = flow.trigger_on_ingest(store=args.store or str(store_root()))
        except flow.OrchestrationError as error:
            print(f"fraud ingest: the data is ingested, but {error}", file=sys.stderr)
            return 3
        print(f"started lifecycle flow run {run_id}")
    return 0


def _cmd_replay(args) -> int:
    results = _run(lambda: replay(args.file, args.start, args.months, args.store, replace=args.replace,
                                  after_each=lambda r: print(r.describe())))
    return 2 if results is None else 0


def _run(action):
    from fraudlib.tabformer import TabFormerFormatError

    try:
        return action()
    except (StoreError, TabFormerFormatError, FileNotFoundError) as error:
        print(f"fraud: {error}", file=sys.stderr)
        return None
