"""Read a canonical dataset's tables as Ray Data datasets (the later stages' API)."""

from __future__ import annotations

import os
from pathlib import Path

import ray.data

from forge_ray.data.schema import DATASET_KIND, TABLES
from forge_ray.errors import InputError
from forge_ray.io import read_manifest


def dataset_manifest(path: str | os.PathLike) -> dict:
    """The dataset's manifest (raises InputError if ``path`` is not a dataset)."""
    return read_manifest(path, DATASET_KIND)


def read_table(path: str | os.PathLike, table: str, **read_args) -> ray.data.Dataset:
    """Stream ``path/<table>/*.parquet`` as a Ray Dataset (lazy, bounded memory)."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; expected one of {TABLES}")
    dataset_manifest(path)
    folder = Path(path) / table
    if not folder.is_dir() or not any(folder.glob("*.parquet")):
        raise InputError(path, f"dataset has no {table} table")
    return ray.data.read_parquet(str(folder), **read_args)


def read_items(path: str | os.PathLike, **read_args) -> ray.data.Dataset:
    """``item_id`` int64 and ``embedding`` (fixed-size list) rows, plus key/text if present."""
    return read_table(path, "items", **read_args)


def read_pairs(path: str | os.PathLike, **read_args) -> ray.data.Dataset:
    """``item_a``, ``item_b`` int64 co-occurrence pairs."""
    return read_table(path, "pairs", **read_args)


def read_sequences(path: str | os.PathLike, **read_args) -> ray.data.Dataset:
    """``user_id`` int64 and ``item_ids`` list<int64> in time order."""
    return read_table(path, "sequences", **read_args)
