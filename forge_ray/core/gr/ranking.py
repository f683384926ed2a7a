"""Rankings without the query's own history: where a dataset's users never come back
to an item (Amazon reviews), a history item in the top K is a slot lost.

Whether to drop them is read from the model's training data
(:func:`~forge_ray.core.gr.data.history_excluded`); eval-gr applies the same rule to GR
and to the most-popular baseline (content kNN always skips history items), and the
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
    q, m = ranked.shape
    # each (query, item) pair as one int64: item ids stay below 2**40, queries below 2**23
    ex_query = np.repeat(np.arange(q, dtype=np.int64), [len(e) for e in exclude])
    ex_items = np.concatenate([np.asarray(e, np.int64) for e in exclude] or [np.zeros(0, np.int64)])
    rows = np.repeat(np.arange(q, dtype=np.int64), m)
    keep = (ranked.reshape(-1) >= 0) & ~np.isin(rows << 40 | ranked.reshape(-1), ex_query << 40 | ex_items)
    keep = keep.reshape(q, m)
    rank = np.cumsum(keep, axis=1) - 1  # new rank of every kept entry
    out = np.full((q, k), -1, dtype=np.int64)
    sel = keep & (rank < k)
    out[np.nonzero(sel)[0], rank[sel]] = ranked[sel]
    return out


def beam_items(trie, codes: np.ndarray, k: int, exclude: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Ranked SIDs (Q, N, L) -> (Q, k) ranked items (:meth:`SIDTrie.expand`), leaving
    out each query's ``exclude`` items when given."""
    if exclude is None:
        return trie.expand(codes, k)
    extra = max((len(e) for e in exclude), default=0)
    return drop_items(trie.expand(codes, k + extra), exclude, k)
