"""k-means data on a Ray cluster: the core :class:`~forge_ray.core.quantize.kmeans.KMeansData`
interface answered by Ray tasks over a dataset's item shards (its Parquet files).

``assign_to`` is one pass: one task per shard streams the shard's embeddings
(``batch_size`` rows at a time), subtracts the codes of the levels already fitted
(so residual levels never write a residual copy of the data), assigns the rows to
the centroids and returns only per-shard partial sums and counts; the driver adds
the partials as they arrive (:meth:`Assignment.merge`). ``sample`` draws a seeded
Bernoulli sample per shard. The core Lloyd loop (``kmeans``) and
``RQKMeans.fit_data`` run unchanged on top.

Plain tasks rather than a Ray Data job per pass: k-means makes
``levels x (niter + 1)`` passes and a task launch costs milliseconds where a
streaming-executor start costs seconds.

Memory: a task holds ``batch_size`` rows, ``batch_size x K`` float32 costs and a
(K, D) float64 partial; the driver holds the centroids of every level, at most
``max_in_flight`` unmerged partials and the sample.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
import torch

from forge_ray.core.quantize.base import as_tensor, code_costs
from forge_ray.core.quantize.kmeans import Assignment
from forge_ray.data.schema import embeddings_to_numpy

Level = tuple[np.ndarray, np.ndarray | None]  # (centroids (K, D) float32, bias (K,) or None)


def residualize(x: torch.Tensor, chain: list[Level]) -> torch.Tensor:
    """(B, D) rows minus the nearest (biased) code of each fitted level, in order."""
    r = x.clone()
    for centroids, bias in chain:  # task arguments: read-only arrays
        c = as_tensor(centroids)
        b = None if bias is None else as_tensor(bias)
        r -= c[code_costs(r, c, "l2", b).argmin(dim=1)]
    return r


@ray.remote(num_cpus=1)
def _assign_shard(path: str, chain: list[Level], centroids: np.ndarray, bias: np.ndarray | None,
                  batch_size: int) -> Assignment:
    torch.set_num_threads(1)  # one task per CPU: intra-op threads would oversubscribe
    k, dim = centroids.shape
    c = as_tensor(centroids)
    b = None if bias is None else as_tensor(bias)
    sums = torch.zeros(k, dim, dtype=torch.float64)
    counts = torch.zeros(k, dtype=torch.int64)
    objective = 0.0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=["embedding"]):
        r = residualize(as_tensor(embeddings_to_numpy(batch["embedding"])), chain)
        d, a = code_costs(r, c, "l2", b).min(dim=1)
        sums.index_add_(0, a, r.double())
        counts += torch.bincount(a, minlength=k)
        objective += float(d.double().sum())
    return Assignment(None, None, objective, sums.numpy(), counts.numpy())


@ray.remote(num_cpus=1)
def _sample_shard(path: str, fraction: float, seed: int, batch_size: int):
    rng = np.random.default_rng(seed)
    ids, rows = [], []
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size,
                                                   columns=["item_id", "embedding"]):
        keep = rng.random(batch.num_rows) < fraction
        if keep.any():
            ids.append(batch["item_id"].to_numpy()[keep])
            rows.append(embeddings_to_numpy(batch["embedding"])[keep])
    if not ids:
        return np.zeros(0, np.int64), None
    return np.concatenate(ids), np.concatenate(rows)


class ShardedData:
    """:class:`KMeansData` over the item shards (``items/*.parquet``) of a dataset.

    Args:
        dataset: canonical dataset folder (on storage every node can read).
        count, dim: rows and embedding width (from the manifest: no counting pass).
        batch_size: rows per assignment batch inside a task.
        chain: levels already fitted; their codes are subtracted on the fly.
        max_in_flight: shard tasks running or awaiting merge at once.
    """

    def __init__(self, dataset: str | os.PathLike, count: int, dim: int, batch_size: int = 16384,
                 chain: list[Level] | None = None, max_in_flight: int = 16):
        self.dataset = Path(dataset)
        self.shards = [os.fspath(p) for p in sorted((self.dataset / "items").glob("*.parquet"))]
        self._count, self._dim = count, dim
        self.batch_size = batch_size
        self.chain = list(chain or [])
        self.max_in_flight = max_in_flight

    def count(self) -> int:
        return self._count

    def dim(self) -> int:
        return self._dim

    def map_shards(self, fn, *args):
        """Run ``fn(shard, *args)`` over every shard, at most max_in_flight at a time;
        yields results as they finish."""
        pending, todo = [], list(self.shards)
        while todo or pending:
            while todo and len(pending) < self.max_in_flight:
                pending.append(fn.remote(todo.pop(0), *args))
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])

    def sample(self, n: int, seed: int) -> np.ndarray:
        """About ``min(n, count)`` residual rows, in item-id order (a sample of every row
        equals the in-memory ``ArrayData`` sample of item-ordered data)."""
        n = min(n, self._count)
        # Bernoulli sampling with slack so that n rows are (almost surely) drawn.
        frac = 1.0 if n == self._count else min(1.0, (n + 4 * math.sqrt(n) + 16) / self._count)
        ids, rows = [], []
        refs = [_sample_shard.remote(shard, frac, seed * 100003 + i, self.batch_size)
                for i, shard in enumerate(self.shards)]  # seeded per shard, not by timing
        for ids_i, rows_i in ray.get(refs):
            if rows_i is not None:
                ids.append(ids_i)
                rows.append(rows_i)
        ids_a = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        x = np.concatenate(rows) if rows else np.zeros((0, self._dim), np.float32)
        x = np.ascontiguousarray(x[np.argsort(ids_a, kind="stable")], dtype=np.float32)
        if len(x) > n:
            x = x[np.sort(np.random.default_rng(seed).choice(len(x), n, replace=False))]
        return residualize(torch.from_numpy(x), self.chain).numpy()

    def assign_to(self, centroids: np.ndarray, bias: np.ndarray | None = None) -> Assignment:
        """One pass over the shards; codes stay there (``Assignment.codes`` is None)."""
        centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        bias = None if bias is None else np.asarray(bias, dtype=np.float32)
        k, dim = centroids.shape
        args = (ray.put(self.chain), ray.put(centroids), ray.put(bias), self.batch_size)
        total = Assignment(None, None, 0.0, np.zeros((k, dim)), np.zeros(k, np.int64))
        for part in self.map_shards(_assign_shard, *args):
            total = Assignment.merge([total, part])
        return total

    def residual(self, centroids: np.ndarray, bias: np.ndarray | None = None) -> "ShardedData":
        """Lazy: the next level subtracts these codes inside its tasks."""
        level = (np.ascontiguousarray(centroids, dtype=np.float32),
                 None if bias is None else np.asarray(bias, dtype=np.float32))
        return ShardedData(self.dataset, self._count, self._dim, self.batch_size,
                           [*self.chain, level], self.max_in_flight)
