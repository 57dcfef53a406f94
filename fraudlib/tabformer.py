"""The one TabFormer reader: ``card_transaction.v1.csv`` (plain, ``.gz``, or inside a ``.tgz``)
or the Kaggle copy ``credit_card_transactions-ibm_v2.csv``, into a pandas DataFrame.

Columns keep their TabFormer names; values come out clean:

=================  ==================================================================
User, Card         int32, int16
Year, Month, Day   int16, int8, int8
Time               int16, minutes after midnight (``HH:MM`` in the file)
Amount             float64 (``$134.09``, refunds ``$-292.00``)
Use Chip           Categorical of str
Merchant Name      Categorical of int64 (parsed as a signed 64-bit integer, never via float)
Merchant City      Categorical of str (``ONLINE`` for online rows)
Merchant State     Categorical of str, NaN when empty (online rows)
Zip                Categorical of float64 (``91750.0`` or ``91750``), NaN when empty
MCC                int16
Errors?            Categorical of str, NaN when empty; a list keeps its commas but loses
                   the trailing one (``"Bad PIN,"`` -> ``Bad PIN``), so both copies agree
Is Fraud?          int8, 1 for ``Yes``, 0 for ``No``
=================  ==================================================================

Categorical categories are in order of first appearance in the file. Extra columns (the
Kaggle copy's index column) are ignored. Any bad input raises :class:`TabFormerFormatError`
naming the file, the line (1-based, header = line 1), the column and the value.

Speed: pyarrow.csv parses only the requested columns with fixed types, string columns as
dictionaries, and every per-value parse (Amount, Time, Zip, Errors?) runs on the dictionary
of distinct values, never per row. Locating the line of a bad value rescans the file, which
only happens on the error path.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import tarfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

COLUMNS = (
    "User", "Card", "Year", "Month", "Day", "Time", "Amount", "Use Chip", "Merchant Name",
    "Merchant City", "Merchant State", "Zip", "MCC", "Errors?", "Is Fraud?",
)
# Empty values are allowed only here (online rows, no error); everywhere else they are bad input.
OPTIONAL = frozenset({"Merchant State", "Zip", "Errors?"})
MEMBER_NAME = "card_transaction.v1.csv"

_DICT = pa.dictionary(pa.int32(), pa.string())
_INTS = {"User": pa.int32(), "Card": pa.int16(), "Year": pa.int16(), "Month": pa.int8(),
         "Day": pa.int8(), "MCC": pa.int16(), "Merchant Name": pa.int64()}
_ARROW_TYPES = {name: _INTS.get(name, _DICT) for name in COLUMNS}
_BLOCK_SIZE = 4 << 20  # fewer chunks than the 1 MB default (cheaper dictionary unification), little memory in flight
_AMOUNT = r"^-?\d+(\.\d+)?$"  # after dropping "$"; a pyarrow (RE2) pattern
_TIME = re.compile(r"(\d{1,2}):(\d{2})")
_ZIP = re.compile(r"\d+(\.0*)?")


class TabFormerFormatError(ValueError):
    """The file is not valid TabFormer input; says where (file, line, column) and what."""

    def __init__(self, path, line: int, column: str | None, value, problem: str, hint: str = ""):
        self.path, self.line, self.column, self.value = str(path), line, column, value
        where = f"{path}, line {line}" + (f", column {column!r}" if column else "")
        what = problem if value is None else f"{problem}: {value!r}"
        hint = hint or "Fix or remove that row (or point at an unmodified TabFormer file) and run again."
        super().__init__(f"{where}: {what}. {hint}")


def read_transactions(path: str | Path, columns: Sequence[str] = COLUMNS) -> pd.DataFrame:
    """Read and validate the given TabFormer ``columns`` of ``path`` (all 15 by default).

    The header must hold all 15 columns whichever are read; values are validated for the
    columns read.
    """
    path = Path(path)
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        raise ValueError(f"unknown TabFormer column(s) {unknown}; the columns are {list(COLUMNS)}")
    columns = [c for c in COLUMNS if c in columns]
    _check_header(path)
    table = _read_arrow(path, columns)
    if table.num_rows == 0:
        raise TabFormerFormatError(path, 1, None, None, "no transactions after the header",
                                   "Point raw_path at a TabFormer file with data rows.")
    for name in columns:
        if name not in OPTIONAL and table.column(name).null_count:
            row = pc.index(pc.is_null(table.column(name)), True).as_py()
            raise TabFormerFormatError(path, _line_of_row(path, row), name, "",
                                       "empty value in a required column")
    # One column at a time, handing each arrow column's memory back once converted (arrow's
    # allocator keeps freed pages otherwise): peak memory stays near one copy of the data.
    # copy=False keeps pandas from consolidating (copying) the columns.
    arrow, converted = {name: table.column(name) for name in columns}, {}
    del table
    for name in columns:
        converted[name] = _CONVERT[name](path, name, arrow.pop(name))
        pa.default_memory_pool().release_unused()
    return pd.DataFrame(converted, copy=False)


def _check_header(path: Path) -> None:
    with _open_text(path) as text:
        header = next(csv.reader(text), None)
    if not header:
        raise TabFormerFormatError(path, 1, None, None, "empty file, expected a TabFormer header",
                                   f"The header is {','.join(COLUMNS)}.")
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise TabFormerFormatError(path, 1, missing[0], None,
                                   f"header lacks column(s) {missing} (it has {header})",
                                   f"A TabFormer file has the columns {','.join(COLUMNS)}.")


def _read_arrow(path: Path, columns: list[str]) -> pa.Table:
    convert = pacsv.ConvertOptions(column_types=_ARROW_TYPES, include_columns=columns,
                                   null_values=[""], strings_can_be_null=True)
    read = pacsv.ReadOptions(block_size=_BLOCK_SIZE)
    try:
        with _open_binary(path) as source:
            table = pacsv.read_csv(source, read_options=read, convert_options=convert)
    except pa.ArrowInvalid as error:
        raise _locate_arrow_error(path, columns, error) from None
    return table  # dictionaries differ per chunk; _dictionary() unifies one column at a time


def _locate_arrow_error(path: Path, columns: list[str], error: pa.ArrowInvalid) -> TabFormerFormatError:
    """Turn pyarrow's error (no row number) into ours by rescanning the file (slow path)."""
    with _open_text(path) as text:
        reader = csv.reader(text)
        header = next(reader)
        positions = {name: header.index(name) for name in columns}
        for record in reader:
            if not record:
                continue
            if len(record) != len(header):
                return TabFormerFormatError(
                    path, reader.line_num, None, ",".join(record),
                    f"row has {len(record)} fields, the header has {len(header)}")
            for name, arrow_type in _INTS.items():
                if name in positions and not _fits(record[positions[name]], arrow_type):
                    return TabFormerFormatError(path, reader.line_num, name, record[positions[name]],
                                                f"not an integer ({arrow_type})")
    return TabFormerFormatError(path, 1, None, str(error), "unreadable CSV")


def _fits(text: str, arrow_type: pa.DataType) -> bool:
    if text == "":
        return True  # an empty value is reported by the null check with its own message
    try:
        value = int(text)
    except ValueError:
        return False
    info = np.iinfo(arrow_type.to_pandas_dtype())
    return info.min <= value <= info.max


# --- per-column conversion (on dictionaries) ------------------------------------------------

def _dictionary(column: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """(codes int32 with -1 for null, dictionary values) of a dictionary column; combining
    the chunks unifies their dictionaries."""
    array = column.combine_chunks()
    indices = array.indices.fill_null(-1) if array.indices.null_count else array.indices
    codes = indices.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    return codes, array.dictionary


def _bad_value(path: Path, name: str, codes: np.ndarray, code: int, value, problem: str):
    row = int(np.flatnonzero(codes == code)[0])
    return TabFormerFormatError(path, _line_of_row(path, row), name, value, problem)


def _categorical(codes: np.ndarray, clean: list) -> pd.Categorical:
    """Categorical from dictionary codes whose values were cleaned (cleaning may merge values;
    None makes a value NaN). Categories keep first-appearance order."""
    seen: dict = {}
    remap = np.full(len(clean) + 1, -1, np.int32)  # the last slot maps code -1 (null)
    for i, value in enumerate(clean):
        if value is not None:
            remap[i] = seen.setdefault(value, len(seen))
    if len(seen) < len(clean):  # values merged or dropped: recode (else the codes stand)
        codes = remap[codes]
    return pd.Categorical.from_codes(codes, categories=list(seen))


def _strings(path, name, column) -> pd.Categorical:
    codes, values = _dictionary(column)
    return _categorical(codes, values.to_pylist())


def _errors(path, name, column) -> pd.Categorical:
    codes, values = _dictionary(column)
    return _categorical(codes, [v.strip().rstrip(",").strip() or None for v in values.to_pylist()])


def _zip(path, name, column) -> pd.Categorical:
    codes, values = _dictionary(column)
    values = values.to_pylist()
    for code, value in enumerate(values):
        if not _ZIP.fullmatch(value.strip()):
            raise _bad_value(path, name, codes, code, value, "not a zip code (e.g. 91750.0)")
    return _categorical(codes, [float(v) for v in values])


def _amount(path, name, column) -> np.ndarray:
    codes, values = _dictionary(column)  # up to a few 100k distinct amounts: vectorized
    text = pc.utf8_trim_whitespace(pc.replace_substring(values, "$", "", max_replacements=1))
    valid = pc.match_substring_regex(text, _AMOUNT)
    if not pc.all(valid).as_py():
        code = pc.index(valid, False).as_py()
        raise _bad_value(path, name, codes, code, values[code].as_py(),
                         "not an amount (e.g. $134.09 or $-292.00)")
    return np.append(pc.cast(text, pa.float64()).to_numpy(), np.nan)[codes]


def _time(path, name, column) -> np.ndarray:
    codes, values = _dictionary(column)
    values = values.to_pylist()
    minutes = np.empty(len(values) + 1, np.int16)
    for code, value in enumerate(values):
        match = _TIME.fullmatch(value.strip())
        if not match or int(match[1]) > 23 or int(match[2]) > 59:
            raise _bad_value(path, name, codes, code, value, "not a time of day HH:MM")
        minutes[code] = int(match[1]) * 60 + int(match[2])
    return minutes[codes]


def _fraud(path, name, column) -> np.ndarray:
    codes, values = _dictionary(column)
    values = values.to_pylist()
    labels = np.empty(len(values) + 1, np.int8)
    for code, value in enumerate(values):
        if value not in ("Yes", "No"):
            raise _bad_value(path, name, codes, code, value, "label must be Yes or No")
        labels[code] = value == "Yes"
    return labels[codes]


def _merchant(path, name, column) -> pd.Categorical:
    codes, uniques = pd.factorize(column.to_numpy(), sort=False)  # first-appearance order
    return pd.Categorical.from_codes(codes.astype(np.int32, copy=False), categories=uniques)


def _integers(path, name, column) -> np.ndarray:
    return column.to_numpy()


_CONVERT = {name: _integers for name in _INTS} | {
    "Merchant Name": _merchant, "Time": _time, "Amount": _amount, "Use Chip": _strings,
    "Merchant City": _strings, "Merchant State": _strings, "Zip": _zip, "Errors?": _errors,
    "Is Fraud?": _fraud,
}


# --- file access ----------------------------------------------------------------------------

def _is_tar(path: Path) -> bool:
    return path.name.endswith((".tgz", ".tar.gz", ".tar"))


@contextmanager
def _open_binary(path: Path) -> Iterator:
    """A source for pyarrow: the path itself (multi-threaded; .gz by extension) or the CSV
    inside a tar archive."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: point raw_path at a TabFormer CSV, .gz or .tgz")
    if not _is_tar(path):
        yield str(path)
        return
    with tarfile.open(path) as archive:
        members = [m for m in archive.getmembers() if m.isfile() and m.name.endswith(".csv")]
        chosen = [m for m in members if Path(m.name).name == MEMBER_NAME] or members
        if len(chosen) != 1:
            raise TabFormerFormatError(path, 1, None, [m.name for m in members],
                                       f"the archive should hold exactly one CSV ({MEMBER_NAME})")
        yield archive.extractfile(chosen[0])


@contextmanager
def _open_text(path: Path) -> Iterator[io.TextIOBase]:
    with _open_binary(path) as source:
        if isinstance(source, str):
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt", newline="", encoding="utf-8-sig") as text:
                yield text
        else:
            yield io.TextIOWrapper(source, encoding="utf-8-sig", newline="")


def _line_of_row(path: Path, row: int) -> int:
    """The 1-based line of data row ``row`` (0-based, as pyarrow counts: empty lines skipped)."""
    with _open_text(path) as text:
        reader = csv.reader(text)
        next(reader)
        index = -1
        for record in reader:
            if record:
                index += 1
                if index == row:
                    return reader.line_num
    raise AssertionError(f"row {row} not found in {path}")
