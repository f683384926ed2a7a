"""Benchmark of SID assignment (forge-ray assign), all in one process and run:

* Ray Data path: ``assign()`` end to end (encode actors + write + verify + exports),
  strategy ``none`` and FORGE's ``cap``;
* the same encode in one process without Ray (``RQKMeans.encode``);
* ``faiss.ResidualQuantizer.compute_codes`` on IDENTICAL codebooks (greedy, beam 1);
* a large float32 matmul (torch) as the machine's measured peak, and the fraction of
  it that the nearest-code search reaches (2 * N * K * d FLOPs per level).

The synthetic items are generated, encoded by both in-process baselines (their time is
summed over chunks) and written CHUNK rows at a time, so this process holds one chunk at
any N and the encoder actors' memory is the only thing that grows with a memory series.

Usage: ``python bench/bench_assign.py --items 100000 --dim 64 --sizes 256 256 256``;
``--strategies none`` runs one strategy only, ``--partitions 0`` lets ``assign`` size its
shuffle (one partition per 1M items) as a user's run does, for a memory series over N;
``--cap 1`` makes most prefix groups busy, the collision pass's worst case.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import torch

from forge_ray.core.quantize.rq_kmeans import RQKMeans
from forge_ray.data.schema import ShardWriter, embedding_array, items_schema
from forge_ray.io import write_manifest

from peak import matmul_gflops  # bench/peak.py and bench/rss.py: a script's own folder is on sys.path
from rss import PeakRss


CHUNK = 250_000  # synthetic rows generated, encoded in-process and written at a time


def chunks(n: int, d: int):
    """The synthetic items, CHUNK rows at a time: (first id, (rows, d) float32), the
    same for every run (so a 10M-item run never holds more than one chunk here)."""
    for i, start in enumerate(range(0, n, CHUNK)):
        yield start, np.random.default_rng([0, i]).normal(size=(min(CHUNK, n - start), d)).astype(np.float32)


def faiss_rq(q: RQKMeans, d: int) -> faiss.ResidualQuantizer:
    """faiss's residual quantizer on the codebooks of ``q``, greedy (beam 1) like ours."""
    sizes = q.sizes
    assert len(set(sizes)) == 1 and sizes[0] & (sizes[0] - 1) == 0, "faiss RQ: equal power-of-2 sizes"
    rq = faiss.ResidualQuantizer(d, len(sizes), int(np.log2(sizes[0])))
    faiss.copy_array_to_vector(np.concatenate(q.codebooks).ravel(), rq.codebooks)
    rq.is_trained = True
    rq.max_beam_size = 1  # greedy level by level = our encode
    return rq


def unpack_faiss(packed: np.ndarray, sizes: list[int]) -> np.ndarray:
    """faiss's packed code bytes (n, bytes) -> (n, L) int64 codes."""
    packed_int = np.zeros(len(packed), dtype=np.uint64)
    for i in range(packed.shape[1]):
        packed_int |= packed[:, i].astype(np.uint64) << np.uint64(8 * i)
    codes, shift = np.zeros((len(packed), len(sizes)), dtype=np.int64), 0
    for lvl, k in enumerate(sizes):
        b = int(np.log2(k))
        codes[:, lvl] = ((packed_int >> np.uint64(shift)) & np.uint64((1 << b) - 1)).astype(np.int64)
        shift += b
    return codes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 256, 256])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--strategies", nargs="+", default=["none", "cap"], choices=["none", "cap"])
    ap.add_argument("--cap", type=int, default=5,
                    help="items per SID for cap (FORGE: 5); 1 makes most groups busy, a worst case")
    ap.add_argument("--partitions", type=int, default=2,
                    help="collision-groupby partitions (0: assign's own, one per 1M items)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    n, d, sizes = args.items, args.dim, args.sizes
    q = RQKMeans(sizes=sizes, niter=2, seed=0).fit(next(chunks(n, d))[1][:20_000])
    rq = faiss_rq(q, d)
    t_core = t_faiss = agree = 0.0
    tmp_dir = tempfile.TemporaryDirectory()
    tmp = Path(tmp_dir.name)
    with ShardWriter(tmp / "data/items", items_schema(d), rows_per_shard=25_000) as w:
        for start, x in chunks(n, d):  # the in-process baselines, timed a chunk at a time
            t = time.perf_counter()
            codes = q.encode(x)
            t_core += time.perf_counter() - t
            t = time.perf_counter()
            packed = rq.compute_codes(x)
            t_faiss += time.perf_counter() - t
            agree += float((unpack_faiss(packed, sizes) == codes).all(axis=1).sum())
            w.write(pa.table({"item_id": np.arange(start, start + len(x), dtype=np.int64),
                              "embedding": embedding_array(x)}))
    write_manifest(tmp / "data", "dataset", counts={"items": n}, embedding_dim=d, embedding_dtype="float32")
    q.save(tmp / "model")
    agree /= n
    flops = 2.0 * n * d * sum(sizes)
    peak = matmul_gflops()

    import ray
    from forge_ray.config import load_config
    from forge_ray.distributed.assign import AssignConfig, assign

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray_times, ray_rss, revisited = {}, {}, {}
    for strategy in args.strategies:
        cfg = load_config(AssignConfig, None, [f"collisions.strategy={strategy}", "pool.actors=2",
                                               "pool.batch_size=8192", f"partitions={args.partitions}",
                                               f"collisions.cap={args.cap}"])
        with PeakRss(period=0.2) as rss:
            t = time.perf_counter()
            m = assign(tmp / "model", tmp / "data", tmp / f"sids_{strategy}", cfg)
            ray_times[strategy] = time.perf_counter() - t
        revisited[strategy] = m["collision_stats"]["revisited_rows"]
        ray_rss[strategy] = rss.matching("Encoder"), rss.matching("Encoder", private=True)
        shutil.rmtree(tmp / f"sids_{strategy}")  # disk: at 10M items a table and its exports are GBs
    ray.shutdown()
    tmp_dir.cleanup()

    print(f"items={n} dim={d} sizes={sizes} threads={args.threads} partitions={args.partitions} "
          f"cap={args.cap}")
    print(f"core encode (1 process)       : {n / t_core:12,.0f} items/s")
    print(f"faiss RQ compute_codes        : {n / t_faiss:12,.0f} items/s  (codes agree {agree:.4f})")
    for s, t in ray_times.items():
        mib, own = (", ".join(f"{b / 2**20:,.0f}" for b in peaks) for peaks in ray_rss[s])
        print(f"Ray Data assign ({s:4s}, e2e)  : {n / t:12,.0f} items/s  ({t:.1f} s; "
              f"{t_core / t:.3f}x core; peak RSS per encoder actor {mib} MiB, private {own} MiB; "
              f"collision pass revisited {revisited[s]:,} rows)")
    print(f"ratio core/faiss              : {t_faiss / t_core:.2f}x")
    print(f"matmul peak                   : {peak:8.1f} GFLOP/s")
    print(f"nearest-code search           : {flops / t_core / 1e9:8.1f} GFLOP/s = "
          f"{flops / t_core / 1e9 / peak:.1%} of peak (core), "
          f"{flops / t_faiss / 1e9 / peak:.1%} (faiss)")


if __name__ == "__main__":
    main()
