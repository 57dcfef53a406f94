"""The transaction store: validated, atomic, idempotent months of Parquet (fraudlib.store)."""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from fraudlib import store, tabformer
from fraudlib.tabformer import TabFormerFormatError, read_transactions


def month_lines(raw: Path, *months: str) -> tuple[str, list[str]]:
    """The header and the data lines of ``raw`` in the given YYYY-MM months, in file order."""
    header, *lines = raw.read_text().splitlines()
    wanted = {tuple(int(p) for p in m.split("-")) for m in months}
    return header, [line for line in lines if tuple(int(p) for p in line.split(",", 4)[2:4]) in wanted]


@pytest.fixture
def month_file(synthetic_csv, tmp_path):
    def write(*months: str, name: str | None = None, drop: int = 0) -> Path:
        header, lines = month_lines(synthetic_csv, *months)
        path = tmp_path / (name or f"{'_'.join(months)}.csv")
        path.write_text("\n".join([header, *lines[drop:]]) + "\n")
        return path

    return write


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != ".lock"}


def test_an_ingested_month_reads_back_with_the_readers_values_and_types(month_file, tmp_path):
    path = month_file("2019-03")
    result = store.ingest(path, tmp_path / "store")
    assert result.added == ["2019-03"] and result.rows > 0
    assert store.months(tmp_path / "store") == ["2019-03"]
    assert (tmp_path / "store" / "year=2019" / "month=03").is_dir()
    expected = read_transactions(path)
    got = store.read(tmp_path / "store")
    assert list(got.columns) == list(expected.columns)
    assert dict(got.dtypes.astype(str)) == dict(expected.dtypes.astype(str))
    pd.testing.assert_frame_equal(got.astype(object), expected.astype(object))
    # Categories in order of first appearance, as preprocessing's merchant table expects.
    merchants = got["Merchant Name"].array
    assert list(merchants.categories) == list(pd.unique(got["Merchant Name"].astype("int64")))


def test_ingesting_the_same_month_twice_adds_nothing_even_from_another_copy(month_file, tmp_path):
    root = tmp_path / "store"
    path = month_file("2019-03")
    store.ingest(path, root)
    before = snapshot(root)
    zipped = tmp_path / "copy.csv.gz"
    zipped.write_bytes(gzip.compress(path.read_bytes()))
    for again in (path, zipped):
        result = store.ingest(again, root)
        assert result.unchanged == ["2019-03"] and not result.changed and result.rows == 0
    assert snapshot(root) == before


def test_other_rows_for_a_sealed_month_are_refused_unless_replace(month_file, tmp_path):
    root = tmp_path / "store"
    store.ingest(month_file("2019-03"), root)
    before = snapshot(root)
    other = month_file("2019-03", name="fewer.csv", drop=5)
    with pytest.raises(store.StoreError, match=r"month 2019-03 is already sealed .* --replace"):
        store.ingest(other, root)
    assert snapshot(root) == before
    result = store.ingest(other, root, replace=True)
    assert result.replaced == ["2019-03"]
    assert len(store.read(root)) == len(read_transactions(other))
    assert len(list(root.glob("year=2019/month=03/*.parquet"))) == 1  # the old file is gone


def test_a_month_older_than_the_newest_sealed_one_is_refused(month_file, tmp_path):
    root = tmp_path / "store"
    store.ingest(month_file("2019-05"), root)
    before = snapshot(root)
    with pytest.raises(store.StoreError, match=r"2019-04 arrives out of order.*2019-05"):
        store.ingest(month_file("2019-04"), root)
    assert snapshot(root) == before
    assert store.ingest(month_file("2019-04"), root, replace=True).added == ["2019-04"]


def test_a_file_with_several_months_is_refused_pointing_at_replay(month_file, tmp_path):
    root = tmp_path / "store"
    path = month_file("2019-01", "2019-02", "2019-03")
    with pytest.raises(store.StoreError, match=r"3 months \(2019-01 .. 2019-03\).*fraud replay .* --start 2019-01 --months 3"):
        store.ingest(path, root)
    assert not (root / store.LEDGER).exists()
    assert store.ingest(path, root, all_months=True).added == ["2019-01", "2019-02", "2019-03"]


def test_bad_input_names_the_line_and_writes_nothing(month_file, tmp_path):
    root = tmp_path / "store"
    store.ingest(month_file("2019-01"), root)
    before = snapshot(root)
    path = month_file("2019-02")
    lines = path.read_text().splitlines()
    lines[3] = lines[3].replace("$", "$x", 1)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TabFormerFormatError, match=r"line 4, column 'Amount'"):
        store.ingest(path, root)
    assert snapshot(root) == before


def test_a_crash_before_the_ledger_is_written_leaves_the_store_as_it_was(month_file, tmp_path, monkeypatch):
    root = tmp_path / "store"
    store.ingest(month_file("2019-01"), root)
    before = snapshot(root)

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(store, "_write_ledger", crash)
    with pytest.raises(OSError, match="disk full"):
        store.ingest(month_file("2019-02"), root)
    assert snapshot(root) == before


@pytest.fixture
def small_blocks(monkeypatch):
    """Files over 700 KB are ingested block by block (the 30,000-row file: 4-5 blocks)."""
    monkeypatch.setattr(store, "CHUNK_BYTES", 700_000)


@pytest.mark.parametrize("rank_table_limit", [1 << 26, 0], ids=["presence-table", "sorted-pairs"])
def test_a_large_file_ingested_block_by_block_is_the_same_store_as_at_once(synthetic_csv, tmp_path, monkeypatch,
                                                                           rank_table_limit):
    whole = store.ingest(synthetic_csv, tmp_path / "whole", all_months=True)
    monkeypatch.setattr(store, "CHUNK_BYTES", 700_000)
    monkeypatch.setattr(tabformer, "RANK_TABLE_LIMIT", rank_table_limit)  # each way of ranking a month's categories
    heard = []
    blocked = store.ingest(synthetic_csv, tmp_path / "blocks", all_months=True, progress=heard.append)
    assert blocked.added == whole.added and blocked.rows == whole.rows == 30_000
    assert f"added {len(whole.added)} months, {whole.added[0]} .. {whole.added[-1]} (30,000 rows written" in blocked.describe()
    assert len(heard) >= 4 and heard[-1].startswith(f"{synthetic_csv.name}: 100% read and stored, 30,000 rows")
    # The same content hashes (of values, not files), rows and frauds per month, the same frame back.
    entry = lambda root: {m: (e["content_hash"], e["rows"], e["fraud"], e["file"])
                          for m, e in store.ledger(root)["months"].items()}
    assert entry(tmp_path / "blocks") == entry(tmp_path / "whole")
    pd.testing.assert_frame_equal(store.read(tmp_path / "blocks"), store.read(tmp_path / "whole"))
    # A month's rows came in several blocks: several row groups in its one file.
    files = sorted((tmp_path / "blocks").glob("year=*/month=*/*.parquet"))
    assert len(files) == len(whole.added) and max(pq.ParquetFile(f).num_row_groups for f in files) > 1
    assert not list((tmp_path / "blocks").glob(".ingest-*"))
    # Ingesting the file again at once adds nothing: the hash does not depend on the blocks.
    monkeypatch.setattr(store, "CHUNK_BYTES", 1 << 40)
    assert store.ingest(synthetic_csv, tmp_path / "blocks", all_months=True).unchanged == whole.added


def test_bad_input_in_a_later_block_names_the_files_line_and_writes_nothing(synthetic_csv, tmp_path, small_blocks):
    root = tmp_path / "store"
    lines = synthetic_csv.read_text().splitlines()
    lines[25_000] = lines[25_000].replace("$", "$x", 1)  # file line 25,001, in a late block
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TabFormerFormatError, match=rf"{path.name}.*line 25001, column 'Amount'"):
        store.ingest(path, root, all_months=True)
    assert snapshot(root) == {}
    lines[25_000] = "1,2,3"  # a row pyarrow cannot parse
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TabFormerFormatError, match=r"line 25001"):
        store.ingest(path, root, all_months=True)
    assert snapshot(root) == {}


def test_a_crash_mid_file_leaves_the_store_as_it_was_and_no_staging(month_file, synthetic_csv, tmp_path, small_blocks):
    root = tmp_path / "store"
    store.ingest(month_file("2019-01"), root)
    before = snapshot(root)
    heard = []

    def crash(line):
        heard.append(line)
        if len(heard) == 2:
            raise KeyboardInterrupt  # e.g. Ctrl-C half way

    with pytest.raises(KeyboardInterrupt):
        store.ingest(synthetic_csv, root, all_months=True, replace=True, progress=crash)
    assert snapshot(root) == before
    assert sorted(p.name for p in root.iterdir()) == [".lock", store.LEDGER, "year=2019"]


def test_a_staging_folder_left_by_a_killed_ingest_is_removed_by_the_next(month_file, tmp_path):
    root = tmp_path / "store"
    store.ingest(month_file("2019-01"), root)
    left = root / ".ingest-killed"  # as a kill -9 mid-file leaves it: never read, not in the ledger
    left.mkdir()
    (left / "24229.parquet").write_bytes(b"half a file")
    assert store.months(root) == ["2019-01"]
    assert store.ingest(month_file("2019-02"), root).added == ["2019-02"]
    assert not left.exists() and not list(root.glob(".ingest-*"))


def test_a_large_file_with_several_months_is_refused_at_its_first_block(synthetic_csv, tmp_path, small_blocks):
    heard = []
    with pytest.raises(store.StoreError, match=r"holds rows of several months \(at least \d+, \d{4}-\d\d \.\. 20\d\d-\d\d, in its first block\): .* --all-months$"):
        store.ingest(synthetic_csv, tmp_path / "store", progress=heard.append)
    assert heard == [] and not (tmp_path / "store" / store.LEDGER).exists()


def test_replay_feeds_one_month_at_a_time_in_order(synthetic_csv, tmp_path):
    root = tmp_path / "store"
    seen = []
    results = store.replay(synthetic_csv, "2019-11", 3, root, after_each=lambda r: seen.append(store.months(root)))
    assert [r.added for r in results] == [["2019-11"], ["2019-12"], ["2020-01"]]
    assert seen == [["2019-11"], ["2019-11", "2019-12"], ["2019-11", "2019-12", "2020-01"]]
    full = read_transactions(synthetic_csv)
    in_window = full[(full["Year"] * 12 + full["Month"]).between(2019 * 12 + 11, 2020 * 12 + 1)]
    assert len(store.read(root)) == len(in_window)
    assert len(store.read(root, since="2019-12", before="2020-01")) == int(
        ((full["Year"] == 2019) & (full["Month"] == 12)).sum())


def test_replay_of_months_the_file_lacks_is_refused_before_writing(synthetic_csv, tmp_path):
    root = tmp_path / "store"
    with pytest.raises(store.StoreError, match=r"no rows for 2020-03, 2020-04 \(it holds 1991-.. .. 2020-02\)"):
        store.replay(synthetic_csv, "2020-01", 4, root)
    assert not (root / store.LEDGER).exists()


@pytest.mark.parametrize("start", ["2019-13", "2019-3", "March"])
def test_a_month_that_is_not_yyyy_mm_is_refused(synthetic_csv, tmp_path, start):
    with pytest.raises(store.StoreError, match="not a month written YYYY-MM"):
        store.replay(synthetic_csv, start, 1, tmp_path / "store")


def test_reading_an_empty_window_says_what_the_store_holds(month_file, tmp_path):
    root = tmp_path / "store"
    store.ingest(month_file("2019-03"), root)
    with pytest.raises(store.StoreError, match=r"no months in \[start, 2019-01\) .*sealed: 2019-03"):
        store.read(root, before="2019-01")


def commands(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fraud")
    store.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_ingest_and_replay_commands_report_and_exit_with_status(month_file, synthetic_csv, tmp_path, capsys):
    root = str(tmp_path / "store")
    assert commands(["replay", str(synthetic_csv), "--start", "2019-01", "--months", "2", "--store", root]) == 0
    assert "added 2019-02" in capsys.readouterr().out
    assert commands(["ingest", str(month_file("2019-02")), "--store", root]) == 0
    assert "already ingested 2019-02" in capsys.readouterr().out
    assert commands(["ingest", str(month_file("2019-01", "2019-02")), "--store", root]) == 2
    assert "fraud replay" in capsys.readouterr().err
    assert commands(["ingest", str(tmp_path / "missing.csv"), "--store", root]) == 2
    assert "does not exist" in capsys.readouterr().err
    ledger = json.loads((tmp_path / "store" / store.LEDGER).read_text())
    assert sorted(ledger["months"]) == ["2019-01", "2019-02"]
    assert all(np.isfinite(e["rows"]) and e["fraud"] >= 0 for e in ledger["months"].values())
