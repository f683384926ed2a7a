"""Collision handling: make items that landed on one full SID fit a per-SID cap.

Every strategy is a pure function of ONE group of items (:func:`resolve_group`), so
that the distributed version can run it on blocks that hold whole groups
(:func:`resolve_groups`: only groups with an over-cap SID call it, and each result is
checked against the strategy's guarantee):

* ``cap``, ``random`` and ``sinkhorn`` only change the LAST level, so their group is a
  *prefix group*: all items sharing the first L-1 codes (:func:`group_levels` = L-1).
* ``suffix`` (TIGER) appends a de-dup level; its natural group is a *full SID*
  (``group_levels`` = L), though a prefix group gives the same answer because it is
  split by full SID inside.
* ``none`` keeps codes as they are.

Determinism: rows are sorted by ``item_id`` inside the group and the group's RNG is
seeded from ``(seed, *group key codes)``, so the result does not depend on the order
rows arrive in, nor on how groups are spread over workers.

Strategies (``cap`` = k items per full SID at most):

``cap``       FORGE's rule. Items are ranked in a seeded random order; each SID keeps
              its first ``cap`` items, the others walk down their ranked candidate
              list (last-level codes nearest-first under the item's own prefix) in
              synchronous rounds: in round r every unplaced item proposes its r-th
              candidate and each code accepts proposers (random order) while it has
              room. Items placed never move again.
``random``    FORGE's alternative: overflow items go to a random last-level code with
              room under the same prefix (seeded rejection sampling, then an exact
              draw among free codes if the group is nearly full).
``sinkhorn``  Balanced re-assignment in groups that contain an over-cap SID:
              Sinkhorn-Knopp on costs (candidate distances, or ranks when no
              distances are given) with rows summing to 1 and columns capped at
              ``cap``, then greedy rounding (each item proposes codes in decreasing
              plan mass; a code accepts the largest masses first) honouring the cap.

Fallback (never lose an item): an item whose candidates are all full (``cap``,
``sinkhorn``) is placed by the ``random`` rule and flagged in
:attr:`GroupResolution.fallback`. A prefix group holding more than ``cap x K`` items
cannot fit at all and raises ValueError naming the prefix (raise ``cap``).

Memory per group: O(n x k) for n items and k candidates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
from tqdm import tqdm

from forge_ray.config import require
from forge_ray.core.arrays import has_duplicates

Strategy = Literal["none", "suffix", "cap", "random", "sinkhorn"]
STRATEGIES = ("none", "suffix", "cap", "random", "sinkhorn")
_REJECTION_ROUNDS = 32  # random draws before switching to an exact draw among free codes
_SINKHORN_TOL = 1e-6  # stop when no column scaling moves by more than this (log units)


@dataclass
class CollisionConfig:
    """How to resolve collisions.

    Attributes:
        strategy: one of ``none``, ``suffix``, ``cap``, ``random``, ``sinkhorn``.
        cap: most items allowed per full SID (FORGE: 5); unused by ``none``/``suffix``.
        candidates: ranked last-level candidates per item that ``cap`` / ``sinkhorn``
            use (FORGE: top-200); extra columns passed in are ignored.
        seed: base seed (>= 0); each group derives its own from it and its key.
        suffix_order: ``random`` (seeded) or ``id`` (ascending item id) order in which
            items sharing a SID get suffixes 0, 1, 2, ...
        sinkhorn_iters: Sinkhorn-Knopp iterations.
        sinkhorn_epsilon: entropic temperature, in units of the group's mean gap between
            an item's nearest and second-nearest candidate (one rank without distances).
    """

    strategy: Strategy = "cap"
    cap: int = 5
    candidates: int = 200
    seed: int = 0
    suffix_order: Literal["random", "id"] = "random"
    sinkhorn_iters: int = 100
    sinkhorn_epsilon: float = 0.5

    def __post_init__(self):
        require(self.strategy in STRATEGIES, f"strategy must be one of {', '.join(STRATEGIES)}")
        require(self.cap >= 1, "cap must be >= 1")
        require(self.candidates >= 1, "candidates must be >= 1")
        require(self.seed >= 0, "seed must be >= 0")
        require(self.suffix_order in ("random", "id"), "suffix_order must be random or id")
        require(self.sinkhorn_iters >= 1, "sinkhorn_iters must be >= 1")
        require(self.sinkhorn_epsilon > 0, "sinkhorn_epsilon must be > 0")

    @property
    def needs_candidates(self) -> bool:
        return self.strategy in ("cap", "sinkhorn")


class GroupResolution(NamedTuple):
    """Result for one group, rows in the caller's order.

    codes: (n, L) int64 new codes ((n, L+1) for ``suffix``).
    fallback: (n,) bool, items placed by the random fallback (candidates exhausted).
    """

    codes: np.ndarray
    fallback: np.ndarray


def group_levels(strategy: str, n_levels: int) -> int:
    """How many leading code columns form a group key: L for ``suffix``, else L-1."""
    return n_levels if strategy == "suffix" else n_levels - 1


def resolve_group(item_ids: np.ndarray, codes: np.ndarray, candidates: np.ndarray | None,
                  cfg: CollisionConfig, seed: int | None = None, *, last_size: int,
                  distances: np.ndarray | None = None) -> GroupResolution:
    """Resolve collisions inside one group.

    Args:
        item_ids: (n,) int64 unique item ids.
        codes: (n, L) int64 SIDs, all sharing the first L-1 codes (the first L for
            ``suffix`` groups are allowed to differ in the last code too).
        candidates: (n, k) int64 last-level codes ranked nearest-first under the
            item's prefix (``-1`` pads short lists); required by ``cap``/``sinkhorn``.
        cfg: the strategy and its parameters.
        seed: overrides ``cfg.seed``.
        last_size: K, the number of codes of the last level.
        distances: optional (n, k) float distances matching ``candidates``, used by
            ``sinkhorn`` as costs (ranks are used otherwise).
    """
    item_ids = np.asarray(item_ids, dtype=np.int64)
    codes = np.asarray(codes, dtype=np.int64)
    n = item_ids.shape[0]
    if codes.ndim != 2 or codes.shape[0] != n or codes.shape[1] < 1:
        raise ValueError(f"codes of shape {codes.shape} do not match {n} item ids")
    base_seed = cfg.seed if seed is None else int(seed)
    if has_duplicates(item_ids):
        raise ValueError("item ids in a group must be unique")
    order = np.argsort(item_ids, kind="stable")  # canonical row order -> determinism
    c = codes[order]
    fallback = np.zeros(n, dtype=bool)
    if cfg.strategy == "suffix":
        out = _suffix(c, cfg, base_seed)
    elif cfg.strategy == "none" or n == 0:
        out = c.copy()
    else:
        prefix = c[0, :-1]
        if (c[:, :-1] != prefix).any():
            raise ValueError("a collision group must share its first L-1 codes")
        if n > cfg.cap * last_size:
            raise ValueError(f"prefix {prefix.tolist()} holds {n} items, more than cap "
                             f"{cfg.cap} x {last_size} codes: raise the cap")
        if (c[:, -1] >= last_size).any() or (c[:, -1] < 0).any():
            raise ValueError(f"last-level code outside [0, {last_size})")
        cand = dist = None
        if cfg.needs_candidates:
            cand, dist = _check_candidates(candidates, distances, order, n, cfg, last_size)
        rng = _group_rng(base_seed, prefix)
        last, fallback = _resolve_last(c[:, -1], cand, dist, cfg, rng, last_size)
        out = np.concatenate([c[:, :-1], last[:, None]], axis=1)
    result = np.empty_like(out)
    result[order] = out
    fb = np.empty_like(fallback)
    fb[order] = fallback
    return GroupResolution(result, fb)


class BlockResolution(NamedTuple):
    """Result for many whole groups (:func:`resolve_groups`), rows in the caller's order.

    codes: (n, L) int64 new codes ((n, L+1) for ``suffix``).
    fallback: (n,) bool, items placed by the random fallback.
    before: before[v] = number of raw full SIDs holding v items.
    after: after[v] = number of final SIDs holding v items.
    groups: number of groups.
    """

    codes: np.ndarray
    fallback: np.ndarray
    before: np.ndarray
    after: np.ndarray
    groups: int


def resolve_groups(item_ids: np.ndarray, codes: np.ndarray, candidates: np.ndarray | None,
                   cfg: CollisionConfig, *, last_size: int, distances: np.ndarray | None = None,
                   progress: bool = False) -> BlockResolution:
    """Resolve every group of the rows given, which must hold WHOLE groups (all items
    sharing a group key, :func:`group_levels`), and check the strategy's guarantee.

    Same arguments and per-row result as :func:`resolve_group` on each group. Only
    groups that need work call it: a group where no full SID holds more than ``cap``
    items (``suffix``: more than one) keeps its codes (suffix 0), exactly what
    :func:`resolve_group` would return. The histograms count SIDs, and since groups
    are disjoint in SID space, partial histograms of disjoint blocks add up.

    Raises ValueError on duplicate item ids or a group too large for the cap, and
    RuntimeError when a resolved group breaks the guarantee (``cap``, ``random``,
    ``sinkhorn``: at most ``cap`` items per final SID; ``suffix``: one item per final
    SID): a bug, never expected. Memory: O(n x (L + k)).
    """
    item_ids = np.asarray(item_ids, dtype=np.int64)
    codes = np.asarray(codes, dtype=np.int64)
    n, n_levels = codes.shape
    if item_ids.shape != (n,):
        raise ValueError(f"codes of shape {codes.shape} do not match {item_ids.shape[0]} item ids")
    if has_duplicates(item_ids):
        raise ValueError("item ids must be unique")
    key_cols = group_levels(cfg.strategy, n_levels)
    order = np.lexsort(codes.T[::-1]) if n else np.zeros(0, dtype=np.int64)  # by full SID
    sc = codes[order]
    new_sid = np.r_[True, (sc[1:] != sc[:-1]).any(axis=1)] if n else np.zeros(0, dtype=bool)
    sid_start = np.flatnonzero(new_sid)
    sid_size = np.diff(np.r_[sid_start, n])  # items per raw SID, in sorted order
    before = np.bincount(sid_size, minlength=1).astype(np.int64)
    new_group = (np.r_[True, (sc[1:, :key_cols] != sc[:-1, :key_cols]).any(axis=1)]
                 if n else np.zeros(0, dtype=bool))
    starts = np.flatnonzero(new_group)
    bounds = np.r_[starts, n]
    out_levels = n_levels + (cfg.strategy == "suffix")
    out = np.zeros((n, out_levels), dtype=np.int64)
    out[:, :n_levels] = codes  # suffix 0 for items alone on their SID
    fallback = np.zeros(n, dtype=bool)
    if cfg.strategy == "none":
        return BlockResolution(out, fallback, before, before.copy(), len(starts))
    limit = 1 if cfg.strategy == "suffix" else cfg.cap
    group_of = np.cumsum(new_group) - 1  # group index of each sorted row
    busy = np.zeros(len(starts), dtype=bool)
    busy[group_of[np.repeat(sid_size, sid_size) > limit]] = True
    # SIDs of untouched groups keep their item counts
    after = np.bincount(sid_size[~busy[group_of[sid_start]]], minlength=1).astype(np.int64)
    for g in tqdm(np.flatnonzero(busy), desc=f"collisions[{cfg.strategy}]", disable=not progress):
        rows = order[bounds[g]:bounds[g + 1]]
        res = resolve_group(item_ids[rows], codes[rows],
                            None if candidates is None else candidates[rows], cfg,
                            last_size=last_size,
                            distances=None if distances is None else distances[rows])
        per_sid = _items_per_sid(res.codes)
        if per_sid.max() > limit:
            raise RuntimeError(f"collision strategy {cfg.strategy!r} left {per_sid.max()} items on "
                               f"one SID under prefix {codes[rows[0], :key_cols].tolist()} "
                               f"(at most {limit} allowed)")
        out[rows], fallback[rows] = res.codes, res.fallback
        after = _add_counts(after, np.bincount(per_sid))
    return BlockResolution(out, fallback, before, after, len(starts))


def resolve_all(item_ids: np.ndarray, codes: np.ndarray, candidates: np.ndarray | None,
                cfg: CollisionConfig, *, last_size: int, distances: np.ndarray | None = None,
                progress: bool = False) -> tuple[np.ndarray, dict]:
    """In-memory convenience: :func:`resolve_groups` on the whole input.

    Returns (new codes in input row order, stats) where stats holds ``items``,
    ``groups``, ``moved`` (items whose SID changed), ``fallback`` and, for
    ``suffix``, ``suffix_size`` (codes the extra level needs = largest SID group).
    Memory: the whole input (O(N x (L + k))).
    """
    codes = np.asarray(codes, dtype=np.int64)
    n, n_levels = codes.shape
    res = resolve_groups(item_ids, codes, candidates, cfg, last_size=last_size,
                         distances=distances, progress=progress)
    out = res.codes
    stats = {"items": int(n), "groups": res.groups,
             "moved": int((out[:, :n_levels] != codes).any(axis=1).sum()),
             "fallback": int(res.fallback.sum())}
    if cfg.strategy == "suffix":
        stats["suffix_size"] = int(out[:, -1].max() + 1) if n else 0
    return out, stats


# ----------------------------------------------------------------------------- helpers

def _items_per_sid(codes: np.ndarray) -> np.ndarray:
    """(n, W) codes -> (S,) items on each distinct row (n >= 1)."""
    return np.unique(codes, axis=0, return_counts=True)[1]


def _add_counts(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sum of two histograms of different lengths."""
    out = np.zeros(max(a.size, b.size), dtype=np.int64)
    out[:a.size] += a
    out[:b.size] += b
    return out


def _group_rng(seed: int, key: np.ndarray) -> np.random.Generator:
    """A generator that depends only on the base seed and the group's key codes."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, key)]))


def _check_candidates(candidates, distances, order, n, cfg, last_size):
    if candidates is None:
        raise ValueError(f"strategy {cfg.strategy!r} needs ranked candidates")
    cand = np.asarray(candidates, dtype=np.int64)
    if cand.ndim != 2 or cand.shape[0] != n:
        raise ValueError(f"candidates of shape {cand.shape} do not match {n} items")
    cand = cand[order, : cfg.candidates]
    if (cand >= last_size).any() or (cand < -1).any():
        raise ValueError(f"candidate code outside [0, {last_size}) (or -1 padding)")
    dist = None
    if distances is not None:
        dist = np.asarray(distances, dtype=np.float64)
        if dist.shape[0] != n or dist.shape[1] < cand.shape[1]:
            raise ValueError("distances must have the shape of candidates")
        dist = dist[order, : cand.shape[1]]
    return cand, dist


def _suffix(c: np.ndarray, cfg: CollisionConfig, seed: int) -> np.ndarray:
    """Append suffix 0, 1, ... to items sharing a full SID (rows sorted by item id).

    Each shared SID draws its random order from a generator seeded by the SID itself,
    so a full-SID group and the prefix group containing it give the same suffixes.
    """
    n = c.shape[0]
    sid_order = np.lexsort(c.T[::-1])  # stable: ties keep item-id order
    sc = c[sid_order]
    first = np.r_[True, (sc[1:] != sc[:-1]).any(axis=1)] if n else np.zeros(0, dtype=bool)
    starts = np.flatnonzero(first)
    rank = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))  # id order
    if cfg.suffix_order == "random":
        for s, e in zip(starts, np.r_[starts[1:], n]):
            if e - s > 1:
                rank[s:e] = _group_rng(seed, sc[s]).permutation(e - s)
    suffix = np.empty(n, dtype=np.int64)
    suffix[sid_order] = rank
    return np.concatenate([c, suffix[:, None]], axis=1)


def _resolve_last(last, cand, dist, cfg, rng, last_size):
    """Last-level codes for one prefix group (rows sorted by item id)."""
    n = last.shape[0]
    fallback = np.zeros(n, dtype=bool)
    if np.bincount(last).max() <= cfg.cap:
        return last.copy(), fallback  # nothing over the cap: every strategy keeps codes
    priority = rng.permutation(n).astype(np.float64)  # FORGE's "random order"
    assigned = np.full(n, -1, dtype=np.int64)
    if cfg.strategy == "sinkhorn":
        proposals, keys = _sinkhorn_proposals(cand, dist, cfg)
    else:
        # Round 0: every item proposes its own code, so each SID keeps its first `cap`.
        own = last[:, None]
        proposals = own if cfg.strategy == "random" else np.concatenate([own, cand], axis=1)
        keys = np.broadcast_to(priority[:, None], proposals.shape)
    for r in range(proposals.shape[1]):
        if not (assigned < 0).any():
            break
        _place(assigned, proposals[:, r], keys[:, r], priority, cfg.cap)
    pending = assigned < 0
    if pending.any():
        if cfg.strategy != "random":
            fallback = pending.copy()
        _place_random(assigned, priority, cfg.cap, rng, last_size)
    return assigned, fallback


def _place(assigned: np.ndarray, proposal: np.ndarray, key: np.ndarray, tie: np.ndarray,
           cap: int) -> None:
    """One round: unplaced items propose ``proposal``; codes accept the lowest keys.

    ``assigned`` (n,) holds placed codes or -1 and is updated in place. A code accepts
    proposers in increasing (``key``, ``tie``) while its occupancy stays <= ``cap``.
    Proposals of -1 are skipped.
    """
    who = np.flatnonzero((assigned < 0) & (proposal >= 0))
    if who.size == 0:
        return
    prop = proposal[who]
    used, used_n = np.unique(assigned[assigned >= 0], return_counts=True)
    occupancy = np.zeros(who.size, dtype=np.int64)
    if used.size:
        pos = np.minimum(np.searchsorted(used, prop), used.size - 1)
        occupancy = np.where(used[pos] == prop, used_n[pos], 0)
    srt = np.lexsort((tie[who], key[who], prop))  # by code, then best key first
    sp = prop[srt]
    first = np.r_[True, sp[1:] != sp[:-1]]
    group_start = np.maximum.accumulate(np.where(first, np.arange(sp.size), 0))
    ok = np.empty(sp.size, dtype=bool)
    ok[srt] = occupancy[srt] + (np.arange(sp.size) - group_start) < cap
    assigned[who[ok]] = prop[ok]


def _place_random(assigned, priority, cap, rng, last_size) -> None:
    """Place every unplaced item on a random code with room (the ``random`` rule)."""
    rounds = 0
    while (assigned < 0).any():
        pending = assigned < 0
        proposal = np.full(assigned.shape[0], -1, dtype=np.int64)
        if rounds < _REJECTION_ROUNDS:  # cheap: most codes have room in most groups
            proposal[pending] = rng.integers(0, last_size, size=int(pending.sum()))
        else:  # nearly full group: draw among the codes with room only
            free = np.flatnonzero(np.bincount(assigned[~pending], minlength=last_size) < cap)
            proposal[pending] = free[rng.integers(0, free.size, size=int(pending.sum()))]
        _place(assigned, proposal, priority, priority, cap)
        rounds += 1


def _sinkhorn_proposals(cand, dist, cfg):
    """Capacity-constrained Sinkhorn plan over (item, candidate) pairs.

    Solves min <P, C> - eps H(P) s.t. rows sum to 1 and columns sum to <= cap by
    block coordinate ascent on the dual (log domain): u = 1 / (K v) and
    v = min(1, cap / (K^T u)). Returns (proposals (n, k) codes in decreasing plan
    mass, keys (n, k) = -mass) so codes accept the largest masses first.
    """
    n, k = cand.shape
    valid = cand >= 0
    if not valid.any():  # nothing to rank: every item goes to the random fallback
        return np.full((n, 1), -1, dtype=np.int64), np.zeros((n, 1))
    rank_cost = np.broadcast_to(np.arange(k, dtype=np.float64)[None, :], (n, k))
    cost = np.where(valid, rank_cost if dist is None else dist, 0.0)
    # Costs in units of the typical gap between an item's nearest and second-nearest
    # code (1 for ranks), so one epsilon suits any distance scale.
    both = valid[:, 0] & valid[:, 1] if k > 1 else np.zeros(n, dtype=bool)
    gap = float(np.mean(cost[both, 1] - cost[both, 0])) if both.any() else 0.0
    scale = gap if gap > 0 else 1.0
    logk = np.where(valid, -(cost - cost[valid].min()) / (scale * cfg.sinkhorn_epsilon), -np.inf)
    cols, inv = np.unique(np.where(valid, cand, -1), return_inverse=True)
    inv = inv.reshape(n, k)
    log_v = np.zeros(cols.size)
    log_cap = np.log(cfg.cap)
    for _ in range(cfg.sinkhorn_iters):
        log_u = -_logsumexp_rows(logk + log_v[inv])
        log_u = np.where(np.isfinite(log_u), log_u, 0.0)  # items without candidates
        prev = log_v
        log_v = np.minimum(0.0, log_cap - _logsumexp_by(logk + log_u[:, None], inv, cols.size))
        if np.max(np.abs(log_v - prev), initial=0.0) < _SINKHORN_TOL:
            break
    mass = np.where(valid, np.exp(logk + log_u[:, None] + log_v[inv]), -1.0)
    order = np.argsort(-mass, axis=1, kind="stable")
    proposals = np.take_along_axis(np.where(valid, cand, -1), order, axis=1)
    return proposals, -np.take_along_axis(mass, order, axis=1)


def _logsumexp_rows(a: np.ndarray) -> np.ndarray:
    m = a.max(axis=1)
    m = np.where(np.isfinite(m), m, 0.0)
    return m + np.log(np.exp(a - m[:, None]).sum(axis=1))


def _logsumexp_by(a: np.ndarray, idx: np.ndarray, size: int) -> np.ndarray:
    """log(sum of exp(a) over entries with the same column index).

    One global shift: a column whose mass underflows is ~e^-700 below the largest
    entry, far under any cap, and correctly reads as -inf (unconstrained).
    """
    m = a.max()
    m = m if np.isfinite(m) else 0.0
    s = np.bincount(idx.ravel(), weights=np.exp(a.ravel() - m), minlength=size)
    with np.errstate(divide="ignore"):
        return m + np.log(s)
