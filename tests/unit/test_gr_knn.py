"""Content kNN baseline: exact cosine ranking, history items excluded, both queries."""

import numpy as np
import pytest

from forge_ray.core.gr.knn import ContentKNN


def brute(x, ids, query, history, k):
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    scores = unit @ (query / np.linalg.norm(query))
    order = [ids[i] for i in np.argsort(-scores, kind="stable") if ids[i] not in set(history)]
    return order[:k]


def test_rankings_match_brute_force_and_skip_the_history():
    rng = np.random.default_rng(0)
    ids = rng.permutation(np.arange(100, 300))[:60]  # unsorted, sparse ids
    x = rng.normal(size=(60, 8)).astype(np.float32)
    knn = ContentKNN(ids, x * rng.uniform(0.5, 3, size=(60, 1)))  # norms do not matter
    row = {int(i): n for n, i in enumerate(ids)}
    histories = [ids[[3, 7, 11]], ids[[5]], np.array([99_999]), ids[[1, 2]]]
    last = knn.rank(histories, 10, "last")
    mean = knn.rank(histories, 10, "mean")
    for h, got_last, got_mean in zip(histories, last, mean):
        known = [int(i) for i in h if int(i) in row]
        if not known:  # no item with an embedding: nothing to rank from
            assert (got_last == -1).all() and (got_mean == -1).all()
            continue
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        q_mean = unit[[row[i] for i in known]].mean(0)
        assert got_last.tolist() == brute(x, ids, x[row[known[-1]]], known, 10)
        assert got_mean.tolist() == brute(x, ids, q_mean, known, 10)
        assert not set(got_last.tolist()) & set(known)


def test_pads_when_the_catalogue_is_small_and_checks_shapes():
    knn = ContentKNN(np.array([1, 2, 3]), np.array([[1, 0], [0.9, 0.1], [0, 1]], np.float32))
    assert knn.rank([np.array([1])], 5).tolist() == [[2, 3, -1, -1, -1]]
    with pytest.raises(ValueError, match="disagree"):
        ContentKNN(np.array([1, 2]), np.eye(3, dtype=np.float32))
    with pytest.raises(ValueError, match="unknown query"):
        knn.rank([np.array([1])], 2, "median")
