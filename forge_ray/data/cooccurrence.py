"""Co-occurrence pairs from user sequences: the collaborative signal for RQ-VAE's
contrastive objective (FORGE Eq. 2) on datasets that ship no pairs table.

Only each user's training part is used (all but the last ``holdout`` items: the
validation and test targets of the leave-one-out protocol), so no held-out target
ever shapes the SIDs the model is scored with. Two items form a pair when they are at
most ``window`` positions apart in that part (1: consecutive interactions); a pair of
an item with itself is skipped (a repeat says nothing about two items' similarity).

Memory: the pairs of one batch, 16 x (items x window) bytes at most.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def cooccurrence_pairs(item_seqs: Sequence[np.ndarray], window: int = 1, holdout: int = 2
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Time-ordered item sequences -> ((P,) item_a, (P,) item_b) int64, ``item_a`` the earlier."""
    if window < 1 or holdout < 0:
        raise ValueError(f"window ({window}) must be >= 1 and holdout ({holdout}) >= 0")
    a, b = [], []
    for seq in item_seqs:
        part = np.asarray(seq, dtype=np.int64)[: max(len(seq) - holdout, 0)]
        for gap in range(1, min(window, len(part) - 1) + 1):
            a.append(part[:-gap])
            b.append(part[gap:])
    if not a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    a, b = np.concatenate(a), np.concatenate(b)
    keep = a != b
    return a[keep], b[keep]
