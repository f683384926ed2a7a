"""``forge-ray embed --data DATASET [--out DATASET2]``: text embeddings for a dataset's items, on Ray."""

from __future__ import annotations

import argparse

from forge_ray.commands import add_common, stage_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from forge_ray.distributed.embed import DEFAULT_MODEL

    parser.add_argument("--data", required=True, help="dataset folder whose items have a text column")
    parser.add_argument("--model", default=None,
                        help="sentence-transformers model folder or installed package bundling "
                             f"one (default: {DEFAULT_MODEL})")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="sentences per forward pass (default 64)")
    parser.add_argument("--actors", type=int, default=None, help="model replicas (default 1)")
    add_common(parser, "write a new dataset here (default: replace --data atomically)",
               out_required=False)


def run(args: argparse.Namespace) -> int:
    from forge_ray.distributed.embed import EmbedConfig, embed
    from forge_ray.distributed.session import ray_session

    cfg = stage_config(EmbedConfig, args, model=args.model, batch_size=args.batch_size,
                       actors=args.actors)
    with ray_session(args.address):
        manifest = embed(args.data, args.out, cfg, overwrite=args.overwrite)
    print(f"embedded {manifest['counts']['items']:,} items with {manifest['embedding_model']} "
          f"({manifest['embedding_dim']}-d {manifest['embedding_dtype']}) -> "
          f"{args.out or args.data}")
    return 0
