"""The work of ``assign``'s actors and tasks, without Ray: reading input units,
encoding them (:class:`Encoder`), preparing revisited parts for the collision pass
(:func:`regroup_parts`, :class:`Ranker`) and writing parts with their exports and
summaries (:func:`write_block`). :mod:`forge_ray.distributed.assign` runs them on Ray
and documents the stage; these are the classes and functions its workers import.
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from forge_ray.core.arrays import has_duplicates, isin_sorted
from forge_ray.core.quantize.base import batched
from forge_ray.core.quantize.registry import load_quantizer
from forge_ray.core.sid.codes import pack_codes
from forge_ray.core.sid.collisions import CollisionConfig, resolve_groups
from forge_ray.core.sid.export import SidTableWriter, SidTokenWriter
from forge_ray.data.schema import embeddings_to_numpy
from forge_ray.errors import ConfigError, InputError
from forge_ray.sid_table import codes_array, list_codes

# ----------------------------------------------------------------------------- arrays

_MASK64 = (1 << 64) - 1


def id_checksum(item_ids: np.ndarray) -> tuple[int, int, int]:
    """(rows, sum, xor) of a 64-bit hash (splitmix64's finaliser) of each item id.

    Order-independent and additive: the checksum of a union of disjoint blocks is
    (sum of rows, sum mod 2**64, xor) of theirs (:func:`combine_checksums`). A lost,
    duplicated or changed id changes the row count or the sum (an id added twice
    leaves the xor unchanged, and the xor also guards the sum: both are kept).
    """
    z = np.asarray(item_ids, dtype=np.int64).view(np.uint64)
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (int(z.size), int(z.sum(dtype=np.uint64)) if z.size else 0,
            int(np.bitwise_xor.reduce(z)) if z.size else 0)


def combine_checksums(parts) -> tuple[int, int, int]:
    """The :func:`id_checksum` of the union of disjoint blocks, from theirs."""
    rows = total = xor = 0
    for n, s, x in parts:
        rows, total, xor = rows + int(n), (total + int(s)) & _MASK64, xor ^ int(x)
    return rows, total, xor


def _small_ints(values: np.ndarray, limit: int) -> np.ndarray:
    """(n, w) ints in [-1, limit) -> the same in the narrowest dtype (int16 or int32):
    the candidates cross the shuffle, and int16 is a quarter of the bytes of int64."""
    return np.ascontiguousarray(values, dtype=np.int16 if limit <= np.iinfo(np.int16).max else np.int32)


# ----------------------------------------------------------------------------- actors

class QuantizerActor:
    """Loads the quantizer once per actor, on ``cuda`` when the actor reserved a GPU and
    sees one (``cpu`` otherwise), and limits torch to the reserved CPUs."""

    def __init__(self, model_dir: str, cpus: float, gpus: float = 0.0):
        import torch

        torch.set_num_threads(max(1, int(cpus)))
        self.device = "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"
        self.quantizer = load_quantizer(model_dir, device=self.device)
        self.sizes = list(self.quantizer.sizes)


class Encoder(QuantizerActor):
    """Units of the input (``path``, ``row_groups``, ``unit``; see :func:`read_units`)
    -> each unit encoded and written as one part with its raw codes (pass 1) -> one
    :data:`SUMMARY` row per unit. The quantizer sees ``rows`` rows per call."""

    def __init__(self, model_dir: str, cpus: float, write: PartSpec, rows: int, gpus: float = 0.0):
        # Not zero-argument super(): a test may ship a subclass by value, and this class
        # with it, whose __class__ cell would then not match the instance's base.
        QuantizerActor.__init__(self, model_dir, cpus, gpus)
        self.rows = rows
        self.write = write

    def __call__(self, units: pa.Table) -> pa.Table:
        return pa.concat_tables([_with_unit(self.process(read_unit(path, groups)), unit)
                                 for path, groups, unit in _rows(units, "path", "row_groups", "unit")])

    def process(self, items: pa.Table) -> pa.Table:
        """``item_id`` + ``embedding`` rows -> the summary of their part, written."""
        # pool.batch_size rows per quantizer call: what fills its device, and bounds its memory
        codes = batched(self.quantizer.encode, embeddings_to_numpy(items["embedding"]), self.rows)
        return write_block(pa.table({"item_id": items["item_id"], "codes": codes_array(codes)}), self.write)


def _rows(table: pa.Table, *columns: str):
    """The values of ``columns`` of a small table (the units or parts of one call), row by row."""
    return zip(*(table[c].to_pylist() for c in columns))


def _with_unit(summary: pa.Table, unit: int) -> pa.Table:
    """A part's summary rows, marked with the input unit they were encoded from."""
    return summary.set_column(SUMMARY.get_field_index("unit"), "unit",
                              pa.array(np.full(summary.num_rows, unit, dtype=np.int64)))


# ----------------------------------------------------------------------------- collision pass

@dataclasses.dataclass(frozen=True)
class RegroupSpec:
    """What the collision pass needs per revisited part: quantizer code ``sizes``, the
    group key's ``key_levels`` (:func:`group_levels`), ``candidates`` to rank per busy
    row (0: the strategy ranks none) and the ``busy`` group keys, sorted int64."""

    sizes: tuple[int, ...]
    key_levels: int
    candidates: int
    busy: np.ndarray


RankFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (b, D) rows, (b, L-1) prefix -> (b, k)


def regroup_parts(parts: pa.Table, spec: RegroupSpec, rank: RankFn | None = None) -> pa.Table:
    """Revisited parts (``part``: a pass-1 Parquet file; ``path``, ``row_groups``: the
    input unit it was encoded from, row for row) -> their rows ``item_id, codes,
    group_key, busy`` and, for busy rows when ``spec.candidates``, ``candidates``
    (list of the k last-level codes ranked by ``rank`` under the row's prefix; empty
    for other rows, whose groups are never resolved)."""
    return pa.concat_tables([_regroup(part, path, groups, spec, rank)
                             for part, path, groups in _rows(parts, "part", "path", "row_groups")])


def _regroup(part: str, path: str, row_groups: list[int], spec: RegroupSpec,
             rank: RankFn | None) -> pa.Table:
    table = pq.read_table(part, columns=["item_id", "codes"])
    sizes, levels = list(spec.sizes), spec.key_levels
    codes = list_codes(table["codes"], len(sizes))
    key = pack_codes(codes[:, :levels], sizes[:levels])
    busy = isin_sorted(key, spec.busy)
    cols = {"item_id": table["item_id"], "codes": table["codes"], "group_key": key, "busy": busy}
    if spec.candidates:
        rows = np.flatnonzero(busy)
        items = read_unit(path, row_groups).take(rows)
        if not np.array_equal(items["item_id"].to_numpy(), table["item_id"].to_numpy()[rows]):
            raise RuntimeError(f"{part} does not hold the rows of {path} row groups {row_groups} in order")
        cand = _small_ints(rank(embeddings_to_numpy(items["embedding"]), codes[rows, :-1]), sizes[-1])
        offsets = np.zeros(len(busy) + 1, dtype=np.int32)
        np.cumsum(busy * spec.candidates, out=offsets[1:])
        cols["candidates"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(cand.ravel()))
    return pa.table(cols)


class Ranker(QuantizerActor):
    """:func:`regroup_parts` with the last-level candidates ranked by this actor's
    quantizer, ``rows`` rows per call."""

    def __init__(self, model_dir: str, cpus: float, spec: RegroupSpec, rows: int, gpus: float = 0.0):
        QuantizerActor.__init__(self, model_dir, cpus, gpus)
        self.spec = spec
        self.rows = rows

    def __call__(self, parts: pa.Table) -> pa.Table:
        return regroup_parts(parts, self.spec, self._rank)

    def _rank(self, x: np.ndarray, prefix: np.ndarray) -> np.ndarray:
        k = self.spec.candidates
        return batched(lambda xb, pb: self.quantizer.rank_last_level(xb, k, pb)[1], x, self.rows, prefix)


# ----------------------------------------------------------------------------- writers

@dataclasses.dataclass(frozen=True)
class PartSpec:
    """What every part writer needs: the input ``dataset`` (for messages), the
    ``staging`` folder, quantizer code ``sizes``, the collision config, whether to
    write the CSV exports, and whether it ``resolve``-s busy groups (the collision
    pass) or writes raw codes (pass 1)."""

    dataset: str
    staging: str
    sizes: tuple[int, ...]
    collisions: CollisionConfig
    export: bool
    resolve: bool = False


SUMMARY = pa.schema([("part", pa.string()), ("first_id", pa.int64()), ("rows", pa.int64()),
                     ("id_sum", pa.uint64()), ("id_xor", pa.uint64()), ("moved", pa.int64()),
                     ("fallback", pa.int64()), ("suffix_size", pa.int64()),
                     ("before", pa.list_(pa.int64())), ("after", pa.list_(pa.int64())),
                     ("sid_keys", pa.list_(pa.int64())), ("unit", pa.int64())])


def write_block(block: pa.Table, spec: PartSpec) -> pa.Table:
    """One block of encoded rows -> written as one Parquet part plus its exports under
    staging names; returns its one-row :data:`SUMMARY`.

    Pass 1 (``spec.resolve`` False) writes the raw codes as SIDs and returns them
    packed in ``sid_keys``. The collision pass's blocks hold every row of their busy
    groups (``busy`` column) and resolve them; ``before`` / ``after`` are the
    items-per-SID histograms of those groups, ``suffix_size`` the largest suffix + 1.
    ``unit`` is -1 here (the encoder sets it).
    """
    n, sizes, coll = block.num_rows, list(spec.sizes), spec.collisions
    if n == 0:
        return SUMMARY.empty_table()
    ids = block["item_id"].to_numpy().astype(np.int64)
    codes = list_codes(block["codes"], len(sizes))
    sid = np.c_[codes, np.zeros(n, dtype=np.int64)] if coll.strategy == "suffix" else codes
    fallback = np.zeros(n, dtype=bool)
    before = after = keys = np.zeros(0, dtype=np.int64)
    if spec.resolve:
        sid, fallback, before, after = _resolve_busy(block, ids, codes, sid, spec)
    else:
        if has_duplicates(ids):
            raise InputError(spec.dataset, "duplicate item ids in the dataset's items")
        keys = pack_codes(codes, sizes)
    stem = uuid.uuid4().hex  # a retried task writes new files; only summarised ones are kept
    staging = Path(spec.staging)
    pq.write_table(pa.table({"item_id": ids, "codes": codes_array(codes), "sid": codes_array(sid),
                             "fallback": fallback}), staging / f"{stem}.parquet")
    suffix_size = int(sid[:, -1].max()) + 1 if coll.strategy == "suffix" else 0
    if spec.export:
        sid_sizes = sizes + ([suffix_size] if suffix_size else [])
        for name, writer in (("sid_table", SidTableWriter), ("sid_tokens", SidTokenWriter)):
            with writer(staging / f"{stem}.{name}.csv", sid_sizes) as w:
                w.write(ids, sid)
    rows, id_sum, id_xor = id_checksum(ids)
    one = {"part": [stem], "first_id": [int(ids.min())], "rows": [rows], "id_sum": [id_sum],
           "id_xor": [id_xor], "moved": [int((sid[:, :len(sizes)] != codes).any(axis=1).sum())],
           "fallback": [int(fallback.sum())], "suffix_size": [suffix_size],
           "before": [list(map(int, before))], "after": [list(map(int, after))], "unit": [-1]}
    return pa.table({**{k: pa.array(v, type=SUMMARY.field(k).type) for k, v in one.items()},
                     "sid_keys": _one_list(keys)}, schema=SUMMARY)


def _resolve_busy(block: pa.Table, ids: np.ndarray, codes: np.ndarray, sid: np.ndarray, spec: PartSpec):
    """Resolve the ``busy`` rows of a collision-pass block (whole groups) in place of
    their raw ``sid`` -> (sid, fallback, before, after) with the histograms of the busy
    groups."""
    rows = np.flatnonzero(block["busy"].to_numpy(zero_copy_only=False))
    fallback = np.zeros(len(sid), dtype=bool)
    if not len(rows):  # a partition that drew no busy group
        return sid, fallback, np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64)
    cand = None
    if "candidates" in block.column_names:
        # as shipped (int16 / int32), busy rows only and in row order: resolve_group
        # widens only the rows of the groups it resolves
        cand = block["candidates"].combine_chunks().flatten().to_numpy().reshape(
            len(rows), spec.collisions.candidates)
    try:
        res = resolve_groups(ids[rows], codes[rows], cand, spec.collisions, last_size=spec.sizes[-1])
    except ValueError as e:  # e.g. a prefix with more than cap x K items
        raise ConfigError("collisions", str(e)) from None
    sid = sid.copy()
    sid[rows], fallback[rows] = res.codes, res.fallback
    return sid, fallback, res.before, res.after


def _one_list(values: np.ndarray) -> pa.ListArray:
    """(n,) int64 -> a one-row list<int64> column (no Python ints in between)."""
    values = np.asarray(values, dtype=np.int64)
    return pa.ListArray.from_arrays(pa.array([0, values.size], pa.int32()), pa.array(values))


def read_units(files: list[str], rows: int) -> list[dict]:
    """The row groups of ``files``, from their footers only, grouped per file into units
    of at least ``rows`` rows (a file's last unit may be smaller): ``path``,
    ``row_groups`` (indices) and ``rows`` each. InputError for a file that is not Parquet."""
    units = []
    for path in files:
        try:
            meta = pq.ParquetFile(path).metadata
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(path, f"not a readable Parquet file ({e})") from None
        groups, n = [], 0
        for i in range(meta.num_row_groups):
            groups.append(i)
            n += meta.row_group(i).num_rows
            if n >= rows:
                units.append({"path": path, "row_groups": groups, "rows": n})
                groups, n = [], 0
        if groups:
            units.append({"path": path, "row_groups": groups, "rows": n})
    return units


def read_unit(path: str, row_groups: list[int]) -> pa.Table:
    """One unit's ``item_id`` and ``embedding`` columns (InputError naming the file when
    it cannot be read or lacks them)."""
    try:
        table = pq.ParquetFile(path).read_row_groups(row_groups, columns=["item_id", "embedding"])
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(path, f"cannot read item_id and embedding ({e})") from None
    missing = {"item_id", "embedding"} - set(table.column_names)  # pyarrow skips absent columns
    if missing:
        raise InputError(path, f"cannot read item_id and embedding (no {', '.join(sorted(missing))} column)")
    return table
