"""Argument parsing for each ``forge-ray`` subcommand (thin: it calls the stages)."""

from __future__ import annotations

import argparse
import re

_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def add_common(parser: argparse.ArgumentParser, out: str, *, out_required: bool = True,
               overwrite: str | None = "replace an existing --out", config: bool = True) -> None:
    """Options every Ray stage shares: output folder, cluster address, config and overrides.

    ``out`` and ``overwrite`` are the help texts of ``--out`` and ``--overwrite`` (no
    ``--overwrite`` option when it is ``None``: the command continues an existing folder).
    """
    parser.add_argument("--out", required=out_required, default=None, help=out)
    if overwrite is not None:
        parser.add_argument("--overwrite", action="store_true", help=overwrite)
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (default: RAY_ADDRESS, else a local cluster)")
    if config:
        parser.add_argument("--config", default=None, help="stage YAML config")
        parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                            help="config overrides")  # its example: forge_ray.cli.EXAMPLES


def stage_config(cls, args: argparse.Namespace, **flags):
    """The stage's typed config: ``--config`` YAML, then KEY=VALUE overrides, then flags.

    Flags left at ``None`` (not given) do not override the file, so a YAML value
    wins over an argparse default.
    """
    from forge_ray.config import load_config

    given = [f"{key}={value}" for key, value in flags.items() if value is not None]
    return load_config(cls, args.config, [*args.overrides, *given])


def split_overrides(values: list[str]) -> tuple[list[str], list[str]]:
    """Separate ``KEY=VALUE`` overrides from other positional values (e.g. input paths).

    argparse cannot split two variadic positionals, so a command taking several
    paths gets them mixed; anything that looks like ``name=...`` is an override.
    """
    overrides = [v for v in values if _OVERRIDE.match(v)]
    return [v for v in values if not _OVERRIDE.match(v)], overrides
