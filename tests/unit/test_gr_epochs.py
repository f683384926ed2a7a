"""train-gr's epochs from a shard held in the worker: every row once per epoch in a
seeded order, as many equal micro-batches as the streamed path yields."""

from __future__ import annotations

import numpy as np

from forge_ray.distributed.train_gr import _micro_batches


def _held(n: int = 50) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = np.empty(n, dtype=object)
    ids[:] = [np.full(rng.integers(2, 9), i) for i in range(n)]  # row i's tokens are all i
    return {"input_ids": ids, "labels": ids.copy()}


def _epoch(held, epoch: int, groups: int = 1, shuffle: int = 4096, seed: int = 0) -> list[list[int]]:
    t = {"micro_batch": 8, "length_buckets": groups, "shuffle_buffer": shuffle, "seed": seed}
    return [[int(x[0]) for x in b["input_ids"]] for b in _micro_batches(None, held, t, epoch)]


def test_held_epochs_permute_every_row_once_and_are_seeded():
    held = _held()
    first, second = _epoch(held, 0), _epoch(held, 1)
    for epoch in (first, second):
        rows = [r for b in epoch for r in b]
        assert len(epoch) == 6 and all(len(b) == 8 for b in epoch)  # 50 rows: the last 2 dropped
        assert len(set(rows)) == 48 and set(rows) <= set(range(50))
    assert first != second and first == _epoch(held, 0) and first != _epoch(held, 0, seed=1)
    assert [r for b in _epoch(held, 3, shuffle=0) for r in b] == list(range(48))  # stored order


def test_held_epochs_with_length_buckets_pad_each_micro_batch_to_its_own_length():
    held = _held()
    epoch = _epoch(held, 0, groups=2)
    assert len(epoch) == 6 and all(len(b) == 8 for b in epoch)  # same count as without buckets
    lengths = {i: len(held["input_ids"][i]) for i in range(50)}
    rows = [r for b in epoch for r in b]
    assert len(set(rows)) == 48
    # within each bucket of 16 rows, the two micro-batches split it by length
    t = {"micro_batch": 8, "length_buckets": 2, "shuffle_buffer": 1, "seed": 0}
    for a, b in zip(*[iter(list(_micro_batches(None, held, t, 0)))] * 2):
        la, lb = ([lengths[int(x[0])] for x in m["input_ids"]] for m in (a, b))
        assert max(min(la), min(lb)) >= min(max(la), max(lb))  # one holds the shorter half
