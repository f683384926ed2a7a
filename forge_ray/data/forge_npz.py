"""FORGE's own npz files -> ``items`` and ``pairs`` chunks.

- contrastive (``contrastive_data_mask.npz``): ``itemEncID`` (pickled dict item id ->
  row of ``embeds``), ``pairs`` int (P, 2) co-occurring item ids, ``embeds`` (N, D).
- reconstruction (``reconstruct_data_mask.npz``): ``ids`` (N,) int, ``embeds`` (N, D).

Rows are streamed with :mod:`forge_ray.data.npz` (never ``np.load`` of a member).
``itemEncID`` is the exception: a pickle cannot be streamed, so it is unpickled once
per process (restricted unpickler; ~100 B/entry transient, 700 MB for FORGE's 6.8M
items) and turned into an (N,) int64 row -> item id array (8 B/entry), cached.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pyarrow as pa

from forge_ray.core.arrays import has_duplicates
from forge_ray.data import npz, resources
from forge_ray.data.chunks import Chunk, ReadResult, finite_rows
from forge_ray.data.schema import PAIRS_SCHEMA, embedding_array, items_schema
from forge_ray.errors import InputError

REQUIRED = {
    "forge_contrastive_npz": ("itemEncID", "pairs", "embeds"),
    "forge_reconstruct_npz": ("ids", "embeds"),
}


def detect(path: str | os.PathLike) -> str:
    names = set(npz.members(path))
    if {"itemEncID", "embeds"} <= names:
        return "forge_contrastive_npz"
    if {"ids", "embeds"} <= names:
        return "forge_reconstruct_npz"
    raise InputError(path, f"unrecognised npz: members {sorted(names)} are neither FORGE "
                           "contrastive (itemEncID, pairs, embeds) nor reconstruction (ids, embeds)")


def check(path: str, fmt: str) -> dict[str, npz.NpyInfo]:
    """Member headers of a FORGE npz, validated (one-line InputError naming ``path``)."""
    infos = npz.members(path)
    missing = [m for m in REQUIRED[fmt] if m not in infos]
    if missing:
        raise InputError(path, f"missing npz member(s) {', '.join(missing)} "
                               f"(a {fmt} file needs {', '.join(REQUIRED[fmt])})")
    emb = infos["embeds"]
    if len(emb.shape) != 2 or emb.dtype.kind != "f":
        raise InputError(path, f"embeds must be a 2-D float array, found shape {emb.shape} "
                               f"dtype {emb.dtype}")
    if fmt == "forge_reconstruct_npz":
        ids = infos["ids"]
        if len(ids.shape) != 1 or ids.dtype.kind not in "iu":
            raise InputError(path, f"ids must be a 1-D integer array, found shape {ids.shape} "
                                   f"dtype {ids.dtype}")
        if ids.shape[0] != emb.shape[0]:
            raise InputError(path, f"ids has {ids.shape[0]} rows but embeds has {emb.shape[0]}")
    else:
        pairs = infos["pairs"]
        if len(pairs.shape) != 2 or pairs.shape[1] != 2 or pairs.dtype.kind not in "iu":
            raise InputError(path, f"pairs must be an integer (P, 2) array, found shape "
                                   f"{pairs.shape} dtype {pairs.dtype}")
    return infos


@functools.lru_cache(maxsize=4)
def _row_item_ids(path: str, _size: int, _mtime_ns: int) -> np.ndarray:
    infos = check(path, "forge_contrastive_npz")
    n = infos["embeds"].shape[0]
    enc = npz.read_pickled(path, infos["itemEncID"])
    if not isinstance(enc, dict):
        raise InputError(path, f"itemEncID must be a dict item id -> row, found {type(enc).__name__}")
    if len(enc) != n:
        raise InputError(path, f"itemEncID has {len(enc)} entries but embeds has {n} rows")
    try:
        keys = np.fromiter((int(k) for k in enc.keys()), dtype=np.int64, count=n)
        rows = np.fromiter((int(v) for v in enc.values()), dtype=np.int64, count=n)
    except (TypeError, ValueError, OverflowError):
        raise InputError(path, "itemEncID keys and values must be integers") from None
    del enc
    if n and (rows.min() < 0 or rows.max() >= n):
        raise InputError(path, f"itemEncID maps to rows outside [0, {n})")
    out = np.full(n, -1, dtype=np.int64)
    out[rows] = keys
    # n entries, all rows in range: a bijection iff no row was named twice.
    if has_duplicates(rows):
        raise InputError(path, "itemEncID is not a bijection: several item ids share a row")
    out.flags.writeable = False
    return out


def row_item_ids(path: str | os.PathLike) -> np.ndarray:
    """(N,) int64: the item id of each ``embeds`` row of a contrastive npz (cached)."""
    path = os.fspath(path)
    st = os.stat(path)
    return _row_item_ids(path, st.st_size, st.st_mtime_ns)


def plan(path: str, fmt: str, chunk_rows: int) -> list[Chunk]:
    """Items chunks over ``embeds`` rows (+ pairs chunks). Validates itemEncID fully.

    Refused (one line, the estimate in it) when one chunk of ``embeds`` rows cannot
    fit in the available memory (e.g. a header declaring 10^6-d rows).

    Deflated members are planned like stored ones (same memory bound per chunk), but
    each chunk re-decompresses the member up to its start: see :mod:`npz`.
    """
    infos = check(path, fmt)
    emb = infos["embeds"]
    rows = min(chunk_rows, emb.shape[0])
    # a read task holds its rows ~3 times (raw bytes, float32 copy, Arrow column)
    fit = (resources.available_memory() or 0) // (3 * max(1, emb.row_bytes))
    resources.require_memory(3 * rows * emb.row_bytes, path,
                             f"reading {rows:,} rows of {emb.shape[1]:,}-d embeddings per task "
                             f"({resources.human(emb.row_bytes)} a row)",
                             f"lower chunk_rows (at most {fit:,} rows fit)")
    if fmt == "forge_contrastive_npz":
        row_item_ids(path)  # validates the bijection now, not inside a Ray task
    chunks = [Chunk(path, fmt, "items", s, min(s + chunk_rows, infos["embeds"].shape[0]), "embeds")
              for s in range(0, infos["embeds"].shape[0], chunk_rows)]
    if "pairs" in infos and fmt == "forge_contrastive_npz":
        p = infos["pairs"].shape[0]
        chunks += [Chunk(path, fmt, "pairs", s, min(s + chunk_rows, p), "pairs")
                   for s in range(0, p, chunk_rows)]
    return chunks


def read(chunk: Chunk, strict: bool = False, row_ids: np.ndarray | None = None) -> ReadResult:
    infos = npz.members(chunk.path)
    if chunk.table == "pairs":
        rows = npz.read_rows(chunk.path, infos["pairs"], chunk.start, chunk.stop).astype(np.int64)
        return ReadResult(pa.table({"item_a": rows[:, 0], "item_b": rows[:, 1]}, schema=PAIRS_SCHEMA))
    emb_info = infos["embeds"]
    emb = npz.read_rows(chunk.path, emb_info, chunk.start, chunk.stop)
    dtype = "float16" if emb_info.dtype == np.float16 else "float32"
    emb = emb.astype(dtype, copy=False)
    if chunk.fmt == "forge_reconstruct_npz":
        ids = npz.read_rows(chunk.path, infos["ids"], chunk.start, chunk.stop).astype(np.int64)
    else:
        ids = (row_item_ids(chunk.path) if row_ids is None else row_ids)[chunk.start:chunk.stop]
    ok = finite_rows(emb)
    dropped = {}
    if not ok.all():
        bad = int((~ok).sum())
        if strict:
            first = chunk.start + int(np.flatnonzero(~ok)[0])
            raise InputError(chunk.path, f"{bad} embedding row(s) hold NaN/Inf in rows "
                                         f"[{chunk.start}, {chunk.stop}), first at row {first}")
        dropped["nan_embedding"] = bad
        ids, emb = ids[ok], emb[ok]
    schema = items_schema(emb.shape[1], dtype)
    table = pa.table({"item_id": pa.array(ids, pa.int64()), "embedding": embedding_array(emb)},
                     schema=schema)
    return ReadResult(table, dropped)


def info(path: str, fmt: str) -> dict:
    infos = check(path, fmt)
    emb = infos["embeds"]
    rows = {"items": emb.shape[0]}
    if fmt == "forge_contrastive_npz":
        rows["pairs"] = infos["pairs"].shape[0]
    return {"embedding_dim": emb.shape[1], "embedding_dtype": str(emb.dtype), "rows": rows,
            "compressed_members": sorted(n for n, i in infos.items() if i.compressed)}
