"""``forge-ray recommend --model GR_DIR --history ITEM ... -k 10``: top-k items for histories.

Histories are item keys as the source names them (ASINs, FORGE item ids; the item id
for data without keys), oldest first: one with ``--history``, or one per line of
``--input FILE`` (keys separated by spaces; ``-`` reads standard input). Output: one
JSON line per history, ``{"history": N, "items": [...], "keys": [...], "scores": [...],
"unknown": [...]}``; unknown keys are skipped and reported on stderr.

Example: ``forge-ray recommend --model demo_out/train_gr --history 1092077691150 598180243684 -k 5``
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0].split(": ", 1)[1]
    parser.epilog = "example: forge-ray recommend --model demo_out/train_gr --history 1092077691150 598180243684 -k 5"
    parser.add_argument("--model", required=True, nargs="+",
                        help="GR_DIR from `forge-ray train-gr`; several: one ensemble (as eval-gr)")
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--history", nargs="+", metavar="ITEM", help="one history: item keys, oldest first")
    given.add_argument("--input", metavar="FILE", help="histories, one per line (keys separated by spaces); - = stdin")
    parser.add_argument("-k", type=int, default=10, help="items per history (default 10)")
    parser.add_argument("--sids", default=None,
                        help="SIDS_DIR to answer from (default: the table in the model's manifest; "
                             "e.g. a newer version from `forge-ray add-items`)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--batch-size", type=int, default=64, help="histories per beam search")


def _histories(args: argparse.Namespace) -> tuple[list[list[str]], list[str]]:
    """(histories, where each came from) from --history or --input."""
    from forge_ray.errors import InputError

    if args.history:
        return [args.history], ["--history"]
    name = "<stdin>" if args.input == "-" else args.input
    try:
        lines = sys.stdin.read().splitlines() if args.input == "-" else open(args.input, encoding="utf-8").read().splitlines()
    except FileNotFoundError:
        raise InputError(name, "file not found") from None
    except UnicodeDecodeError:
        raise InputError(name, "not a UTF-8 text file (expected item keys separated by spaces)") from None
    rows = [(line.split(), f"{name} line {i + 1}") for i, line in enumerate(lines) if line.strip()]
    if not rows:
        raise InputError(name, "no histories (expected one line of item keys per history)")
    return [r for r, _ in rows], [s for _, s in rows]


def run(args: argparse.Namespace) -> int:
    from forge_ray.errors import ConfigError
    from forge_ray.serving.recommender import Recommender

    if args.k < 1 or args.batch_size < 1:
        raise ConfigError("-k/--batch-size", "must be >= 1")
    histories, sources = _histories(args)
    rec = Recommender.from_dir(args.model, sids=args.sids, device=args.device, batch_size=args.batch_size)
    for n, (r, src) in enumerate(zip(rec.recommend(histories, args.k, sources), sources)):
        if r.unknown:
            print(f"forge-ray recommend: {src}: skipped {len(r.unknown)} unknown item(s): "
                  f"{' '.join(r.unknown[:5])}{' ...' if len(r.unknown) > 5 else ''}", file=sys.stderr)
        print(json.dumps({"history": n, **r.to_dict()}))
    return 0
