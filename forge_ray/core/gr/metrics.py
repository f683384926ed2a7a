"""Retrieval metrics for GR: Recall@K, NDCG@K, FORGE HitRate@K and invalid-SID rate.

Every query has a ranked item list (generated SIDs expanded in beam order into
their items, see :meth:`SIDTrie.expand`) and a set T of true items (one held-out
item for leave-one-out; several for AL-GR test rows). With hits h_r = [item at rank
r is in T], r = 1..K, and each true item counted once:

- ``recall@K`` = sum_{r<=K} h_r / |T| (for |T| = 1 the usual hit rate / recall).
- ``ndcg@K`` = DCG / IDCG, DCG = sum_{r<=K} h_r / log2(r + 1), IDCG = sum over the
  first min(|T|, K) ranks of 1 / log2(r + 1) (binary relevance).
- ``hr@K`` (FORGE) = |top-K ∩ T| / |T|: the same formula as recall@K, reported
  under FORGE's name at FORGE's cut-offs (20, 100, 500, 1000).
- ``invalid_rate`` = generated SIDs not in the trie / generated SIDs.

:class:`RetrievalMetrics` keeps per-metric sums, so partial accumulators from many
processes merge exactly into the global mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from forge_ray.core.gr.ranking import beam_items


def hit_matrix(ranked: np.ndarray, truths: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """ranked: (Q, K) item ids (-1 = empty slot); truths: Q arrays of true item ids.

    Returns ((Q, K) bool hits, (Q,) int number of distinct true items).
    """
    ranked = np.asarray(ranked, dtype=np.int64)
    uniq = [np.unique(np.asarray(t, dtype=np.int64)) for t in truths]
    n_true = np.asarray([len(u) for u in uniq], dtype=np.int64)
    width = max(1, int(n_true.max(initial=0)))
    table = np.full((len(uniq), width), -2, dtype=np.int64)  # -2 never equals an item or -1
    for i, u in enumerate(uniq):
        table[i, : len(u)] = u
    hits = np.zeros(ranked.shape, dtype=bool)
    for t in range(width):  # loop over true-set width (small), vectorised over queries/ranks
        hits |= ranked == table[:, t: t + 1]
    return hits & (ranked >= 0), n_true


def recall_at_k(hits: np.ndarray, n_true: np.ndarray, k: int) -> np.ndarray:
    """(Q,) share of each query's true items within the first k ranks."""
    return hits[:, :k].sum(axis=1) / np.maximum(n_true, 1)


def ndcg_at_k(hits: np.ndarray, n_true: np.ndarray, k: int) -> np.ndarray:
    """(Q,) binary-relevance NDCG at k."""
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (hits[:, :k] * disc[: hits[:, :k].shape[1]]).sum(axis=1)
    idcg = np.concatenate([[0.0], np.cumsum(disc)])[np.minimum(n_true, k)]
    return np.where(idcg > 0, dcg / np.where(idcg > 0, idcg, 1.0), 0.0)


@dataclass
class RetrievalMetrics:
    """Summing accumulator; ``result()`` gives means over queries."""

    recall_ks: tuple[int, ...] = (5, 10)
    ndcg_ks: tuple[int, ...] = (5, 10)
    hr_ks: tuple[int, ...] = ()
    sums: dict[str, float] = field(default_factory=dict)
    queries: int = 0
    generated: int = 0
    invalid: int = 0

    @property
    def max_k(self) -> int:
        """Items per query the rankings must hold."""
        return max((*self.recall_ks, *self.ndcg_ks, *self.hr_ks), default=1)

    def update(self, ranked: np.ndarray, truths: Sequence[np.ndarray]) -> None:
        """Add Q queries: ranked (Q, >= max_k) item ids (-1 padded), Q true-item arrays."""
        hits, n_true = hit_matrix(ranked, truths)
        values = {}
        for k in self.recall_ks:
            values[f"recall@{k}"] = recall_at_k(hits, n_true, k)
        for k in self.ndcg_ks:
            values[f"ndcg@{k}"] = ndcg_at_k(hits, n_true, k)
        for k in self.hr_ks:
            values[f"hr@{k}"] = recall_at_k(hits, n_true, k)
        for name, v in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(v.sum())
        self.queries += len(truths)

    def update_from_beams(self, result, trie, truths: Sequence[np.ndarray],
                          exclude: Sequence[np.ndarray] | None = None) -> None:
        """Add a :class:`~forge_ray.core.gr.decoding.BeamResult` of Q queries: counts
        invalid SIDs, expands the valid ones into items (beam order), without each
        query's ``exclude`` items if given, and scores them."""
        generated, invalid = invalid_counts(result, trie)
        self.generated += generated
        self.invalid += invalid
        self.update(beam_items(trie, result.codes, self.max_k, exclude), truths)

    def merge(self, other: "RetrievalMetrics") -> "RetrievalMetrics":
        names = set(self.sums) | set(other.sums)
        return RetrievalMetrics(
            self.recall_ks, self.ndcg_ks, self.hr_ks,
            {n: self.sums.get(n, 0.0) + other.sums.get(n, 0.0) for n in names},
            self.queries + other.queries, self.generated + other.generated,
            self.invalid + other.invalid)

    def result(self) -> dict[str, float]:
        """Means per metric, ``invalid_rate`` (if anything was generated) and counts."""
        out = {n: s / max(self.queries, 1) for n, s in sorted(self.sums.items())}
        if self.generated:
            out["invalid_rate"] = self.invalid / self.generated
        out["queries"] = self.queries
        out["generated_sids"] = self.generated
        return out


def invalid_counts(result, trie) -> tuple[int, int]:
    """(generated, invalid) SIDs of a BeamResult: rows with a finite score are
    generated; invalid ones are not in ``trie`` (including malformed tokens)."""
    found = np.isfinite(result.scores).reshape(-1)
    valid = trie.contains(result.codes.reshape(-1, trie.n_levels))
    return int(found.sum()), int((found & ~valid).sum())
