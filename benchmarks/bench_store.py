"""Transaction store benchmarks (docs/benchmarks.md): the store's size against the CSV's, one month's
ingest, and a rolling-window preprocess read from the store.

    .venv/bin/python benchmarks/bench_store.py --rows 24386900

Uses the synthetic file of that size under runs/data (generated on first use) and a store in a
temporary folder under runs/ (removed afterwards).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from fraudlib import preprocess, settings, store


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=24_386_900)
    # The full-size synthetic file has no fraud in 2019-11, so a window ending there cannot validate.
    parser.add_argument("--month", default="2019-10", help="the month ingested alone; preprocess takes as_of the month after")
    parser.add_argument("--no-preprocess", action="store_true")
    parser.add_argument("--keep-store", default="", help="move the store here afterwards (e.g. for a pipeline run on it)")
    args = parser.parse_args()
    raw = preprocess.resolve_raw_path("", args.rows)
    work = Path(tempfile.mkdtemp(prefix="bench-store-", dir=settings.runs_root()))
    try:
        year, month = (int(p) for p in args.month.split("-"))
        before, single = work / "before.csv", work / f"{args.month}.csv"
        with open(raw) as src, open(before, "w") as out_before, open(single, "w") as out_month:
            head = src.readline()
            out_before.write(head)
            out_month.write(head)
            for line in src:
                key = tuple(int(p) for p in line.split(",", 4)[2:4])
                if key < (year, month):
                    out_before.write(line)
                elif key == (year, month):
                    out_month.write(line)
        root = work / "store"
        started = time.perf_counter()
        bulk = store.ingest(before, root, all_months=True)
        bulk_s = time.perf_counter() - started
        started = time.perf_counter()
        one = store.ingest(single, root)
        month_s = time.perf_counter() - started
        parquet = sum(p.stat().st_size for p in root.rglob("*.parquet"))
        csv_bytes = before.stat().st_size + single.stat().st_size
        print(f"file: {raw} ({args.rows:,} rows, {raw.stat().st_size / 1e6:,.0f} MB)")
        print(f"bulk ingest of {len(bulk.added)} months ({bulk.rows:,} rows): {bulk_s:.1f} s")
        print(f"ingest of {args.month} ({one.rows:,} rows) into a store of {len(bulk.added)} months: {month_s:.2f} s")
        print(f"store: {parquet / 1e6:,.1f} MB of Parquet for {csv_bytes / 1e6:,.1f} MB of CSV "
              f"({100 * parquet / csv_bytes:.1f}%)")
        again = time.perf_counter()
        assert not store.ingest(single, root).changed
        print(f"the same month again (idempotent, nothing written): {time.perf_counter() - again:.2f} s")
        if not args.no_preprocess:
            as_of = store.month_text(store.month_key(args.month) + 1)
            started = time.perf_counter()
            done = preprocess.preprocess(root, work / "graph", as_of=as_of)
            print(f"preprocess from the store, as_of {as_of} (12/1/1 months): {time.perf_counter() - started:.1f} s, "
                  f"{done.rows:,} rows read, edges {done.edges}")
        if args.keep_store:
            shutil.move(str(root), args.keep_store)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
