"""Collision strategies: invariants, determinism and hand-made cases."""

import numpy as np
import pytest

from forge_ray.config import load_config
from forge_ray.core.sid.collisions import (CollisionConfig, group_levels, resolve_all,
                                           resolve_group)
from forge_ray.core.sid.metrics import sid_counts
from forge_ray.errors import ConfigError

K = 8  # last-level codebook size of the synthetic cases


def make_case(seed=0, n=400, k=6):
    """Skewed 3-level SIDs over 2x2 prefixes; candidates = own code then random others."""
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.integers(0, 2, n), rng.integers(0, 2, n),
                      np.minimum(rng.geometric(0.45, n) - 1, K - 1)], axis=1)
    ids = rng.choice(10**12, n, replace=False).astype(np.int64)
    cand = np.stack([np.r_[c, rng.permutation(np.setdiff1d(np.arange(K), [c]))][:k]
                     for c in codes[:, 2]])
    dist = np.sort(rng.random((n, k)), axis=1)
    return ids, codes, cand, dist


def as_map(ids, codes):
    return {int(i): tuple(c) for i, c in zip(ids, codes.tolist())}


LAST_LEVEL = ["cap", "random", "sinkhorn"]


@pytest.mark.parametrize("strategy", LAST_LEVEL)
def test_last_level_invariants(strategy):
    ids, codes, cand, dist = make_case()
    cfg = CollisionConfig(strategy=strategy, cap=20, candidates=6, seed=3)
    out, stats = resolve_all(ids, codes, cand, cfg, last_size=K, distances=dist)
    assert out.shape == codes.shape and stats["items"] == len(ids)
    assert sid_counts(codes).max() > 20  # the case really has collisions
    assert sid_counts(out).max() <= 20  # cap respected
    assert (out[:, :2] == codes[:, :2]).all()  # prefix kept
    assert ((out[:, 2] >= 0) & (out[:, 2] < K)).all()
    assert stats["moved"] == int((out != codes).any(axis=1).sum()) > 0
    assert stats["groups"] == len(np.unique(codes[:, :2], axis=0))


@pytest.mark.parametrize("strategy", LAST_LEVEL + ["suffix", "none"])
def test_deterministic_across_row_order_and_reruns(strategy):
    ids, codes, cand, dist = make_case(1)
    cfg = CollisionConfig(strategy=strategy, cap=15, candidates=6, seed=7)
    out, _ = resolve_all(ids, codes, cand, cfg, last_size=K, distances=dist)
    again, _ = resolve_all(ids, codes, cand, cfg, last_size=K, distances=dist)
    assert (out == again).all()
    perm = np.random.default_rng(5).permutation(len(ids))
    shuffled, _ = resolve_all(ids[perm], codes[perm], cand[perm], cfg, last_size=K,
                              distances=dist[perm])
    assert as_map(ids, out) == as_map(ids[perm], shuffled)


@pytest.mark.parametrize("strategy", ["cap", "random", "suffix"])
def test_seed_changes_random_choices(strategy):
    ids, codes, cand, _ = make_case(2)
    results = {resolve_all(ids, codes, cand, CollisionConfig(strategy=strategy, cap=15, seed=s),
                           last_size=K)[0].tobytes() for s in range(4)}
    assert len(results) > 1


def test_resolve_group_ignores_row_order_within_group():
    ids, codes, cand, _ = make_case(3)
    grp = (codes[:, 0] == 1) & (codes[:, 1] == 0)
    ids, codes, cand = ids[grp], codes[grp], cand[grp]
    cfg = CollisionConfig(strategy="cap", cap=15, seed=1)
    a = resolve_group(ids, codes, cand, cfg, last_size=K)
    perm = np.random.default_rng(0).permutation(len(ids))
    b = resolve_group(ids[perm], codes[perm], cand[perm], cfg, last_size=K)
    assert as_map(ids, a.codes) == as_map(ids[perm], b.codes)
    assert not a.fallback.any()


@pytest.mark.parametrize("strategy", ["cap", "random"])
def test_items_of_sids_within_cap_never_move(strategy):
    ids, codes, cand, _ = make_case(4)
    out, _ = resolve_all(ids, codes, cand, CollisionConfig(strategy=strategy, cap=20), last_size=K)
    keys, inv, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    within = counts[inv.ravel()] <= 20
    assert (out[within] == codes[within]).all()
    # over-cap SIDs keep exactly `cap` of their items
    kept = np.bincount(inv.ravel(), weights=(out == codes).all(axis=1), minlength=len(keys))
    assert (kept == np.minimum(counts, 20)).all()


def test_cap_hand_made_case():
    # prefix (0, 0), cap 2: A, B, C on code 0, D on code 1. One of A/B/C overflows and
    # walks its list [0, 1, 2, 3]: code 0 is full, code 1 has room (D alone) -> code 1.
    ids = np.array([10, 11, 12, 13])
    codes = np.array([[0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 1]])
    cand = np.array([[0, 1, 2, 3]] * 3 + [[1, 0, 2, 3]])
    moved_items = set()
    for seed in range(12):
        res = resolve_group(ids, codes, cand, CollisionConfig(strategy="cap", cap=2, seed=seed),
                            last_size=4)
        last = res.codes[:, 2]
        assert last[3] == 1 and sorted(last[:3].tolist()) == [0, 0, 1]
        moved_items.add(int(ids[np.flatnonzero(last[:3] == 1)[0]]))
        assert not res.fallback.any()
    assert len(moved_items) > 1  # which one moves is the seeded random order


def test_cap_next_nearest_skips_full_codes():
    # cap 1: A, B on code 0, C on code 1. The loser of A/B skips full code 1 and takes
    # its own next candidate: A -> 2, B -> 3.
    ids = np.array([1, 2, 3])
    codes = np.array([[5, 0], [5, 0], [5, 1]])
    cand = np.array([[0, 1, 2, 3], [0, 1, 3, 2], [1, 0, 2, 3]])
    seen = set()
    for seed in range(12):
        last = resolve_group(ids, codes, cand, CollisionConfig(strategy="cap", cap=1, seed=seed),
                             last_size=4).codes[:, 1]
        assert tuple(last) in {(0, 3, 1), (2, 0, 1)}
        seen.add(tuple(last))
    assert len(seen) == 2


def test_cap_exhausted_candidates_fall_back_to_free_codes():
    ids = np.array([1, 2, 3, 4])
    codes = np.array([[0], [0], [0], [1]])  # L = 1: one group over everything
    cand = np.array([[0, 1]] * 3 + [[1, 0]])
    res = resolve_group(ids, codes, cand, CollisionConfig(strategy="cap", cap=1), last_size=4)
    last = res.codes[:, 0]
    assert sorted(last.tolist()) == [0, 1, 2, 3]  # every item kept, cap 1 honoured
    assert res.fallback.sum() == 2 and set(last[res.fallback].tolist()) == {2, 3}


def test_group_too_big_for_cap_is_a_clear_error():
    ids = np.arange(9)
    codes = np.zeros((9, 2), dtype=np.int64)
    with pytest.raises(ValueError, match=r"prefix \[0\] holds 9 items, more than cap 2 x 4"):
        resolve_group(ids, codes, np.zeros((9, 1), int), CollisionConfig(cap=2), last_size=4)


def test_cap_needs_candidates_and_a_shared_prefix():
    ids = np.arange(3)
    with pytest.raises(ValueError, match="needs ranked candidates"):
        resolve_group(ids, np.zeros((3, 2), int), None, CollisionConfig(cap=1), last_size=4)
    with pytest.raises(ValueError, match="share its first"):
        resolve_group(ids, np.array([[0, 0], [1, 0], [0, 0]]), np.zeros((3, 2), int),
                      CollisionConfig(cap=1), last_size=4)


def test_random_places_overflow_on_free_codes_under_prefix():
    ids = np.arange(30)
    codes = np.c_[np.full(30, 3), np.zeros(30, dtype=np.int64)]
    res = resolve_group(ids, codes, None, CollisionConfig(strategy="random", cap=3), last_size=10)
    counts = np.bincount(res.codes[:, 1], minlength=10)
    assert (counts == 3).all()  # exactly full: the exact draw among free codes finished it
    assert (res.codes[:, 0] == 3).all() and not res.fallback.any()


def test_sinkhorn_finds_the_cheaper_balanced_assignment():
    # cap 1, A and B both on code 0. A's alternative (code 1) costs 1.0, B's (code 2)
    # 0.2: the balanced optimum keeps A on 0 and moves B, whatever the random order.
    ids = np.array([1, 2])
    codes = np.array([[0, 0], [0, 0]])
    cand = np.array([[0, 1, 2], [0, 2, 1]])
    dist = np.array([[0.0, 1.0, 5.0], [0.0, 0.2, 5.0]])
    for seed in range(6):
        cfg = CollisionConfig(strategy="sinkhorn", cap=1, seed=seed, sinkhorn_epsilon=0.1)
        res = resolve_group(ids, codes, cand, cfg, last_size=3, distances=dist)
        assert res.codes[:, 1].tolist() == [0, 2]


def test_suffix_makes_sids_unique():
    ids, codes, _, _ = make_case(5)
    out, stats = resolve_all(ids, codes, None, CollisionConfig(strategy="suffix"), last_size=K)
    assert out.shape == (len(ids), 4) and (out[:, :3] == codes).all()
    assert sid_counts(out).max() == 1
    assert stats["suffix_size"] == sid_counts(codes).max() == out[:, 3].max() + 1


def test_suffix_id_order_and_prefix_group_gives_same_answer():
    ids = np.array([30, 10, 20, 40])
    codes = np.array([[0, 1], [0, 1], [0, 1], [0, 2]])
    cfg = CollisionConfig(strategy="suffix", suffix_order="id")
    res = resolve_group(ids, codes, None, cfg, last_size=4)
    assert res.codes[:, 2].tolist() == [2, 0, 1, 0]
    rnd = CollisionConfig(strategy="suffix", seed=4)
    whole = resolve_group(ids, codes, None, rnd, last_size=4).codes
    per_sid = resolve_group(ids[:3], codes[:3], None, rnd, last_size=4).codes
    assert (whole[:3] == per_sid).all()
    assert group_levels("suffix", 3) == 3 and group_levels("cap", 3) == 2


def test_none_keeps_codes():
    ids, codes, _, _ = make_case(6)
    out, stats = resolve_all(ids, codes, None, CollisionConfig(strategy="none"), last_size=K)
    assert (out == codes).all() and stats["moved"] == 0


def test_config_validation():
    with pytest.raises(ValueError, match="cap must be"):
        CollisionConfig(cap=0)
    with pytest.raises(ConfigError, match="strategy"):
        load_config(CollisionConfig, None, ["strategy=fancy"])
    cfg = load_config(CollisionConfig, None, ["strategy=random", "cap=3", "seed=9"])
    assert (cfg.strategy, cfg.cap, cfg.seed) == ("random", 3, 9)


def test_cap_with_a_real_quantizer_moves_overflow_to_ranked_candidates():
    from forge_ray.core.quantize.rq_kmeans import RQKMeans

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    quantizer = RQKMeans(sizes=[4, 4, 8], niter=2, init_niter=5, seed=0).fit(x)
    codes, cand = quantizer.rank_last_level(x, 8)
    ids = np.arange(300) * 11
    cfg = CollisionConfig(strategy="cap", cap=4, candidates=8)
    out, stats = resolve_all(ids, codes, cand, cfg, last_size=8)
    assert sid_counts(codes).max() > 4 >= sid_counts(out).max()
    assert (out[:, :2] == codes[:, :2]).all() and stats["fallback"] == 0
    moved = (out != codes).any(axis=1)
    assert moved.sum() == stats["moved"] > 0
    # a moved item lands on one of its ranked candidates, never on its own full code
    rank = np.argmax(cand[moved] == out[moved, 2:3], axis=1)
    assert (cand[moved][np.arange(moved.sum()), rank] == out[moved, 2]).all() and (rank > 0).all()
    assert sid_counts(codes).size < sid_counts(out).size
