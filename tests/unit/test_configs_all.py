"""Every YAML shipped in configs/ loads into its stage's config dataclass, and starts
with a comment giving the command that runs it."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from forge_ray.config import load_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(REPO.glob("configs/**/*.yaml"))

# file stem (or folder for sweeps) -> (module, config class, command in the first line)
STAGES = {
    "ingest": ("forge_ray.distributed.ingest", "IngestConfig", "forge-ray ingest"),
    "embed": ("forge_ray.distributed.embed", "EmbedConfig", "forge-ray embed"),
    "train_sid": ("forge_ray.distributed.train_quantizer", "TrainSidConfig", "forge-ray train-sid"),
    "assign": ("forge_ray.distributed.assign", "AssignConfig", "forge-ray assign"),
    "sid_metrics": ("forge_ray.distributed.sid_metrics", "SidMetricsStageConfig", "forge-ray sid-metrics"),
    "train_gr": ("forge_ray.distributed.train_gr", "TrainGRConfig", "forge-ray train-gr"),
    "eval_gr": ("forge_ray.distributed.evaluate", "EvalGRConfig", "forge-ray eval-gr"),
    "pipeline": ("forge_ray.distributed.pipeline", "PipelineConfig", "forge-ray pipeline"),
    "sweep": ("forge_ray.distributed.sweep", "SweepConfig", "forge-ray sweep"),
    "beauty": ("jobs.beauty_benchmark", "BeautyJobConfig", "python -m jobs.beauty_benchmark"),
}


def stage_of(path: Path) -> str:
    if path.parent.name == "sweep":
        return "sweep"
    return "beauty" if path.stem.startswith("beauty_") else path.stem


def test_every_config_has_a_stage():
    assert CONFIGS, "no configs found"
    unknown = [str(p.relative_to(REPO)) for p in CONFIGS if stage_of(p) not in STAGES]
    assert not unknown, f"configs with no stage in this table: {unknown}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_config_loads(path):
    module, cls_name, command = STAGES[stage_of(path)]
    cls = getattr(importlib.import_module(module), cls_name)
    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# {command}"), f"{path.name}: first line must be '# {command} ...'"
    cfg = load_config(cls, path)
    assert isinstance(cfg, cls)
