"""``forge-ray sweep --config configs/sweep/tiny.yaml --data DATASET --out DIR``: Ray Tune
over codebook settings, SID metrics per trial, GR on the best, Spearman report."""

from __future__ import annotations

import argparse

from forge_ray.commands import add_common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, help="canonical dataset with item embeddings "
                                                     "(default: the config's data:)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted sweep in --out (ended trials are kept, not rerun)")
    add_common(parser, "sweep folder (results, report, Tune experiment)", overwrite=None)


def run(args: argparse.Namespace) -> int:
    from forge_ray.commands import stage_config
    from forge_ray.distributed.session import ray_session
    from forge_ray.distributed.sweep import SweepConfig, sweep

    cfg = stage_config(SweepConfig, args, data=args.data)
    with ray_session(args.address):
        report = sweep(None, args.out, cfg, resume=args.resume)
    print(f"{report['trials']} trials: {report['finished']} finished, {report['stopped_early']} stopped "
          f"early, {len(report['failed'])} failed -> {args.out}/report.md")
    for metric, rho in report["spearman"].items():
        print(f"  Spearman({metric}, {report['gr_target']}) = {'n/a' if rho is None else f'{rho:+.3f}'}")
    return 0
