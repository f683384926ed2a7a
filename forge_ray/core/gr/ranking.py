"""Rankings without the query's own history: where a dataset's users never come back
to an item (Amazon reviews), a history item in the top K is a slot lost.

Whether to drop them is read from the model's training data
(:func:`~forge_ray.core.gr.data.history_excluded`); eval-gr applies the same rule to GR
and to the most-popular baseline (content kNN always skips them, through the same function), and the
Recommender to what it serves.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def drop_items(ranked: np.ndarray, exclude: Sequence[np.ndarray], k: int) -> np.ndarray:
    """Each query's ranking without its excluded items, the later items moving up.

    Args:
        ranked: (Q, M) item ids, best first, -1 padded.
        exclude: Q arrays of item ids to leave out (the query's history).
        k: ranks to keep; ``M >= k + len(exclude[q])`` keeps row q full when it was.
    Returns:
        (Q, k) int64 item ids, -1 padded.
    """
    ranked = np.asarray(ranked, dtype=np.int64)
    out = np.full((len(ranked), k), -1, dtype=np.int64)
    for q, (row, skip) in enumerate(zip(ranked, exclude)):  # Q x M is small: a batch x beams
        kept = row[(row >= 0) & ~np.isin(row, np.asarray(skip, np.int64))][:k]
        out[q, :len(kept)] = kept
    return out


def beam_items(trie, codes: np.ndarray, k: int, exclude: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Ranked SIDs (Q, N, L) -> (Q, k) ranked items (:meth:`SIDTrie.expand`), leaving
    out each query's ``exclude`` items when given."""
    if exclude is None:
        return trie.expand(codes, k)
    extra = max((len(e) for e in exclude), default=0)
    return drop_items(trie.expand(codes, k + extra), exclude, k)
