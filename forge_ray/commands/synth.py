"""``forge-ray synth --out DIR``: FORGE-shaped synthetic data in FORGE's own formats.

Runs in process (no Ray): ``forge-ray synth --out data/synth --items 100000 --dim 64
--users 10000 --seed 0``. Any other generator parameter is a ``KEY=VALUE`` override
(``forge-ray synth --out DIR branching=[16,16,8] zipf_alpha=1.2 --items ...``) or comes
from ``--config synth.yaml``.
"""

from __future__ import annotations

import argparse

from forge_ray import logs
from forge_ray.commands import stage_config
from forge_ray.data.synth import SynthConfig, synth


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (created atomically)")
    parser.add_argument("--items", type=int, default=None, help="number of items")
    parser.add_argument("--dim", type=int, default=None, help="embedding width")
    parser.add_argument("--users", type=int, default=None, help="number of users (sequences)")
    parser.add_argument("--seed", type=int, default=None, help="random seed")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--config", default=None, help="YAML with SynthConfig fields")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="SynthConfig overrides")


def run(args: argparse.Namespace) -> int:
    cfg = stage_config(SynthConfig, args, items=args.items, dim=args.dim, users=args.users,
                       seed=args.seed)
    counts = synth(args.out, cfg, overwrite=args.overwrite,
                   progress=not args.no_progress and logs.bars())["counts"]
    print(f"wrote {args.out}: {counts['items']} items, {counts['pairs']} pairs, "
          f"{counts['users']} users, {counts['interactions']} interactions")
    return 0
