"""``forge-ray assign``: give every item of a dataset exactly one SID, on Ray.

Pipeline (all Ray Data, streaming; nothing holds the whole item table in one process):

1. **Encode.** ``items`` stream through a pool of :class:`Encoder` actors
   (``map_batches`` with ``ActorPoolStrategy``); each actor loads the quantizer once
   and turns a batch of (B, D) embeddings into (B, L) codes, plus the ranked
   last-level candidates (B, k) when the collision strategy needs them, and the
   group key (the first L-1 codes, or all L for ``suffix``, packed into an int64).
2. **Resolve collisions.** ``groupby(group_key).map_groups(...)`` shuffles items by
   prefix so that each call holds one prefix group and runs the core
   :func:`~forge_ray.core.sid.collisions.resolve_group` on it (deterministic for a
   seed whatever the partitioning). Strategy ``none`` skips the shuffle.
3. **Write** Parquet files straight into SIDS_DIR: ``item_id`` int64, ``codes``
   list<int64> (raw quantizer codes), ``sid`` list<int64> (final codes, L+1 levels for
   ``suffix``), ``fallback`` bool (placed by the random fallback).
4. **Verify** on the written files: rows == input items == distinct item ids
   (distributed groupby count); otherwise fail and leave no output.
5. **Export** per Parquet file (Ray tasks): ``export/sid_table/part-00000.csv``
   (FORGE's ``item_id,c1,c2,c3``) and ``export/sid_tokens/part-00000.csv`` (``item_id,sid``
   with ``C{c+offset}`` token strings). Every part has a header.

Memory: an encoder actor holds the quantizer plus one batch (B x max(K) costs); a
collision call holds one prefix group (n x k candidates); the driver holds only
counts. The output is written into a temporary sibling and renamed at the end
(:func:`~forge_ray.io.atomic_dir`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data

from forge_ray.config import require, to_dict
from forge_ray.core.quantize.base import Quantizer
from forge_ray.core.quantize.registry import load_quantizer, quantizer_dim
from forge_ray.core.sid.codes import pack_codes
from forge_ray.core.sid.collisions import CollisionConfig, group_levels, resolve_group
from forge_ray.core.sid.metrics import histogram_quality
from forge_ray.core.sid.export import SidTableWriter, SidTokenWriter
from forge_ray.data.schema import DEFAULT_ROWS_PER_SHARD, embeddings_to_numpy
from forge_ray.distributed.dataset import dataset_manifest, read_items
from forge_ray.distributed.remote_errors import surface_user_errors
from forge_ray.distributed.sid_counts import key_counts
from forge_ray.errors import ConfigError, InputError
from forge_ray.io import atomic_dir, read_manifest, write_manifest
from forge_ray.sid_table import EXPORTS, SIDS_KIND, codes_array, export_paths, list_codes, sid_files

ROWS_PER_PARTITION = 1_000_000  # shuffle partition size of the groupbys


@dataclasses.dataclass
class ActorPoolConfig:
    """The Ray Data actor pool that runs a quantizer.

    actors: pool size.  cpus_per_actor: logical CPUs each actor reserves (fractional
    values let several actors share a core; torch uses max(1, floor(cpus)) threads).
    gpus_per_actor: GPUs reserved per actor (the core quantizers compute on CPU tensors,
    so this only places actors on GPU nodes).  batch_size: rows per batch.
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
    partitions: shuffle partitions of the groupbys (0: one per 1M items).
    export: write the CSV exports under ``export/``.
    fail_once_marker: TEST HOOK. When set and that file does not exist, the first
        encoder batch creates it and kills its actor process (``os._exit``), to check
        that Ray Data's retry neither loses nor duplicates items. Leave empty.
    """

    collisions: CollisionConfig = dataclasses.field(default_factory=CollisionConfig)
    pool: ActorPoolConfig = dataclasses.field(default_factory=ActorPoolConfig)
    partitions: int = 0
    export: bool = True
    fail_once_marker: str = ""

    def __post_init__(self):
        require(self.partitions >= 0, "partitions must be >= 0")


# ----------------------------------------------------------------------------- arrays

def partitions_for(rows: int, configured: int = 0) -> int:
    return configured or max(1, math.ceil(rows / ROWS_PER_PARTITION))


# ----------------------------------------------------------------------------- actors

class QuantizerActor:
    """Loads the quantizer once per actor and limits torch to the reserved CPUs."""

    def __init__(self, model_dir: str, cpus: float):
        import torch

        torch.set_num_threads(max(1, int(cpus)))
        self.quantizer = load_quantizer(model_dir)
        self.sizes = list(self.quantizer.sizes)


class Encoder(QuantizerActor):
    """Batch of items -> ``item_id, codes, group_key`` (+ ``candidates``)."""

    def __init__(self, model_dir: str, cpus: float, candidates: int, key_levels: int,
                 fail_once_marker: str = ""):
        super().__init__(model_dir, cpus)
        self.k = candidates
        self.key_levels = key_levels
        self.fail_once_marker = fail_once_marker

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.fail_once_marker:
            try:  # exclusive create: exactly one batch of the whole run crashes, once
                with open(self.fail_once_marker, "x"):
                    pass
                os._exit(1)
            except FileExistsError:
                pass
        x = embeddings_to_numpy(batch["embedding"])
        if self.k:
            codes, cand = self.quantizer.rank_last_level(x, self.k)
        else:
            codes, cand = self.quantizer.encode(x), None
        key = (pack_codes(codes[:, :self.key_levels], self.sizes[:self.key_levels])
               if self.key_levels else np.zeros(len(codes), dtype=np.int64))
        cols = {"item_id": batch["item_id"], "codes": codes_array(codes), "group_key": key}
        if cand is not None:
            cols["candidates"] = codes_array(cand)
        return pa.table(cols)


def resolve_prefix_group(group: pa.Table, cfg: CollisionConfig, n_levels: int,
                         last_size: int) -> pa.Table:
    """``map_groups`` body: one prefix group -> ``item_id, codes, sid, fallback``."""
    ids = group["item_id"].to_numpy().astype(np.int64)
    codes = list_codes(group["codes"], n_levels)
    cand = None
    if "candidates" in group.column_names:
        col = group["candidates"].combine_chunks()
        cand = list_codes(col, len(col[0]) if len(col) else 0)
    try:
        res = resolve_group(ids, codes, cand, cfg, last_size=last_size)
    except ValueError as e:  # e.g. a prefix with more than cap x K items
        raise ConfigError("collisions", str(e)) from None
    return pa.table({"item_id": ids, "codes": codes_array(codes), "sid": codes_array(res.codes),
                     "fallback": res.fallback})


def _no_collisions(batch: pa.Table) -> pa.Table:
    return pa.table({"item_id": batch["item_id"], "codes": batch["codes"], "sid": batch["codes"],
                     "fallback": np.zeros(batch.num_rows, dtype=bool)})


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

    items = read_items(dataset, columns=["item_id", "embedding"])
    n_in = items.count()
    parts = partitions_for(n_in, cfg.partitions)
    key_levels = group_levels(coll.strategy, len(sizes))
    pool = cfg.pool
    # Streaming re-blocking to batch-sized blocks: a shard is one block, and a dataset
    # of a few shards would otherwise feed only that many of the pool's actors.
    encoded = items.repartition(target_num_rows_per_block=pool.batch_size).map_batches(
        Encoder, fn_constructor_kwargs={
            "model_dir": os.fspath(model_dir), "cpus": pool.cpus_per_actor,
            "candidates": coll.candidates if coll.needs_candidates else 0,
            "key_levels": key_levels, "fail_once_marker": cfg.fail_once_marker},
        **pool.map_args())
    if coll.strategy == "none":
        resolved = encoded.map_batches(_no_collisions, batch_format="pyarrow")
    else:
        resolved = encoded.groupby("group_key", num_partitions=parts).map_groups(
            resolve_prefix_group, batch_format="pyarrow",
            fn_kwargs={"cfg": coll, "n_levels": len(sizes), "last_size": sizes[-1]})

    with atomic_dir(out, overwrite, kind=SIDS_KIND, inputs=(model_dir, dataset)) as tmp:
        with surface_user_errors():
            # whole shards, not one small file per batch-sized block
            resolved.write_parquet(str(tmp), min_rows_per_file=DEFAULT_ROWS_PER_SHARD)
            stats = _verify(tmp, n_in, sizes, coll.strategy, parts, cfg.export)
        return write_manifest(
            tmp, SIDS_KIND, model=os.fspath(Path(model_dir).resolve()),
            dataset=os.fspath(Path(dataset).resolve()), sizes=stats["sid_sizes"], code_sizes=sizes,
            strategy=coll.strategy, collisions=to_dict(coll), config=to_dict(cfg),
            counts={"input_items": n_in, "items": stats["items"],
                    "distinct_items": stats["distinct_items"]},
            collision_stats=stats["collision_stats"], exports=stats["exports"])


def _verify(folder: Path, n_in: int, sizes: list[int], strategy: str, parts: int,
            export: bool) -> dict:
    """Check that every input item has exactly one SID on the written table (rows,
    distinct ids), count moved/fallback items, SID sharing before/after, and write the
    exports. Raises InputError (so the output is discarded) on any mismatch."""
    files = sid_files(folder)
    table = read_sid_table(folder)
    rows = table.count()
    counts = key_counts(table, sizes, strategy == "suffix", parts)
    distinct = int(counts.hist[0].sum())
    if not rows == distinct == n_in or counts.hist[0].size > 2:
        raise InputError(folder.parent, f"SID table is inconsistent: {n_in} input items, {rows} rows, "
                                        f"{distinct} distinct item ids (duplicate item ids in the "
                                        "dataset, or lost/duplicated rows)")
    suffix_size = len(counts.levels[2][-1]) if strategy == "suffix" else None
    sid_sizes = sizes + ([suffix_size] if suffix_size else [])
    export_dir = folder / "export" if export else None
    if export_dir:
        for sub in ("sid_table", "sid_tokens"):
            (export_dir / sub).mkdir(parents=True)
    scans = ray.get([_scan_file.remote(p, i, export_dir and str(folder), sizes, sid_sizes)
                     for i, p in enumerate(files)])
    scanned = {k: sum(s[k] for s in scans) for k in ("rows", "moved", "fallback")}
    if scanned["rows"] != rows:
        raise InputError(folder.parent, f"exported {scanned['rows']} rows, expected {rows}")
    stats = {"moved": scanned["moved"], "fallback": scanned["fallback"],
             "before": histogram_quality(counts.hist[1]),
             "after": histogram_quality(counts.hist[2])}
    exports = {**EXPORTS, "rows": rows} if export_dir else None
    return {"items": rows, "distinct_items": distinct, "sid_sizes": sid_sizes,
            "collision_stats": stats, "exports": exports}


@ray.remote(num_cpus=0.25)
def _scan_file(path: str, index: int, table_dir: str | None, sizes: list[int], sid_sizes: list[int]) -> dict:
    """One Parquet part: count rows / moved / fallback items and, with ``table_dir``,
    write that part's CSV of each export (``part-<index>.csv``: idempotent on retry)."""
    out = {"rows": 0, "moved": 0, "fallback": 0}
    writers = []
    if table_dir:
        table_csv, tokens_csv = export_paths(table_dir, index)
        writers = [SidTableWriter(table_csv, sid_sizes), SidTokenWriter(tokens_csv, sid_sizes)]
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=65536,
                                                       columns=["item_id", "codes", "sid", "fallback"]):
            ids = batch.column("item_id").to_numpy().astype(np.int64)
            codes = list_codes(batch.column("codes"), len(sizes))
            sid = list_codes(batch.column("sid"), len(sid_sizes))
            out["rows"] += len(ids)
            out["moved"] += int((sid[:, :len(sizes)] != codes).any(axis=1).sum())
            out["fallback"] += int(np.asarray(batch.column("fallback")).sum())
            for w in writers:
                w.write(ids, sid)
    finally:
        for w in writers:
            w.close()
    return out
