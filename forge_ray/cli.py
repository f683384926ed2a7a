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
import os
import sys

from forge_ray import __version__
from forge_ray.errors import ForgeRayError

# name -> (module under forge_ray.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("synth", "generate FORGE-shaped synthetic data in FORGE's own formats"),
    "ingest": ("ingest", "turn FORGE npz / AL-GR / Amazon / Parquet / logs into a canonical dataset"),
    "embed": ("embed", "add text embeddings to a dataset's items with a sentence-transformers model"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``command``'s own arguments are registered."""
    parser = argparse.ArgumentParser(
        prog="forge-ray",
        description="Semantic IDs and generative retrieval at FORGE scale, on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"forge-ray {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == command:
            importlib.import_module(f"forge_ray.commands.{module}").add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if not any(a == "--address" or a.startswith("--address=") for a in argv) \
            and not os.environ.get("RAY_ADDRESS"):
        # A cluster we start ourselves stays on loopback: Ray reads this flag at
        # import time and then takes 127.0.0.1 as the node address instead of the
        # machine's public interface (so nothing listens on a public address).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(f"forge_ray.commands.{COMMANDS[args.command][0]}")
    try:
        return int(module.run(args) or 0)
    except ForgeRayError as e:
        print(f"forge-ray {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"forge-ray {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
