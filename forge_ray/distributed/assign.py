"""``forge-ray assign``: give every item of a dataset exactly one SID, on Ray, in a
streaming pass that writes every item's raw codes, and a collision pass that rewrites
only the parts holding items of over-full groups.

1. **Encode and write** (pass 1, every strategy). The driver splits the input's
   Parquet row groups (from the footers) into *units* of at least
   ``max(pool.batch_size, DEFAULT_ROWS_PER_SHARD)`` rows (a file's last unit may be
   smaller), never across files. The units stream through a pool of :class:`Encoder`
   actors (``map_batches`` with ``ActorPoolStrategy``, one unit per call): each actor
   loads the quantizer once (onto its GPU when the pool reserves one and the actor
   sees CUDA), reads its unit's ``item_id`` and ``embedding`` with pyarrow, turns the
   (B, D) embeddings, ``pool.batch_size`` rows per quantizer call, into (B, L) codes
   and writes the unit as one part (:func:`write_block`) with its raw codes as SIDs
   (a suffix 0 for ``suffix``). Reading in the actor moves no embedding through the
   object store; on this project's 2-core box Ray Data's own Parquet read spent
   45-75 ms per file listing the input and its re-blocking into batch-sized blocks
   10 us per row, which left the encoders idle two thirds of the time
   (docs/benchmarks.md). Each part is one Parquet file, ``item_id`` int64, ``codes``
   list<int64> (raw quantizer codes), ``sid`` list<int64> (final codes, L+1 levels
   for ``suffix``), ``fallback`` bool, and with ``export`` the part's two CSVs
   (``export/sid_table``: FORGE's ``item_id,c1,c2,c3``; ``export/sid_tokens``:
   ``item_id,sid`` with ``C{c+offset}`` tokens; headers in every part) from the same
   arrays. Its writer returns a one-row :data:`SUMMARY`: rows, an order-independent
   checksum of its item ids (:func:`id_checksum`), moved / fallback counts, the SID
   histograms of the groups it resolved, and its packed raw SIDs.
2. **Count.** Items per raw SID over the packed SIDs, by a task shuffle
   (:func:`~forge_ray.distributed.sid_counts.items_per_key`), which also names the
   SIDs holding more than the strategy allows (``cap`` items; one for ``suffix``).
   Their groups (the first L-1 codes, or all L for ``suffix``) are the *busy* groups.
   Strategy ``none``, or no busy group, ends here: the table is what pass 1 wrote,
   exactly what resolving every group would give (a group without an over-full SID
   keeps its codes).
3. **Resolve** (the collision pass). Only the parts holding an item of a busy group
   are revisited: for each, a task (an actor of the quantizer when the strategy ranks
   candidates) reads the part's ids and codes, marks the rows of busy groups and,
   for ``cap`` / ``sinkhorn``, reads those rows' embeddings and ranks their
   last-level candidates (B, k) under the prefix pass 1 chose (:func:`regroup_parts`).
   The rows are hash-partitioned by group key (``repartition(keys=...)``: one block
   per partition, holding every row of a busy group) and each block's busy groups are
   resolved by the core :func:`~forge_ray.core.sid.collisions.resolve_groups`
   (deterministic for a seed whatever the partitioning; it checks each resolved group
   against the strategy's guarantee) and written as one part, which replaces the
   revisited parts. Only busy rows carry candidates across the shuffle.
4. **Check** on the driver: rows and checksums of the parts kept equal those of the
   input ids (a driver thread reads only the input's ``item_id`` column while the
   pipeline runs), so every input item has exactly one SID; otherwise InputError and
   no output. Parts land in staging names and are renamed ``part-<i>`` in first-item
   order only after the check, so a retried task's orphan file, or a revisited part,
   is never part of the table.

Memory: an encoder actor holds the quantizer, one unit (fewer than
``max(B, DEFAULT_ROWS_PER_SHARD)`` rows plus one row group's: the dataset's shards are
written in row groups of at most ``DEFAULT_ROWS_PER_SHARD`` rows) and one quantizer
call's intermediates (B x max(K) costs, in row blocks); a collision writer holds one
block (a partition: about ``dataset.ROWS_PER_PARTITION`` revisited rows x L codes,
plus k candidates per busy row); the driver holds one summary row per part at a
time, the per-SID histogram and the busy SIDs and groups (8 bytes each). The output
is written into a temporary sibling and renamed at the end
(:func:`~forge_ray.io.atomic_dir`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data

from forge_ray.config import require, to_dict
from forge_ray.core.arrays import has_duplicates, isin_sorted, sorted_unique
from forge_ray.core.quantize.base import Quantizer, batched
from forge_ray.core.quantize.registry import load_quantizer, quantizer_dim
from forge_ray.core.sid.codes import pack_codes
from forge_ray.core.sid.collisions import CollisionConfig, group_levels, resolve_groups
from forge_ray.core.sid.export import SidTableWriter, SidTokenWriter
from forge_ray.core.sid.metrics import histogram_quality, sum_histograms
from forge_ray.data.schema import DEFAULT_ROWS_PER_SHARD, embeddings_to_numpy
from forge_ray.distributed.dataset import dataset_manifest, partitions_for
from forge_ray.distributed.remote_errors import surface_user_errors
from forge_ray.distributed.sid_counts import items_per_key
from forge_ray.errors import ConfigError, InputError
from forge_ray.io import atomic_dir, read_manifest, write_manifest
from forge_ray.sid_table import EXPORTS, SIDS_KIND, codes_array, export_paths, list_codes, sid_files

WRITER_CPUS = 0.25  # a writer is mostly Parquet/CSV encoding: let it run beside the actors


@dataclasses.dataclass
class ActorPoolConfig:
    """The Ray Data actor pool that runs a quantizer.

    actors: pool size.  cpus_per_actor: logical CPUs each actor reserves (fractional
    values let several actors share a core; torch uses max(1, floor(cpus)) threads).
    gpus_per_actor: GPUs reserved per actor; an actor that has one (and sees CUDA)
    computes on it.  batch_size: rows per batch (raise it to fill a GPU; ``assign``
    hands its actors units of at least ``DEFAULT_ROWS_PER_SHARD`` rows and encodes
    them ``batch_size`` rows per quantizer call).
    """

    actors: int = 2
    cpus_per_actor: float = 0.5
    gpus_per_actor: float = 0.0
    batch_size: int = 4096

    def __post_init__(self):
        require(self.actors >= 1, "pool.actors must be >= 1")
        require(self.cpus_per_actor > 0, "pool.cpus_per_actor must be > 0")
        require(self.gpus_per_actor >= 0, "pool.gpus_per_actor must be >= 0")
        require(self.batch_size >= 1, "pool.batch_size must be >= 1")

    def map_args(self) -> dict:
        """Keyword arguments of ``Dataset.map_batches`` for this pool."""
        return {"compute": ray.data.ActorPoolStrategy(size=self.actors),
                "num_cpus": self.cpus_per_actor, "num_gpus": self.gpus_per_actor or None,
                "batch_size": self.batch_size, "batch_format": "pyarrow"}


@dataclasses.dataclass
class AssignConfig:
    """Options of ``forge-ray assign``.

    collisions: the collision strategy (core :class:`CollisionConfig`).
    pool: the encoder actor pool.
    partitions: buckets of the items-per-SID count and shuffle partitions of the
        collision pass (0: one per 1M items), which writes one Parquet part per
        partition in place of the parts it revisits.
    export: write the CSV exports under ``export/`` (in the same pass).
    """

    collisions: CollisionConfig = dataclasses.field(default_factory=CollisionConfig)
    pool: ActorPoolConfig = dataclasses.field(default_factory=ActorPoolConfig)
    partitions: int = 0
    export: bool = True

    def __post_init__(self):
        require(self.partitions >= 0, "partitions must be >= 0")


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

    def __init__(self, model_dir: str, cpus: float, write: PartSpec, gpus: float = 0.0,
                 rows: int = ActorPoolConfig.batch_size):
        # Not zero-argument super(): a test may ship a subclass by value, and this class
        # with it, whose __class__ cell would then not match the instance's base.
        QuantizerActor.__init__(self, model_dir, cpus, gpus)
        self.rows = rows
        self.write = write

    def __call__(self, units: pa.Table) -> pa.Table:
        return pa.concat_tables([_with_unit(self.process(read_unit(path, groups)), unit) for path, groups, unit
                                 in zip(*(units[c].to_pylist() for c in ("path", "row_groups", "unit")))])

    def process(self, items: pa.Table) -> pa.Table:
        """``item_id`` + ``embedding`` rows -> the summary of their part, written."""
        # pool.batch_size rows per quantizer call: what fills its device, and bounds its memory
        codes = batched(self.quantizer.encode, embeddings_to_numpy(items["embedding"]), self.rows)
        return write_block(pa.table({"item_id": items["item_id"], "codes": codes_array(codes)}), self.write)


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
    return pa.concat_tables([_regroup(part, path, groups, spec, rank) for part, path, groups in
                             zip(*(parts[c].to_pylist() for c in ("part", "path", "row_groups")))])


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

    def __init__(self, model_dir: str, cpus: float, spec: RegroupSpec, gpus: float = 0.0,
                 rows: int = ActorPoolConfig.batch_size):
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
        busy = block["busy"].to_numpy(zero_copy_only=False)
        sid, fallback, before, after = _resolve_busy(block, ids, codes, busy, sid, fallback, spec)
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


def _resolve_busy(block: pa.Table, ids: np.ndarray, codes: np.ndarray, busy: np.ndarray, sid: np.ndarray,
                  fallback: np.ndarray, spec: PartSpec):
    """Resolve the busy rows of a collision-pass block (whole groups) in place of their
    raw ``sid`` / ``fallback`` -> (sid, fallback, before, after) with the histograms
    of the busy groups."""
    rows = np.flatnonzero(busy)
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
    sid, fallback = sid.copy(), fallback.copy()
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


def _input_checksum(files: list[str]) -> tuple[int, int, int]:
    """:func:`id_checksum` of the input Parquet files, reading their ``item_id`` column
    only, one file at a time (memory: one file's ids). Runs in a driver thread beside
    the pipeline: Arrow reads without the GIL, and no Ray worker has to start for it."""
    return combine_checksums(id_checksum(pq.read_table(p, columns=["item_id"])["item_id"].to_numpy())
                             for p in files)


# ----------------------------------------------------------------------------- stage

def read_sid_table(sids_dir: str | os.PathLike, columns=("item_id", "codes", "sid")) -> ray.data.Dataset:
    return ray.data.read_parquet(sid_files(sids_dir), columns=list(columns))


def load_model(model_dir: str | os.PathLike) -> tuple[Quantizer, dict]:
    """The quantizer of MODEL_DIR and its manifest (empty for a bare saved quantizer)."""
    q = load_quantizer(model_dir)
    has_manifest = (Path(model_dir) / "manifest.json").is_file()
    return q, read_manifest(model_dir, "quantizer") if has_manifest else {}


def assign(model_dir: str | os.PathLike, dataset: str | os.PathLike, out: str | os.PathLike,
           cfg: AssignConfig | None = None, overwrite: bool = False) -> dict:
    """Assign SIDs to every item of ``dataset`` with the quantizer in ``model_dir``;
    write SIDS_DIR ``out``; return its manifest. Needs a Ray connection."""
    cfg = cfg or AssignConfig()
    coll = cfg.collisions
    data_manifest = dataset_manifest(dataset)
    q, _ = load_model(model_dir)
    sizes = list(q.sizes)
    dim, ddim = quantizer_dim(q), int(data_manifest.get("embedding_dim") or 0)
    if not ddim:
        raise InputError(dataset, "dataset items have no embeddings (run forge-ray embed first)")
    if dim != ddim:
        raise InputError(dataset, f"embeddings are {ddim}-d but the quantizer in {model_dir} "
                                  f"expects {dim}-d")
    if coll.needs_candidates and coll.candidates > sizes[-1]:
        coll = dataclasses.replace(coll, candidates=sizes[-1])  # cannot rank more than K codes

    pool = cfg.pool
    input_files = sorted(str(p) for p in (Path(dataset) / "items").glob("*.parquet"))
    units = read_units(input_files, max(pool.batch_size, DEFAULT_ROWS_PER_SHARD))
    if not units:
        raise InputError(dataset, "dataset has no items")
    actor_args = {"model_dir": os.fspath(model_dir), "cpus": pool.cpus_per_actor,
                  "gpus": pool.gpus_per_actor, "rows": pool.batch_size}

    with atomic_dir(out, overwrite, kind=SIDS_KIND, inputs=(model_dir, dataset)) as tmp:
        staging = tmp / ".parts"
        staging.mkdir()
        spec = PartSpec(os.fspath(dataset), str(staging), tuple(sizes), coll, cfg.export)
        with ThreadPoolExecutor(1) as reader:
            want = reader.submit(_input_checksum, input_files)  # runs beside the pipeline
            with surface_user_errors():
                result = _run_pipeline(units, pool, actor_args, spec, cfg.partitions)
        stats = _check(out, result, want.result(), sizes)
        _place_parts(tmp, result.summaries, cfg.export)
        shutil.rmtree(staging)
        return write_manifest(
            tmp, SIDS_KIND, model=os.fspath(Path(model_dir).resolve()),
            dataset=os.fspath(Path(dataset).resolve()), sizes=stats["sid_sizes"], code_sizes=sizes,
            strategy=coll.strategy, collisions=to_dict(coll), config=to_dict(cfg),
            counts={"input_items": stats["input_items"], "items": stats["items"],
                    "distinct_items": stats["items"]},
            collision_stats=stats["collision_stats"],
            exports={**EXPORTS, "rows": stats["items"]} if cfg.export else None)


class PipelineResult(NamedTuple):
    """What :func:`_run_pipeline` leaves: the summaries of the parts that form the
    table, the items-per-SID histograms before and after collision handling, and how
    many parts and rows the collision pass revisited."""

    summaries: list[dict]
    before: np.ndarray
    after: np.ndarray
    revisited_parts: int
    revisited_rows: int


def _run_pipeline(units: list[dict], pool: ActorPoolConfig, actor_args: dict, spec: PartSpec,
                  partitions: int) -> PipelineResult:
    """Encode and write ``units`` (:func:`read_units`) in one streaming Ray Data job,
    count items per raw SID, and run the collision pass over the parts that hold busy
    groups, if any. Call it inside :func:`surface_user_errors`: a dataset keeps the
    Ray Data context it was built in."""
    coll, sizes = spec.collisions, list(spec.sizes)
    # one block per unit and one unit per call: the pool's actors share the units evenly
    todo = ray.data.from_items([{"path": u["path"], "row_groups": u["row_groups"], "unit": i}
                                for i, u in enumerate(units)], override_num_blocks=len(units))
    map_args = {**pool.map_args(), "batch_size": 1}
    written = todo.map_batches(Encoder, fn_constructor_kwargs={**actor_args, "write": spec}, **map_args)
    # One block at a time into the driver, not a Ray Data pass that drops the keys: its
    # per-task overhead (5.6 s for 400 parts here) is more than fetching them.
    blocks = written.materialize().to_arrow_refs()
    summaries = [row for ref in blocks for row in ray.get(ref).drop_columns(["sid_keys"]).to_pylist()]
    limit = None if coll.strategy == "none" else 1 if coll.strategy == "suffix" else coll.cap
    parts = partitions_for(sum(s["rows"] for s in summaries), partitions)
    before, over = items_per_key(blocks, "sid_keys", parts, over=limit)
    if not len(over):  # every group keeps its raw codes: pass 1 wrote the table
        return PipelineResult(summaries, before, before, 0, 0)
    levels = group_levels(coll.strategy, len(sizes))
    busy = sorted_unique(over // int(np.prod(sizes[levels:], dtype=np.int64)))
    redo = _revisited(blocks, busy, int(np.prod(sizes[levels:], dtype=np.int64)))
    kept = [s for s in summaries if s["part"] not in redo]
    again = [s for s in summaries if s["part"] in redo]
    rspec = RegroupSpec(tuple(sizes), levels, coll.candidates if coll.needs_candidates else 0, busy)
    fixed = _collision_pass(again, units, pool, actor_args, spec, rspec, partitions)
    # histograms of disjoint SID sets add up: swap the busy groups' raw counts for theirs resolved
    replaced = sum_histograms(s["before"] for s in fixed)
    after = sum_histograms([before, *(s["after"] for s in fixed)])
    after[:len(replaced)] -= replaced
    return PipelineResult(kept + fixed, before, after, len(again), sum(s["rows"] for s in again))


def _revisited(blocks: list[ray.ObjectRef], busy: np.ndarray, radix: int) -> set[str]:
    """The pass-1 parts (``part`` stems) holding an item of a ``busy`` group: a packed
    SID's group key is the SID // ``radix`` (the product of the sizes of the levels
    after the group's)."""
    redo = set()
    for ref in blocks:
        block = ray.get(ref)
        keys = block["sid_keys"].combine_chunks()
        hits = isin_sorted(keys.flatten().to_numpy() // radix, busy)
        row = np.repeat(np.arange(block.num_rows), keys.value_lengths().to_numpy(zero_copy_only=False))
        redo.update(block["part"].take(pa.array(sorted_unique(row[hits]))).to_pylist())
    return redo


def _collision_pass(again: list[dict], units: list[dict], pool: ActorPoolConfig, actor_args: dict,
                    spec: PartSpec, rspec: RegroupSpec, partitions: int) -> list[dict]:
    """Re-read the pass-1 parts ``again``, rank their busy rows' candidates when the
    strategy needs them (an actor pool of the quantizer, else tasks), shuffle by group
    key and resolve and write each partition -> the new parts' summaries."""
    staging = Path(spec.staging)
    todo = ray.data.from_items([{"part": str(staging / f"{s['part']}.parquet"), "path": units[s["unit"]]["path"],
                                 "row_groups": units[s["unit"]]["row_groups"]} for s in again],
                               override_num_blocks=len(again))
    if rspec.candidates:
        rows = todo.map_batches(Ranker, fn_constructor_kwargs={**actor_args, "spec": rspec},
                                **{**pool.map_args(), "batch_size": 1})
    else:
        rows = todo.map_batches(regroup_parts, fn_kwargs={"spec": rspec}, batch_size=1,
                                batch_format="pyarrow", num_cpus=WRITER_CPUS)
    parts = partitions_for(sum(s["rows"] for s in again), partitions)
    written = rows.repartition(parts, keys=["group_key"]).map_batches(
        write_block, batch_size=None, fn_kwargs={"spec": dataclasses.replace(spec, resolve=True)},
        batch_format="pyarrow", num_cpus=WRITER_CPUS)
    return [row for ref in written.materialize().to_arrow_refs()
            for row in ray.get(ref).drop_columns(["sid_keys"]).to_pylist()]


def _check(out, result: PipelineResult, want: tuple[int, int, int], sizes: list[int]) -> dict:
    """Compare the kept parts' rows and id checksum with the input's, ``want``
    (InputError when they differ: the output is discarded) and total the collision
    statistics."""
    summaries = result.summaries
    got = combine_checksums((s["rows"], s["id_sum"], s["id_xor"]) for s in summaries)
    if got != want:
        raise InputError(out, f"SID table is inconsistent: {got[0]} rows written for {want[0]} input "
                              f"items, item-id checksum {got[1]:016x}/{got[2]:016x} written vs "
                              f"{want[1]:016x}/{want[2]:016x} read (items lost, duplicated or "
                              "changed on the way); nothing was written")
    suffix_size = max((s["suffix_size"] for s in summaries), default=0)
    stats = {"moved": sum(s["moved"] for s in summaries),
             "fallback": sum(s["fallback"] for s in summaries),
             "revisited_parts": result.revisited_parts, "revisited_rows": result.revisited_rows,
             "before": histogram_quality(result.before), "after": histogram_quality(result.after)}
    return {"input_items": want[0], "items": got[0], "collision_stats": stats,
            "sid_sizes": sizes + ([suffix_size] if suffix_size else [])}


def _place_parts(folder: Path, summaries: list[dict], export: bool) -> None:
    """Move the summarised parts from staging to ``part-<i>`` names, in first-item order
    (export part i holds the rows of Parquet part i, in the same order)."""
    staging = folder / ".parts"
    if export:
        for sub in ("sid_table", "sid_tokens"):
            (folder / "export" / sub).mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(sorted(summaries, key=lambda s: s["first_id"])):
        os.replace(staging / f"{s['part']}.parquet", folder / f"part-{i:05d}.parquet")
        if export:
            for name, dest in zip(("sid_table", "sid_tokens"), export_paths(folder, i)):
                os.replace(staging / f"{s['part']}.{name}.csv", dest)
