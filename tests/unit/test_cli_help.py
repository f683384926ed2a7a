"""Every subcommand's --help shows a real example of its own: the command line parses
with that subcommand's parser, and its KEY=VALUE overrides (with its --config) load into
the subcommand's config class (``ingest`` once rejected the shared ``train.lr=1e-3``)."""

from __future__ import annotations

import shlex

import pytest

from forge_ray import cli
from forge_ray.commands import split_overrides
from forge_ray.config import load_config


def _config_class(name: str):
    from forge_ray.data.synth import SynthConfig
    from forge_ray.distributed.assign import AssignConfig
    from forge_ray.distributed.embed import EmbedConfig
    from forge_ray.distributed.evaluate import EvalGRConfig
    from forge_ray.distributed.ingest import IngestConfig
    from forge_ray.distributed.pipeline import PipelineConfig
    from forge_ray.distributed.serve import ServeConfig
    from forge_ray.distributed.sid_metrics import SidMetricsStageConfig
    from forge_ray.distributed.sweep import SweepConfig
    from forge_ray.distributed.train_gr import TrainGRConfig
    from forge_ray.distributed.train_quantizer import TrainSidConfig

    return {"synth": SynthConfig, "ingest": IngestConfig, "embed": EmbedConfig, "train-sid": TrainSidConfig,
            "assign": AssignConfig, "sid-metrics": SidMetricsStageConfig, "train-gr": TrainGRConfig,
            "eval-gr": EvalGRConfig, "pipeline": PipelineConfig, "sweep": SweepConfig,
            "serve": ServeConfig}.get(name)


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_help_example_is_the_subcommands_own(name, capsys):
    example = cli.EXAMPLES[name]
    tokens = shlex.split(example.split(";")[0])
    assert tokens[:2] == ["forge-ray", name]
    parser = cli.command_parser(name)
    args = parser.parse_intermixed_args(tokens[2:])
    if name == "ingest":
        args.sources, extra = split_overrides(args.sources)
        args.overrides = [*extra, *args.overrides]
    overrides = getattr(args, "overrides", [])
    cls = _config_class(name)
    if cls is not None:
        load_config(cls, getattr(args, "config", None), overrides)  # raises on an unknown key
    assert all(o in parser.format_help() for o in overrides)  # the overrides' help shows them
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    assert f"example: {tokens[0]} {name}" in capsys.readouterr().out
