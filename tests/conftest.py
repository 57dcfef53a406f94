"""Shared fixtures: small TabFormer files (hand-written for quirks, synthetic for volume)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fraudlib import synthetic

TABFORMER_HEADER = ("User,Card,Year,Month,Day,Time,Amount,Use Chip,Merchant Name,Merchant City,"
                    "Merchant State,Zip,MCC,Errors?,Is Fraud?")


@pytest.fixture
def write_tabformer(tmp_path):
    """Write data lines under the TabFormer header: ``write_tabformer(lines, name=..., header=...)``."""

    def write(lines: list[str], name: str = "card_transaction.v1.csv", header: str = TABFORMER_HEADER) -> Path:
        path = tmp_path / name
        path.write_text("\n".join([header, *lines]) + "\n")
        return path

    return write


@pytest.fixture(scope="session")
def synthetic_csv(tmp_path_factory) -> Path:
    """30,000 synthetic transactions (every year 1991-2020, fraud in train/validation/test)."""
    path = tmp_path_factory.mktemp("raw") / "card_transaction.v1.csv"
    synthetic.generate(path, 30_000, seed=0)
    return path
