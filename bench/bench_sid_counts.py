"""Benchmark of sid-metrics' counts (items per item id, raw SID and final SID, and
per-level code usage) on Ray against the same maths in this process.

A synthetic SID table of N items is written in parts of 25,000 rows (as ``assign``
writes them): Zipf-skewed codes, so raw SIDs collide, and a ``suffix`` level that ranks
the items of each raw SID, so final SIDs are unique. Then, side by side in one run:

* **in-process**: :func:`~forge_ray.sid_table.key_pieces` over every part with one
  bucket, then :func:`~forge_ray.core.sid.metrics.merged_key_histograms`: the same
  numpy counting with no Ray, the single-process ceiling;
* **Ray, cold**: :func:`~forge_ray.distributed.sid_counts.key_counts` as the stage's
  first call makes it (task workers not yet started);
* **Ray, warm**: the same again, ``--reps`` times (median);
* **stage**: ``sid_metrics`` without a dataset (counts, metrics, three plots).

The histograms of every Ray run are checked equal to the in-process ones. Workers'
peak private memory (RSS less shared pages) is sampled every 0.1 s.

    python bench/bench_sid_counts.py --items 1000000 3000000 --sizes 256 256 256
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from forge_ray.core.sid.metrics import merged_key_histograms  # noqa: E402
from forge_ray.io import write_manifest  # noqa: E402
from forge_ray.sid_table import codes_array, key_pieces, sid_files  # noqa: E402
from rss import PeakRss  # noqa: E402  (bench/rss.py)

PART = 25_000  # rows per Parquet part
MIB = 1024 ** 2


def write_table(folder: Path, n: int, sizes: list[int], seed: int = 0) -> None:
    """A SID table of ``n`` items with a suffix level, in parts of PART rows."""
    rng = np.random.default_rng(seed)
    codes = np.stack([np.minimum(rng.zipf(1.3, n) - 1, k - 1) for k in sizes], axis=1)
    _, inverse = np.unique(codes, axis=0, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(inverse[order]) != 0])
    rank = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    suffix = np.empty(n, dtype=np.int64)
    suffix[order] = rank
    sid = np.c_[codes, suffix]
    ids = rng.permutation(n).astype(np.int64)
    folder.mkdir(parents=True)
    for i, s in enumerate(range(0, n, PART)):
        e = min(s + PART, n)
        pq.write_table(pa.table({"item_id": ids[s:e], "codes": codes_array(codes[s:e]),
                                 "sid": codes_array(sid[s:e]), "fallback": np.zeros(e - s, dtype=bool)}),
                       folder / f"part-{i:05d}.parquet")
    write_manifest(folder, "sids", sizes=sizes + [int(suffix.max()) + 1], code_sizes=sizes,
                   strategy="suffix", counts={"items": n})


def in_process(files: list[str], sizes: list[int]) -> list[np.ndarray]:
    """The same counting in this process: one bucket, one map over all parts."""
    pieces = key_pieces(files, sizes, True, 1)
    return merged_key_histograms(pieces[0])


def trimmed(h: np.ndarray) -> list[int]:
    return np.trim_zeros(np.asarray(h), "b").tolist()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, nargs="+", default=[1_000_000])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 256, 256])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    import ray
    from forge_ray.distributed.dataset import partitions_for
    from forge_ray.distributed.sid_counts import key_counts
    from forge_ray.distributed.sid_metrics import sid_metrics

    rows = []
    for n in args.items:
        with tempfile.TemporaryDirectory() as tmp:
            table = Path(tmp) / "sids"
            write_table(table, n, args.sizes)
            files = sid_files(table)
            t = time.perf_counter()
            want = in_process(files, args.sizes)
            t_core = time.perf_counter() - t
            parts = partitions_for(n, 0)
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
            times = []
            with PeakRss() as rss:
                for rep in range(1 + args.reps):
                    t = time.perf_counter()
                    got = key_counts(files, args.sizes, True, parts)
                    times.append(time.perf_counter() - t)
                    assert [trimmed(h) for h in got.hist] == [trimmed(h) for h in want], "histograms differ"
                t = time.perf_counter()
                sid_metrics(table, None, Path(tmp) / "metrics")
                t_stage = time.perf_counter() - t
            ray.shutdown()
        cold, warm = times[0], statistics.median(times[1:]) if args.reps else float("nan")
        private = max(rss.private.values(), default=0) / MIB
        rows.append((n, parts, t_core, cold, warm, t_stage, private))
        print(f"items={n:,} parts={parts}: in-process {t_core:.2f} s, Ray cold {cold:.2f} s "
              f"({t_core / cold:.2f}x), warm {warm:.2f} s ({t_core / warm:.2f}x), "
              f"stage {t_stage:.2f} s, largest worker private {private:.0f} MiB", flush=True)
    print("\n| items | buckets | in-process s | Ray cold s (ratio) | Ray warm s (ratio) | stage s | worker private MiB |")
    print("|---|---|---|---|---|---|---|")
    for n, parts, t_core, cold, warm, t_stage, private in rows:
        print(f"| {n:,} | {parts} | {t_core:.2f} | {cold:.2f} ({t_core / cold:.2f}x) | "
              f"{warm:.2f} ({t_core / warm:.2f}x) | {t_stage:.2f} | {private:.0f} |")


if __name__ == "__main__":
    main()
