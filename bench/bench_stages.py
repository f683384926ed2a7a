"""Per-stage time and peak memory from 100k to 10M items (docs/operations.md, section 3).

For each item count N, in one local Ray cluster: ``synth`` writes FORGE-shaped data
(not timed), then ``ingest`` (its npz files and interactions), ``train-sid``
(RQ-KMeans 3 x 256, in the driver up to ``in_process_max_items``, Ray tasks over
shards above), ``assign`` (strategy ``suffix``, 2 encoder actors, exports on) and
``sid-metrics`` (with the Embedding HitRate sampled like configs/forge/sid_metrics.yaml) run
through their library functions.
Each stage reports wall seconds, the driver's peak RSS, the largest Ray worker's peak
RSS and peak private memory (RSS less shared pages such as the object store's) and the
peak of all workers together (sampled every 0.1 s). A baseline runs side
by side: the same RQ-KMeans encode of all N items in this process (``RQKMeans.encode``,
no Ray), so the ratio shows what the Ray path adds at each N.

    python bench/bench_stages.py --items 100000 1000000 --dim 64
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from forge_ray.config import load_config  # noqa: E402
from rss import PeakRss, ray_workers  # noqa: E402  (bench/rss.py)

MB = 1024 ** 2


def measured(fn, label: str, largest: int = 0) -> dict:
    """Run ``fn()``: wall seconds and peak RSS (MB) of the driver and the Ray workers,
    printed at once (a large size takes long; the earlier stages' figures stay);
    ``largest``: also the peaks and Ray task/actor names of that many largest workers."""
    me = psutil.Process()
    with PeakRss(lambda: [me]) as driver, PeakRss(ray_workers) as workers:
        t = time.perf_counter()
        fn()
        wall = time.perf_counter() - t
    row = {"s": round(wall, 2), "driver_mb": round(driver.peak_one / MB),
           "worker_max_mb": round(workers.peak_one / MB), "workers_sum_mb": round(workers.peak_sum / MB),
           "worker_max_private_mb": round(max(workers.private.values(), default=0) / MB)}
    if largest:
        row["largest"] = [{"mb": round(b / MB), "names": names} for b, names in workers.largest(largest)]
    print(f"{label}: {json.dumps(row)}", flush=True)
    return row


def hitrate_overrides(n: int, sessions: int, gallery: int) -> list[str]:
    """sid-metrics' HitRate the way configs/forge/sid_metrics.yaml samples it: at most
    ``sessions`` sessions against a gallery of at most ``gallery`` items (session items
    plus distractors) in an IVF index of ~4 sqrt(G) lists, 32 probed; 0 means all
    sessions / items (exact search grows with sessions x items, i.e. with N^2)."""
    out = [f"hitrate.max_sessions={sessions}"] if sessions else []
    if gallery:
        g = min(n, gallery)
        nlist = 1 << max(4, round(np.log2(4 * np.sqrt(g))))
        out += [f"hitrate.gallery_size={g}", f"hitrate.index_factory=IVF{nlist},Flat",
                "hitrate.search_params=nprobe=32"]
    return out


def one_size(work: Path, n: int, dim: int, hitrate_sessions: int, hitrate_gallery: int,
             niter: int = 10) -> dict:
    from forge_ray.data.synth import (CONTRASTIVE_FILE, INTERACTIONS_DIR, RECONSTRUCT_FILE, SynthConfig,
                                      synth)
    from forge_ray.distributed.assign import AssignConfig, assign
    from forge_ray.distributed.ingest import IngestConfig, ingest
    from forge_ray.distributed.sid_metrics import SidMetricsStageConfig, sid_metrics
    from forge_ray.distributed.train_quantizer import TrainSidConfig, train_sid
    from forge_ray.core.quantize.registry import load_quantizer

    raw, data = work / "raw", work / "data"
    t = time.perf_counter()
    synth(raw, SynthConfig(items=n, dim=dim, users=max(1000, n // 10)), progress=False)
    row = {"items": n, "dim": dim, "synth_s": round(time.perf_counter() - t, 1)}
    sources = [str(raw / CONTRASTIVE_FILE), str(raw / RECONSTRUCT_FILE),
               str(raw / INTERACTIONS_DIR)]
    row["ingest"] = measured(lambda: ingest(sources, data, IngestConfig(progress=False)), f"{n:,} ingest")
    sid_cfg = load_config(TrainSidConfig, None, [
        "quantizer=rq_kmeans", "rq_kmeans.sizes=[256,256,256]", f"rq_kmeans.niter={niter}",
        f"storage_path={work / 'runs'}", "scale.num_workers=1"])
    row["train_sid"] = measured(lambda: train_sid(data, work / "model", sid_cfg), f"{n:,} train_sid")
    assign_cfg = load_config(AssignConfig, None, [
        "collisions.strategy=suffix", "pool.actors=2", "pool.cpus_per_actor=0.5", "export=true"])
    row["assign"] = measured(lambda: assign(work / "model", data, work / "sids", assign_cfg), f"{n:,} assign")
    metrics_cfg = load_config(SidMetricsStageConfig, None, [
        "pool.actors=2", "pool.cpus_per_actor=0.5", *hitrate_overrides(n, hitrate_sessions, hitrate_gallery)])
    row["sid_metrics"] = measured(lambda: sid_metrics(work / "sids", data, work / "metrics", metrics_cfg), f"{n:,} sid_metrics")

    # baseline: the same quantizer encoding every item in this process (no Ray)
    q = load_quantizer(work / "model")
    with np.load(raw / CONTRASTIVE_FILE) as z:
        x = np.ascontiguousarray(z["embeds"], dtype=np.float32)
    t = time.perf_counter()
    q.encode(x)
    row["core_encode_s"] = round(time.perf_counter() - t, 2)
    row["assign_over_core_encode"] = round(row["core_encode_s"] / row["assign"]["s"], 3)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument("--hitrate-sessions", type=int, default=10_000,
                    help="sid-metrics: Embedding HitRate on at most this many sessions (0: all)")
    ap.add_argument("--hitrate-gallery", type=int, default=2_000_000,
                    help="sid-metrics: HitRate gallery of at most this many items in an IVF index "
                         "(0: every item, exact search: sessions x items grows with N^2)")
    ap.add_argument("--niter", type=int, default=10,
                    help="train-sid: Lloyd passes per level (fewer: a faster memory series)")
    args = ap.parse_args()
    import torch

    from forge_ray import logs
    from forge_ray.distributed.session import ray_session

    logs.setup()  # the CLI's default levels: Ray Data's per-dataset INFO lines stay out

    torch.set_num_threads(1)  # the baseline encodes on one thread, like one encoder actor
    rows = []
    with ray_session(num_cpus=args.cpus):
        for n in args.items:
            with tempfile.TemporaryDirectory(prefix="bench_stages_") as tmp:
                rows.append(one_size(Path(tmp), n, args.dim, args.hitrate_sessions, args.hitrate_gallery,
                                    args.niter))
            print(json.dumps(rows[-1]), flush=True)
    print(f"{'items':>11s} {'stage':12s}{'s':>9s}{'items/s':>11s}{'driver MB':>11s}"
          f"{'worker max MB':>15s}{'private MB':>12s}{'workers MB':>12s}")
    for r in rows:
        for stage in ("ingest", "train_sid", "assign", "sid_metrics"):
            m = r[stage]
            print(f"{r['items']:11,d} {stage:12s}{m['s']:9.1f}{r['items'] / m['s']:11,.0f}"
                  f"{m['driver_mb']:11,d}{m['worker_max_mb']:15,d}{m['worker_max_private_mb']:12,d}"
                  f"{m['workers_sum_mb']:12,d}")
        print(f"{'':11s} {'core encode':12s}{r['core_encode_s']:9.1f}{r['items'] / r['core_encode_s']:11,.0f}"
              f"   (assign / core encode = {r['assign_over_core_encode']:.3f}x)")


if __name__ == "__main__":
    main()
