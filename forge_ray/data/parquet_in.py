"""Parquet already in canonical shape -> ``items`` / ``pairs`` / ``sequences`` / ``interactions``.

Accepted inputs:

- one ``.parquet`` file;
- a folder of ``.parquet`` files (every file of one table);
- a canonical dataset folder with ``items/``, ``pairs/``, ``sequences/`` (and/or
  ``interactions/``) subfolders of Parquet shards.

Each file's table is recognised by its columns: ``item_a, item_b`` -> pairs;
``user_id, item_ids`` -> sequences; ``item_id`` (+ ``embedding`` and/or
``item_key``/``text``) -> items; user/item/timestamp (aliases in
:mod:`forge_ray.data.interactions`) -> interactions. Embeddings may be fixed-size or
variable lists of floats (all rows must share one width). Chunks are row-group ranges
``[start, stop)`` of the file named by ``Chunk.member`` (relative to ``Chunk.path``),
grouped to about ``chunk_rows`` rows; memory per chunk = those row groups.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from forge_ray.data import interactions
from forge_ray.data.schema import PAIRS_SCHEMA, embedding_array, embeddings_to_numpy, items_schema
from forge_ray.data.chunks import Chunk, ReadResult, finite_rows
from forge_ray.errors import InputError

SUBFOLDERS = ("items", "pairs", "sequences", "interactions")


def is_parquet(path: str | os.PathLike) -> bool:
    p = Path(path)
    if p.is_dir():
        return bool(_files(p))
    with open(p, "rb") as f:
        return f.read(4) == b"PAR1" or p.suffix == ".parquet"


def _files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    subs = [root / s for s in SUBFOLDERS if (root / s).is_dir()]
    return sorted(f for d in (subs or [root]) for f in d.glob("*.parquet"))


def _schema(path: Path) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(path, f"not a readable Parquet file ({e})") from None


def table_of(names: list[str], source: str | os.PathLike) -> str:
    """Which canonical table a Parquet file with these columns holds."""
    cols = set(names)
    if {"item_a", "item_b"} <= cols:
        return "pairs"
    if {"user_id", "item_ids"} <= cols:
        return "sequences"
    if interactions.columns(names) is not None:
        return "interactions"
    if "item_id" in cols and cols & {"embedding", "item_key", "text"}:
        return "items"
    raise InputError(source, f"Parquet columns {sorted(cols)} match no known table (items: "
                             "item_id+embedding; pairs: item_a,item_b; sequences: user_id,item_ids; "
                             "interactions: user_id,item_id,timestamp)")


def detect(path: str | os.PathLike) -> str:
    files = _files(Path(path))
    if not files:
        raise InputError(path, "unrecognised input: a folder with no Parquet files "
                               "(and no Amazon user_sequence.txt)")
    tables = {table_of(_schema(f).names, f) for f in files}
    return "interactions" if tables == {"interactions"} else "parquet"


def plan(path: str, chunk_rows: int, fmt: str = "parquet") -> list[Chunk]:
    root = Path(path)
    chunks = []
    for f in _files(root):
        table = table_of(_schema(f).names, f)
        try:
            meta = pq.ParquetFile(f).metadata
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f, f"not a readable Parquet file ({e})") from None
        member = "" if root.is_file() else str(f.relative_to(root))
        start, rows = 0, 0
        for g in range(meta.num_row_groups):
            rows += meta.row_group(g).num_rows
            if rows >= chunk_rows or g == meta.num_row_groups - 1:
                chunks.append(Chunk(path, fmt, table, start, g + 1, member))
                start, rows = g + 1, 0
    return chunks


def read(chunk: Chunk, strict: bool = False) -> ReadResult:
    path = Path(chunk.path) / chunk.member if chunk.member else Path(chunk.path)
    try:
        table = pq.ParquetFile(path).read_row_groups(range(chunk.start, chunk.stop))
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(path, f"cannot read row groups [{chunk.start}, {chunk.stop}) ({e})") from None
    try:
        if chunk.table == "interactions":
            return interactions.normalise(table, interactions.columns(table.column_names), str(path),
                                          strict)
        if chunk.table == "pairs":
            return ReadResult(table.select(["item_a", "item_b"]).cast(PAIRS_SCHEMA))
        if chunk.table == "sequences":
            return _sequences(table, path, strict)
        return _items(table, path, strict)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        # columns Arrow cannot convert to the canonical types (e.g. 'id999' as an id)
        raise InputError(path, f"row groups [{chunk.start}, {chunk.stop}) do not convert to the "
                               f"canonical {chunk.table} table: {e}") from None


def _sequences(table: pa.Table, path: Path, strict: bool) -> ReadResult:
    keep = [c for c in ("user_id", "item_ids", "timestamps", "user_key") if c in table.column_names]
    table = table.select(keep)
    lengths = pc.fill_null(pc.list_value_length(table.column("item_ids")), 0)
    empty = pc.equal(lengths, 0)
    n_empty = pc.sum(empty).as_py() or 0
    dropped = {}
    if n_empty:
        if strict:
            raise InputError(path, f"{n_empty} sequence(s) with no items")
        dropped["empty_sequence"] = n_empty
        table = table.filter(pc.invert(empty))
    types = {"user_id": pa.int64(), "item_ids": pa.list_(pa.int64()),
             "timestamps": pa.list_(pa.int64()), "user_key": pa.string()}
    return ReadResult(table.cast(pa.schema([pa.field(c, types[c]) for c in keep])), dropped)


def _items(table: pa.Table, path: Path, strict: bool) -> ReadResult:
    id_col = interactions.int_column(table.column("item_id"), str(path), "item_id")
    ok = np.array(pc.is_valid(id_col), dtype=bool)  # writable: NaN rows are masked out below
    dropped = {}
    if not ok.all():
        bad = int((~ok).sum())
        if strict:
            raise InputError(path, f"{bad} item row(s) with a null item_id")
        dropped["null_item_id"] = bad
    ids = id_col.fill_null(-1).to_numpy()
    out = {}
    dim, dtype = 0, "float32"
    if "embedding" in table.column_names:
        col = table.column("embedding").combine_chunks()
        if not pa.types.is_fixed_size_list(col.type):
            widths = pc.unique(pc.list_value_length(col)).to_pylist()
            if len(widths) > 1 or None in widths:
                raise InputError(path, f"embedding rows have differing widths {sorted(map(str, widths))}")
        emb = embeddings_to_numpy(col) if len(col) else np.zeros((0, 0), np.float32)
        if pa.types.is_fixed_size_list(col.type) and col.type.value_type == pa.float16():
            dtype, emb = "float16", emb.astype(np.float16)
        dim = emb.shape[1] if emb.ndim == 2 and len(emb) else getattr(col.type, "list_size", 0)
        finite = finite_rows(emb)
        if not finite[ok].all():  # rows already dropped for a null id are not counted again
            bad = int((ok & ~finite).sum())
            if strict:
                raise InputError(path, f"{bad} embedding row(s) hold NaN/Inf")
            dropped["nan_embedding"] = bad
        ok &= finite
        if dim:
            out["embedding"] = embedding_array(emb[ok])
    schema = items_schema(dim, dtype, "item_key" in table.column_names, "text" in table.column_names)
    out = {"item_id": pa.array(ids[ok], pa.int64()), **out}
    for c in ("item_key", "text"):
        if c in table.column_names:
            out[c] = table.column(c).cast(pa.string()).filter(pa.array(ok))
    return ReadResult(pa.table(out).cast(schema), dropped)


def info(path: str, fmt: str) -> dict:
    rows: dict[str, int] = {}
    dims = set()
    for f in _files(Path(path)):
        schema = _schema(f)
        table = table_of(schema.names, f)
        rows[table] = rows.get(table, 0) + pq.ParquetFile(f).metadata.num_rows
        if table == "items" and "embedding" in schema.names:
            # variable-width lists: the width is only known once rows are read (None)
            dims.add(getattr(schema.field("embedding").type, "list_size", None))
    dim = dims.pop() if len(dims) == 1 else (0 if not dims else None)
    return {"embedding_dim": dim, "rows": rows}
