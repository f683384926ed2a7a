"""``forge-ray train-sid --data DATASET --out MODEL_DIR``: train a SID quantizer on Ray."""

from __future__ import annotations

import argparse

from forge_ray.commands import add_common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="canonical dataset folder whose items have embeddings")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run's latest checkpoint (same run_name/storage_path); "
                             "without it an existing run is refused")
    add_common(parser, "model folder to write (MODEL_DIR)", overwrite="replace an existing MODEL_DIR")


def run(args: argparse.Namespace) -> int:
    from forge_ray.config import load_config
    from forge_ray.distributed.session import ray_session
    from forge_ray.distributed.train_quantizer import TrainSidConfig, train_sid

    cfg = load_config(TrainSidConfig, args.config, args.overrides)
    with ray_session(args.address):
        manifest = train_sid(args.data, args.out, cfg, overwrite=args.overwrite,
                             resume=args.resume)
    util = ", ".join(f"{u:.2f}" for u in manifest["utilization"])
    print(f"trained {manifest['quantizer']} {manifest['sizes']} on "
          f"{manifest['dataset_counts']['items']:,} items -> {args.out} "
          f"(utilization per level: {util})")
    if manifest.get("tensorboard"):
        print(f"TensorBoard: {manifest['tensorboard']}")
    return 0
