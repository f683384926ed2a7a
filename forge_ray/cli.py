"""The ``forge-ray`` command: one subcommand per pipeline stage.

Each subcommand lives in ``forge_ray.commands.<module>`` and provides
``add_arguments(parser)`` and ``run(args) -> int``. Only the chosen subcommand's
module is imported, so ``forge-ray --help`` stays fast and a stage's heavy imports
(Ray, torch, DeepSpeed) are paid only by that stage. User errors
(:class:`~forge_ray.errors.ForgeRayError`) print as one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from forge_ray import __version__, logs, ray_env
from forge_ray.errors import ForgeRayError

# name -> (module under forge_ray.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("synth", "generate FORGE-shaped synthetic data in FORGE's own formats"),
    "ingest": ("ingest", "turn FORGE npz / AL-GR / Amazon / Parquet / logs into a canonical dataset"),
    "embed": ("embed", "add text embeddings to a dataset's items with a sentence-transformers model"),
    "train-sid": ("train_sid", "train an RQ-VAE / RQ-KMeans SID quantizer (Ray Train + DeepSpeed)"),
    "assign": ("assign", "assign one SID per item with a trained quantizer + collision handling (Ray Data)"),
    "sid-metrics": ("sid_metrics", "SID quality: collisions, Gini, utilization, reconstruction, Embedding HitRate"),
    "train-gr": ("train_gr", "train a generative-retrieval model on SID sequences (Ray Train + DeepSpeed)"),
    "eval-gr": ("eval_gr", "Recall/NDCG/HR@K of a GR model with constrained beam search in Ray actors"),
    "pipeline": ("pipeline", "every stage from one config in one Ray session; skips finished stages"),
    "sweep": ("sweep", "Ray Tune over codebook settings: SID metrics vs GR quality, Spearman report"),
    "recommend": ("recommend", "top-k items for histories of item keys from a trained GR model"),
    "serve": ("serve", "serve a GR model on Ray Serve: HTTP POST /recommend with request batching"),
    "add-items": ("add_items", "SIDs for new items consistent with an existing SID table (cold start)"),
    "demo": ("demo", "synthesise a small FORGE-shaped dataset and run the pipeline on it"),
}


# name -> a real command line of its own, shown by its --help (tests/unit/test_cli_help.py
# parses each one and loads its KEY=VALUE overrides into the subcommand's config).
# Stage folders are inputs by name (--data, --model, --sids), the output is always --out.
EXAMPLES: dict[str, str] = {
    "synth": "forge-ray synth --out data/synth --items 10000 --dim 32 --users 2000 branching=[16,16,8]",
    "ingest": "forge-ray ingest data/synth/contrastive_data_mask.npz data/synth/reconstruct_data_mask.npz "
              "data/synth/interactions --out runs/tiny/ingest chunk_rows=32768",
    "embed": "forge-ray embed --data runs/beauty/ingest --out runs/beauty/embedded batch_size=128 actors=2",
    "train-sid": "forge-ray train-sid --data runs/tiny/ingest --out runs/tiny/train_sid "
                 "--config configs/tiny/train_sid.yaml rq_kmeans.niter=20",
    "assign": "forge-ray assign --model runs/tiny/train_sid --data runs/tiny/ingest --out runs/tiny/assign "
              "--config configs/tiny/assign.yaml collisions.strategy=cap collisions.cap=4",
    "sid-metrics": "forge-ray sid-metrics --sids runs/tiny/assign --data runs/tiny/ingest "
                   "--out runs/tiny/sid_metrics hitrate.topk=10",
    "train-gr": "forge-ray train-gr --data runs/tiny/ingest --sids runs/tiny/assign --out runs/tiny/train_gr "
                "--config configs/tiny/train_gr.yaml train.lr=1e-3",
    "eval-gr": "forge-ray eval-gr --model runs/tiny/train_gr --data runs/tiny/ingest --sids runs/tiny/assign "
               "--out runs/tiny/eval_gr num_beams=10",
    "pipeline": "forge-ray pipeline --config configs/tiny/pipeline.yaml --out runs/tiny until=sid_metrics",
    "sweep": "forge-ray sweep --config configs/sweep/tiny.yaml --data runs/tiny/ingest --out runs/sweep "
             "max_concurrent=1",
    "recommend": "forge-ray recommend --model demo_out/train_gr --history 1092077691150 598180243684 -k 5",
    "serve": 'forge-ray serve --model demo_out/train_gr --port 8000 replicas=2; then '
             'curl -d \'{"history": ["1092077691150"], "k": 5}\' http://127.0.0.1:8000/recommend',
    "add-items": "forge-ray add-items --sids demo_out/assign --data new_items_dataset --out demo_out/assign_v2",
    "demo": "forge-ray demo --out demo_out --items 2000",
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: lists the subcommands (their own options are per command)."""
    parser = argparse.ArgumentParser(
        prog="forge-ray",
        description="Semantic IDs and generative retrieval at FORGE scale, on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"forge-ray {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of one subcommand, with its module's own arguments and its example
    (:data:`EXAMPLES`: the epilog, and its KEY=VALUE overrides in the overrides' help)."""
    parser = argparse.ArgumentParser(prog=f"forge-ray {name}", description=COMMANDS[name][1],
                                     epilog=f"example: {EXAMPLES[name]}")
    importlib.import_module(f"forge_ray.commands.{COMMANDS[name][0]}").add_arguments(parser)
    logs.add_arguments(parser)  # -v / -q on every subcommand
    overrides = [t for t in EXAMPLES[name].split(";")[0].split() if "=" in t and not t.startswith("-")]
    for action in parser._actions:
        if action.dest == "overrides" and overrides:
            action.help = f"config overrides, e.g. {' '.join(overrides)}"
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        build_parser().parse_args(argv)  # handles --help/--version and unknown commands
        build_parser().print_help()
        return 2
    name, rest = argv[0], argv[1:]
    if any(a == "--address" or a.startswith("--address=") for a in rest):
        ray_env.joining_a_cluster()  # a cluster we start ourselves stays on loopback; this one is not ours
    # Intermixed: KEY=VALUE overrides may come before or after the options.
    args = command_parser(name).parse_intermixed_args(rest)
    args.command = name
    logs.setup(args.verbosity)  # before the stage starts Ray
    module = importlib.import_module(f"forge_ray.commands.{COMMANDS[name][0]}")
    try:
        return int(module.run(args) or 0)
    except ForgeRayError as e:
        print(f"forge-ray {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        # a stage that knows where it stopped says so ("at step N; rerun ... to resume ...")
        where = f" {e}" if str(e) else ""
        print(f"forge-ray {name}: interrupted{where}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
