"""Cold-start placement: new items obey the table's collision rule with the items already there."""

from __future__ import annotations

import numpy as np
import pytest

from forge_ray.core.sid.cold_start import place_new_items


def test_suffix_takes_the_smallest_free_suffix_and_walks_off_a_full_sid():
    # base SID (0, 1) already holds suffixes 0 and 2 of a 3-code suffix level; (0, 2) is empty
    existing = np.array([[0, 1, 0], [0, 1, 2]])
    ids = np.array([11, 10])
    codes = np.array([[0, 1], [0, 1]])
    cand = np.array([[1, 2], [1, 2]])
    out = place_new_items(ids, codes, cand, existing, "suffix", sizes=[2, 4, 3])
    # item 10 (smaller id) first: suffix 1 is free; item 11 finds (0, 1) full and takes (0, 2)
    assert out.sids.tolist() == [[0, 2, 0], [0, 1, 1]]
    assert not out.fallback.any()
    sids = {tuple(s) for s in np.concatenate([existing, out.sids]).tolist()}
    assert len(sids) == 4  # still one item per final SID


def test_cap_counts_the_items_already_there():
    existing = np.array([[1, 3]] * 2)
    ids = np.arange(4)
    codes = np.array([[1, 3]] * 4)
    cand = np.array([[3, 0, 2]] * 4)
    out = place_new_items(ids, codes, cand, existing, "cap", sizes=[4, 4], cap=2)
    assert out.sids[:, 1].tolist() == [0, 0, 2, 2]  # 3 is full; next candidates in rank order
    assert not out.fallback.any()


def test_fallback_when_candidates_are_full_and_error_when_the_prefix_is():
    existing = np.array([[0, 0], [0, 1]])
    out = place_new_items(np.array([5]), np.array([[0, 0]]), np.array([[0, 1]]), existing, "cap",
                          sizes=[1, 3], cap=1)
    assert out.sids.tolist() == [[0, 2]] and out.fallback.tolist() == [True]
    with pytest.raises(ValueError, match=r"prefix \[0\] has no room"):
        place_new_items(np.array([5, 6]), np.array([[0, 0], [0, 0]]), None,
                        np.array([[0, 0], [0, 1], [0, 2]]), "cap", sizes=[1, 3], cap=1)


def test_order_of_rows_does_not_matter_and_none_keeps_codes():
    rng = np.random.default_rng(0)
    ids = rng.permutation(50)
    codes = rng.integers(0, 3, (50, 2))
    cand = np.stack([codes[:, 1], (codes[:, 1] + 1) % 3, (codes[:, 1] + 2) % 3], axis=1)
    a = place_new_items(ids, codes, cand, np.zeros((0, 2)), "cap", sizes=[3, 3], cap=10)
    p = rng.permutation(50)
    b = place_new_items(ids[p], codes[p], cand[p], np.zeros((0, 2)), "cap", sizes=[3, 3], cap=10)
    assert (a.sids[p] == b.sids).all()
    counts = np.unique(a.sids, axis=0, return_counts=True)[1]
    assert counts.max() <= 10 and a.sids[:, 0].tolist() == codes[:, 0].tolist()  # prefix never changes
    assert (place_new_items(ids, codes, cand, np.zeros((0, 2)), "none", sizes=[3, 3]).sids == codes).all()
