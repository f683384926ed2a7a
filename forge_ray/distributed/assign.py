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

The actors' and tasks' code (reading, encoding, regrouping, writing parts) is in
:mod:`forge_ray.distributed.assign_parts`, which imports no Ray; this module runs it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data

from forge_ray.config import require, to_dict
from forge_ray.core.arrays import isin_sorted, sorted_unique
from forge_ray.core.quantize.base import Quantizer
from forge_ray.core.quantize.registry import load_quantizer, quantizer_dim
from forge_ray.core.sid.collisions import CollisionConfig, group_levels
from forge_ray.core.sid.metrics import histogram_quality, sum_histograms
from forge_ray.data.schema import DEFAULT_ROWS_PER_SHARD
from forge_ray.distributed.assign_parts import (Encoder, PartSpec, Ranker, RegroupSpec, combine_checksums,
                                                id_checksum, read_units, regroup_parts, write_block)
from forge_ray.distributed.dataset import dataset_manifest, partitions_for
from forge_ray.distributed.remote_errors import surface_user_errors
from forge_ray.distributed.sid_counts import items_per_key
from forge_ray.errors import InputError
from forge_ray.io import atomic_dir, read_manifest, write_manifest
from forge_ray.sid_table import EXPORTS, SIDS_KIND, export_paths, sid_files

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
    summaries = _summaries(blocks)
    limit = None if coll.strategy == "none" else 1 if coll.strategy == "suffix" else coll.cap
    parts = partitions_for(sum(s["rows"] for s in summaries), partitions)
    before, over = items_per_key(blocks, "sid_keys", parts, over=limit)
    if not len(over):  # every group keeps its raw codes: pass 1 wrote the table
        return PipelineResult(summaries, before, before, 0, 0)
    levels = group_levels(coll.strategy, len(sizes))
    radix = int(np.prod(sizes[levels:], dtype=np.int64))  # packed SID // radix = its group key
    busy = sorted_unique(over // radix)
    redo = _revisited(blocks, busy, radix)
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
    return _summaries(written.materialize().to_arrow_refs())


def _summaries(blocks: list[ray.ObjectRef]) -> list[dict]:
    """The writers' summary rows, one block at a time into the driver, without the
    packed SIDs."""
    return [row for ref in blocks for row in ray.get(ref).drop_columns(["sid_keys"]).to_pylist()]


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
