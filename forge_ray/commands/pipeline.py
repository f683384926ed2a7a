"""``forge-ray pipeline --config FILE --out RUN_DIR [KEY=VALUE...]``: all stages, resumable."""

from __future__ import annotations

import argparse

from forge_ray.commands import add_common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser, "RUN_DIR: one folder per stage plus state.json; an existing RUN_DIR "
                       "is continued (finished, unchanged stages are skipped)", overwrite=None)


def run(args: argparse.Namespace) -> int:
    from forge_ray.config import load_config
    from forge_ray.distributed.pipeline import PipelineConfig, run_pipeline, summary_table
    from forge_ray.distributed.session import ray_session

    cfg = load_config(PipelineConfig, args.config, args.overrides)
    with ray_session(args.address):
        results = run_pipeline(args.out, cfg)
    print(summary_table(results))
    return 0
