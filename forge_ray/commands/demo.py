"""``forge-ray demo --out DIR``: the whole pipeline on built-in synthetic data.

Runs ``configs/tiny/pipeline.yaml`` (synth -> ingest -> train-sid -> assign ->
sid-metrics -> train-gr -> eval-gr) on a local Ray cluster and prints the summary
table, then GR's Recall/NDCG@10 next to the most-popular baseline on the same
queries. An existing DIR is continued (finished stages are skipped); ``--overwrite``
starts from scratch, deleting DIR only when it is a previous pipeline run folder
(anything else is refused, untouched).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from forge_ray.commands import add_common

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny" / "pipeline.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--items", type=int, default=None, help="synthetic items (default: config's)")
    parser.add_argument("--dim", type=int, default=None, help="embedding width (default: config's)")
    parser.add_argument("--users", type=int, default=None, help="synthetic users (default: config's)")
    add_common(parser, "RUN_DIR for every stage's output", config=False,
               overwrite="start from scratch (default: continue an existing DIR)")


def run(args: argparse.Namespace) -> int:
    from forge_ray.config import load_config
    from forge_ray.distributed.pipeline import (PipelineConfig, remove_run_dir, run_pipeline,
                                                summary_table)
    from forge_ray.distributed.session import ray_session

    given = {"synth.items": args.items, "synth.dim": args.dim, "synth.users": args.users}
    cfg = load_config(PipelineConfig, CONFIG, [f"{k}={v}" for k, v in given.items() if v is not None])
    out = Path(args.out)
    if args.overwrite:
        remove_run_dir(out)
    with ray_session(args.address):
        results = run_pipeline(out, cfg)
    print(summary_table(results))
    gr = {r.stage: r.metrics for r in results}.get("eval_gr", {})
    if "recall@10" in gr and "popularity recall@10" in gr:
        print(f"GR recall@10 {gr['recall@10']:.4f} vs most-popular {gr['popularity recall@10']:.4f}; "
              f"ndcg@10 {gr['ndcg@10']:.4f} vs {gr['popularity ndcg@10']:.4f}")
    return 0
