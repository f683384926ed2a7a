"""Raw interaction logs (Parquet or CSV) -> the ``interactions`` table.

Rows are ``user_id int64, item_id int64, timestamp int64`` (seconds); the caller
groups them into time-ordered sequences (a distributed Ray groupby). Column names are
matched case-insensitively against these aliases:

- ``user_id``: user_id, user, userid, uid, user id, visitor_id, visitorid, customer_id
- ``item_id``: item_id, item, itemid, iid, item id, product_id, productid
- ``timestamp``: timestamp, time, ts, unix_time, unix_timestamp, unixreviewtime,
  event_time, datetime

User and item ids must be integers (string ids are refused: map them first, or use
the Amazon reader). Timestamps may be integers (taken as seconds), floats (floored),
Arrow timestamps or ISO-8601 strings (converted to seconds). Rows with a missing
value are dropped and counted as ``null_field`` (refused when strict).

CSV files need a header row; ``,`` or tab delimited; chunks are byte ranges aligned
to lines. Parquet chunks are row-group ranges (see :mod:`forge_ray.data.parquet_in`).
"""

from __future__ import annotations

import io
import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from forge_ray.data.chunks import Chunk, ReadResult, read_lines, text_splits
from forge_ray.errors import InputError

SCHEMA = pa.schema([pa.field("user_id", pa.int64(), nullable=False),
                    pa.field("item_id", pa.int64(), nullable=False),
                    pa.field("timestamp", pa.int64(), nullable=False)])
ALIASES = {
    "user_id": ("user_id", "user", "userid", "uid", "user id", "visitor_id", "visitorid",
                "customer_id"),
    "item_id": ("item_id", "item", "itemid", "iid", "item id", "product_id", "productid"),
    "timestamp": ("timestamp", "time", "ts", "unix_time", "unix_timestamp", "unixreviewtime",
                  "event_time", "datetime"),
}


def columns(names: list[str]) -> dict[str, str] | None:
    """Canonical column -> source column name, or None if any of the three is absent."""
    lower = {n.strip().lower(): n for n in names}
    out = {}
    for canon, aliases in ALIASES.items():
        hit = next((lower[a] for a in aliases if a in lower), None)
        if hit is None:
            return None
        out[canon] = hit
    return out


def _delimiter(header: str) -> str:
    return "\t" if header.count("\t") > header.count(",") else ","


def csv_columns(header: str) -> dict[str, str] | None:
    """:func:`columns` for a CSV header line."""
    return columns([c.strip().strip('"') for c in header.split(_delimiter(header))])


def _csv_header(path: str) -> tuple[str, int]:
    with open(path, "rb") as f:
        first = f.readline()
    header = first.decode("utf-8", "replace").rstrip("\r\n")
    if csv_columns(header) is None:
        raise InputError(path, "interactions CSV needs a header naming user, item and timestamp "
                               f"columns; found {header[:120]!r}")
    return header, len(first)


def plan(path: str, chunk_rows: int) -> list[Chunk]:
    """CSV logs (Parquet logs are read by :mod:`forge_ray.data.parquet_in`)."""
    _, start = _csv_header(path)
    return [Chunk(path, "interactions", "interactions", s, e) for s, e in text_splits(path, chunk_rows, start)]


def read(chunk: Chunk, strict: bool = False) -> ReadResult:
    header, _ = _csv_header(chunk.path)
    delim = _delimiter(header)
    names = [c.strip().strip('"') for c in header.split(delim)]
    body = b"\n".join(line for _, line in read_lines(chunk.path, max(chunk.start, 1), chunk.stop)
                      if line.strip())
    cols = columns(names)
    if not body:
        return ReadResult(SCHEMA.empty_table())
    try:
        table = pacsv.read_csv(io.BytesIO(body),
                               read_options=pacsv.ReadOptions(column_names=names),
                               parse_options=pacsv.ParseOptions(delimiter=delim),
                               convert_options=pacsv.ConvertOptions(include_columns=list(cols.values())))
    except pa.ArrowInvalid as e:
        raise InputError(chunk.path, f"unreadable CSV rows in bytes [{chunk.start}, {chunk.stop}): "
                                     f"{e}") from None
    return normalise(table, cols, chunk.path, strict)


def normalise(table: pa.Table, cols: dict[str, str], source: str, strict: bool) -> ReadResult:
    """Rename/convert a raw log table to :data:`SCHEMA`, dropping rows with nulls."""
    out = {}
    for canon, name in cols.items():
        col = table.column(name)
        out[canon] = _timestamp(col, source, name) if canon == "timestamp" else int_column(col, source, name)
    valid = pc.and_(pc.and_(pc.is_valid(out["user_id"]), pc.is_valid(out["item_id"])),
                    pc.is_valid(out["timestamp"]))
    dropped = {}
    bad = len(valid) - pc.sum(valid).as_py() if len(valid) else 0
    result = pa.table(out)
    if bad:
        if strict:
            raise InputError(source, f"{bad} interaction row(s) with a missing user, item or timestamp")
        dropped["null_field"] = bad
        result = result.filter(valid)
    return ReadResult(result.cast(SCHEMA), dropped)


def int_column(col: pa.ChunkedArray, source: str, name: str) -> pa.ChunkedArray:
    """An id column as int64 (nulls kept); InputError naming ``source`` unless it holds integers."""
    if pa.types.is_integer(col.type) or pa.types.is_null(col.type):
        return col.cast(pa.int64())
    raise InputError(source, f"column {name!r} must hold integer ids, found {col.type}")


def _timestamp(col: pa.ChunkedArray, source: str, name: str) -> pa.ChunkedArray:
    t = col.type
    try:
        if pa.types.is_integer(t) or pa.types.is_null(t):
            return col.cast(pa.int64())
        if pa.types.is_floating(t):
            return pc.floor(col).cast(pa.int64())
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            col = col.cast(pa.timestamp("s"))
            t = col.type
        if pa.types.is_timestamp(t) or pa.types.is_date(t):
            return col.cast(pa.timestamp("s"), safe=False).cast(pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise InputError(source, f"column {name!r}: cannot read timestamps ({e})") from None
    raise InputError(source, f"column {name!r} must hold timestamps, found {t}")


def info(path: str, fmt: str) -> dict:
    _csv_header(path)
    return {"embedding_dim": 0, "embedding_dtype": None, "bytes": os.path.getsize(path), "rows": {}}
