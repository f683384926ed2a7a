"""k-means over the data interface, Sinkhorn balancing and RQ-KMeans."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from forge_ray.core.quantize.balanced import sinkhorn_assign, sinkhorn_bias
from forge_ray.core.quantize.base import QUANTIZER_FILE, Quantizer
from forge_ray.core.quantize.registry import load_quantizer
from forge_ray.core.quantize.kmeans import ArrayData, Assignment, kmeans
from forge_ray.core.quantize.rq_kmeans import RQKMeans, RQKMeansConfig
from forge_ray.errors import InputError


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/unit/conftest.py


def skewed(n=2000, d=16, seed=0):
    """Power-law cluster sizes: a few huge, tight clusters and many tiny ones."""
    rng = np.random.default_rng(seed)
    sizes = np.maximum((n * 0.5 ** np.arange(12)).astype(int) // 2, 3)
    centers = rng.standard_normal((len(sizes), d)) * 4
    x = np.concatenate([c + 0.3 * rng.standard_normal((s, d)) for c, s in zip(centers, sizes)])
    return x[:n].astype(np.float32)


def popular_and_tail(n=2000, d=16, seed=0):
    """90% of items in one dense popular region, 10% in a wide tail (skewed codes)."""
    rng = np.random.default_rng(seed)
    m = n * 9 // 10
    return np.concatenate([rng.standard_normal((m, d)) * 0.3,
                           rng.standard_normal((n - m, d)) * 3]).astype(np.float32)


def gaussian(n=2000, d=16, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)) * np.linspace(0.3, 2.0, d)).astype(np.float32)


def test_array_data_assign_matches_brute_force_and_merges():
    x = gaussian(300, 8)
    c = x[:5].copy()
    data = ArrayData(x, batch_size=64)  # several batches
    a = data.assign_to(c)
    d2 = ((x[:, None, :] - c[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(a.codes, d2.argmin(1))
    np.testing.assert_allclose(a.distances, d2.min(1), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(a.counts, np.bincount(d2.argmin(1), minlength=5))
    np.testing.assert_allclose(a.sums[2], x[d2.argmin(1) == 2].sum(0), rtol=1e-5, atol=1e-4)
    # shards add up to the whole
    parts = [ArrayData(x[:100]).assign_to(c), ArrayData(x[100:]).assign_to(c)]
    m = Assignment.merge(parts)
    np.testing.assert_array_equal(m.counts, a.counts)
    np.testing.assert_allclose(m.objective, a.objective, rtol=1e-5)
    # residual level: x minus its assigned centroid
    np.testing.assert_allclose(data.residual(c).x, x - c[a.codes], atol=1e-6)


@pytest.mark.parametrize("init", ["faiss", "random"])
def test_kmeans_matches_faiss_on_skewed_data(init):
    x = skewed()
    res = kmeans(ArrayData(x), 32, niter=10, seed=3, init=init)
    km = faiss.Kmeans(x.shape[1], 32, niter=20, seed=3)
    km.train(x)
    ref = float(faiss.knn(x, km.centroids, 1)[0].sum())
    assert res.assignment.objective <= 1.10 * ref
    objs = [s["objective"] for s in res.stats]
    assert objs[-1] <= objs[0] + 1e-3 * abs(objs[0])  # Lloyd never makes it worse
    assert {"objective", "empty", "max_size"} <= set(res.stats[0])


def test_kmeans_reseeds_empty_clusters():
    rng = np.random.default_rng(0)
    # 90% copies of one point: a random init picks it many times -> empty clusters
    x = np.concatenate([np.ones((1800, 4)), rng.standard_normal((200, 4)) * 5]).astype(np.float32)
    res = kmeans(ArrayData(x), 16, niter=8, seed=0, init="random", init_sample=16)
    assert res.stats[0]["empty"] > 0
    assert (res.assignment.counts == 0).sum() < res.stats[0]["empty"]


def test_sinkhorn_bias_balances_a_skewed_cost():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(skewed(1024, 8))
    c = x[torch.from_numpy(rng.choice(1024, 16, replace=False))]
    cost = torch.cdist(x, c) ** 2
    plain = torch.bincount(cost.argmin(1), minlength=16)
    bal = torch.bincount(sinkhorn_assign(cost, eps=0.02, n_iter=200), minlength=16)
    assert bal.max() < plain.max()
    assert bal.max() <= 2 * 1024 / 16
    assert sinkhorn_bias(cost).shape == (16,)


def test_rq_kmeans_matches_faiss_residual_quantizer():
    x = gaussian()
    q = RQKMeans(sizes=[16, 16, 16], niter=5, seed=0).fit(x)
    err = ((q.decode(q.encode(x)) - x) ** 2).sum(1).mean()
    rq = faiss.ResidualQuantizer(x.shape[1], 3, 4)  # 3 levels x 2^4 codes
    rq.max_beam_size = 1  # greedy, like ours
    rq.train(x)
    ref = ((rq.decode(rq.compute_codes(x)) - x) ** 2).sum(1).mean()
    assert err <= 1.05 * ref
    assert err < 0.7 * ((x - x.mean(0)) ** 2).sum(1).mean()  # it actually quantizes


def test_rq_kmeans_per_level_sizes_and_interface():
    x = gaussian()
    q = RQKMeans(sizes=[32, 16, 8], niter=2).fit(x)
    assert isinstance(q, Quantizer)
    codes = q.encode(x)
    assert codes.shape == (2000, 3) and codes.dtype == np.int64
    assert [c.shape[0] for c in q.codebooks] == [32, 16, 8]
    assert (codes.max(0) < [32, 16, 8]).all() and (codes.min(0) >= 0).all()
    assert len(np.unique(codes[:, 0])) > 24  # most level-1 codes used
    errs = []
    for levels in (1, 2, 3):  # each level lowers the error
        partial = np.zeros_like(x)
        for lv in range(levels):
            partial += q.codebooks[lv][codes[:, lv]]
        errs.append(((partial - x) ** 2).sum(1).mean())
    assert errs[0] > errs[1] > errs[2]


def collisions(codes):
    _, counts = np.unique(codes, axis=0, return_counts=True)
    return int(counts.max()), float(1 - len(counts) / len(codes))


def test_balanced_rq_kmeans_cuts_collisions():
    # (A per-code bias cannot split near-identical items, so perfectly tight clusters as
    # in skewed() stay together; FORGE's collision handling takes care of those.)
    x = popular_and_tail()
    plain = RQKMeans(sizes=[8, 8, 4], niter=3).fit(x)
    bal = RQKMeans(sizes=[8, 8, 4], niter=3, balanced=True).fit(x)
    p_max, _ = collisions(plain.encode(x))
    b_max, _ = collisions(bal.encode(x))
    assert b_max < 0.5 * p_max
    assert np.bincount(bal.encode(x)[:, 0]).max() < np.bincount(plain.encode(x)[:, 0]).max()


@pytest.mark.parametrize("balanced", [False, True])
def test_rq_kmeans_rank_last_level_and_round_trip(tmp_path, balanced):
    x = skewed(600, 8)
    q = RQKMeans(sizes=[8, 8, 16], niter=2, balanced=balanced, batch_size=100).fit(x)
    codes, cand = q.rank_last_level(x, 10)
    enc = q.encode(x)
    np.testing.assert_array_equal(codes, enc)
    np.testing.assert_array_equal(cand[:, 0], enc[:, -1])
    assert all(len(set(row)) == 10 for row in cand.tolist())
    # ranked by the (biased) cost under each row's own prefix
    prefix = x - q.codebooks[0][enc[:, 0]] - q.codebooks[1][enc[:, 1]]
    cost = ((prefix[:, None, :] - q.codebooks[2][None]) ** 2).sum(-1) - q.biases[2][None]
    ranked = np.take_along_axis(cost, cand, 1)
    assert (np.diff(ranked, axis=1) >= -1e-4).all()
    q.save(tmp_path / "q")
    assert (tmp_path / "q" / QUANTIZER_FILE).is_file()
    q2 = load_quantizer(tmp_path / "q")
    assert isinstance(q2, RQKMeans) and q2.config == q.config
    np.testing.assert_array_equal(q2.encode(x), enc)


def test_rq_kmeans_bad_input_and_config():
    with pytest.raises(ValueError, match="codebook size"):
        RQKMeansConfig(sizes=[16, 0])
    q = RQKMeans(sizes=[4, 4], niter=1).fit(gaussian(100, 4))
    with pytest.raises(InputError, match="4-d"):
        q.encode(np.zeros((3, 5), np.float32))
    with pytest.raises(InputError, match="out of range"):
        q.decode(np.array([[0, 4]]))
    with pytest.raises(InputError, match="quantizer.json"):
        load_quantizer("/nonexistent/folder")
