"""Rankings without the query's history items, and the rule that decides it."""

import numpy as np

from forge_ray.core.gr.data import history_excluded
from forge_ray.core.gr.decoding import BeamResult
from forge_ray.core.gr.metrics import RetrievalMetrics
from forge_ray.core.gr.ranking import beam_items, drop_items
from forge_ray.core.gr.trie import SIDTrie


def test_drop_items_moves_later_items_up():
    ranked = np.array([[5, 6, 7, 8, -1], [1, 2, 3, -1, -1], [9, 8, 7, 6, 5]])
    out = drop_items(ranked, [np.array([6, 42]), np.array([], np.int64), np.array([9, 8, 7, 6, 5])], k=3)
    np.testing.assert_array_equal(out, [[5, 7, 8], [1, 2, 3], [-1, -1, -1]])
    # another query's history does not count: 6 is dropped from row 0 only
    np.testing.assert_array_equal(drop_items(ranked[:2], [np.array([6]), np.array([1])], 2), [[5, 7], [2, 3]])
    big = np.array([[2**50 + 1, 1, 2**50 + 2]])  # any int64 item id (hashed ids of a Parquet source)
    np.testing.assert_array_equal(drop_items(big, [np.array([1])], 2), [[2**50 + 1, 2**50 + 2]])


def test_beam_items_equal_expanding_the_beams_left_after_the_history():
    rng = np.random.default_rng(0)
    sizes = (4, 3, 5)
    codes = np.stack([rng.integers(0, s, 60) for s in sizes], axis=1)
    items = rng.permutation(60) + 100
    trie = SIDTrie(codes, items, sizes)
    beams = codes[rng.integers(0, 60, (8, 6))]  # 8 queries x 6 SIDs (some shared by several items)
    histories = [rng.choice(items, rng.integers(0, 6), replace=False) for _ in range(8)]
    got = beam_items(trie, beams, 4, histories)
    for q in range(8):
        full = trie.expand(beams[q:q + 1], 60)[0]
        expect = [i for i in full if i >= 0 and i not in set(histories[q].tolist())][:4]
        assert got[q][got[q] >= 0].tolist() == expect
    np.testing.assert_array_equal(beam_items(trie, beams, 4), trie.expand(beams, 4))


def test_excluding_the_history_turns_a_wasted_slot_into_a_hit():
    trie = SIDTrie(np.array([[0, 0], [0, 1], [1, 0]]), np.array([10, 11, 12]), (2, 2))
    beams = BeamResult(np.array([[[0, 0], [0, 1]]]), np.array([[-0.1, -0.2]]))
    plain, excl = RetrievalMetrics((1,), (1,)), RetrievalMetrics((1,), (1,))
    plain.update_from_beams(beams, trie, [np.array([11])])
    excl.update_from_beams(beams, trie, [np.array([11])], exclude=[np.array([10])])
    assert plain.result()["recall@1"] == 0.0 and excl.result()["recall@1"] == 1.0


def test_history_rule_reads_the_training_repeat_rate():
    assert history_excluded({"targets": 1000, "repeats": 0}) is True
    assert history_excluded({"targets": 1000, "repeats": 9}) is True
    assert history_excluded({"targets": 1000, "repeats": 10}) is False  # 1%: users come back
    assert history_excluded({"targets": 1000}) is None  # a manifest from before repeats were counted
    assert history_excluded({"targets": 0, "repeats": 0}) is None  # AL-GR: nothing counted
    assert history_excluded(None) is None
