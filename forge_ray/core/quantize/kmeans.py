"""Lloyd k-means written against a tiny data interface (faiss contrib style).

The loop only ever asks the data four things (:class:`KMeansData`): how many rows,
their dimension, a random sample, and "assign every row to these centroids and
give me per-centroid partial sums". :class:`ArrayData` answers from an in-memory
array in bounded batches; a distributed implementation answers ``assign_to`` with
one task per shard and adds the per-shard :class:`Assignment` partials together
(:meth:`Assignment.merge`), so the same loop clusters data larger than one
process's memory. Residual quantizers cluster level after level through
:meth:`KMeansData.residual`, which the distributed version can implement lazily
(subtract the chosen codes on the fly, shard by shard).

Memory of the loop itself: O(K * D) for centroids and sums, plus whatever the data
needs for one assignment batch (``ArrayData``: ``batch_size x K`` costs).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Protocol

import numpy as np
import torch

from forge_ray.core.quantize.base import as_tensor, code_costs


@dataclasses.dataclass
class Assignment:
    """Result of assigning (a part of) the data to K centroids.

    codes: (n,) int64 chosen centroid per row (``None`` when a distributed
        implementation keeps them on the shards).
    distances: (n,) float32 assignment cost per row (or ``None``, as codes).
    objective: float64 sum of costs over the rows.  sums: (K, D) float64 sum of
        the rows assigned to each centroid.  counts: (K,) int64 rows per centroid.
    """

    codes: np.ndarray | None
    distances: np.ndarray | None
    objective: float
    sums: np.ndarray
    counts: np.ndarray

    @staticmethod
    def merge(parts: list["Assignment"]) -> "Assignment":
        """Add per-shard partials (codes/distances kept only if every part has them)."""
        keep = all(p.codes is not None for p in parts)
        return Assignment(
            codes=np.concatenate([p.codes for p in parts]) if keep else None,
            distances=np.concatenate([p.distances for p in parts]) if keep else None,
            objective=float(sum(p.objective for p in parts)),
            sums=np.sum([p.sums for p in parts], axis=0),
            counts=np.sum([p.counts for p in parts], axis=0),
        )


class KMeansData(Protocol):
    """The data side of k-means; see :class:`ArrayData` for the reference."""

    def count(self) -> int: ...

    def dim(self) -> int: ...

    def sample(self, n: int, seed: int) -> np.ndarray:
        """(min(n, count), D) float32 rows drawn uniformly without replacement."""

    def assign_to(self, centroids: np.ndarray, bias: np.ndarray | None = None) -> Assignment:
        """Assign every row to ``argmin_k ||x - c_k||^2 - bias_k``."""

    def residual(self, centroids: np.ndarray, bias: np.ndarray | None = None) -> "KMeansData":
        """The data minus each row's assigned centroid (for the next residual level)."""


class ArrayData:
    """:class:`KMeansData` over an in-memory (N, D) array, assigned in batches.

    Memory: the array itself plus ``batch_size x K`` float32 costs per batch.
    """

    def __init__(self, x: np.ndarray, batch_size: int = 16384):
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.batch_size = batch_size

    def count(self) -> int:
        return self.x.shape[0]

    def dim(self) -> int:
        return self.x.shape[1]

    def sample(self, n: int, seed: int) -> np.ndarray:
        if n >= len(self.x):
            return self.x.copy()
        idx = np.random.default_rng(seed).choice(len(self.x), size=n, replace=False)
        return self.x[np.sort(idx)]

    def _batches(self, centroids: np.ndarray, bias: np.ndarray | None):
        c = as_tensor(np.ascontiguousarray(centroids, dtype=np.float32))
        b = None if bias is None else as_tensor(np.asarray(bias, dtype=np.float32))
        for i in range(0, len(self.x), self.batch_size):
            xb = as_tensor(self.x[i:i + self.batch_size])
            cost = code_costs(xb, c, "l2", b)  # (B, K)
            d, a = cost.min(dim=1)
            yield i, xb, a, d

    def assign_to(self, centroids: np.ndarray, bias: np.ndarray | None = None) -> Assignment:
        k, dim = centroids.shape
        codes = np.empty(len(self.x), dtype=np.int64)
        dists = np.empty(len(self.x), dtype=np.float32)
        sums = torch.zeros(k, dim, dtype=torch.float64)
        for i, xb, a, d in self._batches(centroids, bias):
            codes[i:i + len(xb)] = a.numpy()
            dists[i:i + len(xb)] = d.numpy()
            sums.index_add_(0, a, xb.double())
        return Assignment(codes, dists, float(dists.sum(dtype=np.float64)), sums.numpy(),
                          np.bincount(codes, minlength=k).astype(np.int64))

    def residual(self, centroids: np.ndarray, bias: np.ndarray | None = None) -> "ArrayData":
        out = np.empty_like(self.x)
        for i, xb, a, _ in self._batches(centroids, bias):
            out[i:i + len(xb)] = (xb - as_tensor(centroids)[a]).numpy()
        return ArrayData(out, self.batch_size)


@dataclasses.dataclass
class KMeansResult:
    """centroids: (K, D) float32.  stats: one dict per Lloyd pass with ``objective``
    (sum of squared distances *before* that pass's update), ``empty`` (clusters with no
    rows, re-seeded) and ``max_size``.  assignment: the last pass's assignment."""

    centroids: np.ndarray
    stats: list[dict]
    assignment: Assignment


def kmeans(data: KMeansData, k: int, *, niter: int = 10, seed: int = 0,
           init: Literal["faiss", "random"] = "faiss", init_sample: int | None = None,
           init_niter: int = 20) -> KMeansResult:
    """Cluster ``data`` into ``k`` centroids.

    Args:
        init: ``"faiss"`` runs seeded ``faiss.Kmeans`` on a sample (the sampled init:
            cheap, in memory, usually most of the work); ``"random"`` picks k sampled rows.
        init_sample: sample size for the init (default ``min(count, 256 * k)``).
        niter: full Lloyd passes over ``data`` after the init (each one ``assign_to``).
    """
    n = data.count()
    if n < k:
        raise ValueError(f"cannot make {k} clusters from {n} rows")
    sample = data.sample(init_sample or min(n, 256 * k), seed)
    if init == "faiss":
        # Imported here: Ray Train workers import this module with the RQ-VAE before
        # their log levels are set, and faiss's loader logs a dozen INFO lines on import.
        import faiss

        km = faiss.Kmeans(data.dim(), k, niter=init_niter, seed=seed, verbose=False,
                          min_points_per_centroid=1,  # small levels/samples are fine
                          max_points_per_centroid=max(256, len(sample) // k + 1))
        km.train(sample)
        centroids = km.centroids.copy()
    elif init == "random":
        centroids = sample[np.random.default_rng(seed).choice(len(sample), k, replace=False)].copy()
    else:
        raise ValueError(f"unknown init {init!r}")
    rng = np.random.default_rng(seed + 1)
    stats: list[dict] = []
    assignment = data.assign_to(centroids)
    for _ in range(niter):
        counts = assignment.counts
        empty = counts == 0
        stats.append({"objective": assignment.objective, "empty": int(empty.sum()),
                      "max_size": int(counts.max())})
        centroids = (assignment.sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
        _split_heavy(centroids, counts.copy(), rng)
        assignment = data.assign_to(centroids)
    return KMeansResult(centroids, stats, assignment)


def _split_heavy(centroids: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> int:
    """Re-seed empty clusters by splitting heavy ones (as faiss does): an empty
    centroid becomes a slightly perturbed copy of a centroid drawn proportionally to
    its size, which moves the other way. Needs no data access. In place; returns
    the number of splits."""
    empty = np.flatnonzero(counts == 0)
    fac = np.ones(centroids.shape[1], dtype=np.float32)
    fac[::2] += 1 / 1024.0
    fac[1::2] -= 1 / 1024.0
    for ci in empty:
        p = np.maximum(counts.astype(np.float64) - 1, 0)
        if p.sum() == 0:
            break
        cj = rng.choice(len(counts), p=p / p.sum())
        c = centroids[cj].copy()
        centroids[ci], centroids[cj] = c * fac, c / fac
        counts[ci] = counts[cj] // 2
        counts[cj] -= counts[ci]
    return len(empty)
