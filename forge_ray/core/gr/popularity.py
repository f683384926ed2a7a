"""Most-popular baseline: rank every item by its number of training interactions.

The counter is built batch by batch (and merged across processes); its memory is
16 bytes per distinct item. Training interactions follow the leave-one-out protocol
of :mod:`forge_ray.core.gr.data`: a user's items except the last ``holdout`` (2:
validation and test targets).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


class PopularityCounter:
    """Interaction counts per item; ties ranked by ascending item id."""

    def __init__(self, item_ids: np.ndarray | None = None, counts: np.ndarray | None = None):
        self.item_ids = np.zeros(0, np.int64) if item_ids is None else np.asarray(item_ids, np.int64)
        self.counts = np.zeros(0, np.int64) if counts is None else np.asarray(counts, np.int64)

    def update(self, items: np.ndarray) -> None:
        """Count a batch of interactions ((N,) item ids, repeats allowed)."""
        self._add(*np.unique(np.asarray(items, dtype=np.int64), return_counts=True))

    def update_from_sequences(self, item_seqs: Sequence[np.ndarray], holdout: int = 2) -> None:
        """Count the training part (all but the last ``holdout`` items) of each sequence."""
        parts = [np.asarray(s, dtype=np.int64)[: max(len(s) - holdout, 0)] for s in item_seqs]
        self.update(np.concatenate(parts) if parts else np.zeros(0, np.int64))

    def merge(self, other: "PopularityCounter") -> "PopularityCounter":
        out = PopularityCounter(self.item_ids, self.counts)
        out._add(other.item_ids, other.counts)
        return out

    def _add(self, ids: np.ndarray, counts: np.ndarray) -> None:
        all_ids = np.concatenate([self.item_ids, ids])
        all_counts = np.concatenate([self.counts, counts])
        self.item_ids, inverse = np.unique(all_ids, return_inverse=True)
        self.counts = np.bincount(inverse, weights=all_counts, minlength=len(self.item_ids)).astype(np.int64)

    def top(self, k: int) -> np.ndarray:
        """(k,) most interacted item ids, -1 padded if fewer items were seen."""
        order = np.lexsort((self.item_ids, -self.counts))[:k]
        return np.concatenate([self.item_ids[order], np.full(k - len(order), -1, np.int64)])

    def rank(self, n_queries: int, k: int) -> np.ndarray:
        """(n_queries, k) the same popularity ranking for every query."""
        return np.broadcast_to(self.top(k), (n_queries, k))
