"""Ingest benchmark: Ray ingest vs a plain single-process npz -> Parquet loop.

Writes a FORGE reconstruction npz (``ids``, ``embeds`` N x D float32; default
750,000 x 512 = 1.5 GB) with the streaming npz writer, then in one process run:

1. ``forge_ray`` ingest on a fresh local Ray cluster (``--cpus`` CPUs), sampling
   the RSS of every Ray worker process (psutil, every 50 ms) to find the peak;
2. the baseline: ``np.load`` the npz and write the same Parquet shards with
   :class:`~forge_ray.data.schema.ShardWriter` in this process (peak RSS sampled the
   same way).

It prints rows/s, MB/s, the speed ratio and peak RSS against the file size, and
checks the memory limit it imposes on itself: every Ray worker must stay below
``--worker-limit-mb`` (default 512 MB, about a third of the default file), i.e. the
file cannot fit in any worker. The idle RSS of a worker (Python, Ray, pyarrow
loaded) is reported too, so the part due to the data is visible.

    python bench/bench_ingest.py                      # ~1.5 GB, a few minutes on 2 cores
    python bench/bench_ingest.py --items 100000       # quick
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402

from forge_ray.data.npz import NpzWriter  # noqa: E402
from forge_ray.data.schema import ShardWriter, embedding_array, items_schema  # noqa: E402
from rss import PeakRss, ray_workers  # noqa: E402  (bench/rss.py)

MB = 1024 ** 2


def write_npz(path: Path, n: int, d: int, block: int = 32_768) -> None:
    rng = np.random.default_rng(0)
    with NpzWriter(path) as w:
        with w.stream("ids", np.int64, (n,)) as ids:
            ids.write(np.arange(n, dtype=np.int64) * 7 + 100_000_000_000)
        with w.stream("embeds", np.float32, (n, d)) as emb:
            for r in range(0, n, block):
                emb.write(rng.standard_normal((min(block, n - r), d), dtype=np.float32))


def baseline(path: Path, out: Path) -> int:
    """What a user would write without forge_ray: load the arrays, write shards."""
    with np.load(path) as z:
        ids, emb = z["ids"], z["embeds"]
    schema = items_schema(emb.shape[1])
    with ShardWriter(out, schema) as w:
        for r in range(0, len(ids), 65_536):
            w.write(pa.table({"item_id": ids[r:r + 65_536],
                              "embedding": embedding_array(emb[r:r + 65_536])}, schema=schema))
    return w.rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=750_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument("--chunk-rows", type=int, default=16_384)
    ap.add_argument("--worker-limit-mb", type=float, default=512,
                    help="peak RSS limit for every Ray worker, in MB")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args()

    import ray

    from forge_ray.distributed.ingest import IngestConfig, ingest

    work = Path(tempfile.mkdtemp(prefix="bench_ingest_", dir=args.workdir))
    try:
        npz = work / "reconstruct.npz"
        t = time.perf_counter()
        write_npz(npz, args.items, args.dim)
        size = npz.stat().st_size
        print(f"npz: {args.items:,} x {args.dim} float32 = {size / MB:,.0f} MB "
              f"(written in {time.perf_counter() - t:.1f} s)")

        ray.init(num_cpus=args.cpus, include_dashboard=False, object_store_memory=256 * MB,
                 log_to_driver=False)
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        cfg = IngestConfig(chunk_rows=args.chunk_rows, progress=False)
        warm = work / "warm.npz"  # start the worker processes outside the timing
        write_npz(warm, 1000, args.dim)
        ingest([str(warm)], work / "warm_ds", cfg)
        idle = max(p.memory_info().rss for p in ray_workers())

        with PeakRss(ray_workers, period=0.05) as ray_rss:
            t = time.perf_counter()
            m = ingest([str(npz)], work / "ray_ds", cfg)
            t_ray = time.perf_counter() - t
        assert m["counts"]["items"] == args.items
        ray.shutdown()

        me = psutil.Process()
        with PeakRss(lambda: [me], period=0.05) as base_rss:
            t = time.perf_counter()
            rows = baseline(npz, work / "base_ds")
            t_base = time.perf_counter() - t
        assert rows == args.items

        print(f"{'':22s}{'time s':>8s}{'rows/s':>12s}{'MB/s':>9s}{'peak RSS MB':>13s}")
        print(f"{'ray ingest':22s}{t_ray:8.1f}{args.items / t_ray:12,.0f}{size / MB / t_ray:9.1f}"
              f"{ray_rss.peak_one / MB:13.0f}  (max one worker; all workers "
              f"{ray_rss.peak_sum / MB:,.0f})")
        print(f"{'numpy+pyarrow loop':22s}{t_base:8.1f}{args.items / t_base:12,.0f}"
              f"{size / MB / t_base:9.1f}{base_rss.peak_one / MB:13.0f}")
        print(f"speed ratio ray/baseline: {t_base / t_ray:.2f}x  ({args.cpus} Ray CPUs, "
              f"{os.cpu_count()} cores)")
        limit = args.worker_limit_mb * MB
        ok = ray_rss.peak_one < limit
        print(f"peak worker RSS {ray_rss.peak_one / MB:,.0f} MB = {ray_rss.peak_one / size:.1%} "
              f"of the file (idle worker {idle / MB:,.0f} MB, so data +"
              f"{(ray_rss.peak_one - idle) / MB:,.0f} MB = {(ray_rss.peak_one - idle) / size:.1%}); "
              f"limit {args.worker_limit_mb:,.0f} MB, file = {size / limit:.1f}x limit: "
              f"{'OK' if ok else 'EXCEEDED'}")
        if not ok:
            raise SystemExit(1)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
