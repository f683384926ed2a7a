"""``forge-ray assign``: give every item of a dataset exactly one SID, on Ray, in one
streaming pass that never reads back what it wrote.

1. **Read and encode.** The driver splits the input's Parquet row groups (from the
   footers) into *units* of at least ``max(pool.batch_size, DEFAULT_ROWS_PER_SHARD)``
   rows (a file's last unit may be smaller), never across files. The units stream through a pool of :class:`Encoder` actors
   (``map_batches`` with ``ActorPoolStrategy``, one unit per call): each actor loads
   the quantizer once (onto its GPU when the pool reserves one and the actor sees
   CUDA), reads its unit's ``item_id`` and ``embedding`` with pyarrow and turns the
   (B, D) embeddings, ``pool.batch_size`` rows per quantizer call, into (B, L) codes,
   plus the ranked last-level candidates (B, k) when the collision strategy needs
   them, and the group key (the first L-1 codes, or all L for ``suffix``, packed into
   an int64). Reading in the actor moves no embedding through the object store; on
   this project's 2-core box Ray Data's own Parquet read spent 45-75 ms per file
   listing the input and its re-blocking into batch-sized blocks 10 us per row, which
   left the encoders idle two thirds of the time (docs/benchmarks.md).
2. **Resolve and write** (:func:`write_block`). Strategy ``none`` has no groups: each
   encoder actor writes its unit as one part itself (no writer tasks, whose worker
   processes took longer to start on a small machine than the writing takes). Other
   strategies (Ray tasks): rows are hash-partitioned by group key
   (``repartition(keys=...)``: one block per partition, holding whole groups) and each
   block's groups are resolved by the core
   :func:`~forge_ray.core.sid.collisions.resolve_groups` (deterministic for a seed
   whatever the partitioning; it checks each resolved group against the strategy's
   guarantee). Each part is one Parquet file, ``item_id`` int64, ``codes``
   list<int64> (raw quantizer codes), ``sid`` list<int64> (final codes, L+1 levels
   for ``suffix``), ``fallback`` bool, and with ``export`` the part's two CSVs
   (``export/sid_table``: FORGE's ``item_id,c1,c2,c3``; ``export/sid_tokens``:
   ``item_id,sid`` with ``C{c+offset}`` tokens; headers in every part) from the same
   arrays. Its writer returns a one-row summary: rows, an order-independent checksum
   of its item ids (:func:`id_checksum`), moved / fallback counts and the SID
   histograms of its groups (for ``none``: its packed SIDs, counted by a task shuffle,
   :func:`~forge_ray.distributed.sid_counts.items_per_key`).
3. **Check** on the driver: rows and checksums of what the writers wrote equal those
   of the input ids (a driver thread reads only the input's ``item_id`` column while
   the pipeline runs), so every input item has exactly one SID; otherwise InputError and
   no output. Parts land in staging names and are renamed ``part-<i>`` in first-item
   order only after the check, so a retried task's orphan file is never part of the
   table.

Memory: an encoder actor holds the quantizer, one unit (fewer than
``max(B, DEFAULT_ROWS_PER_SHARD)`` rows plus one row group's: the dataset's shards are
written in row groups of at most ``DEFAULT_ROWS_PER_SHARD`` rows) and
one quantizer call's intermediates (B x max(K) costs, in row blocks); a writer holds
one block (a partition: about ``dataset.ROWS_PER_PARTITION`` rows x (L + k)
codes); the driver holds one summary row per part. The output is written into a
temporary sibling and renamed at the end (:func:`~forge_ray.io.atomic_dir`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data

from forge_ray.config import require, to_dict
from forge_ray.core.arrays import has_duplicates
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
    partitions: shuffle partitions of the collision groupby (0: one per 1M items);
        also the number of Parquet parts for strategies other than ``none``.
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
    """Units of the input (``path``, ``row_groups``; see :func:`read_units`) -> the
    encoded rows ``item_id, codes`` (+ ``group_key``, + ``candidates``), or with
    ``write`` (strategy ``none``, which needs no groups) each unit written as one part
    here -> its one-row :data:`SUMMARY`. The quantizer sees ``rows`` rows per call."""

    def __init__(self, model_dir: str, cpus: float, candidates: int, key_levels: int | None,
                 gpus: float = 0.0, rows: int = ActorPoolConfig.batch_size,
                 write: PartSpec | None = None):
        # Not zero-argument super(): a test may ship a subclass by value, and this class
        # with it, whose __class__ cell would then not match the instance's base.
        QuantizerActor.__init__(self, model_dir, cpus, gpus)
        self.k = candidates
        self.key_levels = key_levels
        self.rows = rows
        self.write = write

    def __call__(self, units: pa.Table) -> pa.Table:
        return pa.concat_tables([self.process(read_unit(path, groups)) for path, groups in
                                 zip(units["path"].to_pylist(), units["row_groups"].to_pylist())])

    def _ranked(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        codes, cand = self.quantizer.rank_last_level(x, self.k)
        return codes, _small_ints(cand, self.sizes[-1])

    def process(self, items: pa.Table) -> pa.Table:
        """``item_id`` + ``embedding`` rows -> encoded rows, or the summary of their part."""
        x = embeddings_to_numpy(items["embedding"])
        # pool.batch_size rows per quantizer call: what fills its device, and bounds its memory
        if self.k:
            # narrowed a batch at a time: int64 candidates are 1.6 KB a row (200 of
            # them) to concatenate, int16 a quarter of that
            codes, cand = batched(self._ranked, x, self.rows)
        else:
            codes, cand = batched(self.quantizer.encode, x, self.rows), None
        cols = {"item_id": items["item_id"], "codes": codes_array(codes)}
        if self.write is not None:
            return write_block(pa.table(cols), self.write)
        if self.key_levels is not None:  # None: strategy none, no groups
            cols["group_key"] = (pack_codes(codes[:, :self.key_levels], self.sizes[:self.key_levels])
                                 if self.key_levels else np.zeros(len(codes), dtype=np.int64))
        if cand is not None:
            cols["candidates"] = pa.FixedSizeListArray.from_arrays(pa.array(cand.ravel()), self.k)
        return pa.table(cols)


# ----------------------------------------------------------------------------- writers

@dataclasses.dataclass(frozen=True)
class PartSpec:
    """What every writer task needs: the input ``dataset`` (for messages), the
    ``staging`` folder, quantizer code ``sizes``, the collision config and whether to
    write the CSV exports."""

    dataset: str
    staging: str
    sizes: tuple[int, ...]
    collisions: CollisionConfig
    export: bool


SUMMARY = pa.schema([("part", pa.string()), ("first_id", pa.int64()), ("rows", pa.int64()),
                     ("id_sum", pa.uint64()), ("id_xor", pa.uint64()), ("moved", pa.int64()),
                     ("fallback", pa.int64()), ("suffix_size", pa.int64()),
                     ("before", pa.list_(pa.int64())), ("after", pa.list_(pa.int64())),
                     ("sid_keys", pa.list_(pa.int64()))])


def write_block(block: pa.Table, spec: PartSpec) -> pa.Table:
    """One block of encoded rows -> resolved, written as one Parquet part plus its
    exports under staging names; returns its one-row :data:`SUMMARY`.

    The block holds whole collision groups (strategy ``none``: any rows). ``before`` /
    ``after`` are its items-per-SID histograms (empty for ``none``, whose packed SIDs
    go out in ``sid_keys`` instead); ``suffix_size`` its largest suffix + 1.
    """
    n, sizes, coll = block.num_rows, list(spec.sizes), spec.collisions
    if n == 0:
        return SUMMARY.empty_table()
    ids = block["item_id"].to_numpy().astype(np.int64)
    codes = list_codes(block["codes"], len(sizes))
    before = after = keys = np.zeros(0, dtype=np.int64)
    if coll.strategy == "none":
        if has_duplicates(ids):
            raise InputError(spec.dataset, "duplicate item ids in the dataset's items")
        sid, fallback, keys = codes, np.zeros(n, dtype=bool), pack_codes(codes, sizes)
    else:
        cand = None
        if "candidates" in block.column_names:
            col = block["candidates"].combine_chunks()
            # as shipped (int16 / int32): resolve_group widens only the rows of the
            # groups it resolves, not n x k values of which few are ever read
            cand = col.flatten().to_numpy().reshape(n, -1)
        try:
            res = resolve_groups(ids, codes, cand, coll, last_size=sizes[-1])
        except ValueError as e:  # e.g. a prefix with more than cap x K items
            raise ConfigError("collisions", str(e)) from None
        sid, fallback, before, after = res.codes, res.fallback, res.before, res.after
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
           "before": [list(map(int, before))], "after": [list(map(int, after))]}
    return pa.table({**{k: pa.array(v, type=SUMMARY.field(k).type) for k, v in one.items()},
                     "sid_keys": _one_list(keys)}, schema=SUMMARY)


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
    parts = partitions_for(sum(u["rows"] for u in units), cfg.partitions)
    encoder_args = {"model_dir": os.fspath(model_dir), "cpus": pool.cpus_per_actor,
                    "gpus": pool.gpus_per_actor, "rows": pool.batch_size,
                    "candidates": coll.candidates if coll.needs_candidates else 0,
                    "key_levels": None if coll.strategy == "none" else group_levels(coll.strategy,
                                                                                    len(sizes))}

    with atomic_dir(out, overwrite, kind=SIDS_KIND, inputs=(model_dir, dataset)) as tmp:
        staging = tmp / ".parts"
        staging.mkdir()
        spec = PartSpec(os.fspath(dataset), str(staging), tuple(sizes), coll, cfg.export)
        with ThreadPoolExecutor(1) as reader:
            want = reader.submit(_input_checksum, input_files)  # runs beside the pipeline
            with surface_user_errors():
                summaries, sid_hist = _run_pipeline(units, pool, encoder_args, spec, parts)
        stats = _check(out, summaries, want.result(), sizes, sid_hist)
        _place_parts(tmp, summaries, cfg.export)
        shutil.rmtree(staging)
        return write_manifest(
            tmp, SIDS_KIND, model=os.fspath(Path(model_dir).resolve()),
            dataset=os.fspath(Path(dataset).resolve()), sizes=stats["sid_sizes"], code_sizes=sizes,
            strategy=coll.strategy, collisions=to_dict(coll), config=to_dict(cfg),
            counts={"input_items": stats["input_items"], "items": stats["items"],
                    "distinct_items": stats["items"]},
            collision_stats=stats["collision_stats"],
            exports={**EXPORTS, "rows": stats["items"]} if cfg.export else None)


def _run_pipeline(units: list[dict], pool: ActorPoolConfig, encoder_args: dict, spec: PartSpec,
                  parts: int) -> tuple[list[dict], np.ndarray | None]:
    """Read, encode, resolve and write ``units`` (:func:`read_units`) in one streaming
    Ray Data job -> (one summary dict per written part, items-per-SID histogram for
    strategy ``none`` else None). Call it inside :func:`surface_user_errors`: a
    dataset keeps the Ray Data context it was built in."""
    none = spec.collisions.strategy == "none"
    # one block per unit and one unit per call: the pool's actors share the units evenly
    todo = ray.data.from_items([{"path": u["path"], "row_groups": u["row_groups"]} for u in units],
                               override_num_blocks=len(units))
    map_args = {**pool.map_args(), "batch_size": 1}
    if none:  # no groups: each actor writes its units as parts itself
        written = todo.map_batches(Encoder, fn_constructor_kwargs={**encoder_args, "write": spec}, **map_args)
    else:  # one block per partition, whole groups in each
        encoded = todo.map_batches(Encoder, fn_constructor_kwargs=encoder_args, **map_args)
        written = encoded.repartition(parts, keys=["group_key"]).map_batches(
            write_block, batch_size=None, fn_kwargs={"spec": spec}, batch_format="pyarrow",
            num_cpus=WRITER_CPUS)
    written = written.materialize()  # the summaries (and, for none, the packed SIDs)
    # One block at a time into the driver, not a Ray Data pass that drops the keys: its
    # per-task overhead (5.6 s for 400 parts here) is more than fetching them.
    blocks = written.to_arrow_refs()
    summaries = [row for ref in blocks for row in ray.get(ref).drop_columns(["sid_keys"]).to_pylist()]
    return summaries, items_per_key(blocks, "sid_keys", parts) if none else None


def _check(out, summaries: list[dict], want: tuple[int, int, int], sizes: list[int],
           sid_hist: np.ndarray | None) -> dict:
    """Compare the writers' rows and id checksum with the input's, ``want`` (InputError
    when they differ: the output is discarded) and total the collision statistics."""
    got = combine_checksums((s["rows"], s["id_sum"], s["id_xor"]) for s in summaries)
    if got != want:
        raise InputError(out, f"SID table is inconsistent: {got[0]} rows written for {want[0]} input "
                              f"items, item-id checksum {got[1]:016x}/{got[2]:016x} written vs "
                              f"{want[1]:016x}/{want[2]:016x} read (items lost, duplicated or "
                              "changed on the way); nothing was written")
    if sid_hist is None:
        before, after = (sum_histograms(s[k] for s in summaries) for k in ("before", "after"))
    else:
        before = after = sid_hist
    suffix_size = max((s["suffix_size"] for s in summaries), default=0)
    stats = {"moved": sum(s["moved"] for s in summaries),
             "fallback": sum(s["fallback"] for s in summaries),
             "before": histogram_quality(before), "after": histogram_quality(after)}
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
