"""AL-GR generative-retrieval text files -> ``sequences`` + ``sids`` (+ ``targets``).

AL-GR (FORGE's released GR data, e.g. ``train_data/s1_tiny.csv``) is tab-separated
with header ``id system user answer``, one record per line:

- ``id``: a row key (a UUID), kept as the sequence's ``user_key``;
- ``system``: a fixed instruction (ignored);
- ``user``: a fixed prompt around the history, written as concatenated SID tokens
  ``C1989C14585C22548...`` (L tokens per item, level l's tokens offset by the sizes of
  the levels before it); the longest run of ``C<n>`` tokens is the history;
- ``answer``: the next item's SID in training files; ``;``-separated raw item ids in
  test files.

AL-GR names items only by SID, so each distinct SID becomes a synthetic int64 item id
``pack_codes(codes, sizes)`` (mixed radix, unique per SID) and the ``sids`` table keeps
``item_id -> codes`` so nothing is lost. Training rows give the sequence history +
answer (answer last). Test rows give the history only; their answers name real item
ids that live in a different id space from the SID-derived ones, so they go to the
``targets`` table (``user_id, item_ids``) instead of being mixed into the sequence.

``user_id`` is the byte offset of the row's line in the file: unique within the file,
stable, and known to a chunk without scanning the file before it.
"""

from __future__ import annotations

import csv
import os
import re

import numpy as np
import pyarrow as pa

from forge_ray.core.sid.codes import level_offsets, pack_codes, token_array
from forge_ray.data.chunks import Chunk, ReadResult, read_lines, text_splits
from forge_ray.errors import InputError

HEADER = ["id", "system", "user", "answer"]
_RUN = re.compile(r"(?:C\d+)+")
_TOKEN = re.compile(r"C(\d+)")
_TEST_ANSWER = re.compile(r"^\s*\d+(\s*;\s*\d+)*\s*;?\s*$")

SEQUENCES_SCHEMA = pa.schema([pa.field("user_id", pa.int64(), nullable=False),
                              pa.field("item_ids", pa.list_(pa.int64())),
                              pa.field("user_key", pa.string())])
SIDS_SCHEMA = pa.schema([pa.field("item_id", pa.int64(), nullable=False),
                         pa.field("codes", pa.list_(pa.int64()))])
TARGETS_SCHEMA = pa.schema([pa.field("user_id", pa.int64(), nullable=False),
                            pa.field("item_ids", pa.list_(pa.int64()))])


def _header_end(path: str) -> int:
    with open(path, "rb") as f:
        first = f.readline()
    if first.decode("utf-8", "replace").rstrip("\r\n").split("\t") != HEADER:
        raise InputError(path, "not an AL-GR file: the first line must be the tab-separated "
                               "header 'id system user answer'")
    return len(first)


def _check_sizes(path: str, sizes: tuple[int, ...]) -> None:
    if not sizes or min(sizes) <= 0:
        raise InputError(path, f"invalid SID codebook sizes {list(sizes)}")
    if float(np.prod(np.asarray(sizes, dtype=np.float64))) >= 2.0**63:
        raise InputError(path, f"SID codebook sizes {list(sizes)} do not pack into int64 ids")


def plan(path: str, chunk_rows: int, sid_sizes: tuple[int, ...]) -> list[Chunk]:
    """Byte-range chunks; ``targets`` chunks too when the file's answers are item ids."""
    _check_sizes(path, sid_sizes)
    start = _header_end(path)
    splits = text_splits(path, chunk_rows, start)
    tables = ["sequences", "sids"]
    if splits and _is_test_file(path, start):
        tables.append("targets")
    return [Chunk(path, "algr_tsv", t, s, e, sid_sizes=sid_sizes) for s, e in splits for t in tables]


def _is_test_file(path: str, start: int) -> bool:
    """Whether any of the first 100 rows has a ``;``-separated item-id answer."""
    for _, line in read_lines(path, start, start + (1 << 20))[:100]:
        fields = _fields(line)
        if fields is not None and _TEST_ANSWER.match(fields[3]):
            return True
    return False


def _fields(line: bytes) -> list[str] | None:
    """The 4 tab-separated fields of a line; None when it has another count or is
    not UTF-8 (a malformed line)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return None
    fields = next(csv.reader([text], delimiter="\t"), [])
    return fields if len(fields) == 4 else None


class _Bad(Exception):
    """A row that is dropped (counted under ``reason``) or refused when strict."""

    def __init__(self, reason: str):
        self.reason = reason


def _codes(text: str, sizes: tuple[int, ...], offs: np.ndarray) -> np.ndarray:
    try:
        tokens = token_array(_TOKEN.findall(text))
    except ValueError:  # a token number beyond int64
        raise _Bad("malformed_sid") from None
    if tokens.size % len(sizes):
        raise _Bad("malformed_sid")
    codes = tokens.reshape(-1, len(sizes)) - offs[None, :]
    if codes.size and ((codes < 0).any() or (codes >= np.asarray(sizes)[None, :]).any()):
        raise _Bad("malformed_sid")
    return codes


def parse_row(fields: list[str], sizes: tuple[int, ...], offs: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, list[int] | None]:
    """``(history codes (n, L), answer codes (0|1, L), test target ids or None)``."""
    runs = _RUN.findall(fields[2])
    if not runs:
        raise _Bad("empty_sequence")
    history = _codes(max(runs, key=len), sizes, offs)
    answer = fields[3].strip()
    if _TEST_ANSWER.match(answer):
        targets = [int(t) for t in answer.split(";") if t.strip()]
        if max(targets) >= 2**63:  # an item id beyond int64
            raise _Bad("malformed_answer")
        return history, np.zeros((0, len(sizes)), np.int64), targets
    if not answer or _RUN.fullmatch(answer) is None:
        raise _Bad("malformed_answer")
    ans = _codes(answer, sizes, offs)
    if len(ans) != 1:
        raise _Bad("malformed_answer")
    return history, ans, None


def read(chunk: Chunk, strict: bool = False) -> ReadResult:
    sizes = chunk.sid_sizes
    offs = level_offsets(sizes)
    dropped: dict[str, int] = {}
    users, keys, seqs, targets, all_codes = [], [], [], [], []
    for offset, line in read_lines(chunk.path, chunk.start, chunk.stop):
        if not line.strip():
            continue
        try:
            fields = _fields(line)
            if fields is None:
                raise _Bad("malformed_line")
            history, answer, target = parse_row(fields, sizes, offs)
        except _Bad as bad:
            if strict:
                raise InputError(chunk.path, f"{bad.reason.replace('_', ' ')} in the row at "
                                             f"byte {offset}") from None
            dropped[bad.reason] = dropped.get(bad.reason, 0) + 1
            continue
        codes = np.concatenate([history, answer])
        users.append(offset)
        keys.append(fields[0])
        seqs.append(pack_codes(codes, sizes))
        all_codes.append(codes)
        if target is not None:
            targets.append((offset, target))
    if chunk.table == "sequences":
        table = pa.table({"user_id": pa.array(users, pa.int64()),
                          "item_ids": pa.array([s.tolist() for s in seqs], pa.list_(pa.int64())),
                          "user_key": pa.array(keys, pa.string())}, schema=SEQUENCES_SCHEMA)
    elif chunk.table == "sids":
        table = sids_table(np.concatenate(all_codes) if all_codes else
                           np.zeros((0, len(sizes)), np.int64), sizes)
        dropped = {}  # counted once, on the sequences chunk of the same range
    elif chunk.table == "targets":
        table = pa.table({"user_id": pa.array([u for u, _ in targets], pa.int64()),
                          "item_ids": pa.array([t for _, t in targets], pa.list_(pa.int64()))},
                         schema=TARGETS_SCHEMA)
        dropped = {}
    else:
        raise InputError(chunk.path, f"AL-GR files have no {chunk.table!r} table")
    return ReadResult(table, dropped)


def sids_table(codes: np.ndarray, sizes: tuple[int, ...]) -> pa.Table:
    """Distinct SIDs among (n, L) ``codes`` as ``item_id, codes`` rows (sorted by id)."""
    ids = pack_codes(codes, sizes)
    uniq, first = np.unique(ids, return_index=True)
    flat = pa.array(codes[first].reshape(-1))
    return pa.table({"item_id": pa.array(uniq, pa.int64()),
                     "codes": pa.ListArray.from_arrays(
                         pa.array(np.arange(0, len(flat) + 1, codes.shape[1], dtype=np.int32)),
                         flat)}, schema=SIDS_SCHEMA)


def info(path: str, fmt: str) -> dict:
    _header_end(path)
    return {"embedding_dim": 0, "embedding_dtype": None,
            "bytes": os.path.getsize(path), "rows": {}}
