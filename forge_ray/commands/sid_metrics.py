"""``forge-ray sid-metrics --sids SIDS_DIR [--data DATASET] --out DIR``: SID quality metrics on Ray."""

from __future__ import annotations

import argparse

from forge_ray.commands import add_common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sids", required=True, metavar="SIDS_DIR", help="forge-ray assign output")
    parser.add_argument("--data", default=None,
                        help="dataset the SIDs were assigned to (adds reconstruction MSE and "
                             "Embedding HitRate)")
    add_common(parser, "output folder (created atomically)")


def run(args: argparse.Namespace) -> int:
    from forge_ray.config import load_config
    from forge_ray.core.sid.metrics import hitrate_key
    from forge_ray.distributed.session import ray_session
    from forge_ray.distributed.sid_metrics import SidMetricsStageConfig, sid_metrics

    cfg = load_config(SidMetricsStageConfig, args.config, args.overrides)
    with ray_session(args.address):
        m = sid_metrics(args.sids, args.data, args.out, cfg, overwrite=args.overwrite)
    line = (f"{m['items']:,} items, {m['sids']:,} SIDs: raw collision rate {m['raw_collision_rate']:.4f}, "
            f"unique {m['unique_sid_ratio']:.4f}, max/SID {m['max_items_per_sid']}, gini {m['gini']:.4f}")
    if m.get("reconstruction_mse") is not None:
        line += f", recon MSE {m['reconstruction_mse']:.5f}"
    hr = m.get(hitrate_key(cfg.hitrate.topk))
    if hr:
        line += f", embedding HR@{hr['topk']} {hr['hitrate']:.4f}"
    print(f"{line} -> {args.out}/metrics.json")
    return 0
