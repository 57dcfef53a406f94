"""The TabFormer reader: every quirk of the data contract, and bad input named precisely."""

from __future__ import annotations

import gzip
import io
import math
import tarfile

import numpy as np
import pandas as pd
import pytest

from fraudlib.tabformer import COLUMNS, TabFormerFormatError, read_transactions

HEADER = ",".join(COLUMNS)
QUIRKS = [
    '0,0,2002,9,1,06:21,$134.09,Swipe Transaction,3527213246127876953,La Verne,CA,91750.0,5300,,No',
    '0,0,2002,9,2,23:59,$-292.00,Chip Transaction,-9223372036854775808,ONLINE,,,5311,"Bad PIN,",No',
    '0,1,2019,1,3,00:00,$5.00,Online Transaction,9007199254740993,ONLINE,,,5311,"Bad CVV,Technical Glitch,",Yes',
    '1,3,2020,2,28,7:05,$0.5,Chip Transaction,9223372036854775807,Rome,Italy,,4829,"Bad CVV,Technical Glitch",No',
]
GOOD = QUIRKS[0]


def test_reads_every_quirk_of_the_data_contract(write_tabformer):
    frame = read_transactions(write_tabformer(QUIRKS))

    assert list(frame.columns) == list(COLUMNS)
    assert frame["Amount"].tolist() == [134.09, -292.0, 5.0, 0.5]
    assert frame["Time"].tolist() == [6 * 60 + 21, 23 * 60 + 59, 0, 7 * 60 + 5]
    # int64 extremes and 2**53 + 1 survive exactly: never parsed through float
    assert frame["Merchant Name"].astype("int64").tolist() == [
        3527213246127876953, -9223372036854775808, 9007199254740993, 9223372036854775807]
    assert frame["Zip"].iloc[0] == 91750.0 and frame["Zip"].iloc[1:].isna().all()
    assert frame["Merchant City"].tolist() == ["La Verne", "ONLINE", "ONLINE", "Rome"]
    assert pd.isna(frame["Merchant State"].iloc[1]) and frame["Merchant State"].iloc[3] == "Italy"
    errors = frame["Errors?"].tolist()
    assert math.isnan(errors[0])
    assert errors[1:] == ["Bad PIN", "Bad CVV,Technical Glitch", "Bad CVV,Technical Glitch"]
    assert frame["Is Fraud?"].tolist() == [0, 0, 1, 0]
    assert frame["Use Chip"].cat.categories.tolist() == ["Swipe Transaction", "Chip Transaction", "Online Transaction"]


def test_reads_only_the_requested_columns(write_tabformer):
    frame = read_transactions(write_tabformer(QUIRKS), columns=["Amount", "User"])

    assert list(frame.columns) == ["User", "Amount"]


def test_gzip_and_tgz_copies_read_the_same_as_the_csv(write_tabformer, tmp_path):
    csv_path = write_tabformer(QUIRKS)
    gz_path = tmp_path / "card_transaction.v1.csv.gz"
    gz_path.write_bytes(gzip.compress(csv_path.read_bytes()))
    tgz_path = tmp_path / "transactions.tgz"
    with tarfile.open(tgz_path, "w:gz") as archive:
        archive.add(csv_path, arcname="data/card_transaction.v1.csv")

    expected = read_transactions(csv_path)
    pd.testing.assert_frame_equal(read_transactions(gz_path), expected)
    pd.testing.assert_frame_equal(read_transactions(tgz_path), expected)


def test_a_byte_order_mark_before_the_header_is_ignored(write_tabformer, tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + write_tabformer(QUIRKS).read_bytes())

    pd.testing.assert_frame_equal(read_transactions(path), read_transactions(tmp_path / "card_transaction.v1.csv"))


def test_kaggle_copy_with_index_column_and_integer_zips_reads_the_same(write_tabformer):
    kaggle_lines = [f"{i},{line}".replace("91750.0", "91750") for i, line in enumerate(QUIRKS)]
    kaggle = write_tabformer(kaggle_lines, name="credit_card_transactions-ibm_v2.csv",
                             header="Index," + HEADER)

    pd.testing.assert_frame_equal(read_transactions(kaggle), read_transactions(write_tabformer(QUIRKS)))



def _replace(line: str, column: str, value: str) -> str:
    fields = next(iter(pd.read_csv(io.StringIO(",".join(COLUMNS) + "\n" + line), dtype=str,
                                   keep_default_na=False).itertuples(index=False)))
    fields = list(fields)
    fields[COLUMNS.index(column)] = value
    return ",".join(f'"{f}"' if "," in f else f for f in fields)


@pytest.mark.parametrize("column, value, problem", [
    ("Amount", "$12.x4", "not an amount"),
    ("Amount", "", "empty value"),
    ("Time", "25:10", "not a time of day"),
    ("Time", "0621", "not a time of day"),
    ("Year", "20x9", "not an integer"),
    ("Merchant Name", "1.5e18", "not an integer"),
    ("Is Fraud?", "Maybe", "Yes or No"),
    ("Zip", "9I750", "not a zip code"),
])
def test_bad_value_names_file_line_column_and_value(write_tabformer, column, value, problem):
    path = write_tabformer([GOOD, GOOD, _replace(GOOD, column, value), GOOD])

    with pytest.raises(TabFormerFormatError) as caught:
        read_transactions(path)

    message = str(caught.value)
    assert str(path) in message and "line 4" in message and repr(column) in message
    assert repr(value) in message and problem in message
    assert (caught.value.line, caught.value.column, caught.value.value) == (4, column, value)


def test_line_numbers_count_quoted_values_and_blank_lines_like_an_editor(write_tabformer):
    bad = _replace(GOOD, "Amount", "oops")
    path = write_tabformer([QUIRKS[1], "", QUIRKS[2], bad])

    with pytest.raises(TabFormerFormatError, match="line 5"):
        read_transactions(path)


def test_missing_column_is_named_on_line_1(write_tabformer):
    header = HEADER.replace(",Zip", "")
    line = GOOD.replace(",91750.0", "")

    with pytest.raises(TabFormerFormatError, match=r"line 1, column 'Zip'") as caught:
        read_transactions(write_tabformer([line], header=header))
    assert "Zip" in str(caught.value) and caught.value.line == 1


def test_row_with_wrong_field_count_is_located(write_tabformer):
    with pytest.raises(TabFormerFormatError, match="line 3.*14 fields, the header has 15"):
        read_transactions(write_tabformer([GOOD, GOOD.rsplit(",", 1)[0]]))


@pytest.mark.parametrize("content", ["", HEADER + "\n"], ids=["empty", "header-only"])
def test_empty_file_is_bad_input(tmp_path, content):
    path = tmp_path / "card_transaction.v1.csv"
    path.write_text(content)

    with pytest.raises(TabFormerFormatError, match=f"{path}, line 1"):
        read_transactions(path)


def test_archive_without_one_csv_is_bad_input(tmp_path):
    path = tmp_path / "transactions.tgz"
    with tarfile.open(path, "w:gz") as archive:
        info = tarfile.TarInfo("README.txt")
        archive.addfile(info, io.BytesIO(b""))

    with pytest.raises(TabFormerFormatError, match="exactly one CSV"):
        read_transactions(path)


def test_missing_file_says_what_to_point_at(tmp_path):
    with pytest.raises(FileNotFoundError, match="raw_path"):
        read_transactions(tmp_path / "nope.csv")


def test_categories_keep_first_appearance_order(write_tabformer):
    frame = read_transactions(write_tabformer(QUIRKS[::-1]))

    assert frame["Merchant Name"].cat.categories.tolist()[0] == 9223372036854775807
    assert np.array_equal(frame["Merchant Name"].cat.codes.to_numpy(), [0, 1, 2, 3])
