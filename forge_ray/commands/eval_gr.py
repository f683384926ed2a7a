"""``forge-ray eval-gr``: Recall/NDCG/HR@K of a trained GR model with constrained beam search."""

from __future__ import annotations

import argparse

from forge_ray.commands import add_common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, nargs="+",
                        help="MODEL_DIR from `forge-ray train-gr`; several: decoded as one ensemble "
                             "(the same config trained with other seeds on the same SIDs)")
    parser.add_argument("--data", default=None,
                        help="canonical dataset folder (sequences table) or an AL-GR test TSV "
                             "(answers: ';'-separated true item ids); default: the model's training data")
    parser.add_argument("--sids", default=None, help="SIDS_DIR (default: the table the model was trained on)")
    add_common(parser, "folder for metrics.json")


def run(args: argparse.Namespace) -> int:
    from forge_ray.config import load_config
    from forge_ray.distributed.evaluate import EvalGRConfig, evaluate
    from forge_ray.distributed.session import ray_session

    cfg = load_config(EvalGRConfig, args.config, args.overrides)
    with ray_session(args.address):
        m = evaluate(args.model, args.out, cfg, data=args.data, sids=args.sids, overwrite=args.overwrite)
    shown = {k: round(v, 4) for k, v in m.items() if "@" in k}
    print(f"{m['num_queries']:,} queries, invalid_rate {m['invalid_rate']:.4f}: {shown}")
    if "popularity" in m:
        print(f"popularity baseline: { {k: round(v, 4) for k, v in m['popularity'].items()} }")
    elif "popularity_skipped" in m:
        print(f"popularity baseline skipped: {m['popularity_skipped']}")
    for name, row in m.get("content_knn", {}).items():
        print(f"content kNN ({name.replace('_', ' ')}): { {k: round(v, 4) for k, v in row.items()} }")
    if "content_knn_skipped" in m:
        print(f"content kNN baseline skipped: {m['content_knn_skipped']}")
    print(f"-> {args.out}/metrics.json")
    return 0
