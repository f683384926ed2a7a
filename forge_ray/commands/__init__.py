"""Argument parsing for each ``forge-ray`` subcommand (thin: it calls the stages)."""

from __future__ import annotations

import argparse


def add_common(parser: argparse.ArgumentParser, config: bool = True) -> None:
    """Options every Ray stage shares: cluster address, config file and overrides."""
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (default: RAY_ADDRESS, else a local cluster)")
    if config:
        parser.add_argument("--config", default=None, help="stage YAML config")
        parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                            help="config overrides, e.g. train.lr=1e-3")
