"""The graph directory's on-disk layout: what the blueprint's training container reads."""

import numpy as np
import pytest

from fraudlib import graph_store
from test_scoring import random_graph


def test_feature_masks_are_written_in_the_blueprint_layout_and_read_back(tmp_path):
    g = random_graph(fu=3, fm=4, fe=5)
    g.feature_mask_merchant = np.array([1, 1, 2, 2], np.int32)
    g.feature_mask_edge = np.array([3, 4, 4, 5, 6], np.int32)
    graph_store.write_part(tmp_path, "test", g)

    base = tmp_path / "gnn" / "test_gnn"
    assert (base / "nodes" / "user_feature_mask.csv").read_text() == "0\n0\n0\n"
    assert (base / "nodes" / "merchant_feature_mask.csv").read_text() == "1\n1\n2\n2\n"
    assert (base / "edges" / "user_to_merchant_feature_mask.csv").read_text() == "3\n4\n4\n5\n6\n"
    assert not (base / "edges" / "user_to_merchant_attr_feature_mask.csv").exists()
    back = graph_store.read_part(tmp_path, "test")
    np.testing.assert_array_equal(back.feature_mask_edge, g.feature_mask_edge)
    np.testing.assert_array_equal(back.feature_mask_merchant, g.feature_mask_merchant)


def test_a_mask_with_a_header_row_is_refused_naming_the_file(tmp_path):
    graph_store.write_part(tmp_path, "test", random_graph(fe=2))
    path = tmp_path / "gnn" / "test_gnn" / "edges" / "user_to_merchant_feature_mask.csv"
    path.write_text("E_0,E_1\n2,2\n")
    with pytest.raises(ValueError, match="user_to_merchant_feature_mask.csv: expected 2 integer group ids"):
        graph_store.read_part(tmp_path, "test")


def test_tables_are_written_in_chunks_as_the_same_bytes_as_one_pyarrow_write(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.csv as pacsv

    monkeypatch.setattr(graph_store, "_CSV_CHUNK_ROWS", 7)  # several chunks of a small table
    rng = np.random.default_rng(0)
    values = np.hstack([rng.integers(0, 2, (50, 3)), rng.normal(size=(50, 2))]).astype(np.float32)
    values[4, 3], values[5, 4], values[6, 0] = -0.0, np.nan, 3.0  # "-0", "nan" and an integer
    values[40, 1], values[30, 2] = -0.0, np.nan  # in columns of otherwise 0/1 values: kept as floats
    columns = ["a", "b", "c", "d", "e"]

    graph_store._write_table(tmp_path / "chunked.csv", columns, values)

    pacsv.write_csv(pa.table({c: values[:, i] for i, c in enumerate(columns)}), tmp_path / "whole.csv")
    assert (tmp_path / "chunked.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()


def test_a_parquet_edge_table_of_several_row_groups_is_read_into_the_same_row_major_table(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(graph_store, "_BLOCK_ROWS", 3)  # several row blocks per group, one cut short
    values = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    path = tmp_path / "edges.parquet"
    pq.write_table(pa.table({f"c{i}": values[:, i] for i in range(4)}), path, row_group_size=8)
    assert pq.ParquetFile(path).metadata.num_row_groups == 7

    table = graph_store._read_rows_table(path, ["c1", "c3"])

    assert table.flags.c_contiguous and table.dtype == np.float32
    np.testing.assert_array_equal(table, values[:, [1, 3]])


def test_compact_relabels_the_touched_nodes_in_order_as_np_unique_does():
    g = random_graph(users=200, merchants=150, fu=2, fm=3, fe=1)  # 300 edges: some nodes left untouched
    users, src = np.unique(g.edge_index[0], return_inverse=True)
    merchants, dst = np.unique(g.edge_index[1], return_inverse=True)
    assert users.size < g.x_user.shape[0] and merchants.size < g.x_merchant.shape[0]

    small = graph_store.compact(g)

    np.testing.assert_array_equal(small.edge_index, np.vstack([src, dst]))
    np.testing.assert_array_equal(small.x_user, g.x_user[users])
    np.testing.assert_array_equal(small.x_merchant, g.x_merchant[merchants])
