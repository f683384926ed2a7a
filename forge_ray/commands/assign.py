"""``forge-ray assign --model MODEL_DIR --data DATASET --out SIDS_DIR``: one SID per item, on Ray."""

from __future__ import annotations

import argparse

from forge_ray.commands import add_common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="quantizer folder (forge-ray train-sid output)")
    parser.add_argument("--data", required=True, help="canonical dataset with item embeddings")
    add_common(parser, "SIDS_DIR to write (created atomically)",
               overwrite="replace an existing SIDS_DIR")


def run(args: argparse.Namespace) -> int:
    from forge_ray.config import load_config
    from forge_ray.distributed.assign import AssignConfig, assign
    from forge_ray.distributed.session import ray_session

    cfg = load_config(AssignConfig, args.config, args.overrides)
    with ray_session(args.address):
        manifest = assign(args.model, args.data, args.out, cfg, overwrite=args.overwrite)
    stats = manifest["collision_stats"]
    print(f"assigned {manifest['counts']['items']:,} items -> {args.out} "
          f"(strategy {manifest['strategy']}, SID sizes {manifest['sizes']}); "
          f"collision rate {stats['before']['collision_rate']:.4f} -> {stats['after']['collision_rate']:.4f}, "
          f"max items per SID {stats['before']['max_items_per_sid']} -> "
          f"{stats['after']['max_items_per_sid']}, moved {stats['moved']:,}, fallback {stats['fallback']:,}")
    return 0
