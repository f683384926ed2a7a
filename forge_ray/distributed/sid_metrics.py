"""``forge-ray sid-metrics``: SID quality of a SIDS_DIR, computed on Ray.

* **Counts** (:func:`~forge_ray.distributed.sid_counts.key_counts`): a hash shuffle
  of Ray tasks over the table's files counts items per item id, per raw SID
  (``codes``) and per final SID (``sid``); the driver sums partial histograms and
  holds O(parts x max items per SID + sum(sizes)) numbers, never the per-SID table.
  The quality numbers come from the histograms (:func:`~forge_ray.core.sid.metrics.histogram_quality`).
* **Reconstruction** (with ``--data``): the dataset's items are full-outer-joined to
  the SID table on ``item_id`` (Ray Data hash join) and decoded in a quantizer actor
  pool; each batch returns squared-error sums. Items without a SID are an error;
  SIDs of unknown items are counted.
* **Embedding HitRate** (with ``--data`` and sequences): sessions (target = last item,
  history = the items before it) are sampled by a seeded hash of ``user_id``
  (about ``hitrate.max_sessions``) and collected; the gallery (session items plus a
  hash-sampled ``gallery_size`` of distractors, or every item) is decoded in the actor
  pool and collected; the core :func:`~forge_ray.core.sid.metrics.embedding_hitrate`
  searches it with faiss. Driver memory: gallery x D float32 plus the sessions.
  Sequence items without a SID are counted with a distributed anti-join.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray.data
from ray.data.aggregate import Count, Sum

from forge_ray.config import require, to_dict
from forge_ray.core.arrays import sorted_unique
from forge_ray.core.sid.metrics import (SidMetricsConfig, embedding_hitrate, expand_hist, histogram_quality,
                                        hitrate_key, perplexity, ragged, utilization)
from forge_ray.core.sid.plots import plot_code_usage, plot_sid_distribution
from forge_ray.data.schema import embedding_array, embeddings_to_numpy
from forge_ray.distributed.assign import ActorPoolConfig, load_model, quantizer_dim, read_sid_table
from forge_ray.distributed.assign_parts import QuantizerActor
from forge_ray.distributed.dataset import dataset_manifest, partitions_for, read_items, read_sequences
from forge_ray.distributed.remote_errors import surface_user_errors
from forge_ray.distributed.sid_counts import key_counts
from forge_ray.errors import InputError
from forge_ray.io import atomic_dir, read_manifest, write_manifest
from forge_ray.sid_table import SIDS_KIND, list_codes, sid_files

SID_METRICS_KIND = "sid_metrics"


@dataclasses.dataclass
class SidMetricsStageConfig:
    """Options of ``forge-ray sid-metrics``.

    hitrate: Embedding HitRate settings (core config; ``max_sessions`` and
        ``gallery_size`` are applied here as seeded hash samples before collecting).
    pool: the decoder actor pool.  partitions: count/join partitions (0: per 1M rows).
    max_plot_sids: the items-per-SID plot draws at most this many SIDs (a seeded
        sample of the exact histogram); the metrics are always exact.
    """

    hitrate: SidMetricsConfig = dataclasses.field(default_factory=SidMetricsConfig)
    pool: ActorPoolConfig = dataclasses.field(default_factory=ActorPoolConfig)
    partitions: int = 0
    max_plot_sids: int = 5_000_000

    def __post_init__(self):
        require(self.partitions >= 0, "partitions must be >= 0")
        require(self.max_plot_sids >= 1, "max_plot_sids must be >= 1")


# ----------------------------------------------------------------------------- quality

def level_quality(levels: list[np.ndarray]) -> dict:
    return {"utilization": [utilization(c) for c in levels],
            "perplexity": [perplexity(c) for c in levels]}


# ----------------------------------------------------------------------------- with data

class ReconStats(QuantizerActor):
    """Joined batch (embedding and codes/sid, either may be null) -> one row of sums."""

    def __init__(self, model_dir: str, cpus: float, sid_levels: int):
        super().__init__(model_dir, cpus)
        self.sid_levels = sid_levels

    def __call__(self, batch: pa.Table) -> pa.Table:
        has_emb = np.asarray(batch["embedding"].is_valid())
        has_sid = np.asarray(batch["codes"].is_valid())
        both = pa.array(has_emb & has_sid)
        missing = has_emb & ~has_sid
        ids = batch["item_id"].to_numpy()
        x = embeddings_to_numpy(batch["embedding"].filter(both))
        n_levels = len(self.sizes)
        codes = list_codes(batch["codes"].filter(both), n_levels)
        sid = list_codes(batch["sid"].filter(both), self.sid_levels)[:, :n_levels]
        sq = [float(((x.astype(np.float64) - self.quantizer.decode(c)) ** 2).sum()) if len(c) else 0.0
              for c in (codes, sid)]
        return pa.table({"items": [int(both.true_count)], "missing": [int(missing.sum())],
                         "missing_example": [int(ids[missing][0]) if missing.any() else -1],
                         "unknown_sids": [int((~has_emb & has_sid).sum())],
                         "sq_raw": [sq[0]], "sq_final": [sq[1]], "elements": [int(x.size)]})


class Reconstruct(QuantizerActor):
    """SID rows -> ``item_id, recon`` for the gallery items (all, or ``keep`` ids plus
    a hash sample of ``fraction`` of the others)."""

    def __init__(self, model_dir: str, cpus: float, sid_levels: int, keep: np.ndarray | None,
                 fraction: float, seed: int):
        super().__init__(model_dir, cpus)
        self.sid_levels, self.keep, self.fraction, self.seed = sid_levels, keep, fraction, seed

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch["item_id"].to_numpy().astype(np.int64)
        sel = np.ones(len(ids), dtype=bool)
        if self.keep is not None:
            sel = np.isin(ids, self.keep) | (hash_unit(ids, self.seed) < self.fraction)
        sid = list_codes(batch["sid"], self.sid_levels)[sel][:, :len(self.sizes)]
        recon = self.quantizer.decode(sid)
        return pa.table({"item_id": ids[sel], "recon": embedding_array(recon)})


def hash_unit(ids: np.ndarray, seed: int) -> np.ndarray:
    """Seeded splitmix64 of int64 ids -> uniform floats in [0, 1) (sampling by id)."""
    with np.errstate(over="ignore"):
        z = ids.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15) * np.uint64(seed + 1)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _sessions(batch: pa.Table, fraction: float, seed: int) -> pa.Table:
    """Sequences -> sampled sessions: ``history`` (all but the last item), ``target``."""
    users = batch["user_id"].to_numpy().astype(np.int64)
    seqs = batch["item_ids"].combine_chunks() if isinstance(batch["item_ids"], pa.ChunkedArray) \
        else batch["item_ids"]
    lens = np.asarray(seqs.value_lengths().fill_null(0))
    values, offsets = ragged(seqs.filter(pa.array((lens > 0) & (hash_unit(users, seed) < fraction))))
    last = offsets[1:] - 1
    mask = np.ones(values.size, dtype=bool)
    mask[last] = False
    hist_offsets = (offsets - np.arange(offsets.size)).astype(np.int32)
    return pa.table({"history": pa.ListArray.from_arrays(pa.array(hist_offsets), pa.array(values[mask])),
                     "target": values[last]})


def _explode(batch: pa.Table) -> pa.Table:
    seqs = batch["item_ids"].combine_chunks() if isinstance(batch["item_ids"], pa.ChunkedArray) \
        else batch["item_ids"]
    lens = np.asarray(seqs.value_lengths().fill_null(0))
    return pa.table({"user_id": np.repeat(batch["user_id"].to_numpy(), lens),
                     "item_id": seqs.flatten().to_numpy(zero_copy_only=False).astype(np.int64)})


def _collect(ds: ray.data.Dataset) -> pa.Table | None:
    tables = list(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    return pa.concat_tables(tables) if tables else None


def _data_metrics(sids_dir, sid_table, manifest: dict, dataset, cfg: SidMetricsStageConfig,
                  parts: int) -> dict:
    """Reconstruction MSE (of the final SIDs and ``raw_`` of the raw codes), sequence
    coverage and Embedding HitRate@K of the final SIDs (needs the dataset)."""
    q, _ = load_model(manifest["model"])
    dmeta = dataset_manifest(dataset)
    dim, ddim = quantizer_dim(q), int(dmeta.get("embedding_dim") or 0)
    if dim != ddim:
        raise InputError(dataset, f"embeddings are {ddim}-d but the SIDs' quantizer "
                                  f"{manifest['model']} expects {dim}-d")
    pool, sid_levels = cfg.pool, len(manifest["sizes"])
    actor_args = {"model_dir": manifest["model"], "cpus": pool.cpus_per_actor, "sid_levels": sid_levels}
    joined = read_items(dataset, columns=["item_id", "embedding"]).join(
        sid_table, "full_outer", num_partitions=parts, on=("item_id",))
    partial = _collect(joined.map_batches(ReconStats, fn_constructor_kwargs=actor_args,
                                          **pool.map_args()))
    tot = {c: sum(partial[c].to_pylist()) for c in ("items", "missing", "unknown_sids",
                                                     "sq_raw", "sq_final", "elements")}
    if tot["missing"]:
        example = next(i for i in partial["missing_example"].to_pylist() if i >= 0)
        raise InputError(sids_dir, f"{tot['missing']} items of {dataset} have no SID "
                                   f"(e.g. item {example}): assign SIDs to this dataset first")
    hr_key = hitrate_key(cfg.hitrate.topk)
    out = {"reconstruction_mse": tot["sq_final"] / tot["elements"] if tot["elements"] else None,
           "raw_reconstruction_mse": tot["sq_raw"] / tot["elements"] if tot["elements"] else None,
           "sids_of_unknown_items": tot["unknown_sids"]}
    if not (Path(dataset) / "sequences").is_dir():
        out[hr_key] = None
        return out
    seqs = read_sequences(dataset, columns=["user_id", "item_ids"])
    n_seq = seqs.count()
    unknown = (seqs.map_batches(_explode, batch_format="pyarrow")
               .join(sid_table.select_columns(["item_id"]), "left_anti", num_partitions=parts,
                     on=("item_id",))
               .groupby("user_id", num_partitions=parts).count()
               .aggregate(Count(), Sum("count()"))) or {}  # None when nothing is unknown
    out["sequences"] = {"sequences": n_seq,
                        "with_unknown_items": int(unknown.get("count()") or 0),
                        "unknown_item_refs": int(unknown.get("sum(count())") or 0)}
    hr = cfg.hitrate
    fraction = 1.0 if hr.max_sessions is None else min(1.0, hr.max_sessions / max(n_seq, 1))
    sessions = _collect(seqs.map_batches(_sessions, batch_format="pyarrow",
                                         fn_kwargs={"fraction": fraction, "seed": hr.seed}))
    if sessions is None or sessions.num_rows == 0:
        out[hr_key] = None
        return out
    keep, distract = None, 1.0
    if hr.gallery_size is not None:
        hist = sessions["history"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        keep = sorted_unique(np.r_[hist, sessions["target"].to_numpy()]).astype(np.int64)
        n_items = manifest["counts"]["items"]
        distract = max(hr.gallery_size - keep.size, 0) / max(n_items - keep.size, 1)
    gallery = _collect(sid_table.map_batches(
        Reconstruct, fn_constructor_kwargs={**actor_args, "keep": keep, "fraction": distract,
                                            "seed": hr.seed + 1}, **pool.map_args()))
    result = embedding_hitrate(gallery["item_id"].to_numpy(), embeddings_to_numpy(gallery["recon"]),
                               sessions["history"], sessions["target"].to_numpy(),
                               dataclasses.replace(hr, max_sessions=None, gallery_size=None))
    out[hr_key] = {**result, "max_sessions": hr.max_sessions,
                   "gallery_size": hr.gallery_size}
    return out


def sid_metrics(sids_dir: str | os.PathLike, dataset: str | os.PathLike | None, out: str | os.PathLike,
                cfg: SidMetricsStageConfig | None = None, *, overwrite: bool = False) -> dict:
    """Compute SID metrics of ``sids_dir`` (plus reconstruction and HitRate with
    ``dataset``); write ``out/metrics.json``, PNG plots and a manifest. Returns the
    metrics: those of the final SIDs at the top level (``gini``, ``unique_sid_ratio``,
    ...) beside ``raw_collision_rate`` (raw codes, before collision handling); ``raw`` and
    ``final`` hold every histogram metric of each. Needs a Ray connection."""
    cfg = cfg or SidMetricsStageConfig()
    manifest = read_manifest(sids_dir, SIDS_KIND)
    sizes, code_sizes = list(manifest["sizes"]), list(manifest["code_sizes"])
    suffix = len(sizes) == len(code_sizes) + 1
    parts = partitions_for(manifest["counts"]["items"], cfg.partitions)
    with atomic_dir(out, overwrite, kind=SID_METRICS_KIND, inputs=(sids_dir, dataset)) as tmp:
        with surface_user_errors():
            counts = key_counts(sid_files(sids_dir), code_sizes, suffix, parts)
            if counts.hist[0].size > 2:
                raise InputError(sids_dir, "SID table names some item more than once")
            raw = {**histogram_quality(counts.hist[1]), **level_quality(counts.levels[1])}
            final = {**histogram_quality(counts.hist[2]), **level_quality(counts.levels[2])}
            metrics = {
                "items": final["items"], "sids": final["sids"],
                "raw_collision_rate": raw["collision_rate"],
                **{k: final[k] for k in ("unique_sid_ratio", "max_items_per_sid", "gini",
                                         "utilization", "perplexity")},
                "strategy": manifest["strategy"], "sizes": sizes, "raw": raw, "final": final}
            if dataset is not None:
                metrics.update(_data_metrics(sids_dir, read_sid_table(sids_dir), manifest, dataset, cfg, parts))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        for name, hist, title in (("sid_distribution.png", counts.hist[2], "final SIDs"),
                                  ("sid_distribution_raw.png", counts.hist[1], "raw codes")):
            per_sid, sampled = expand_hist(hist, cfg.max_plot_sids, cfg.hitrate.seed)
            plot_sid_distribution(per_sid, tmp / name, title=f"Items per SID ({title}"
                                  + (f", sample of {cfg.max_plot_sids:,} SIDs)" if sampled else ")"))
        plot_code_usage(counts.levels[2], tmp / "code_usage.png")
        write_manifest(tmp, SID_METRICS_KIND, sids=os.fspath(Path(sids_dir).resolve()),
                       dataset=None if dataset is None else os.fspath(Path(dataset).resolve()),
                       config=to_dict(cfg), files=["metrics.json", "sid_distribution.png",
                                                   "sid_distribution_raw.png", "code_usage.png"])
    return metrics
