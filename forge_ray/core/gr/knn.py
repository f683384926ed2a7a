"""Content kNN baselines: rank items by cosine similarity of their embeddings to a history.

The honest yardstick for generative retrieval built from the same embeddings: if GR
over SIDs quantised from these vectors cannot beat their plain nearest neighbours,
it has not earned its cost. Two queries per history:

- ``last``: the embedding of the most recent history item (item-to-item kNN);
- ``mean``: the normalised mean of the history's normalised embeddings.

Items already in the history are never recommended (they would be their own nearest
neighbours). Exact search with faiss ``IndexFlatIP`` on unit vectors.

Memory: 4 x D bytes per item for the index (12k x 384-d: 18 MB; callers decide
whether a catalogue fits, see ``eval-gr``'s ``knn_max_mb``), plus Q x (k + H)
scores per call.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

from forge_ray.core.gr.ranking import drop_items

Query = Literal["last", "mean"]


def _unit(x: np.ndarray) -> np.ndarray:
    """(N, D) -> a float32 copy with unit rows (zero rows stay zero), as sid-metrics' HitRate does."""
    import faiss

    out = np.array(x, dtype=np.float32, order="C")
    faiss.normalize_L2(out)
    return out


class ContentKNN:
    """Exact cosine kNN over ``(N,) item_ids`` with ``(N, D) embeddings``."""

    def __init__(self, item_ids: np.ndarray, embeddings: np.ndarray):
        import faiss

        item_ids = np.asarray(item_ids, dtype=np.int64)
        if embeddings.ndim != 2 or len(embeddings) != len(item_ids):
            raise ValueError(f"item_ids {item_ids.shape} and embeddings {embeddings.shape} disagree")
        order = np.argsort(item_ids, kind="stable")
        self.item_ids = item_ids[order]
        self.vectors = _unit(np.asarray(embeddings, dtype=np.float32)[order])
        self.index = faiss.IndexFlatIP(self.vectors.shape[1])
        self.index.add(self.vectors)

    def _rows(self, items: np.ndarray) -> np.ndarray:
        """Row of each item id in the index; -1 where the item has no embedding."""
        pos = np.minimum(np.searchsorted(self.item_ids, items), len(self.item_ids) - 1)
        return np.where(self.item_ids[pos] == items, pos, -1)

    def rank(self, histories: Sequence[np.ndarray], k: int, query: Query = "last") -> np.ndarray:
        """Q histories (item ids, oldest first) -> (Q, k) item ids ranked by cosine
        similarity to the query vector, history items excluded, -1 padded (also for a
        history none of whose items has an embedding)."""
        out = np.full((len(histories), k), -1, np.int64)
        rows = [self._rows(np.asarray(h, dtype=np.int64)) for h in histories]
        rows = [r[r >= 0] for r in rows]
        live = [i for i, r in enumerate(rows) if len(r)]
        if not live:
            return out
        if query == "last":
            q = self.vectors[[rows[i][-1] for i in live]]
        elif query == "mean":
            q = _unit(np.stack([self.vectors[rows[i]].mean(0) for i in live]))
        else:
            raise ValueError(f"unknown query {query!r}: last or mean")
        extra = max(len(rows[i]) for i in live)  # room for the history items filtered out
        _, found = self.index.search(q, min(k + extra, len(self.item_ids)))
        ranked = np.where(found >= 0, self.item_ids[np.maximum(found, 0)], -1)
        out[live] = drop_items(ranked, [histories[i] for i in live], k)
        return out
