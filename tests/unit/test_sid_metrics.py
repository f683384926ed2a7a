"""SID quality metrics on hand-made cases."""

import math

import numpy as np
import pyarrow as pa
import pytest

import pyarrow.parquet as pq

from forge_ray.core.sid.metrics import (SidMetricsConfig, collision_rate, distinct_counts, embedding_hitrate,
                                        expand_hist, gini, histogram_quality, level_counts, lorenz_curve,
                                        max_items_per_sid, merged_key_histogram, merged_key_histograms, merged_keys_over,
                                        perplexity, reconstruction_mse, sid_counts, sid_quality,
                                        split_key_counts, sum_histograms, unique_sid_ratio,
                                        utilization)
from forge_ray.errors import InputError
from forge_ray.sid_table import codes_array, key_pieces


def test_gini_by_hand():
    assert gini([4, 4, 4, 4]) == pytest.approx(0.0)
    # one SID holds everything: (N+1)/N - 2 * 1 * 10 / (N * 10) = 5/4 - 1/2 = (N-1)/N
    assert gini([0, 0, 10, 0]) == pytest.approx(0.75)
    # sorted y = 1, 1, 1, 97, weights 4, 3, 2, 1: 5/4 - 2 * 106 / 400 = 0.72
    assert gini([97, 1, 1, 1]) == pytest.approx(0.72)
    x, y = lorenz_curve([3, 1])
    assert x.tolist() == [0, 0.5, 1] and y.tolist() == [0, 0.25, 1]


def test_collision_counts_by_hand():
    codes = np.array([[0, 0], [0, 0], [0, 1], [1, 0], [1, 0], [1, 0], [2, 2]])
    counts = sid_counts(codes)
    assert sorted(counts.tolist()) == [1, 1, 2, 3]
    assert collision_rate(counts) == pytest.approx(5 / 7)
    assert unique_sid_ratio(counts) == pytest.approx(4 / 7)
    assert max_items_per_sid(counts) == 3
    assert collision_rate([1, 1, 1]) == 0.0


def test_level_usage_utilization_perplexity():
    codes = np.array([[0, 0], [1, 0], [2, 0], [3, 0]])
    lv = level_counts(codes, [4, 8])
    assert lv[0].tolist() == [1, 1, 1, 1] and lv[1].tolist() == [4] + [0] * 7
    assert perplexity(lv[0]) == pytest.approx(4.0) and utilization(lv[0]) == 1.0
    assert perplexity(lv[1]) == pytest.approx(1.0) and utilization(lv[1]) == 1 / 8
    assert perplexity([5, 5, 0, 0]) == pytest.approx(2.0)
    q = sid_quality(sid_counts(codes), lv)
    assert q["items"] == 4 and q["collision_rate"] == 0 and q["perplexity"] == pytest.approx([4, 1])


def test_reconstruction_mse():
    x = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert reconstruction_mse(x, x + np.array([[1.0, 0.0], [0.0, -3.0]])) == pytest.approx(10 / 4)
    with pytest.raises(ValueError):
        reconstruction_mse(x, x[:1])


def test_empty_counts_rejected():
    with pytest.raises(ValueError, match="no items"):
        gini([])


def _unit(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


# Items on the unit circle; 7 and 8 share one SID (identical reconstructions).
IDS = np.array([1, 2, 3, 4, 5, 7, 8])
RECON = np.array([_unit(0), _unit(8), _unit(90), _unit(97), _unit(180), _unit(300), _unit(300)],
                 dtype=np.float32) * np.array([[1], [2], [1], [3], [1], [1], [1]], dtype=np.float32)
HIST = [[1], [1], [3, 1], [99], [1], [1], [], [7]]
TARGETS = np.array([2, 1, 4, 1, 5, 77, 3, 8])
# topk=1 neighbour (itself excluded): 1->2, 3->4, 7->8. Sessions:
# 0 hit; 1 miss (1 is not its own neighbour); 2 hit via 3; 3 skipped (no known history);
# 4 miss; 5 skipped (unknown target); 6 skipped (empty); 7 hit (self excluded by id).


def test_embedding_hitrate_by_hand():
    res = embedding_hitrate(IDS, RECON, HIST, TARGETS, SidMetricsConfig(topk=1))
    assert (res["hits"], res["sessions"]) == (3, 5)
    assert res["skipped_no_history"] == 2 and res["skipped_unknown_target"] == 1
    assert res["hitrate"] == pytest.approx(3 / 5)
    # Item 5 (180 deg) is the last of item 1's 6 other items: found only with topk >= 6;
    # session 1 never hits, whatever topk, because an item is not its own neighbour.
    assert embedding_hitrate(IDS, RECON, HIST, TARGETS, SidMetricsConfig(topk=5))["hits"] == 3
    assert embedding_hitrate(IDS, RECON, HIST, TARGETS, SidMetricsConfig(topk=6))["hits"] == 4
    assert embedding_hitrate(IDS, RECON, HIST, TARGETS, SidMetricsConfig(topk=50))["hits"] == 4


def test_embedding_hitrate_input_forms_and_batching_agree():
    arrow = pa.array(HIST, type=pa.list_(pa.int64()))
    a = embedding_hitrate(IDS, RECON, arrow, TARGETS, SidMetricsConfig(topk=1, batch_sessions=2))
    b = embedding_hitrate(IDS, RECON, pa.chunked_array([arrow]), TARGETS,
                          SidMetricsConfig(topk=1, index_factory="HNSW8"))
    assert a["hits"] == b["hits"] == 3 and a["sessions"] == b["sessions"] == 5


def test_embedding_hitrate_sampling():
    rng = np.random.default_rng(0)
    n = 300
    ids = np.arange(1000, 1000 + n)
    recon = rng.normal(size=(n, 8)).astype(np.float32)
    hist = [rng.choice(ids, 3, replace=False) for _ in range(50)]
    targets = rng.choice(ids, 50)
    full = embedding_hitrate(ids, recon, hist, targets, SidMetricsConfig(topk=30))
    assert full["sessions"] == 50 and full["gallery"] == n
    part = embedding_hitrate(ids, recon, hist, targets,
                             SidMetricsConfig(topk=30, max_sessions=10, gallery_size=100, seed=1))
    assert part["sessions"] == 10 and part["gallery"] == 100
    again = embedding_hitrate(ids, recon, hist, targets,
                              SidMetricsConfig(topk=30, max_sessions=10, gallery_size=100, seed=1))
    assert part == again
    # a smaller gallery has fewer distractors: hit rate cannot drop
    small = embedding_hitrate(ids, recon, hist, targets, SidMetricsConfig(topk=30, gallery_size=160))
    assert small["hits"] >= full["hits"]


def test_embedding_hitrate_rejects_bad_inputs():
    with pytest.raises(ValueError, match="duplicate"):
        embedding_hitrate(np.array([1, 1]), np.eye(2), [[1]], np.array([1]))
    with pytest.raises(ValueError, match="targets"):
        embedding_hitrate(IDS, RECON, HIST, TARGETS[:3])
    with pytest.raises(ValueError, match="topk"):
        SidMetricsConfig(topk=0)


def test_histogram_quality_equals_core():
    rng = np.random.default_rng(3)
    counts = rng.integers(1, 9, size=500)
    hist = np.bincount(counts)
    want = sid_quality(counts, [])
    got = histogram_quality(hist)
    for k in ("items", "sids", "collision_rate", "unique_sid_ratio", "max_items_per_sid", "gini"):
        assert got[k] == pytest.approx(want[k], rel=1e-12), k
    full, sampled = expand_hist(hist, 10_000, 0)
    assert not sampled and np.array_equal(np.sort(full), np.sort(counts))
    part, sampled = expand_hist(hist, 100, 0)
    assert sampled and part.size == 100


@pytest.mark.parametrize("parts", [1, 3])
def test_split_and_merged_key_histogram_equal_a_direct_count(parts):
    """The hash-partitioned count (map: split_key_counts per block; reduce:
    merged_key_histogram per bucket) sums to the items-per-key histogram of all keys."""
    rng = np.random.default_rng(7)
    blocks = [rng.integers(0, 50, size=n) for n in (40, 0, 25, 60)]  # few keys: many repeats
    tables = [pa.table({"keys": pa.array([b.tolist()], pa.list_(pa.int64()))}) for b in blocks]
    split = [split_key_counts("keys", parts, t) for t in tables]
    split = split if parts > 1 else [[s] for s in split]
    hists = [merged_key_histogram(*[s[i] for s in split]) for i in range(parts)]
    total = np.zeros(max(h.size for h in hists), dtype=np.int64)
    for h in hists:
        total[:h.size] += h
    want = np.bincount(np.unique(np.concatenate(blocks), return_counts=True)[1])
    np.testing.assert_array_equal(total, want)
    assert all(set(s[i][0]).isdisjoint(s2[j][0]) for s in split for s2 in split
               for i in range(parts) for j in range(parts) if i != j)  # a key lands in one bucket
    assert merged_key_histogram().tolist() == [0]
    # the reduce side can also name the over-full keys: those holding more than a limit
    counts = np.unique(np.concatenate(blocks), return_counts=True)
    for limit in (0, 2, 3, 10**9):
        over = [merged_keys_over(limit, *[s[i] for s in split]) for i in range(parts)]
        assert sum(h.sum() for h, _ in over) == len(counts[0])
        np.testing.assert_array_equal(np.sort(np.concatenate([k for _, k in over])),
                                      counts[0][counts[1] > limit])


def test_distinct_counts_of_two_part_keys_by_hand():
    keys = np.array([[5, 1, 5, 1, 5], [0, 2, 1, 2, 0]])  # (5, 0) twice, (1, 2) twice, (5, 1) once
    got = distinct_counts(keys, np.array([1, 2, 3, 4, 5]))
    assert got.tolist() == [[1, 5, 5], [2, 0, 1], [6, 6, 3]]
    assert distinct_counts(np.zeros((2, 0), dtype=np.int64)).shape == (3, 0)


def _sid_part(path, ids, codes, sid):
    pq.write_table(pa.table({"item_id": np.asarray(ids, np.int64), "codes": codes_array(codes),
                             "sid": codes_array(sid)}), path)
    return str(path)


@pytest.mark.parametrize("parts", [1, 3])
def test_key_pieces_merged_by_bucket_equal_a_direct_count(tmp_path, parts):
    """sid-metrics' map side (key_pieces over a few files) and reduce side
    (merged_key_histograms per bucket) give the per-kind items-per-key histograms and
    per-level code usage of a direct count over all rows, suffix level included."""
    rng = np.random.default_rng(3)
    sizes = [4, 3]
    codes = rng.integers(0, 3, size=(90, 2))  # few SIDs: collisions
    suffix = np.zeros(90, dtype=np.int64)
    _, inverse = np.unique(codes, axis=0, return_inverse=True)
    for g in np.unique(inverse):  # suffix: rank within the raw SID, one in three left at 0
        members = np.flatnonzero(inverse == g)
        suffix[members] = np.arange(members.size) * (rng.random(members.size) > 0.3)
    sid = np.c_[codes, suffix]
    ids = rng.permutation(1000)[:90]
    files = [_sid_part(tmp_path / f"p{i}.parquet", ids[s], codes[s], sid[s])
             for i, s in enumerate((slice(0, 40), slice(40, 40), slice(40, 90)))]
    maps = [key_pieces(files[:2], sizes, True, parts), key_pieces(files[2:], sizes, True, parts)]
    merged = [merged_key_histograms(*[m[b] for m in maps]) for b in range(parts)]
    for k, rows in enumerate((ids[:, None], codes, sid)):
        want = np.bincount(np.unique(rows, axis=0, return_counts=True)[1])
        np.testing.assert_array_equal(np.trim_zeros(sum_histograms(h[k] for h in merged), "b"), want)
    for kind, rows in ((1, codes), (2, sid)):
        for lvl in range(rows.shape[1]):
            total = sum_histograms(m[parts][kind][lvl] for m in maps)
            want = np.bincount(rows[:, lvl], minlength=sizes[lvl] if lvl < 2 else 1)
            np.testing.assert_array_equal(total, want)


def test_key_pieces_name_the_file_of_bad_codes(tmp_path):
    good = np.zeros((2, 2), dtype=np.int64)
    wide = _sid_part(tmp_path / "wide.parquet", [1, 2], good, np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(InputError, match=r"wide.parquet: a 'sid' row does not have 2 levels"):
        key_pieces([wide], [4, 4], False, 1)
    big = _sid_part(tmp_path / "big.parquet", [1, 2], np.array([[0, 0], [0, 9]]), good)
    with pytest.raises(InputError, match=r"big.parquet: .*code"):
        key_pieces([big], [4, 4], False, 1)
    neg = _sid_part(tmp_path / "neg.parquet", [1, 2], good, np.array([[0, 0, 0], [0, 0, -1]]))
    with pytest.raises(InputError, match=r"neg.parquet: a negative SID suffix"):
        key_pieces([neg], [4, 4], True, 1)
