"""sid-metrics with Ray Data's object-store hash shuffle vs its disk-based shuffle.

At 1M -> 3M items the largest Ray worker of ``sid-metrics`` grew from 1.6 to 3.6 GB
(docs/operations.md) while the other stages stayed nearly flat. This bench runs the
same stage on the same inputs twice in one Ray session, once per
``DataContext.use_disk_based_hash_shuffle`` setting, and prints wall seconds, the peak
RSS of the largest worker and of all workers, the disk / object-store ratios, and the
Ray task or actor names of the three largest workers, so the one that grows is named,
not guessed. The HitRate is sampled small (its faiss search runs in the driver and does
not touch the workers' memory).

    python bench/bench_shuffle_memory.py --data DATASET --sids SIDS_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray.data  # noqa: E402

from bench_stages import measured  # noqa: E402  (bench/bench_stages.py)
from forge_ray.config import load_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="dataset folder (ingest output)")
    ap.add_argument("--sids", required=True, help="SIDS_DIR (assign output)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument("--sessions", type=int, default=2000, help="HitRate sessions sampled")
    ap.add_argument("--gallery", type=int, default=100_000, help="HitRate gallery size")
    args = ap.parse_args()

    from forge_ray.distributed.session import ray_session
    from forge_ray.distributed.sid_metrics import SidMetricsStageConfig, sid_metrics

    cfg = load_config(SidMetricsStageConfig, None, [
        "pool.actors=2", "pool.cpus_per_actor=0.5", f"hitrate.max_sessions={args.sessions}",
        f"hitrate.gallery_size={args.gallery}", "hitrate.index_factory=IVF1024,Flat",
        "hitrate.search_params=nprobe=32"])
    rows = {}
    with ray_session(num_cpus=args.cpus), tempfile.TemporaryDirectory() as tmp:
        ctx = ray.data.DataContext.get_current()
        for name, disk in (("object_store", False), ("disk", True)):
            ctx.use_disk_based_hash_shuffle = disk
            rows[name] = measured(lambda: sid_metrics(args.sids, args.data, Path(tmp) / name, cfg),
                                  f"sid_metrics, {name} shuffle", largest=3)
    ratios = {k: round(rows["disk"][k] / max(rows["object_store"][k], 1e-9), 3)
              for k in ("s", "worker_max_mb", "workers_sum_mb")}
    print(json.dumps({"rows": rows, "disk_over_object_store": ratios}, indent=2))


if __name__ == "__main__":
    main()
