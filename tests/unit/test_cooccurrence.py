"""Co-occurrence pairs come from the training part only, within the window."""

import numpy as np
import pytest

from forge_ray.data.cooccurrence import cooccurrence_pairs


def test_pairs_skip_held_out_targets_and_repeats():
    seqs = [np.array([1, 2, 3, 4, 5, 6]), np.array([7, 7, 8, 9, 10]), np.array([11, 12])]
    a, b = cooccurrence_pairs(seqs, window=1)
    # user 1's training part [1..4], user 2's [7, 7, 8] (7-7 is a repeat), user 3's [] (too short)
    assert sorted(zip(a.tolist(), b.tolist())) == [(1, 2), (2, 3), (3, 4), (7, 8)]
    a, b = cooccurrence_pairs(seqs, window=2)
    assert sorted(zip(a.tolist(), b.tolist())) == [(1, 2), (1, 3), (2, 3), (2, 4), (3, 4), (7, 8), (7, 8)]
    held_out = {5, 6, 9, 10, 11, 12}
    assert not held_out & set(a.tolist()) | held_out & set(b.tolist())
    assert cooccurrence_pairs([], 1)[0].shape == (0,)
    with pytest.raises(ValueError, match="window"):
        cooccurrence_pairs(seqs, window=0)
