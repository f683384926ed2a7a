"""Sorted distinct values of integer arrays, by a sort.

numpy 2.4's ``np.unique(x)`` without ``return_*`` options hashes: on 1M distinct
int64 ids it takes 0.6-0.8 s here, against 0.01 s for ``np.sort``, and the gap widens
with n as the hash table leaves the caches. These are the same results by a sort, for
the id and key arrays that the pipeline checks and deduplicates at every scale.
"""

from __future__ import annotations

import numpy as np


def sorted_unique(values) -> np.ndarray:
    """(n,) values -> (m,) their distinct values in ascending order (``np.unique``)."""
    s = np.sort(np.asarray(values).ravel())
    if s.size < 2:
        return s
    keep = np.empty(s.size, dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


def has_duplicates(values) -> bool:
    """Whether some value of (n,) ``values`` occurs more than once."""
    s = np.sort(np.asarray(values).ravel())
    return bool(s.size > 1 and (s[1:] == s[:-1]).any())


def isin_sorted(values, sorted_set: np.ndarray) -> np.ndarray:
    """(n,) values -> (n,) bool, whether each is in ``sorted_set`` (ascending, as from
    :func:`sorted_unique`): a binary search per value, no hash table."""
    values = np.asarray(values)
    if not len(sorted_set):
        return np.zeros(values.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[pos] == values
