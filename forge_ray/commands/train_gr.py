"""``forge-ray train-gr``: train a generative-retrieval model on SID sequences (Ray Train + DeepSpeed)."""

from __future__ import annotations

import argparse

from forge_ray.commands import add_common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True,
                        help="canonical dataset folder (sequences table) or an AL-GR training TSV")
    parser.add_argument("--sids", default=None,
                        help="SIDS_DIR from `forge-ray assign` (required for a dataset folder)")
    add_common(parser, "MODEL_DIR to write")


def run(args: argparse.Namespace) -> int:
    from forge_ray.config import load_config
    from forge_ray.distributed.session import ray_session
    from forge_ray.distributed.train_gr import TrainGRConfig, train_gr

    cfg = load_config(TrainGRConfig, args.config, args.overrides)
    with ray_session(args.address):
        manifest = train_gr(args.data, args.sids, args.out, cfg, overwrite=args.overwrite)
    print(f"trained {manifest['arch']} for {manifest['steps']} steps on "
          f"{manifest['counts']['examples']:,} examples; best {manifest['best']} -> {args.out}")
    return 0
