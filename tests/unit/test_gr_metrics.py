"""Recall / NDCG / FORGE HR / invalid rate on hand-made cases, merging, popularity."""

import math

import numpy as np
import pytest

from forge_ray.core.gr.decoding import BeamResult
from forge_ray.core.gr.metrics import RetrievalMetrics, invalid_counts
from forge_ray.core.gr.popularity import PopularityCounter
from forge_ray.core.gr.trie import SIDTrie


def test_single_target_recall_and_ndcg_by_hand():
    ranked = np.array([[7, 3, 9, 1, 2, 5], [4, 8, 6, 0, 10, 11], [1, 2, 3, 4, 5, -1]])
    truths = [np.array([9]), np.array([5]), np.array([5])]
    m = RetrievalMetrics(recall_ks=(1, 5), ndcg_ks=(5,))
    m.update(ranked, truths)
    r = m.result()
    assert r["recall@1"] == 0
    assert r["recall@5"] == pytest.approx(2 / 3)  # hits at rank 3 and rank 5
    assert r["ndcg@5"] == pytest.approx((1 / math.log2(4) + 1 / math.log2(6)) / 3)
    assert r["queries"] == 3 and "invalid_rate" not in r


def test_multi_target_hr_and_ndcg_and_merge():
    # FORGE HR@K: |top-K ∩ true| / |true|, duplicates in the truth counted once
    ranked = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    truths = [np.array([2, 4, 4, 100]), np.array([9])]
    a = RetrievalMetrics(recall_ks=(), ndcg_ks=(2,), hr_ks=(2, 4))
    a.update(ranked[:1], truths[:1])
    b = RetrievalMetrics(recall_ks=(), ndcg_ks=(2,), hr_ks=(2, 4))
    b.update(ranked[1:], truths[1:])
    r = a.merge(b).result()
    assert r["hr@2"] == pytest.approx((1 / 3 + 0) / 2)
    assert r["hr@4"] == pytest.approx((2 / 3 + 0) / 2)
    idcg2 = 1 + 1 / math.log2(3)
    assert r["ndcg@2"] == pytest.approx((1 / math.log2(3)) / idcg2 / 2)


def test_beams_are_expanded_and_invalid_sids_counted():
    sizes = (3, 3)
    trie = SIDTrie(np.array([[0, 0], [0, 0], [1, 2], [2, 1]]), np.array([10, 11, 12, 13]), sizes)
    codes = np.array([[[2, 2], [0, 0], [1, 2]],      # (2,2) is not a SID
                      [[2, 1], [-1, -1], [-1, -1]]])  # only one SID generated
    scores = np.array([[-1.0, -2.0, -3.0], [-0.5, -np.inf, -np.inf]], dtype=np.float32)
    res = BeamResult(codes, scores)
    assert invalid_counts(res, trie) == (4, 1)
    m = RetrievalMetrics(recall_ks=(2,), ndcg_ks=(), hr_ks=(3,))
    m.update_from_beams(res, trie, [np.array([12]), np.array([13])])
    r = m.result()
    # query 0 ranks [10, 11, 12]: target at rank 3; query 1 ranks [13]
    assert r["recall@2"] == pytest.approx(0.5) and r["hr@3"] == pytest.approx(1.0)
    assert r["invalid_rate"] == pytest.approx(0.25) and r["generated_sids"] == 4


def test_popularity_ranking_counts_training_part_and_merges():
    a = PopularityCounter()
    a.update_from_sequences([np.array([5, 5, 7, 1, 2]), np.array([7, 3, 4])])  # train parts [5,5,7], [7]
    b = PopularityCounter()
    b.update(np.array([3, 3]))
    p = a.merge(b)
    assert dict(zip(p.item_ids.tolist(), p.counts.tolist())) == {3: 2, 5: 2, 7: 2}
    np.testing.assert_array_equal(p.top(4), [3, 5, 7, -1])  # ties by ascending id, -1 padded
    m = RetrievalMetrics(recall_ks=(1, 2), ndcg_ks=())
    m.update(p.rank(2, 4), [np.array([5]), np.array([3])])
    assert m.result()["recall@1"] == 0.5 and m.result()["recall@2"] == 1.0
