"""The sort-based distinct values and membership agree with np.unique and np.isin."""

from __future__ import annotations

import numpy as np
import pytest

from forge_ray.core.arrays import has_duplicates, isin_sorted, sorted_unique


@pytest.mark.parametrize("n, high", [(0, 5), (1, 5), (2, 1), (1000, 50), (1000, 10**12)])
def test_sorted_unique_equals_np_unique(n, high):
    x = np.random.default_rng(n + high).integers(-high, high, n)
    got = sorted_unique(x)
    np.testing.assert_array_equal(got, np.unique(x))
    assert got.dtype == x.dtype
    assert has_duplicates(x) == (np.unique(x).size != n)


def test_has_duplicates_by_hand():
    assert not has_duplicates(np.array([3, 1, 2], dtype=np.int64))
    assert has_duplicates(np.array([3, 1, 3], dtype=np.int64))
    assert not has_duplicates(np.zeros(0, dtype=np.int64))


@pytest.mark.parametrize("n_set", [0, 1, 7, 300])
def test_isin_sorted_equals_np_isin(n_set):
    rng = np.random.default_rng(n_set)
    values = rng.integers(-50, 50, 1000)
    members = sorted_unique(rng.integers(-60, 60, n_set))
    got = isin_sorted(values, members)
    np.testing.assert_array_equal(got, np.isin(values, members))
    assert got.any() == bool(n_set)  # both outcomes occur: 100 values, ~all drawn
