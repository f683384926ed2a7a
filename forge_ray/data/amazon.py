"""Amazon review folders as the GR literature ships them -> ``items`` + ``sequences``.

A folder (e.g. ``amazon/Beauty``) with:

- ``item_text.txt``: ``ASIN title words`` per line, covering every item;
- ``user_sequence.txt``: ``USER ASIN ASIN ...`` per line, in time order.

Item ids: an ASIN's int64 id is its rank in order of first appearance in
``item_text.txt`` (0, 1, 2, ...): deterministic and stable for a given file. Items get
``item_key`` (the ASIN) and ``text`` (the title words) and no embedding (dim 0) until
``forge-ray embed`` adds one. Users: ``user_id`` is the byte offset of the user's line
in ``user_sequence.txt`` (unique, stable, known without a scan), ``user_key`` the
original user string.

Every sequence chunk needs the whole ASIN -> id map, so each process parses
``item_text.txt`` once (cached; ~100-200 B per item: fine for Amazon-sized catalogues
of up to a few million items). Items chunks count LINES of ``item_text.txt``;
sequences chunks count BYTES of ``user_sequence.txt``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pyarrow as pa

from forge_ray.data.schema import items_schema
from forge_ray.data.chunks import Chunk, ReadResult, read_lines, text_splits
from forge_ray.errors import InputError

ITEMS_FILE = "item_text.txt"
SEQUENCES_FILE = "user_sequence.txt"
ITEMS_SCHEMA = items_schema(0, with_key=True, with_text=True)
SEQUENCES_SCHEMA = pa.schema([pa.field("user_id", pa.int64(), nullable=False),
                              pa.field("item_ids", pa.list_(pa.int64())),
                              pa.field("user_key", pa.string())])




class _Catalogue:
    """The parsed ``item_text.txt``: ASINs and texts in file order, ASIN -> id."""

    def __init__(self, path: Path):
        self.keys: list[str] = []    # one per line ("" for a blank line)
        self.texts: list[str] = []
        self.ids: dict[str, int] = {}
        self.first: list[bool] = []  # line holds the first appearance of its ASIN
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, text = line.strip().partition(" ")
                new = bool(key) and key not in self.ids
                if new:
                    self.ids[key] = len(self.ids)
                self.keys.append(key)
                self.texts.append(text.strip())
                self.first.append(new)


@functools.lru_cache(maxsize=2)
def _catalogue(path: str, _size: int, _mtime_ns: int) -> _Catalogue:
    return _Catalogue(Path(path))


def catalogue(folder: str | os.PathLike) -> _Catalogue:
    """The (per-process cached) item catalogue of an Amazon folder."""
    path = os.path.join(os.fspath(folder), ITEMS_FILE)
    st = os.stat(path)
    return _catalogue(path, st.st_size, st.st_mtime_ns)


def _check(folder: str) -> None:
    for name in (ITEMS_FILE, SEQUENCES_FILE):
        if not os.path.isfile(os.path.join(folder, name)):
            raise InputError(folder, f"not an Amazon folder: {name} is missing")


def plan(folder: str, chunk_rows: int) -> list[Chunk]:
    _check(folder)
    n_lines = len(catalogue(folder).keys)
    chunks = [Chunk(folder, "amazon", "items", s, min(s + chunk_rows, n_lines), ITEMS_FILE)
              for s in range(0, n_lines, chunk_rows)]
    seq_path = os.path.join(folder, SEQUENCES_FILE)
    chunks += [Chunk(folder, "amazon", "sequences", s, e, SEQUENCES_FILE)
               for s, e in text_splits(seq_path, chunk_rows)]
    return chunks


def read(chunk: Chunk, strict: bool = False) -> ReadResult:
    cat = catalogue(chunk.path)
    if chunk.table == "items":
        return _read_items(chunk, cat, strict)
    if chunk.table != "sequences":
        raise InputError(chunk.path, f"Amazon folders have no {chunk.table!r} table")
    seq_path = os.path.join(chunk.path, SEQUENCES_FILE)
    dropped: dict[str, int] = {}
    users, keys, seqs = [], [], []
    for offset, line in read_lines(seq_path, chunk.start, chunk.stop):
        parts = line.decode("utf-8", "replace").split()
        if not parts:
            continue
        items = [cat.ids.get(a, -1) for a in parts[1:]]
        missing = items.count(-1)
        if missing:
            if strict:
                raise InputError(seq_path, f"user {parts[0]!r} (byte {offset}) names {missing} "
                                           f"item(s) absent from {ITEMS_FILE}")
            dropped["unknown_item"] = dropped.get("unknown_item", 0) + missing
            items = [i for i in items if i >= 0]
        if not items:
            if strict:
                raise InputError(seq_path, f"user {parts[0]!r} (byte {offset}) has no items")
            dropped["empty_sequence"] = dropped.get("empty_sequence", 0) + 1
            continue
        users.append(offset)
        keys.append(parts[0])
        seqs.append(items)
    table = pa.table({"user_id": pa.array(users, pa.int64()),
                      "item_ids": pa.array(seqs, pa.list_(pa.int64())),
                      "user_key": pa.array(keys, pa.string())}, schema=SEQUENCES_SCHEMA)
    return ReadResult(table, dropped)


def _read_items(chunk: Chunk, cat: _Catalogue, strict: bool) -> ReadResult:
    rows = range(chunk.start, chunk.stop)
    keep = [r for r in rows if cat.first[r]]
    dropped = {}
    blank = sum(1 for r in rows if not cat.keys[r])
    dup = len(rows) - len(keep) - blank
    if dup:
        if strict:
            raise InputError(os.path.join(chunk.path, ITEMS_FILE),
                             f"{dup} repeated ASIN line(s) in lines [{chunk.start}, {chunk.stop})")
        dropped["duplicate_item"] = dup
    table = pa.table({"item_id": pa.array([cat.ids[cat.keys[r]] for r in keep], pa.int64()),
                      "item_key": pa.array([cat.keys[r] for r in keep], pa.string()),
                      "text": pa.array([cat.texts[r] for r in keep], pa.string())},
                     schema=ITEMS_SCHEMA)
    return ReadResult(table, dropped)


def info(folder: str, fmt: str) -> dict:
    _check(folder)
    return {"embedding_dim": 0, "embedding_dtype": None,
            "rows": {"items": len(catalogue(folder).ids)}}
