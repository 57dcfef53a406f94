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

New transactions have no label yet: with ``label_required=False`` a header without
``Is Fraud?`` is accepted and the frame has no such column (with one, it is read as always).

Categorical categories are in order of first appearance in the file. Extra columns (the
Kaggle copy's index column) are ignored. Any bad input raises :class:`TabFormerFormatError`
naming the file, the line (1-based, header = line 1), the column and the value: a missing
column, an unparseable value, an unknown label, an amount with ``|amount| >= 1e9`` (overflows
and typos, never a card payment), text that is not UTF-8, a ``.gz`` that is not gzip or whose
stream is cut short, a ``.tgz`` that is not a tar archive, a directory. A path that does not
exist raises FileNotFoundError.

Speed: pyarrow.csv parses only the requested columns with fixed types, string columns as
dictionaries, and every per-value parse (Amount, Time, Zip, Errors?) runs on the dictionary
of distinct values, never per row. Locating the line of a bad value rescans the file, which
only happens on the error path.

In pieces (the dask engine, ``fraudlib.dask_engine``): ``blocks`` cuts a plain CSV into
line-aligned byte ranges, ``read_block`` reads one with the same parse and checks (its errors
count lines from the block, ``TabFormerFormatError.shifted`` places them in the file), and
``concat`` joins the pieces' frames into the frame of the whole file.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import re
import tarfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from pandas.api.types import union_categoricals

COLUMNS = (
    "User", "Card", "Year", "Month", "Day", "Time", "Amount", "Use Chip", "Merchant Name",
    "Merchant City", "Merchant State", "Zip", "MCC", "Errors?", "Is Fraud?",
)
# Empty values are allowed only here (online rows, no error); everywhere else they are bad input.
OPTIONAL = frozenset({"Merchant State", "Zip", "Errors?"})
MEMBER_NAME = "card_transaction.v1.csv"
LABEL = "Is Fraud?"

_DICT = pa.dictionary(pa.int32(), pa.string())
_INTS = {"User": pa.int32(), "Card": pa.int16(), "Year": pa.int16(), "Month": pa.int8(),
         "Day": pa.int8(), "MCC": pa.int16(), "Merchant Name": pa.int64()}
_ARROW_TYPES = {name: _INTS.get(name, _DICT) for name in COLUMNS}
_BLOCK_SIZE = 4 << 20  # fewer chunks than the 1 MB default (cheaper dictionary unification), little memory in flight
_AMOUNT = r"^-?\d+(\.\d+)?$"  # after dropping "$"; a pyarrow (RE2) pattern
_TIME = re.compile(r"(\d{1,2}):(\d{2})")
_ZIP = re.compile(r"\d+(\.0*)?")
RANK_TABLE_LIMIT = 1 << 26  # ``rank``: a presence table over a value range below this, else a sort
AMOUNT_LIMIT = 1e9  # |amount| at or above this is bad input (an overflow or a typo, not a payment)
_GZIP_MAGIC = b"\x1f\x8b"
_READ_CHUNK = 16 << 20  # bytes per read when counting lines
_SHOWN_VALUE_CHARS = 80  # a longer value is shortened in messages (a 400-digit amount)
# What a damaged file raises while it is decoded or decompressed (not FileNotFoundError & co:
# _check_file has ruled those out; an OSError from pyarrow is its zlib/gzip failure).
_DAMAGE = (UnicodeDecodeError, EOFError, zlib.error, gzip.BadGzipFile, tarfile.TarError, csv.Error)
# What parsing a block raises where the file is bad (``locate_error`` says where).
PARSE_ERRORS = (pa.ArrowInvalid, *_DAMAGE)


class TabFormerFormatError(ValueError):
    """The file is not valid TabFormer input; says where (file, line, column) and what.

    ``line`` is None when the problem is the whole file (a directory, not a tar archive).
    """

    def __init__(self, path, line: int | None, column: str | None, value, problem: str, hint: str = ""):
        self.path, self.line, self.column, self.value = str(path), line, column, value
        self.problem, self.hint = problem, hint
        where = str(path) + (f", line {line}" if line is not None else "") + (f", column {column!r}" if column else "")
        shown = repr(value)
        if len(shown) > _SHOWN_VALUE_CHARS:
            shown = f"{shown[:_SHOWN_VALUE_CHARS - 20]}...{shown[-10:]} ({len(str(value))} characters)"
        what = problem if value is None else f"{problem}: {shown}"
        hint = hint or "Fix or remove that row (or point at an unmodified TabFormer file) and run again."
        super().__init__(f"{where}: {what}. {hint}")

    def __reduce__(self):  # rebuilt from its facts when it crosses processes (Dask workers)
        return type(self), (self.path, self.line, self.column, self.value, self.problem, self.hint)

    def shifted(self, lines: int) -> "TabFormerFormatError":
        """The same error ``lines`` further down the file (a block's error, placed in its file)."""
        line = None if self.line is None else self.line + lines
        return type(self)(self.path, line, self.column, self.value, self.problem, self.hint)


def read_transactions(path: str | Path, columns: Sequence[str] = COLUMNS,
                      label_required: bool = True) -> pd.DataFrame:
    """Read and validate the given TabFormer ``columns`` of ``path`` (all 15 by default).

    The header must hold all 15 columns whichever are read (all but ``Is Fraud?`` when not
    ``label_required``: then a file without it gives a frame without it); values are validated
    for the columns read.
    """
    path = Path(path)
    columns = check(path, columns, label_required)
    try:
        # No name holds the table here: _compact frees each arrow column once converted.
        return _compact(_Source(path), _with_rows(_read_arrow(path, columns), path), columns)
    except _DAMAGE as error:  # raised while decoding or decompressing: locate it (slow path)
        raise _damage(path, error) from None


def _with_rows(table: pa.Table, path: Path) -> pa.Table:
    if table.num_rows == 0:
        raise no_rows_error(path)
    return table


def check(path: str | Path, columns: Sequence[str] = COLUMNS, label_required: bool = True) -> list[str]:
    """The columns ``read_transactions`` reads from ``path``, after its whole-file checks
    (existence, kind, compression, header), which raise its errors."""
    path = Path(path)
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        raise ValueError(f"unknown TabFormer column(s) {unknown}; the columns are {list(COLUMNS)}")
    columns = [c for c in COLUMNS if c in columns]
    _check_file(path)
    try:
        header = _check_header(path, label_required)
    except _DAMAGE as error:
        raise _damage(path, error) from None
    return columns if LABEL in header else [c for c in columns if c != LABEL]


def splittable(path: str | Path) -> bool:
    """Whether ``read_block`` can read ``path`` in pieces (a plain CSV, not a compressed stream)."""
    return not (_is_tar(Path(path)) or _is_compressed(Path(path)))


def no_rows_error(path) -> TabFormerFormatError:
    return TabFormerFormatError(path, 1, None, None, "no transactions after the header",
                                "Point raw_path at a TabFormer file with data rows.")


def read_block(path: str | Path, start: int, end: int, columns: Sequence[str]) -> pd.DataFrame:
    """The data rows in bytes ``[start, end)`` of the plain CSV ``path`` (``blocks`` gives
    line-aligned ranges), read and validated as ``read_transactions`` reads the whole file;
    ``columns`` as ``read_transactions`` settles them (header checked by the caller).

    Its errors count lines from the block's start as if the header preceded it (header =
    line 1): ``error.shifted(newlines before start - 1)`` names the line in the file. A row
    pyarrow cannot parse raises pyarrow's error, which ``locate_error`` places in the file.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        data = handle.readline()
        handle.seek(start)
        data += handle.read(end - start)
    return _compact(_Source(path, data), _parse(pa.BufferReader(data), columns), columns)  # no name holds the table


def blocks(path: str | Path, size: int) -> list[tuple[int, int]]:
    """Line-aligned byte ranges of about ``size`` bytes covering the data rows of the plain
    CSV ``path`` (after the header line); none when it has no data bytes."""
    with open(path, "rb") as handle:
        handle.readline()
        start, total = handle.tell(), Path(path).stat().st_size
        ranges = []
        while start < total:
            handle.seek(min(start + size, total))
            if handle.tell() < total:
                handle.readline()  # to the end of the line the cut falls in
            end = handle.tell()
            ranges.append((start, end))
            start = end
    return ranges


def newlines_before(path: str | Path, offset: int) -> int:
    with open(path, "rb") as handle:
        count = 0
        while offset > 0 and (chunk := handle.read(min(_READ_CHUNK, offset))):
            count += chunk.count(b"\n")
            offset -= len(chunk)
    return count


def locate_error(path: str | Path, columns: Sequence[str], error: BaseException) -> TabFormerFormatError:
    """A block's ``PARSE_ERRORS`` (they name no line of the file) as ``read_transactions``
    reports them: where the file is bad, found by rescanning it (slow path, bounded memory)."""
    path = Path(path)
    try:
        if isinstance(error, pa.ArrowInvalid):
            return _locate_arrow_error(path, list(columns), error)
        return _damage(path, error)
    except _DAMAGE as damage:
        return _damage(path, damage)


def rank(values: np.ndarray, positions: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """(sorted distinct values, each value's int32 position among them, or None unless
    ``positions``) of integer values: the dense codes of ids (preprocessing's node tables, the
    store's per-month dictionaries)."""
    if values.size == 0:
        return values[:0], np.zeros(0, np.int32) if positions else None
    low, high = int(values.min()), int(values.max())
    if high - low >= RANK_TABLE_LIMIT:
        return np.unique(values, return_inverse=True) if positions else (np.unique(values), None)
    # A presence table over the value range beats sorting millions of values.
    offset = values - low
    present = np.bincount(offset, minlength=high - low + 1) > 0
    return np.flatnonzero(present) + low, (np.cumsum(present) - 1).astype(np.int32)[offset] if positions else None


def concat(parts: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Frames read from consecutive pieces of one input (blocks, files, months, in order) as
    the frame of the whole: categoricals unified with their categories in order of first
    appearance, as if read at once. Empties ``parts`` column by column (memory)."""
    names, columns = list(parts[0].columns), {}
    for name in names:
        pieces = [part.pop(name) for part in parts]
        if isinstance(pieces[0].dtype, pd.CategoricalDtype):
            columns[name] = _union(pieces)
        else:
            columns[name] = np.concatenate([p.to_numpy() for p in pieces])
        del pieces
    return pd.DataFrame(columns, copy=False)


def _union(pieces: list[pd.Series]) -> pd.Categorical:
    typed = [p.array.categories for p in pieces if len(p.array.categories)]
    if not typed:  # null everywhere (Errors? of a file without errors)
        return pd.Categorical.from_codes(np.concatenate([p.array.codes for p in pieces]), categories=[])
    # A piece where the column is all null has categories of no dtype: give it the others'.
    empty = pd.Index([], dtype=typed[0].dtype)
    return union_categoricals([p.array if len(p.array.categories) else
                               pd.Categorical.from_codes(p.array.codes, categories=empty) for p in pieces])


@dataclass(frozen=True)
class _Source:
    """Where parsed rows come from, for error messages: the file, and for a block of it the
    block's bytes under the header (whose lines the errors then count)."""

    path: Path
    block: bytes | None = None

    def line_of_row(self, row: int) -> int:
        if self.block is None:
            return _line_of_row(self.path, row)
        text = io.TextIOWrapper(io.BytesIO(self.block), encoding="utf-8-sig", newline="")
        return _row_line(text, row, self.path)


def _compact(source: _Source, table: pa.Table, columns: list[str]) -> pd.DataFrame:
    path = source.path
    for name in columns:
        if name not in OPTIONAL and table.column(name).null_count:
            row = pc.index(pc.is_null(table.column(name)), True).as_py()
            raise TabFormerFormatError(path, source.line_of_row(row), name, "",
                                       "empty value in a required column")
    # One column at a time, handing each arrow column's memory back once converted (arrow's
    # allocator keeps freed pages otherwise): peak memory stays near one copy of the data.
    # copy=False keeps pandas from consolidating (copying) the columns.
    arrow, converted = {name: table.column(name) for name in columns}, {}
    del table
    for name in columns:
        converted[name] = _CONVERT[name](source, name, arrow.pop(name))
        pa.default_memory_pool().release_unused()
    return pd.DataFrame(converted, copy=False)


def _check_header(path: Path, label_required: bool = True) -> list[str]:
    with _open_text(path) as text:
        header = next(csv.reader(text), None)
    if not header:
        raise TabFormerFormatError(path, 1, None, None, "empty file, expected a TabFormer header",
                                   f"The header is {','.join(COLUMNS)}.")
    missing = [c for c in COLUMNS if c not in header and (label_required or c != LABEL)]
    if missing:
        raise TabFormerFormatError(path, 1, missing[0], None,
                                   f"header lacks column(s) {missing} (it has {header})",
                                   f"A TabFormer file has the columns {','.join(COLUMNS)}"
                                   + ("." if label_required else f" ({LABEL} optional)."))
    return header


def _parse(source, columns: list[str]) -> pa.Table:
    convert = pacsv.ConvertOptions(column_types=_ARROW_TYPES, include_columns=columns,
                                   null_values=[""], strings_can_be_null=True)
    return pacsv.read_csv(source, read_options=pacsv.ReadOptions(block_size=_BLOCK_SIZE), convert_options=convert)


def _read_arrow(path: Path, columns: list[str]) -> pa.Table:
    try:
        with _open_binary(path) as source:
            table = _parse(source, columns)
    except pa.ArrowInvalid as error:
        raise _locate_arrow_error(path, columns, error) from None
    except OSError as error:  # pyarrow's own gzip reader: a corrupt or truncated stream
        if not _is_compressed(path) or isinstance(error, (FileNotFoundError, PermissionError)):
            raise
        raise _damage(path, error) from None
    return table  # dictionaries differ per chunk; _dictionary() unifies one column at a time


def _locate_arrow_error(path: Path, columns: list[str], error: pa.ArrowInvalid) -> TabFormerFormatError:
    """Turn pyarrow's error (no row number) into ours by rescanning the file (slow path)."""
    with _open_text(path) as text:
        reader = csv.reader(text)
        header = next(reader)
        positions = {name: header.index(name) for name in columns}
        start = reader.line_num + 1  # the line a record starts on (a quoted value may span lines)
        for record in reader:
            first, start = start, reader.line_num + 1
            if not record:
                continue
            if len(record) != len(header):
                spans = f" (a quote opened on this line runs to line {reader.line_num})" \
                    if reader.line_num > first else ""
                return TabFormerFormatError(
                    path, first, None, ",".join(record),
                    f"row has {len(record)} fields, the header has {len(header)}{spans}")
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


def _bad_value(source: _Source, name: str, codes: np.ndarray, code: int, value, problem: str):
    row = int(np.flatnonzero(codes == code)[0])
    return TabFormerFormatError(source.path, source.line_of_row(row), name, value, problem)


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


def _strings(source, name, column) -> pd.Categorical:
    codes, values = _dictionary(column)
    return _categorical(codes, values.to_pylist())


def _errors(source, name, column) -> pd.Categorical:
    codes, values = _dictionary(column)
    return _categorical(codes, [v.strip().rstrip(",").strip() or None for v in values.to_pylist()])


def _zip(source, name, column) -> pd.Categorical:
    codes, values = _dictionary(column)
    values = values.to_pylist()
    for code, value in enumerate(values):
        if not _ZIP.fullmatch(value.strip()):
            raise _bad_value(source, name, codes, code, value, "not a zip code (e.g. 91750.0)")
    return _categorical(codes, [float(v) for v in values])


def _amount(source, name, column) -> np.ndarray:
    codes, values = _dictionary(column)  # up to a few 100k distinct amounts: vectorized
    text = pc.utf8_trim_whitespace(pc.replace_substring(values, "$", "", max_replacements=1))
    valid = pc.match_substring_regex(text, _AMOUNT)
    if not pc.all(valid).as_py():
        code = pc.index(valid, False).as_py()
        raise _bad_value(source, name, codes, code, values[code].as_py(),
                         "not an amount (e.g. $134.09 or $-292.00)")
    amounts = pc.cast(text, pa.float64())  # 400 digits become inf: caught by the range check
    in_range = pc.less(pc.abs(amounts), AMOUNT_LIMIT)
    if not pc.all(in_range).as_py():
        code = pc.index(in_range, False).as_py()
        raise _bad_value(source, name, codes, code, values[code].as_py(),
                         f"amount out of range (|amount| must be below {AMOUNT_LIMIT:,.0f})")
    return np.append(amounts.to_numpy(), np.nan)[codes]


def _time(source, name, column) -> np.ndarray:
    codes, values = _dictionary(column)
    values = values.to_pylist()
    minutes = np.empty(len(values) + 1, np.int16)
    for code, value in enumerate(values):
        match = _TIME.fullmatch(value.strip())
        if not match or int(match[1]) > 23 or int(match[2]) > 59:
            raise _bad_value(source, name, codes, code, value, "not a time of day HH:MM")
        minutes[code] = int(match[1]) * 60 + int(match[2])
    return minutes[codes]


def _fraud(source, name, column) -> np.ndarray:
    codes, values = _dictionary(column)
    values = values.to_pylist()
    labels = np.empty(len(values) + 1, np.int8)
    for code, value in enumerate(values):
        if value not in ("Yes", "No"):
            raise _bad_value(source, name, codes, code, value, "label must be Yes or No")
        labels[code] = value == "Yes"
    return labels[codes]


def _merchant(source, name, column) -> pd.Categorical:
    codes, uniques = pd.factorize(column.to_numpy(), sort=False)  # first-appearance order
    return pd.Categorical.from_codes(codes.astype(np.int32, copy=False), categories=uniques)


def _integers(source, name, column) -> np.ndarray:
    return column.to_numpy()


_CONVERT = {name: _integers for name in _INTS} | {
    "Merchant Name": _merchant, "Time": _time, "Amount": _amount, "Use Chip": _strings,
    "Merchant City": _strings, "Merchant State": _strings, "Zip": _zip, "Errors?": _errors,
    "Is Fraud?": _fraud,
}


# --- file access ----------------------------------------------------------------------------

def _is_tar(path: Path) -> bool:
    return path.name.endswith((".tgz", ".tar.gz", ".tar"))


def _is_compressed(path: Path) -> bool:
    return path.suffix in (".gz", ".tgz")


def _check_file(path: Path) -> None:
    """Whole-file problems, before any parsing: not there, a directory, a .gz that is not gzip,
    a .tgz that is not a tar archive, gzip data under a .csv name."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: point raw_path at a TabFormer CSV, .gz or .tgz")
    if path.is_dir():
        inside = sorted(str(p) for p in path.iterdir() if p.name.endswith((".csv", ".csv.gz", ".tgz")))
        raise TabFormerFormatError(path, None, None, None, "is a directory, not a file",
                                   "Point raw_path at the TabFormer file itself"
                                   + (f", e.g. {inside[0]}." if inside else " (a CSV, .gz or .tgz)."))
    if not path.is_file():
        raise TabFormerFormatError(path, None, None, None, "is not a regular file",
                                   "Point raw_path at a TabFormer CSV, .gz or .tgz.")
    with open(path, "rb") as f:
        magic = f.read(2)
    if _is_tar(path):
        try:
            with tarfile.open(path):
                pass
        except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
            reason = str(error).strip().splitlines()[0].rstrip(":")
            hint = ("It is gzip-compressed but holds no tar archive: a gzipped CSV is named .csv.gz."
                    if magic == _GZIP_MAGIC else "Point raw_path at transactions.tgz as downloaded, or at the CSV.")
            raise TabFormerFormatError(path, None, None, None, f"not a tar archive ({reason})", hint) from None
    elif path.suffix == ".gz" and magic != _GZIP_MAGIC:
        plain = _looks_like_text(path)
        raise TabFormerFormatError(
            path, None, None, None, f"named .gz but not gzip-compressed (it starts with {magic!r})",
            "It is plain text: name it .csv." if plain else "Point raw_path at a TabFormer CSV, .gz or .tgz.")
    elif path.suffix != ".gz" and magic == _GZIP_MAGIC:
        raise TabFormerFormatError(path, None, None, None, "gzip-compressed data under a name not ending .gz",
                                   "Name it .csv.gz (or decompress it).")


def _looks_like_text(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        return error.start > len(head) - 4  # only a character cut at the end of the sample
    return True


def _damage(path: Path, error: BaseException) -> TabFormerFormatError:
    """Where a file that failed to decode or decompress is damaged: rescans its bytes (slow path).

    Lines are counted on the raw bytes (newlines, as an editor counts), so undecodable text is
    located even where csv could not read it."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    lines = 1
    try:
        with _open_bytes(path) as stream:
            while chunk := stream.read(16 << 10):  # small: a failing read loses its chunk
                pending = len(decoder.getstate()[0])
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as bad:
                    at = max(bad.start - pending, 0)
                    byte = (bad.object[bad.start:bad.start + 1] or b"?")[0]
                    return TabFormerFormatError(
                        path, lines + chunk.count(b"\n", 0, at), None, None,
                        f"not UTF-8 text (byte 0x{byte:02x})",
                        "A TabFormer file is UTF-8 CSV text; was it re-encoded or is it another kind "
                        "of file? A compressed copy must be named .gz or .tgz.")
                lines += chunk.count(b"\n")
    except (EOFError, zlib.error, gzip.BadGzipFile, tarfile.TarError, OSError) as bad:
        return TabFormerFormatError(
            path, lines, None, None,
            f"the compressed data is corrupt or truncated near this line ({bad})",
            "Download or copy the file again.")
    if isinstance(error, csv.Error):
        return TabFormerFormatError(path, None, None, None, f"not readable as CSV ({error})",
                                    "A TabFormer file is a CSV with the header " + ",".join(COLUMNS) + ".")
    return TabFormerFormatError(path, None, None, None, f"unreadable ({type(error).__name__}: {error})",
                                "Point raw_path at an unmodified TabFormer CSV, .gz or .tgz.")


@contextmanager
def _open_bytes(path: Path) -> Iterator:
    """The decompressed bytes of the CSV (plain, .gz, or inside a tar archive)."""
    with _open_binary(path) as source:
        if isinstance(source, str):
            with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as stream:
                yield stream
        else:
            yield source


@contextmanager
def _open_binary(path: Path) -> Iterator:
    """A source for pyarrow: the path itself (multi-threaded; .gz by extension) or the CSV
    inside a tar archive."""
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
        return _row_line(text, row, path)


def _row_line(text: io.TextIOBase, row: int, path: Path) -> int:
    reader = csv.reader(text)
    next(reader)
    index = -1
    for record in reader:
        if record:
            index += 1
            if index == row:
                return reader.line_num
    raise AssertionError(f"row {row} not found in {path}")
