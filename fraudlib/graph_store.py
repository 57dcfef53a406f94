"""The graph directory: the one place that knows its on-disk layout.

The layout is the NVIDIA blueprint's (so its training container can read it), plus
``manifest.json``, ``encoders.json`` and a split file that keeps validation edges
identifiable::

    <graph_dir>/
      manifest.json                      source hash, counts, feature names and dims
      encoders.json                      fitted encoders (to encode new raw rows the same way)
      gnn/nodes/user.csv                 user (card) node features, header = feature names
      gnn/nodes/user_feature_mask.csv    the feature-group id of each column, one per line, no header
      gnn/nodes/merchant.csv
      gnn/nodes/merchant_feature_mask.csv
      gnn/edges/user_to_merchant.csv             src,dst (user row, merchant row)
      gnn/edges/user_to_merchant_label.csv       Fraud (0/1)
      gnn/edges/user_to_merchant_attr.csv        edge features
      gnn/edges/user_to_merchant_feature_mask.csv  (the edge features' groups)
      gnn/edges/user_to_merchant_split.csv       split (train / validation), year   [ours]
      gnn/test_gnn/nodes/...                     same files: the blueprint's test graph (its
      gnn/test_gnn/edges/...                     selection of the test period), for its clients
      test_edges.parquet                 every edge of the test period: src, dst, Fraud, year and
                                         the edge features (what evaluation and scoring read) [ours]

Node tables hold every node (ids 0..n-1, encoders fitted on all ids), so the training
graph and the test graph index the same node rows. The test period is kept whole (about 1.5M
edges at full size) in Parquet: the blueprint's CSV of it took ~5 s to write and ~5 s to read
again in every stage; ``read_part(.., "test")`` reads it (the CSV test graph of a directory
without it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

MANIFEST = "manifest.json"
TEST_EDGES = "test_edges.parquet"
ENCODERS = "encoders.json"
SPLITS = ("train", "validation", "test")


@dataclass
class Graph:
    """One bipartite user->merchant graph, as plain arrays."""

    x_user: np.ndarray  # float32 [U, Fu]
    x_merchant: np.ndarray  # float32 [M, Fm]
    edge_index: np.ndarray  # int64 [2, E]: row 0 user ids, row 1 merchant ids
    edge_attr: np.ndarray  # float32 [E, Fe]
    label: np.ndarray  # int64 [E]
    split: np.ndarray  # str [E]: train / validation / test
    user_features: list[str] = field(default_factory=list)
    merchant_features: list[str] = field(default_factory=list)
    edge_features: list[str] = field(default_factory=list)
    feature_mask_user: np.ndarray | None = None  # int32 [Fu]
    feature_mask_merchant: np.ndarray | None = None  # int32 [Fm]
    feature_mask_edge: np.ndarray | None = None  # int32 [Fe]
    year: np.ndarray | None = None  # int64 [E]: the transaction's year (graphs per period)

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    def edges(self, mask: np.ndarray) -> "Graph":
        """The same nodes with only the edges selected by ``mask``."""
        return dataclasses.replace(
            self, edge_index=self.edge_index[:, mask], edge_attr=_take_rows(self.edge_attr, mask),
            label=self.label[mask], split=self.split[mask],
            year=None if self.year is None else self.year[mask])


def _take_rows(table: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``table[mask]``, keeping a column-major table (preprocessing's) column-major: a gather
    per column (3x faster than numpy's row gather; the columns stay contiguous for pyarrow)."""
    if table.ndim != 2 or table.flags.c_contiguous or not table.flags.f_contiguous:
        return table[mask]
    rows = np.flatnonzero(mask) if np.asarray(mask).dtype == bool else np.asarray(mask)
    out = np.empty((len(rows), table.shape[1]), dtype=table.dtype, order="F")
    for i in range(table.shape[1]):
        np.take(table[:, i], rows, out=out[:, i])
    return out


def compact(graph: Graph) -> Graph:
    """The same edges over only the nodes they touch (relabelled). Message passing, and so
    every edge's score, is unchanged, while the work and the request no longer scale with
    all nodes of the node tables. Nodes keep their order (``np.unique``'s relabelling, found by
    marking the touched ids rather than sorting the edges' ends: 1.3 s -> 0.1 s at 6.2M edges)."""
    users, src = _touched(graph.edge_index[0], graph.x_user.shape[0])
    merchants, dst = _touched(graph.edge_index[1], graph.x_merchant.shape[0])
    return dataclasses.replace(graph, x_user=graph.x_user[users], x_merchant=graph.x_merchant[merchants],
                               edge_index=np.vstack([src, dst]).astype(np.int64))


def _touched(ids: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows of an ``n``-row node table that ``ids`` touch, in order, and ``ids`` renumbered
    over them."""
    touched = np.zeros(n, dtype=bool)
    touched[ids] = True
    return np.flatnonzero(touched), (np.cumsum(touched) - 1)[ids]


def _part_dir(graph_dir: Path, part: str) -> Path:
    if part not in ("train", "test"):
        raise ValueError(f"part must be 'train' or 'test', got {part!r}")
    return graph_dir / "gnn" if part == "train" else graph_dir / "gnn" / "test_gnn"


_CSV_CHUNK_ROWS = 250_000  # rows formatted per task when writing a large table
_BLOCK_ROWS = 4096  # rows of a column-to-row copy that stay in cache (53 float32 columns: 0.9 MB)


def _column(values: np.ndarray) -> np.ndarray:
    """A float column of small non-negative integers (binary codes, one-hot) as int8: the CSV
    text is the same (pyarrow writes 1.0 as ``1``), formatted twice as fast."""
    if values.dtype.kind != "f" or not np.array_equal(values[:1024], np.rint(values[:1024])):
        return values  # a real-valued column (or NaN), told by its first rows
    with np.errstate(invalid="ignore"):
        small = values.astype(np.int8)
    # signbit: a negative value, or -0.0, which is written "-0"
    return small if np.array_equal(small, values) and not np.signbit(values).any() else values


def _write_table(path: Path, columns: list[str], values: np.ndarray) -> None:
    """A CSV with a header; large tables are formatted in chunks on all cores (pyarrow's writer
    is single-threaded and releases the GIL), then written in order: the same bytes."""
    values = np.asarray(values)
    if values.ndim == 1:
        values = values[:, None]
    table = pa.table({name: _column(values[:, i]) for i, name in enumerate(columns)})

    def text(start: int) -> bytes:
        sink = pa.BufferOutputStream()
        pacsv.write_csv(table.slice(start, _CSV_CHUNK_ROWS), sink,
                        pacsv.WriteOptions(include_header=start == 0))
        return sink.getvalue().to_pybytes()

    starts = range(0, max(table.num_rows, 1), _CSV_CHUNK_ROWS)
    with open(path, "wb") as out, ThreadPoolExecutor(min(len(starts), os.cpu_count() or 1)) as pool:
        for chunk in pool.map(text, starts):
            out.write(chunk)


def _read_matrix(path: Path, dtype) -> tuple[np.ndarray, list[str]]:
    table = pacsv.read_csv(path)
    names = table.column_names
    if table.num_rows == 0:
        return np.zeros((0, len(names)), dtype=dtype), names
    cols = [table.column(n).to_numpy().astype(dtype, copy=False) for n in names]
    return np.column_stack(cols), names


def _write_mask(path: Path, mask, columns: list[str]) -> None:
    """A feature mask as the blueprint writes it: one group id per line, no header."""
    mask = np.asarray(mask, dtype=np.int32).reshape(-1)
    if mask.size != len(columns):
        raise ValueError(f"{path.name}: {mask.size} group ids for {len(columns)} feature columns")
    path.write_text("".join(f"{int(group)}\n" for group in mask))


def _read_mask(path: Path, width: int) -> np.ndarray:
    text = path.read_text().split()
    if len(text) != width or not all(t.lstrip("-").isdigit() for t in text):
        raise ValueError(f"{path}: expected {width} integer group ids, one per line and no header "
                         f"(the blueprint's layout), got {len(text)} values")
    return np.array([int(t) for t in text], dtype=np.int32)


def write_part(graph_dir: Path, part: str, graph: Graph) -> None:
    """Write one part ('train' = gnn/, 'test' = gnn/test_gnn/) of a graph directory."""
    base = _part_dir(Path(graph_dir), part)
    (base / "nodes").mkdir(parents=True, exist_ok=True)
    (base / "edges").mkdir(parents=True, exist_ok=True)
    _write_table(base / "nodes" / "user.csv", graph.user_features, graph.x_user)
    _write_table(base / "nodes" / "merchant.csv", graph.merchant_features, graph.x_merchant)
    _write_mask(base / "nodes" / "user_feature_mask.csv", graph.feature_mask_user, graph.user_features)
    _write_mask(base / "nodes" / "merchant_feature_mask.csv", graph.feature_mask_merchant, graph.merchant_features)
    _write_table(base / "edges" / "user_to_merchant.csv", ["src", "dst"], graph.edge_index.T)
    _write_table(base / "edges" / "user_to_merchant_label.csv", ["Fraud"], graph.label)
    _write_table(base / "edges" / "user_to_merchant_attr.csv", graph.edge_features, graph.edge_attr)
    _write_mask(base / "edges" / "user_to_merchant_feature_mask.csv", graph.feature_mask_edge, graph.edge_features)
    columns = {"split": pa.array(graph.split.astype(str))}
    if graph.year is not None:
        columns["year"] = pa.array(np.asarray(graph.year, dtype=np.int64))
    pacsv.write_csv(pa.table(columns), base / "edges" / "user_to_merchant_split.csv")


def write_parquet(table: "pa.Table | pd.DataFrame", path: Path) -> None:
    """A table as Parquet, dictionary-encoding only its dictionary (categorical) columns:
    trying it on every numeric column doubled the time of writing the test period's rows."""
    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    pq.write_table(table, path, use_dictionary=[f.name for f in table.schema if pa.types.is_dictionary(f.type)])


def write_test_edges(graph_dir: Path, graph: Graph) -> None:
    """Every edge of the test period (``TEST_EDGES``); its nodes are the test part's."""
    columns = {"src": graph.edge_index[0], "dst": graph.edge_index[1],
               "Fraud": np.asarray(graph.label, dtype=np.int8), "year": np.asarray(graph.year, dtype=np.int16)}
    columns |= {name: graph.edge_attr[:, i] for i, name in enumerate(graph.edge_features)}
    write_parquet(pa.table(columns), Path(graph_dir) / TEST_EDGES)


def read_part(graph_dir: Path | str, part: str) -> Graph:
    """Read one part of a graph directory: 'train' (train + validation edges) or 'test'
    (every edge of the test period: ``TEST_EDGES``, else the blueprint's test graph)."""
    base = _part_dir(Path(graph_dir), part)
    if not base.is_dir():
        raise FileNotFoundError(f"{base} does not exist: is {graph_dir} a preprocessed graph directory?")
    x_user, user_features = _read_matrix(base / "nodes" / "user.csv", np.float32)
    x_merchant, merchant_features = _read_matrix(base / "nodes" / "merchant.csv", np.float32)
    masks = {name: _read_mask(base / sub / f"{name}.csv", width)
             for sub, name, width in (("nodes", "user_feature_mask", len(user_features)),
                                      ("nodes", "merchant_feature_mask", len(merchant_features)))}
    nodes = dict(x_user=x_user, x_merchant=x_merchant, user_features=user_features,
                 merchant_features=merchant_features, feature_mask_user=masks["user_feature_mask"],
                 feature_mask_merchant=masks["merchant_feature_mask"])
    edge_mask = base / "edges" / "user_to_merchant_feature_mask.csv"
    if part == "test" and (Path(graph_dir) / TEST_EDGES).is_file():
        table = pq.ParquetFile(Path(graph_dir) / TEST_EDGES)
        edge_features = table.schema_arrow.names[4:]
        edge_attr = _read_rows_table(Path(graph_dir) / TEST_EDGES, edge_features)
        head = table.read(columns=["Fraud", "year"])
        graph = Graph(**nodes, edge_index=read_edge_index(graph_dir, part),
                      edge_attr=edge_attr, label=head.column("Fraud").to_numpy().astype(np.int64),
                      split=np.full(head.num_rows, "test", dtype=object), edge_features=edge_features,
                      feature_mask_edge=_read_mask(edge_mask, len(edge_features)),
                      year=head.column("year").to_numpy().astype(np.int64))
        del head, table
        pa.default_memory_pool().release_unused()
        return graph
    label, _ = _read_matrix(base / "edges" / "user_to_merchant_label.csv", np.int64)
    edge_attr, edge_features = _read_matrix(base / "edges" / "user_to_merchant_attr.csv", np.float32)
    split = pacsv.read_csv(base / "edges" / "user_to_merchant_split.csv",
                           convert_options=pacsv.ConvertOptions(column_types={"split": pa.string()}))
    return Graph(
        **nodes,
        edge_index=read_edge_index(graph_dir, part),
        edge_attr=edge_attr,
        label=label[:, 0],
        split=np.asarray(split.column("split").to_pylist(), dtype=object),
        edge_features=edge_features,
        feature_mask_edge=_read_mask(edge_mask, len(edge_features)),
        year=split.column("year").to_numpy().astype(np.int64) if "year" in split.column_names else None,
    )


def _read_rows_table(path: Path, columns: list[str]) -> np.ndarray:
    """``columns`` of a Parquet file as one float32 row-major table, a row group per task on
    every core. Memory: a row group at a time per core, not the whole Arrow table beside its
    stacked copy (3x the table, and Arrow's pool kept the pages: 5.6 GB of RSS for the 1.3 GB
    test table at 100M rows). Each group's columns are laid side by side as rows, then copied
    into the table in row blocks that stay in cache: writing a column into a row-major table
    strides through memory (5 s of the 5.5 s read at 100M rows)."""
    meta = pq.ParquetFile(path).metadata
    sizes = [meta.row_group(r).num_rows for r in range(meta.num_row_groups)]
    starts = np.cumsum([0, *sizes])
    out = np.empty((meta.num_rows, len(columns)), np.float32)

    def group(r: int) -> None:
        table = pq.ParquetFile(path).read_row_group(r, columns=columns, use_threads=False)
        block = np.empty((len(columns), sizes[r]), np.float32)
        for i in range(len(columns)):
            block[i] = table.column(i).to_numpy()
        del table
        rows = out[starts[r]:starts[r + 1]]
        for a in range(0, sizes[r], _BLOCK_ROWS):
            rows[a:a + _BLOCK_ROWS] = block[:, a:a + _BLOCK_ROWS].T

    with ThreadPoolExecutor(max(1, min(len(sizes), os.cpu_count() or 1))) as pool:
        list(pool.map(group, range(len(sizes))))
    pa.default_memory_pool().release_unused()
    return out


def read_edge_index(graph_dir: Path | str, part: str) -> np.ndarray:
    """One part's edge index ([2, edges], as ``read_part`` gives it) without the rest."""
    if part == "test" and (Path(graph_dir) / TEST_EDGES).is_file():
        ends = pq.read_table(Path(graph_dir) / TEST_EDGES, columns=["src", "dst"])
        return np.vstack([ends.column("src").to_numpy(), ends.column("dst").to_numpy()])
    edge_index, _ = _read_matrix(_part_dir(Path(graph_dir), part) / "edges" / "user_to_merchant.csv", np.int64)
    return np.ascontiguousarray(edge_index.T)


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_manifest(graph_dir: Path | str) -> dict:
    path = Path(graph_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the preprocess stage first")
    return json.loads(path.read_text())


def read_encoders(graph_dir: Path | str) -> dict:
    return json.loads((Path(graph_dir) / ENCODERS).read_text())


def manifest_hash(graph_dir: Path | str) -> str | None:
    """sha256 of the graph directory's manifest.json: names the data a model was trained on."""
    path = Path(graph_dir) / MANIFEST
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
