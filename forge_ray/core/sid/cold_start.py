"""SIDs for new items, consistent with an existing SID table (cold start).

A GR model's vocabulary fixes the codebook sizes, so a new item must land on codes
the model can emit, and the collision rule of the table must keep holding with the
items already there. Each new item, in ascending item-id order (deterministic),
takes the nearest last-level code under its own prefix that still has room:

* ``none``: the quantizer's codes as they are (no per-SID limit).
* ``suffix``: the base SID (quantizer codes) gets the smallest suffix no item of
  the table uses yet; the suffix level has ``sizes[-1]`` codes, so a base SID that
  already holds that many items is full and the item walks to its next candidate.
* ``cap`` / ``random`` / ``sinkhorn``: at most ``cap`` items per full SID, counting the
  items already in the table.

An item whose ranked candidates are all full goes to a free last-level code under
its prefix drawn with a seeded generator (flagged ``fallback``, as in
:mod:`forge_ray.core.sid.collisions`); a prefix with no room at all is a ValueError
naming it. Memory: O(new items x candidates + existing rows under their prefixes).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from forge_ray.core.arrays import has_duplicates
from forge_ray.core.sid.codes import pack_codes


class Placement(NamedTuple):
    """sids: (n, L) int64 final SIDs of the new items, rows in the caller's order;
    fallback: (n,) bool, placed by the seeded random fallback."""

    sids: np.ndarray
    fallback: np.ndarray


def place_new_items(item_ids: np.ndarray, codes: np.ndarray, candidates: np.ndarray | None,
                    existing: np.ndarray, strategy: str, sizes: Sequence[int], cap: int = 5,
                    seed: int = 0) -> Placement:
    """Place new items next to ``existing`` ones.

    Args:
        item_ids: (n,) int64 new item ids (unique).
        codes: (n, Lq) int64 quantizer codes of the new items.
        candidates: (n, k) int64 last-level codes nearest-first under each item's
            prefix (``candidates[:, 0] == codes[:, -1]``; -1 pads); None means the
            item's own code only.
        existing: (m, L) int64 SIDs of the table's items that share a prefix with a
            new item (more rows are fine, just slower).
        strategy: the table's collision strategy.
        sizes: (L,) SID codebook sizes (with the suffix level for ``suffix``).
        cap: items per full SID for ``cap``/``random``/``sinkhorn``.
        seed: seed of the fallback draw.
    """
    item_ids = np.asarray(item_ids, dtype=np.int64)
    codes = np.asarray(codes, dtype=np.int64)
    sizes = [int(s) for s in sizes]
    n = len(item_ids)
    cand = codes[:, -1:] if candidates is None else np.asarray(candidates, dtype=np.int64)
    if has_duplicates(item_ids) or codes.shape[0] != n or cand.shape[0] != n:
        raise ValueError("item ids must be unique and match codes/candidates rows")
    if strategy == "none":
        return Placement(codes.copy(), np.zeros(n, bool))
    suffix = strategy == "suffix"
    base_sizes = sizes[:-1] if suffix else sizes
    if codes.shape[1] != len(base_sizes):
        raise ValueError(f"codes have {codes.shape[1]} levels, the table's quantizer {len(base_sizes)}")
    room = sizes[-1] if suffix else int(cap)
    existing = np.asarray(existing, dtype=np.int64).reshape(-1, len(sizes))
    # slots[key of a base SID] = the slots its items hold: their suffixes (suffix), or
    # 0..count-1 (cap rules); a SID has room while it holds fewer than ``room`` slots.
    base_keys = pack_codes(existing[:, : len(base_sizes)], base_sizes) if len(existing) else []
    slots: dict[int, set[int]] = {}
    for key, last in zip(np.asarray(base_keys).tolist(), existing[:, -1].tolist()):
        taken = slots.setdefault(key, set())
        taken.add(last if suffix else len(taken))
    out = np.empty((n, len(sizes)), dtype=np.int64)
    fallback = np.zeros(n, dtype=bool)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), n]))
    last_size = base_sizes[-1]
    for row in np.argsort(item_ids, kind="stable").tolist():
        prefix = codes[row, :-1]
        base_key0 = int(pack_codes(np.r_[prefix, 0][None, :], base_sizes)[0])
        tried = [int(c) for c in cand[row] if c >= 0]
        if not tried or tried[0] != codes[row, -1]:
            tried = [int(codes[row, -1]), *tried]
        placed = _first_with_room(slots, base_key0, tried, room)
        if placed is None:  # every ranked candidate is full: a free code under the prefix
            free = [c for c in range(last_size) if len(slots.get(base_key0 + c, ())) < room]
            if not free:
                raise ValueError(f"prefix {prefix.tolist()} has no room for item {item_ids[row]}: "
                                 f"all {last_size} codes hold {room} items")
            placed = int(rng.choice(free))
            fallback[row] = True
        taken = slots.setdefault(base_key0 + placed, set())
        slot = min(set(range(room)) - taken)
        taken.add(slot)
        out[row, : len(base_sizes)] = np.r_[prefix, placed]
        if suffix:
            out[row, -1] = slot
    return Placement(out, fallback)


def _first_with_room(slots: dict[int, set[int]], key0: int, tried: list[int], room: int) -> int | None:
    """The first last-level code in ``tried`` whose SID under prefix ``key0`` has room."""
    for c in tried:
        if len(slots.get(key0 + c, ())) < room:
            return c
    return None
