"""``forge-ray demo --out DIR``: the pipeline end to end on small synthetic data.

Today: synthesise FORGE-shaped raw files (npz + interaction logs) into ``DIR/raw``,
ingest them on Ray into ``DIR/dataset`` and print the dataset summary. Later stages
(quantizer training, SID assignment, GR training, evaluation) append their steps here.
Each step's output is written atomically; ``--overwrite`` replaces earlier outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from forge_ray.commands import add_common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder for every step's output")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing demo")
    parser.add_argument("--items", type=int, default=20_000, help="synthetic items")
    parser.add_argument("--dim", type=int, default=64, help="embedding width")
    parser.add_argument("--users", type=int, default=2_000, help="synthetic users")
    add_common(parser, config=False)


def run(args: argparse.Namespace) -> int:
    from forge_ray.config import from_dict
    from forge_ray.data import synth
    from forge_ray.distributed.ingest import IngestConfig, ingest, summary
    from forge_ray.distributed.session import ray_session
    from forge_ray.errors import InputError
    from forge_ray.io import atomic_dir, write_manifest

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise InputError(out, "output already exists (pass --overwrite to replace it)")
    cfg = from_dict(synth.SynthConfig, {"items": args.items, "dim": args.dim,
                                        "users": args.users}, "command line")
    print(f"[1/2] synthesising {cfg.items:,} items x {cfg.dim}-d, {cfg.users:,} users "
          f"-> {out / 'raw'}")
    with atomic_dir(out / "raw", overwrite=True) as tmp:
        counts = synth.generate(cfg, tmp)
        write_manifest(tmp, "synthetic", generator="forge_ray.data.synth",
                       config=dataclasses.asdict(cfg), counts=counts)
    raw = out / "raw"
    srcs = [str(raw / synth.CONTRASTIVE_FILE), str(raw / synth.RECONSTRUCT_FILE),
            str(raw / synth.INTERACTIONS_DIR)]
    print(f"[2/2] ingesting on Ray -> {out / 'dataset'}")
    with ray_session(args.address):
        manifest = ingest(srcs, out / "dataset", IngestConfig(), overwrite=True)
    print(summary(manifest))
    return 0
