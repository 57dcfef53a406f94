"""Specification of fraudlib.training: hyperparameters, phases, metrics, repeatability, learning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fraudlib import graph_store, training
from fraudlib.graph_store import Graph

# Small XGBoost settings keep the suite fast; the defaults are exercised by the benchmark.
FAST_XGB = {"num_boost_round": 40, "num_parallel_tree": 1}


def _bits(values: np.ndarray, width: int) -> np.ndarray:
    return ((values[:, None] >> np.arange(width)) & 1).astype(np.float32)


def write_planted_graph(graph_dir: Path, n_users: int = 400, n_merchants: int = 200,
                        edges_per_user: dict | None = None, seed: int = 0) -> Path:
    """A graph directory whose fraud only the graph reveals.

    In every split a fresh 15 % of users are compromised: each pays at a "risky" merchant
    (merchant category 3), and half of all their transactions, at any merchant, are fraud.
    Other users avoid risky merchants and see 1 % fraud. A transaction's own features (its
    merchant, amount, chip use) say little; a 2-hop GNN sees whether its card touched a risky
    merchant. Node features are binary codes of ids, as in the real preprocessing.
    """
    rng = np.random.default_rng(seed)
    edges_per_user = edges_per_user or {"train": 8, "validation": 4, "test": 4}
    user_bits, merchant_bits = int(np.ceil(np.log2(n_users))), int(np.ceil(np.log2(n_merchants)))
    mcc = np.arange(n_merchants) % 16
    risky, safe = np.flatnonzero(mcc == 3), np.flatnonzero(mcc != 3)
    x_user = _bits(np.arange(n_users), user_bits)
    x_merchant = np.hstack([_bits(np.arange(n_merchants), merchant_bits), _bits(mcc, 4)])

    def split_edges(split: str, per_user: int):
        compromised = rng.random(n_users) < 0.15
        src, dst, fraud = [], [], []
        for user in range(n_users):
            count = max(1, rng.poisson(per_user))
            merchants = rng.choice(safe, count)
            if compromised[user]:
                merchants[0] = rng.choice(risky)
            src += [user] * count
            dst += merchants.tolist()
            fraud += (rng.random(count) < (0.5 if compromised[user] else 0.01)).tolist()
        fraud = np.asarray(fraud, dtype=np.int64)
        amount = rng.normal(0, 1, fraud.size) + 0.3 * fraud
        chip = np.eye(3, dtype=np.float32)[rng.integers(0, 3, fraud.size)]
        attr = np.column_stack([amount, chip, rng.integers(0, 2, fraud.size)]).astype(np.float32)
        return np.vstack([src, dst]).astype(np.int64), attr, fraud, np.full(fraud.size, split, dtype=object)

    parts = {split: split_edges(split, n) for split, n in edges_per_user.items()}
    common = dict(
        x_user=x_user, x_merchant=x_merchant,
        user_features=[f"card_bit{i}" for i in range(user_bits)],
        merchant_features=[f"merchant_bit{i}" for i in range(merchant_bits)] + [f"mcc_bit{i}" for i in range(4)],
        edge_features=["amount", "chip_swipe", "chip_chip", "chip_online", "errors"],
        feature_mask_user=np.zeros(user_bits, dtype=np.int32),
        feature_mask_merchant=np.array([0] * merchant_bits + [1] * 4, dtype=np.int32),
        feature_mask_edge=np.array([0, 1, 1, 1, 2], dtype=np.int32),
    )
    train_parts = [parts["train"], parts["validation"]]
    graph_store.write_part(graph_dir, "train", Graph(
        edge_index=np.hstack([p[0] for p in train_parts]), edge_attr=np.vstack([p[1] for p in train_parts]),
        label=np.concatenate([p[2] for p in train_parts]), split=np.concatenate([p[3] for p in train_parts]),
        **common))
    ei, attr, fraud, split = parts["test"]
    graph_store.write_part(graph_dir, "test", Graph(edge_index=ei, edge_attr=attr, label=fraud, split=split,
                                                    **common))
    graph_store.write_json(graph_dir / graph_store.MANIFEST, {"source": "planted test graph", "seed": seed})
    return graph_dir


@pytest.fixture(scope="module")
def planted_graph(tmp_path_factory) -> Path:
    return write_planted_graph(tmp_path_factory.mktemp("graph") / "graph")


@pytest.fixture(scope="module")
def trained(planted_graph, tmp_path_factory) -> training.TrainResult:
    return training.train(planted_graph, tmp_path_factory.mktemp("model"), {"num_epochs": 8},
                          FAST_XGB, device="cpu", progress=False)
