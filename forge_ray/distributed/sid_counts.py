"""Items per item id, per raw SID and per final SID, counted on Ray.

:func:`key_counts` is ``sid-metrics``'s (one Ray Data ``groupby``; a ``map_batches``
pass turns the count table into per-batch partial histograms, SIDs holding v items, and
per-level code counts, which the driver sums while streaming: it holds
O(max items per SID + sum(sizes)) numbers, never the per-SID table). ``assign`` counts
items per SID with :func:`items_per_key` only for strategy ``none`` (other strategies
count inside their collision groups), over the blocks its writers returned, by a
hash shuffle of plain Ray tasks.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pyarrow as pa
import ray
import ray.data

from forge_ray.core.sid.codes import pack_codes, unpack_codes
from forge_ray.core.sid.metrics import merged_key_histogram, split_key_counts, sum_histograms
from forge_ray.sid_table import list_codes

KINDS = ("item_id", "codes", "sid")  # what key_counts counts, by kind index


class KeyCounts(NamedTuple):
    """hist[k][v]: number of distinct keys of kind k (KINDS) holding v items.
    levels[k]: per level, (size,) code usage counts of kind k (1: codes, 2: sid)."""

    hist: list[np.ndarray]
    levels: dict[int, list[np.ndarray]]


def key_counts(table: ray.data.Dataset, sizes: list[int], suffix: bool, parts: int) -> KeyCounts:
    """Items per item id, per raw SID and per final SID via one distributed groupby.

    ``table`` has ``item_id``, ``codes`` (L levels) and ``sid`` (L, or L+1 with a
    ``suffix`` level). Final SIDs are keyed by (packed first L codes, suffix).
    """
    n_levels = len(sizes)
    keyed = table.map_batches(_keys, batch_format="pyarrow",
                              fn_kwargs={"sizes": sizes, "suffix": suffix})
    counted = keyed.groupby(["kind", "key", "extra"], num_partitions=parts).count()
    partial = counted.map_batches(_summarise, batch_format="pyarrow",
                                  fn_kwargs={"sizes": sizes, "suffix": suffix})
    acc: dict[tuple[int, int], np.ndarray] = {}
    for batch in partial.iter_batches(batch_format="numpy", batch_size=None):
        for k, lvl, idx, n in zip(*(batch[c] for c in ("kind", "level", "index", "n"))):
            arr = acc.get((int(k), int(lvl)), np.zeros(0, dtype=np.int64))
            if idx >= arr.size:
                arr = np.concatenate([arr, np.zeros(int(idx) + 1 - arr.size, dtype=np.int64)])
            arr[idx] += n
            acc[(int(k), int(lvl))] = arr
    hist = [acc.get((k, -1), np.zeros(0, dtype=np.int64)) for k in range(len(KINDS))]
    levels = {}
    for k in (1, 2):
        lv = [_padded(acc.get((k, lvl)), sizes[lvl]) for lvl in range(n_levels)]
        if k == 2 and suffix:
            lv.append(acc.get((k, n_levels), np.zeros(1, dtype=np.int64)))
        levels[k] = lv
    return KeyCounts(hist, levels)


def items_per_key(blocks: list[ray.ObjectRef], column: str, parts: int) -> np.ndarray:
    """hist[v] = number of distinct keys holding v items, over every key in the
    list<int64> column ``column`` of the Arrow tables ``blocks`` (object refs).

    A two-round hash shuffle of plain Ray tasks, not a Ray Data ``groupby``, whose three
    operators took 1.2-1.8 s each to run here even at 1M keys (4.4 s of a 10.9 s
    ``assign``): one task per block counts its keys and splits them by
    :func:`~forge_ray.core.sid.codes.bucket_of` into ``parts`` pieces; one task per
    bucket merges its pieces into a partial histogram; the driver sums those. Memory:
    a count task holds one block's keys, a merge task its bucket's (key, count) pairs
    (about 1/parts of them, 16 bytes each), the driver O(parts x max items per key)
    numbers.
    """
    split = [_split.options(num_returns=parts).remote(b, column, parts) for b in blocks]
    pieces = split if parts > 1 else [[s] for s in split]
    return sum_histograms(ray.get([_merge.remote(*[p[i] for p in pieces]) for i in range(parts)]))


# The core's numpy functions themselves, by reference: a fresh worker imports only
# forge_ray.core.sid.metrics (0.2 s) for them, where this module's ray.data took 0.9 s.
# One CPU each: they run on the workers Ray starts with, no new processes.
_split = ray.remote(num_cpus=1)(split_key_counts)
_merge = ray.remote(num_cpus=1)(merged_key_histogram)


def _padded(arr: np.ndarray | None, size: int) -> np.ndarray:
    out = np.zeros(size, dtype=np.int64)
    if arr is not None:
        out[:arr.size] = arr
    return out


def _keys(batch: pa.Table, sizes: list[int], suffix: bool) -> pa.Table:
    n_levels, n = len(sizes), batch.num_rows
    codes = list_codes(batch["codes"], n_levels)
    sid = list_codes(batch["sid"], n_levels + suffix)
    zeros = np.zeros(n, dtype=np.int64)
    return pa.table({
        "kind": np.repeat(np.arange(3, dtype=np.int64), n),
        "key": np.concatenate([batch["item_id"].to_numpy().astype(np.int64), pack_codes(codes, sizes),
                               pack_codes(sid[:, :n_levels], sizes)]),
        "extra": np.concatenate([zeros, zeros, sid[:, n_levels] if suffix else zeros])})


def _summarise(batch: pa.Table, sizes: list[int], suffix: bool) -> pa.Table:
    """Per-key counts -> nonzero partial sums as rows (kind, level, index, n);
    level -1 is the items-per-key histogram."""
    kind = batch["kind"].to_numpy()
    key, extra = batch["key"].to_numpy(), batch["extra"].to_numpy()
    count = batch["count()"].to_numpy().astype(np.int64)
    out = []

    def emit(k, lvl, values):
        idx = np.flatnonzero(values)
        out.append(np.stack([np.full(idx.size, k), np.full(idx.size, lvl), idx, values[idx]], axis=1))

    for k in range(3):
        sel = kind == k
        if not sel.any():
            continue
        emit(k, -1, np.bincount(count[sel]))
        if k:
            codes = unpack_codes(key[sel], sizes)
            for lvl, size in enumerate(sizes):
                emit(k, lvl, np.bincount(codes[:, lvl], weights=count[sel], minlength=size).astype(np.int64))
            if k == 2 and suffix:
                emit(k, len(sizes), np.bincount(extra[sel], weights=count[sel]).astype(np.int64))
    rows = np.concatenate(out) if out else np.zeros((0, 4), dtype=np.int64)
    return pa.table({c: rows[:, i].astype(np.int64) for i, c in enumerate(("kind", "level", "index", "n"))})
