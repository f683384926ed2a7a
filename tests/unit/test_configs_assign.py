"""Every shipped assign / sid_metrics config loads, validates and names its command."""

from __future__ import annotations

from pathlib import Path

import pytest

from forge_ray.config import load_config
from forge_ray.distributed.assign import AssignConfig
from forge_ray.distributed.sid_metrics import SidMetricsStageConfig
from forge_ray.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("scale", ["tiny", "forge", "amazon"])
@pytest.mark.parametrize("stage,cls,command", [("assign", AssignConfig, "forge-ray assign"),
                                               ("sid_metrics", SidMetricsStageConfig,
                                                "forge-ray sid-metrics")])
def test_shipped_configs_load(scale, stage, cls, command):
    path = CONFIGS / scale / f"{stage}.yaml"
    assert path.read_text().splitlines()[0].startswith(f"# {command}")
    cfg = load_config(cls, path)
    assert cfg.pool.actors >= 1


def test_bad_values_are_one_line_errors():
    with pytest.raises(ConfigError, match="strategy"):
        load_config(AssignConfig, None, ["collisions.strategy=magic"])
    with pytest.raises(ConfigError, match="pool.actors"):
        load_config(AssignConfig, None, ["pool.actors=0"])
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(SidMetricsStageConfig, None, ["hitrate.top_k=3"])
