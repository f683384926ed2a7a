"""``forge-ray ingest SRC... --out DATASET``: build a canonical dataset on Ray."""

from __future__ import annotations

import argparse

from forge_ray.commands import add_common, split_overrides, stage_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="+", metavar="SRC",
                        help="input files or folders (FORGE npz, AL-GR tsv, Amazon folder, "
                             "Parquet, interaction logs); the format is detected")
    parser.add_argument("--strict", action="store_true", default=None,
                        help="refuse instead of dropping and counting bad rows")
    parser.add_argument("--chunk-rows", type=int, default=None,
                        help="rows per read task (bounds each worker's memory; default 65536)")
    parser.add_argument("--buckets", type=int, default=None,
                        help="hash buckets for the duplicate / unknown-item checks "
                             "(default: one per 2M rows)")
    add_common(parser, "dataset folder to create")


def run(args: argparse.Namespace) -> int:
    from forge_ray.distributed.ingest import IngestConfig, ingest, summary
    from forge_ray.distributed.session import ray_session

    args.sources, extra = split_overrides(args.sources)
    args.overrides = [*extra, *args.overrides]
    config = stage_config(IngestConfig, args, strict=args.strict, chunk_rows=args.chunk_rows,
                          buckets=args.buckets)
    with ray_session(args.address):
        manifest = ingest(args.sources, args.out, config, overwrite=args.overwrite)
    print(summary(manifest))
    print(f"wrote {args.out}")
    return 0
