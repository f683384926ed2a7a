"""The canonical dataset: the contract every later stage reads.

A dataset folder holds (each table optional)::

    items/part-*.parquet      item_id int64, embedding fixed_size_list<float32|float16>[D],
                              optional item_key string (the source's own id, e.g. an ASIN)
                              and text string (for `forge-ray embed`)
    pairs/part-*.parquet      item_a int64, item_b int64  (co-occurring items)
    sequences/part-*.parquet  user_id int64, item_ids list<int64> (time order),
                              optional timestamps list<int64> (seconds) and
                              user_key string (the source's own user id)
    manifest.json             kind "dataset", counts, embedding dim/dtype, sources, drops

Shards hold at most ``DEFAULT_ROWS_PER_SHARD`` rows so that Ray Data streams them
with bounded memory (one 512-d float32 shard of 65,536 rows is 128 MiB).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DATASET_KIND = "dataset"
TABLES = ("items", "pairs", "sequences")
DEFAULT_ROWS_PER_SHARD = 65_536


def items_schema(dim: int, dtype: str = "float32", with_key: bool = False,
                 with_text: bool = False) -> pa.Schema:
    """Schema of ``items/``: ``dim`` is the embedding width (0 = no embedding column)."""
    fields = [pa.field("item_id", pa.int64(), nullable=False)]
    if dim:
        value = pa.float16() if dtype == "float16" else pa.float32()
        fields.append(pa.field("embedding", pa.list_(value, dim)))
    if with_key:
        fields.append(pa.field("item_key", pa.string()))
    if with_text:
        fields.append(pa.field("text", pa.string()))
    return pa.schema(fields)


PAIRS_SCHEMA = pa.schema([pa.field("item_a", pa.int64(), nullable=False),
                          pa.field("item_b", pa.int64(), nullable=False)])


def sequences_schema(with_timestamps: bool = False, with_user_key: bool = False) -> pa.Schema:
    """Schema of ``sequences/``; ``user_key`` keeps the source's own user id (a string)."""
    fields = [pa.field("user_id", pa.int64(), nullable=False),
              pa.field("item_ids", pa.list_(pa.int64()))]
    if with_timestamps:
        fields.append(pa.field("timestamps", pa.list_(pa.int64())))
    if with_user_key:
        fields.append(pa.field("user_key", pa.string()))
    return pa.schema(fields)


def embedding_array(emb: np.ndarray) -> pa.FixedSizeListArray:
    """(N, D) float array -> Arrow fixed_size_list<float>[D] without copying rows."""
    emb = np.ascontiguousarray(emb)
    n, d = emb.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), d)


def embeddings_to_numpy(col: pa.Array | pa.ChunkedArray | np.ndarray) -> np.ndarray:
    """An embedding column in any form we meet it -> (N, D) float32 ndarray.

    Handles Arrow fixed_size_list columns, Ray tensor columns (already 2-D) and the
    object arrays of per-row arrays that Ray Data hands ``map_batches`` for
    fixed_size_list Parquet columns.
    """
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if isinstance(col, pa.FixedSizeListArray):
        d = col.type.list_size
        flat = col.flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(-1, d).astype(np.float32, copy=False)
    arr = np.asarray(col)
    if arr.dtype == object:
        arr = np.stack(arr) if len(arr) else np.zeros((0, 0), np.float32)
    return arr.astype(np.float32, copy=False)


class ShardWriter:
    """Writes one table as numbered Parquet shards of at most ``rows_per_shard`` rows.

    Feed it Arrow tables or record batches of any size; it buffers at most one shard.
    ``prefix`` keeps shard names unique when several writers (Ray tasks) share a
    folder.
    """

    def __init__(self, folder: str | os.PathLike, schema: pa.Schema,
                 rows_per_shard: int = DEFAULT_ROWS_PER_SHARD, prefix: str = "part"):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.rows_per_shard = rows_per_shard
        self.prefix = prefix
        self.rows = 0
        self.shards = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def write(self, data: pa.Table | pa.RecordBatch) -> None:
        table = pa.Table.from_batches([data]) if isinstance(data, pa.RecordBatch) else data
        table = table.select(self.schema.names).cast(self.schema)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= self.rows_per_shard:
            whole = pa.concat_tables(self._pending)
            self._flush(whole.slice(0, self.rows_per_shard))
            rest = whole.slice(self.rows_per_shard)
            self._pending, self._pending_rows = [rest], rest.num_rows

    def close(self) -> int:
        """Flush the last partial shard; returns the number of rows written."""
        if self._pending_rows:
            self._flush(pa.concat_tables(self._pending))
        self._pending, self._pending_rows = [], 0
        return self.rows

    def _flush(self, table: pa.Table) -> None:
        path = self.folder / f"{self.prefix}-{self.shards:05d}.parquet"
        pq.write_table(table, path, compression="zstd")
        self.rows += table.num_rows
        self.shards += 1

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
