"""Ray Data plumbing and report files of ``train-sid``.

Reading: the items as (B, D) training batches, the pairs joined to both items'
embeddings, seeded samples. Writing: per-level code utilization and reconstruction
error over all training items (one streaming pass), and the training curves PNG.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data

from forge_ray.data.schema import embedding_array, embeddings_to_numpy
from forge_ray.data.cooccurrence import cooccurrence_pairs
from forge_ray.distributed.dataset import read_items, read_pairs, read_sequences
from forge_ray.errors import InputError
from forge_ray.distributed.kmeans_ray import ShardedData
from forge_ray.io import atomic_dir

ROWS_PER_JOIN_PARTITION = 1_000_000


def _as_tensor(batch: pa.Table, columns: dict[str, str]) -> dict[str, np.ndarray]:
    """Arrow embedding columns -> (B, D) float32 arrays (Ray tensor columns)."""
    return {new: embeddings_to_numpy(batch[old]) for old, new in columns.items()}


def _sequence_pairs(batch: pa.Table, window: int) -> pa.Table:
    a, b = cooccurrence_pairs([np.asarray(s, np.int64) for s in batch["item_ids"].to_pylist()], window)
    return pa.table({"item_a": a, "item_b": b})


def _pair_embeddings(batch: pa.Table, ids: np.ndarray, x: np.ndarray) -> pa.Table:
    """(item_a, item_b) rows -> (emb_a, emb_b) looked up in the broadcast (N,) sorted
    ``ids`` / (N, D) ``x``; pairs with an unknown item drop out (as an inner join)."""
    rows, known = [], np.ones(len(batch), bool)
    for side in ("item_a", "item_b"):
        want = batch[side].to_numpy()
        at = np.minimum(np.searchsorted(ids, want), len(ids) - 1)
        known &= ids[at] == want
        rows.append(at)
    return pa.table({"emb_a": embedding_array(x[rows[0][known]]),
                     "emb_b": embedding_array(x[rows[1][known]])})


def training_pairs(dataset, manifest: dict, pair_window: int) -> tuple[ray.data.Dataset | None, int]:
    """(item_a, item_b) pair rows (None: no pairs) and an upper bound on their number:
    the dataset's ``pairs`` table, or with ``pair_window`` > 0 the co-occurrences of
    each user's training part (:mod:`forge_ray.data.cooccurrence`; never a validation
    or test target; at most ``pair_window`` per interaction)."""
    counts = manifest.get("counts", {})
    if pair_window:
        if not (Path(dataset) / "sequences").is_dir():
            raise InputError(dataset, "pairs.window needs a sequences table to build pairs from")
        pairs = read_sequences(dataset, columns=["item_ids"]).map_batches(
            _sequence_pairs, batch_format="pyarrow", fn_kwargs={"window": pair_window})
        return pairs, pair_window * int(counts.get("interactions") or 0)
    n_pairs = int(counts.get("pairs") or 0)
    if not n_pairs or not (Path(dataset) / "pairs").is_dir():
        return None, 0
    return read_pairs(dataset), n_pairs


def training_datasets(dataset, manifest: dict, pairs_dir: Path, pair_window: int = 0,
                      broadcast_mb: float = 0.0) -> tuple[dict[str, ray.data.Dataset], int]:
    """``{"train": x (B, D)}`` plus ``"pairs": a, b (B, D)`` when there are pairs
    (:func:`training_pairs`), and the number of pairs trained on.

    The pairs are joined to both items' embeddings once (pairs whose items are
    missing drop out), written as Parquet to ``pairs_dir`` (2 x D floats per pair on
    disk; reused when a run resumes; their count read from its footers) and streamed
    from there every epoch, so no epoch repeats the join. Items whose embeddings take
    at most ``broadcast_mb`` MiB are loaded once and broadcast to the map tasks (a hash
    join's shuffle actors cost tens of seconds however small the data); larger ones go
    through two Ray Data hash joins, so nothing is materialised in one process.
    """
    items = read_items(dataset)
    out = {"train": items.map_batches(_as_tensor, batch_format="pyarrow",
                                      fn_kwargs={"columns": {"embedding": "x"}})}
    pairs, most = training_pairs(dataset, manifest, pair_window)
    if pairs is None:
        return out, 0
    if not pairs_dir.is_dir():
        items_mb = manifest["counts"]["items"] * manifest["embedding_dim"] * 4 / 2**20
        if items_mb <= broadcast_mb:
            ids, x = load_embeddings(dataset)
            joined = pairs.map_batches(_pair_embeddings, batch_format="pyarrow",
                                       fn_kwargs={"ids": ids, "x": x})
        else:
            parts = max(1, math.ceil(most / ROWS_PER_JOIN_PARTITION))
            emb = items.select_columns(["item_id", "embedding"])
            joined = pairs
            for side in ("a", "b"):
                joined = joined.join(
                    emb.rename_columns({"item_id": f"item_{side}", "embedding": f"emb_{side}"}),
                    "inner", num_partitions=parts, on=(f"item_{side}",))
        with atomic_dir(pairs_dir) as tmp:
            joined.select_columns(["emb_a", "emb_b"]).write_parquet(os.fspath(tmp))
    files = sorted(pairs_dir.glob("*.parquet"))
    n_pairs = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    if not n_pairs:
        return out, 0
    out["pairs"] = ray.data.read_parquet([os.fspath(f) for f in files]).map_batches(
        _as_tensor, batch_format="pyarrow", fn_kwargs={"columns": {"emb_a": "a", "emb_b": "b"}})
    return out, n_pairs


def sample_embeddings(dataset, count: int, dim: int, n: int, seed: int) -> np.ndarray:
    """About ``min(n, count)`` item embeddings (seeded Bernoulli sample), (n, D) float32."""
    return ShardedData(dataset, count, dim).sample(n, seed)


def load_embeddings(dataset) -> tuple[np.ndarray, np.ndarray]:
    """All items in item-id order: (N,) int64 ids and (N, D) float32 (small data only)."""
    ids, rows = [], []
    for shard in sorted((Path(dataset) / "items").glob("*.parquet")):
        table = pq.read_table(shard, columns=["item_id", "embedding"])
        ids.append(table["item_id"].to_numpy())
        rows.append(embeddings_to_numpy(table["embedding"]))
    ids_a, x = np.concatenate(ids), np.concatenate(rows)
    order = np.argsort(ids_a, kind="stable")
    return ids_a[order], np.ascontiguousarray(x[order], dtype=np.float32)


@ray.remote(num_cpus=1)
def _usage_shard(path: str, quantizer, batch_size: int):
    """One shard -> (per-level (K,) code counts, squared error sum, rows)."""
    import torch

    torch.set_num_threads(1)
    counts = [np.zeros(k, np.int64) for k in quantizer.sizes]
    sq_err, rows = 0.0, 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=["embedding"]):
        x = embeddings_to_numpy(batch["embedding"])
        codes = quantizer.encode(x)
        sq_err += float(((quantizer.decode(codes) - x) ** 2).sum(dtype=np.float64))
        rows += len(x)
        for i, k in enumerate(quantizer.sizes):
            counts[i] += np.bincount(codes[:, i], minlength=k)
    return counts, sq_err, rows


def evaluate_usage(dataset, quantizer, count: int, dim: int,
                   batch_size: int = 16384) -> dict[str, float]:
    """Per-level utilization (share of codes used), perplexity and reconstruction MSE
    over every training item: one task per item shard, the driver adds (K,) counts.
    Checks that every item was seen exactly once (the manifest's count)."""
    data = ShardedData(dataset, count, dim)
    counts = [np.zeros(k, np.int64) for k in quantizer.sizes]
    sq_err, rows = 0.0, 0
    for shard_counts, shard_err, shard_rows in data.map_shards(_usage_shard, ray.put(quantizer),
                                                               batch_size):
        counts = [c + s for c, s in zip(counts, shard_counts)]
        sq_err += shard_err
        rows += shard_rows
    if rows != count:
        raise RuntimeError(f"usage pass saw {rows} items, the manifest counts {count}")
    metrics: dict[str, float] = {"items": rows, "recon_mse": sq_err / max(rows * dim, 1)}
    for i, c in enumerate(counts):
        p = c[c > 0] / rows
        metrics[f"utilization_l{i}"] = float((c > 0).mean())
        metrics[f"perplexity_l{i}"] = float(np.exp(-(p * np.log(p)).sum()))
    return metrics


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a metrics.jsonl; a step logged twice (a restarted attempt) keeps the last."""
    rows: dict[int, dict] = {}
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[int(row["step"])] = row
    return [rows[s] for s in sorted(rows)]


def plot_curves(path: Path, curves: list[dict], metrics: dict, sizes: list[int]) -> None:
    """PNG: loss terms (RQ-VAE) or k-means objective per pass (RQ-KMeans), and code
    usage per level (during training and final utilization)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_use) = plt.subplots(1, 2, figsize=(11, 4))
    if curves and "objective" in curves[0]:  # RQ-KMeans
        for level in range(len(sizes)):
            pts = [c for c in curves if c["level"] == level]
            ax_loss.plot([c["pass"] for c in pts], [c["objective"] for c in pts], marker="o",
                         label=f"level {level}")
        ax_loss.set_xlabel("Lloyd pass")
        ax_loss.set_ylabel("mean squared distance")
    else:
        steps = [c["step"] for c in curves]
        for key in ("loss", "recon", "commit", "pair_recon", "contrastive"):
            pts = [(s, c[key]) for s, c in zip(steps, curves) if key in c]
            if pts:
                ax_loss.plot(*zip(*pts), label=key)
        for level in range(len(sizes)):
            pts = [(s, c[f"usage_l{level}"]) for s, c in zip(steps, curves) if f"usage_l{level}" in c]
            if pts:
                ax_use.plot(*zip(*pts), label=f"batch usage l{level}")
        ax_loss.set_xlabel("step")
        ax_loss.set_yscale("log")
    ax_loss.set_title("training")
    ax_loss.legend(fontsize=8)
    final = [metrics[f"utilization_l{i}"] for i in range(len(sizes))]
    ax_use.axhline(0, color="grey", lw=0.5)
    for i, u in enumerate(final):
        ax_use.scatter([ax_use.get_xlim()[1] if curves and "step" in curves[0] else i], [u],
                       marker="*", s=80, label=f"final utilization l{i}: {u:.2f}")
    ax_use.set_title("codebook usage per level")
    ax_use.set_ylim(0, 1.05)
    ax_use.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
