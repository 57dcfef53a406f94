"""Fault campaign, bad input (issue 13, item 10): every malformed raw file the reader is given
stops with a TabFormerFormatError that names the file, what is wrong and, where there is one,
the line; never a bare UnicodeDecodeError, tarfile.ReadError or a silent inf.

Real files on disk, read by the real reader (pyarrow, gzip, tarfile)."""

from __future__ import annotations

import gzip
import io
import random
import tarfile

import pytest

from fraudlib.tabformer import COLUMNS, TabFormerFormatError, read_transactions

HEADER = ",".join(COLUMNS)
GOOD = '0,0,2002,9,1,06:21,$134.09,Swipe Transaction,3527213246127876953,La Verne,CA,91750.0,5300,,No'
TEXT = (HEADER + "\n" + GOOD + "\n" + GOOD + "\n").encode()


def garbage(size: int = 20_000, seed: int = 13) -> bytes:
    """Random bytes that are not UTF-8 from the first byte on (0xff never occurs in UTF-8)."""
    return b"\xff" + random.Random(seed).randbytes(size)


def amount_line(amount: str) -> str:
    return GOOD.replace("$134.09", amount)


def raises_format_error(path, *fragments: str, line: int | None = None) -> TabFormerFormatError:
    with pytest.raises(TabFormerFormatError) as caught:
        read_transactions(path)
    message = str(caught.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    assert caught.value.line == line, message
    if line is not None:
        assert f"line {line}" in message, message
    assert "Traceback" not in message
    return caught.value


# --- encoding and compression -------------------------------------------------------------------


def test_garbage_named_gz_is_not_gzip(tmp_path):
    path = tmp_path / "card_transaction.v1.csv.gz"
    path.write_bytes(garbage())

    raises_format_error(path, "not gzip-compressed")


def test_plain_csv_named_gz_says_to_rename_it(tmp_path):
    path = tmp_path / "card_transaction.v1.csv.gz"
    path.write_bytes(TEXT)

    raises_format_error(path, "not gzip-compressed", "plain text")


def test_binary_inside_a_valid_gzip_is_not_utf8_text_at_line_1(tmp_path):
    path = tmp_path / "card_transaction.v1.csv.gz"
    path.write_bytes(gzip.compress(garbage()))

    raises_format_error(path, "not UTF-8 text", line=1)


def test_binary_plain_file_is_not_utf8_text_at_line_1(tmp_path):
    path = tmp_path / "card_transaction.v1.csv"
    path.write_bytes(garbage())

    raises_format_error(path, "not UTF-8 text", line=1)


def test_gzip_file_named_csv_says_it_is_compressed(tmp_path):
    path = tmp_path / "card_transaction.v1.csv"
    path.write_bytes(gzip.compress(TEXT))

    raises_format_error(path, "gzip-compressed", ".csv.gz")


def test_binary_after_good_rows_is_located_on_its_line(tmp_path):
    path = tmp_path / "card_transaction.v1.csv"
    path.write_bytes(TEXT + garbage())

    raises_format_error(path, "not UTF-8 text", "0xff", line=4)


def test_latin1_value_in_a_row_is_located_on_its_line(tmp_path):
    path = tmp_path / "card_transaction.v1.csv"
    path.write_bytes(TEXT + GOOD.replace("La Verne", "La V\xe9rne").encode("latin-1") + b"\n")

    raises_format_error(path, "not UTF-8 text", "0xe9", line=4)


def test_truncated_gzip_says_where_the_data_stops(tmp_path):
    path = tmp_path / "card_transaction.v1.csv.gz"
    whole = gzip.compress(HEADER.encode() + b"\n" + (GOOD.encode() + b"\n") * 20_000)
    path.write_bytes(whole[: len(whole) // 2])

    error = raises_format_error(path, "corrupt or truncated", line=error_line(path))
    assert error.line > 2


def error_line(path) -> int | None:
    """The line the reader reports (checked for being a real line by the caller)."""
    try:
        read_transactions(path)
    except TabFormerFormatError as error:
        return error.line
    return None


# --- archives and paths -------------------------------------------------------------------------


def test_tgz_that_is_a_gzipped_csv_is_not_a_tar_archive(tmp_path):
    path = tmp_path / "transactions.tgz"
    path.write_bytes(gzip.compress(TEXT))

    raises_format_error(path, "not a tar archive", ".csv.gz")


def test_garbage_tgz_is_not_a_tar_archive(tmp_path):
    path = tmp_path / "transactions.tgz"
    path.write_bytes(garbage())

    raises_format_error(path, "not a tar archive")


def test_binary_csv_inside_a_tgz_is_not_utf8_text(tmp_path):
    path = tmp_path / "transactions.tgz"
    with tarfile.open(path, "w:gz") as archive:
        data = garbage()
        info = tarfile.TarInfo("card_transaction.v1.csv")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))

    raises_format_error(path, "not UTF-8 text", line=1)


def test_a_directory_is_named_as_a_directory_not_as_missing(tmp_path):
    folder = tmp_path / "tabformer"
    folder.mkdir()
    (folder / "card_transaction.v1.csv").write_bytes(TEXT)

    error = raises_format_error(folder, "is a directory")
    assert "does not exist" not in str(error)
    assert str(folder / "card_transaction.v1.csv") in str(error)  # says which file to point at


# --- amounts ------------------------------------------------------------------------------------


def test_400_digit_amount_is_an_error_on_its_line_not_inf(tmp_path):
    path = tmp_path / "card_transaction.v1.csv"
    path.write_text("\n".join([HEADER, GOOD, amount_line("$" + "9" * 400), GOOD]) + "\n")

    error = raises_format_error(path, "'Amount'", "out of range", line=3)
    assert len(str(error)) < 600  # the 400 digits are shortened in the message


@pytest.mark.parametrize("amount", ["$1000000000.00", "$-1000000000.00", "$1234567890123"])
def test_amount_of_a_billion_or_more_is_an_error_on_its_line(tmp_path, amount):
    path = tmp_path / "card_transaction.v1.csv"
    path.write_text("\n".join([HEADER, GOOD, GOOD, amount_line(amount)]) + "\n")

    raises_format_error(path, "'Amount'", amount, "out of range", line=4)


def test_amount_just_below_a_billion_is_read(tmp_path):
    path = tmp_path / "card_transaction.v1.csv"
    path.write_text("\n".join([HEADER, amount_line("$999999999.99"), amount_line("$-999999999.99")]) + "\n")

    assert read_transactions(path)["Amount"].tolist() == [999999999.99, -999999999.99]


def test_unclosed_quote_is_located_where_it_opens(tmp_path):
    path = tmp_path / "card_transaction.v1.csv"
    path.write_text("\n".join([HEADER, GOOD, GOOD.replace("La Verne", '"La Verne'), *[GOOD] * 10]) + "\n")

    raises_format_error(path, "fields, the header has 15", "runs to line 13", line=3)
