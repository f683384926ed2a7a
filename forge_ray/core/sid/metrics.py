"""SID quality metrics (FORGE section 4 plus the usual codebook statistics).

Streaming-friendly: the distribution metrics take *counts* rather than codes, so a
distributed job can count items per full SID with a groupby (or per-level code usage
by summing :func:`level_counts` over batches) and pass the counts in.

* ``sid_counts``            (N, L) codes -> items per distinct full SID.
* ``collision_rate``        share of items whose SID is shared with another item.
* ``unique_sid_ratio``      distinct SIDs / items.
* ``max_items_per_sid``     largest SID group.
* ``gini``                  FORGE's Gini of items per SID (0 = even).
* ``utilization``/``perplexity`` per level, from per-level code counts.
* ``reconstruction_mse``    mean squared error per element.
* ``embedding_hitrate``     FORGE's Embedding HitRate (faiss inner-product search),
                            reported as ``hitrate_key(topk)`` (``embedding_hitrate@K``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa

from forge_ray.config import require
from forge_ray.core.arrays import sorted_unique
from forge_ray.core.sid.codes import bucket_of


# ------------------------------------------------------------------ distribution metrics

def distinct_counts(keys: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """(w, n) int64 keys, one per column (a key of w parts: an id, or a packed SID
    and its suffix), with (n,) ``counts`` (1 each when None) -> (w + 1, m) int64: the m
    distinct keys sorted by row 0 first, and in the last row the sum of their counts."""
    keys = np.asarray(keys, dtype=np.int64)
    if not keys.shape[1]:
        return np.zeros((keys.shape[0] + 1, 0), dtype=np.int64)
    order = np.argsort(keys[0], kind="stable") if len(keys) == 1 else np.lexsort(keys[::-1])
    keys = keys[:, order]
    starts = np.flatnonzero(np.r_[True, (keys[:, 1:] != keys[:, :-1]).any(axis=0)])
    weights = np.ones(order.size, dtype=np.int64) if counts is None else np.asarray(counts, np.int64)[order]
    return np.vstack([keys[:, starts], np.add.reduceat(weights, starts)])


def split_by_bucket(both: np.ndarray, parts: int) -> list[np.ndarray]:
    """(w + 1, m) :func:`distinct_counts` -> ``parts`` such arrays, one per
    :func:`~forge_ray.core.sid.codes.bucket_of` bucket of row 0: the map side of a
    hash-partitioned count, so that each key is merged in exactly one bucket."""
    bucket = bucket_of(both[0], parts)
    order = np.argsort(bucket, kind="stable")  # one sort, not a pass per bucket
    bounds = np.searchsorted(bucket[order], np.arange(parts + 1))
    both = both[:, order]
    return [np.ascontiguousarray(both[:, bounds[i]:bounds[i + 1]]) for i in range(parts)]


def split_key_counts(column: str, parts: int, *blocks: pa.Table):
    """The int64 keys in the list column ``column`` of ``blocks`` (every row's values)
    -> their (2, m) :func:`distinct_counts` split by :func:`split_by_bucket` (a tuple
    of ``parts`` arrays; a single array for one bucket, one Ray return value)."""
    keys = [b[column].combine_chunks().flatten().to_numpy() for b in blocks]
    both = distinct_counts(np.concatenate(keys)[None] if keys else np.zeros((1, 0), dtype=np.int64))
    return both if parts == 1 else tuple(split_by_bucket(both, parts))


def _merged(pieces) -> np.ndarray:
    """(w + 1, m) :func:`distinct_counts` pieces -> the same of their union."""
    both = np.concatenate(pieces, axis=1) if pieces else np.zeros((2, 0), dtype=np.int64)
    return distinct_counts(both[:-1], both[-1]) if both.shape[1] else both


def merged_key_histogram(*pieces: np.ndarray) -> np.ndarray:
    """One bucket's (w + 1, m) :func:`distinct_counts` pieces -> hist[v]: the number
    of its distinct keys holding v items in all pieces together (the reduce side)."""
    return np.bincount(_merged(pieces)[-1], minlength=1)


def merged_keys_over(limit: int, *pieces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One bucket's (2, m) single-part :func:`distinct_counts` pieces -> (its
    :func:`merged_key_histogram`, its keys holding more than ``limit`` items, sorted):
    the over-full SIDs that collision handling must revisit."""
    both = _merged(pieces)
    return np.bincount(both[-1], minlength=1), both[0, both[-1] > limit]


def merged_key_histograms(*groups: Sequence[np.ndarray]) -> list[np.ndarray]:
    """One bucket's groups, each a sequence of pieces (one per kind of key, all groups
    in the same order) -> one :func:`merged_key_histogram` per kind."""
    return [merged_key_histogram(*kind) for kind in zip(*groups)] if groups else []


def sid_counts(codes: np.ndarray) -> np.ndarray:
    """(N, L) codes -> (S,) int64 item count of each distinct full SID (S SIDs used)."""
    codes = np.asarray(codes, dtype=np.int64)
    if codes.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    _, counts = np.unique(codes, axis=0, return_counts=True)
    return counts.astype(np.int64)


def _counts(counts) -> np.ndarray:
    c = np.asarray(counts, dtype=np.int64).ravel()
    if c.size == 0 or c.sum() == 0:
        raise ValueError("no items counted")
    if (c < 0).any():
        raise ValueError("negative count")
    return c


def collision_rate(counts) -> float:
    """Share of items sharing their SID with at least one other item (before handling)."""
    c = _counts(counts)
    return float(c[c > 1].sum() / c.sum())


def unique_sid_ratio(counts) -> float:
    """Distinct SIDs used / items (1 = every item has its own SID)."""
    c = _counts(counts)
    return float((c > 0).sum() / c.sum())


def max_items_per_sid(counts) -> int:
    return int(_counts(counts).max())


def gini(counts) -> float:
    """FORGE's Gini of items per SID.

    With y(1..N) the per-SID counts sorted ascending,
    ``G = (N+1)/N - 2 * sum_i (N+1-i) y(i) / (N * sum y)``: 0 when every SID holds
    the same number of items, (N-1)/N when one SID holds them all.
    """
    y = np.sort(_counts(counts)).astype(np.float64)
    n = y.size
    weights = np.arange(n, 0, -1, dtype=np.float64)  # N+1-i for i = 1..N
    return float((n + 1) / n - 2.0 * (weights * y).sum() / (n * y.sum()))


def lorenz_curve(counts) -> tuple[np.ndarray, np.ndarray]:
    """(share of SIDs, cumulative share of items), both (S+1,) from (0, 0) to (1, 1)."""
    y = np.sort(_counts(counts)).astype(np.float64)
    x = np.arange(y.size + 1) / y.size
    return x, np.r_[0.0, np.cumsum(y) / y.sum()]


def level_counts(codes: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    """(N, L) codes -> per level, (sizes[l],) int64 usage counts (sum over batches)."""
    codes = np.asarray(codes, dtype=np.int64)
    return [np.bincount(codes[:, lvl], minlength=int(k)).astype(np.int64)
            for lvl, k in enumerate(sizes[: codes.shape[1]])]


def utilization(counts) -> float:
    """Share of a level's codes used at least once (``counts`` over ALL its codes)."""
    c = np.asarray(counts).ravel()
    return float((c > 0).sum() / c.size)


def perplexity(counts) -> float:
    """exp(entropy) of code usage: K for uniform use of K codes, 1 for a single code."""
    c = _counts(counts).astype(np.float64)
    p = c[c > 0] / c.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def reconstruction_mse(x: np.ndarray, x_hat: np.ndarray) -> float:
    """Mean squared error per element of (N, D) arrays (weight batches by N to merge)."""
    x = np.asarray(x, dtype=np.float64)
    x_hat = np.asarray(x_hat, dtype=np.float64)
    if x.shape != x_hat.shape:
        raise ValueError(f"shapes differ: {x.shape} vs {x_hat.shape}")
    return float(np.mean((x - x_hat) ** 2))


def sid_quality(counts, levels: Sequence[np.ndarray]) -> dict:
    """All count-based metrics as one JSON-ready dict."""
    c = _counts(counts)
    return {
        "items": int(c.sum()), "sids": int((c > 0).sum()),
        "collision_rate": collision_rate(c), "unique_sid_ratio": unique_sid_ratio(c),
        "max_items_per_sid": max_items_per_sid(c), "gini": gini(c),
        "utilization": [utilization(lc) for lc in levels],
        "perplexity": [perplexity(lc) for lc in levels],
    }


# ------------------------------------------------------------------ embedding hitrate

@dataclass
class SidMetricsConfig:
    """Embedding HitRate settings.

    Attributes:
        topk: neighbours per history item (FORGE: 30).
        max_sessions: evaluate at most this many sessions (seeded sample); None = all.
        gallery_size: gallery items; None = every item. When sampling, the items of
            the evaluated sessions (history and targets) are always kept and the rest
            is a seeded random sample of distractors.
        index_factory: faiss ``index_factory`` string, inner-product metric
            (``Flat`` exact; e.g. ``IVF4096,Flat`` or ``HNSW32`` for big galleries).
        search_params: faiss ParameterSpace string, e.g. ``nprobe=64`` or ``efSearch=128``.
        batch_sessions: sessions whose history items are searched in one call.
        seed: sampling seed.
    """

    topk: int = 30
    max_sessions: int | None = None
    gallery_size: int | None = None
    index_factory: str = "Flat"
    search_params: str = ""
    batch_sessions: int = 4096
    seed: int = 0

    def __post_init__(self):
        require(self.topk >= 1, "topk must be >= 1")
        require(self.max_sessions is None or self.max_sessions >= 1, "max_sessions must be >= 1")
        require(self.gallery_size is None or self.gallery_size >= 1, "gallery_size must be >= 1")
        require(bool(self.index_factory.strip()), "index_factory must not be empty")
        require(self.batch_sessions >= 1, "batch_sessions must be >= 1")
        require(self.seed >= 0, "seed must be >= 0")


def ragged(histories) -> tuple[np.ndarray, np.ndarray]:
    """Histories as (flat (P,) int64 ids, offsets (S+1,)) from an Arrow list array or
    a sequence of id sequences."""
    if isinstance(histories, pa.ChunkedArray):
        histories = histories.combine_chunks()
    if isinstance(histories, (pa.ListArray, pa.LargeListArray)):
        # flatten(), not .values: a sliced array (a Ray Data batch) shares its parent's
        # whole child buffer, and converting that per batch made passes quadratic
        offsets = histories.offsets.to_numpy().astype(np.int64)
        flat = histories.flatten().to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        return flat, offsets - offsets[0]
    lens = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
    flat = (np.concatenate([np.asarray(h, dtype=np.int64) for h in histories])
            if lens.sum() else np.zeros(0, dtype=np.int64))
    return flat, np.r_[0, np.cumsum(lens)].astype(np.int64)


def hitrate_key(topk: int) -> str:
    """The metric name of an Embedding HitRate over ``topk`` neighbours: ``embedding_hitrate@K``."""
    return f"embedding_hitrate@{topk}"


def embedding_hitrate(item_ids: np.ndarray, recon: np.ndarray, histories, targets: np.ndarray,
                      cfg: SidMetricsConfig | None = None) -> dict:
    """FORGE's Embedding HitRate.

    Every item's reconstruction from its SID is L2-normalised and put in an
    inner-product faiss index over the gallery. For each session, the top-``topk``
    neighbours of every known history item (the item itself excluded) are united;
    the session is a hit when its target is in the union.
    HR = hits / evaluated sessions.

    Sessions are skipped (and counted) when none of their history items has a
    reconstruction (``skipped_no_history``) or their target has none
    (``skipped_unknown_target``: it can never be retrieved).

    Args:
        item_ids: (N,) int64 unique ids of the reconstructed items.
        recon: (N, D) float reconstructions (decode of each item's SID).
        histories: S histories (Arrow list<int64> array or sequences of ids).
        targets: (S,) int64 target item ids.

    Memory: the gallery (G x D float32) plus the index; search works on
    ``batch_sessions`` sessions at a time.
    """
    cfg = cfg or SidMetricsConfig()
    item_ids = np.asarray(item_ids, dtype=np.int64)
    recon = np.ascontiguousarray(recon, dtype=np.float32)
    targets = np.asarray(targets, dtype=np.int64)
    flat, offsets = ragged(histories)
    if recon.ndim != 2 or recon.shape[0] != item_ids.shape[0]:
        raise ValueError(f"reconstructions {recon.shape} do not match {item_ids.shape[0]} ids")
    if offsets.size - 1 != targets.shape[0]:
        raise ValueError(f"{offsets.size - 1} histories but {targets.shape[0]} targets")
    id_order = np.argsort(item_ids, kind="stable")
    sorted_ids = item_ids[id_order]
    if sorted_ids.size > 1 and (sorted_ids[1:] == sorted_ids[:-1]).any():
        raise ValueError("duplicate item ids among reconstructions")

    def row_of(ids: np.ndarray) -> np.ndarray:  # row in recon, -1 when unknown
        if sorted_ids.size == 0:
            return np.full(ids.shape, -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(sorted_ids, ids), sorted_ids.size - 1)
        return np.where(sorted_ids[pos] == ids, id_order[pos], -1)

    rng = np.random.default_rng(cfg.seed)
    n_sessions = targets.shape[0]
    sessions = np.arange(n_sessions)
    if cfg.max_sessions is not None and n_sessions > cfg.max_sessions:
        sessions = np.sort(rng.choice(n_sessions, cfg.max_sessions, replace=False))
    sess_of = np.repeat(np.arange(n_sessions), np.diff(offsets))
    hist_rows = row_of(flat)
    target_rows = row_of(targets)
    has_hist = np.bincount(sess_of[hist_rows >= 0], minlength=n_sessions) > 0
    sel = np.zeros(n_sessions, dtype=bool)
    sel[sessions] = True
    no_hist = sel & ~has_hist
    unknown_target = sel & has_hist & (target_rows < 0)
    evaluated = np.flatnonzero(sel & has_hist & (target_rows >= 0))

    gallery = _gallery_rows(recon.shape[0], hist_rows[_pairs_of(offsets, sessions)], target_rows[evaluated], cfg, rng)
    # Imported here: Ray Train workers import this module (through the SID table) before
    # their log levels are set, and faiss's loader logs a dozen INFO lines on import.
    import faiss

    vectors = recon[gallery]
    faiss.normalize_L2(vectors)
    index = faiss.index_factory(vectors.shape[1], cfg.index_factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(vectors)
    index.add(vectors)
    if cfg.search_params:
        faiss.ParameterSpace().set_index_parameters(index, cfg.search_params)
    gallery_ids = item_ids[gallery]
    k_search = min(cfg.topk + 1, gallery.size)  # +1: the query item finds itself first

    hits = 0
    for b in range(0, evaluated.size, cfg.batch_sessions):
        batch = evaluated[b: b + cfg.batch_sessions]
        pair = _pairs_of(offsets, batch)
        pair = pair[hist_rows[pair] >= 0]
        q_rows = hist_rows[pair]
        uniq, inverse = np.unique(q_rows, return_inverse=True)
        queries = recon[uniq].copy()
        faiss.normalize_L2(queries)
        _, nn = index.search(queries, k_search)
        nn_ids = np.where(nn >= 0, gallery_ids[np.maximum(nn, 0)], -1)
        not_self = (nn >= 0) & (nn_ids != item_ids[uniq][:, None])
        topk = not_self & (np.cumsum(not_self, axis=1) <= cfg.topk)
        pair_target = targets[sess_of[pair]]
        pair_hit = (topk[inverse] & (nn_ids[inverse] == pair_target[:, None])).any(axis=1)
        hit_sessions = sorted_unique(sess_of[pair][pair_hit])
        hits += int(hit_sessions.size)
    n_eval = int(evaluated.size)
    return {
        "hitrate": hits / n_eval if n_eval else float("nan"),
        "hits": hits, "sessions": n_eval,
        "skipped_no_history": int(no_hist.sum()),
        "skipped_unknown_target": int(unknown_target.sum()),
        "gallery": int(gallery.size), "topk": cfg.topk, "index": cfg.index_factory,
    }


def _pairs_of(offsets: np.ndarray, sessions: np.ndarray) -> np.ndarray:
    """Flat history positions of ``sessions`` (their offset ranges, concatenated)."""
    lens = offsets[sessions + 1] - offsets[sessions]
    starts = np.repeat(offsets[sessions] - np.r_[0, np.cumsum(lens)[:-1]], lens)
    return starts + np.arange(lens.sum())


def _gallery_rows(n_items, hist_rows, target_rows, cfg, rng) -> np.ndarray:
    """Rows of the gallery: all items, or the session items plus random distractors."""
    if cfg.gallery_size is None or cfg.gallery_size >= n_items:
        return np.arange(n_items)
    must = sorted_unique(np.r_[hist_rows[hist_rows >= 0], target_rows])
    extra = max(cfg.gallery_size - must.size, 0)
    others = np.setdiff1d(np.arange(n_items), must, assume_unique=True)
    return np.sort(np.r_[must, rng.choice(others, min(extra, others.size), replace=False)])


def histogram_quality(hist: np.ndarray) -> dict:
    """Count metrics of SIDs from ``hist[v]`` = number of SIDs holding v items.

    Exactly the core ``sid_quality`` numbers (items, sids, collision_rate,
    unique_sid_ratio, max_items_per_sid, gini) without expanding per-SID counts: in
    FORGE's Gini the SIDs sorted ascending form one block per value v occupying ranks
    a+1..a+f, whose weights (N+1-i) sum to f(N+1) - f(2a+f+1)/2.
    """
    values = np.flatnonzero(hist)
    if values.size == 0:
        raise ValueError("no items counted")
    freq = hist[values].astype(np.float64)
    v = values.astype(np.float64)
    items, sids = float((v * freq).sum()), float(freq.sum())
    before = np.r_[0.0, np.cumsum(freq)[:-1]]  # SIDs ranked before each block
    weights = freq * (sids + 1) - freq * (2 * before + freq + 1) / 2
    return {"items": int(items), "sids": int(sids),
            "collision_rate": float((v * freq)[values > 1].sum() / items),
            "unique_sid_ratio": sids / items, "max_items_per_sid": int(values.max()),
            "gini": float((sids + 1) / sids - 2.0 * (weights * v).sum() / (sids * items))}


def sum_histograms(hists) -> np.ndarray:
    """Histograms (hist[v], of any lengths) -> their elementwise sum, int64."""
    total = np.zeros(1, dtype=np.int64)
    for h in hists:
        if len(h) > total.size:
            total = np.r_[total, np.zeros(len(h) - total.size, dtype=np.int64)]
        total[:len(h)] += np.asarray(h, dtype=np.int64)
    return total


def expand_hist(hist: np.ndarray, limit: int, seed: int) -> tuple[np.ndarray, bool]:
    """Per-SID counts from a histogram; a seeded sample of ``limit`` SIDs if larger."""
    values = np.flatnonzero(hist)
    freq = hist[values]
    sampled = freq.sum() > limit
    if sampled:
        freq = np.random.default_rng(seed).multivariate_hypergeometric(freq, limit)
    return np.repeat(values, freq), bool(sampled)
