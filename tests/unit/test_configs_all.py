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
    "synth": ("forge_ray.data.synth", "SynthConfig", "forge-ray synth"),
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
    "serve": ("ray.serve.schema", "ServeDeploySchema", "Ray Serve config"),  # Serve's own file format
}


def stage_of(path: Path) -> str:
    if path.parent.name in ("sweep", "serve"):
        return path.parent.name
    return "beauty" if path.stem.startswith("beauty_") else path.stem


def test_every_config_has_a_stage():
    assert CONFIGS, "no configs found"
    unknown = [str(p.relative_to(REPO)) for p in CONFIGS if stage_of(p) not in STAGES]
    assert not unknown, f"configs with no stage in this table: {unknown}"


@pytest.mark.parametrize("path", [p for p in CONFIGS if stage_of(p) != "serve"],
                         ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_config_loads(path, monkeypatch):
    monkeypatch.chdir(REPO)  # pipeline sections name their stage YAMLs relative to the repo
    module, cls_name, command = STAGES[stage_of(path)]
    cls = getattr(importlib.import_module(module), cls_name)
    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# {command}"), f"{path.name}: first line must be '# {command} ...'"
    cfg = load_config(cls, path)
    assert isinstance(cfg, cls)


@pytest.mark.parametrize("config_set", ["amazon", "forge"])
def test_pipeline_sections_are_the_stage_files(config_set, monkeypatch):
    """The shipped pipelines reuse their stage YAMLs (``config:``) rather than copy them."""
    from forge_ray.distributed.pipeline import PipelineConfig, stage_class

    monkeypatch.chdir(REPO)
    pipeline = load_config(PipelineConfig, f"configs/{config_set}/pipeline.yaml")
    for stage in ("train_sid", "assign", "train_gr", "eval_gr"):
        _, section = pipeline.section(stage)
        assert section == load_config(stage_class(stage), f"configs/{config_set}/{stage}.yaml")


def test_tiny_pipeline_is_its_stage_files(monkeypatch):
    """The demo's stage YAMLs are exactly what the demo runs: each section of the tiny
    pipeline is ``config: configs/tiny/STAGE.yaml`` (plus the stage's inputs), nothing else."""
    from forge_ray.distributed.pipeline import INPUT_KEYS, STAGES, PipelineConfig, stage_class

    monkeypatch.chdir(REPO)
    pipeline = load_config(PipelineConfig, "configs/tiny/pipeline.yaml")
    ran = [s for s in STAGES if s != "embed"]  # the synthetic items come with embeddings
    for stage in ran:
        raw = getattr(pipeline, stage)
        assert raw["config"] == f"configs/tiny/{stage}.yaml", stage
        assert set(raw) <= {"config", *INPUT_KEYS.get(stage, ())}, (stage, sorted(raw))
        _, section = pipeline.section(stage)
        assert section == load_config(stage_class(stage), f"configs/tiny/{stage}.yaml"), stage


def test_pipeline_section_overrides_its_stage_file(tmp_path, monkeypatch):
    from forge_ray.config import ConfigError
    from forge_ray.distributed.pipeline import PipelineConfig

    monkeypatch.chdir(REPO)
    cfg = load_config(PipelineConfig, None, [
        "ingest.sources=[x]", "train_gr.config=configs/amazon/train_gr.yaml",
        "train_gr.train.max_steps=7"])
    _, gr = cfg.section("train_gr")
    assert gr.train.max_steps == 7 and gr.train.micro_batch == 128 and gr.model.preset == "tiger"
    with pytest.raises(ConfigError, match="no_such.yaml.*config file not found"):
        load_config(PipelineConfig, None, ["ingest.sources=[x]", "assign.config=no_such.yaml"])


@pytest.mark.parametrize("path", [p for p in CONFIGS if stage_of(p) == "serve"], ids=lambda p: p.name)
def test_serve_config_is_a_valid_serve_file_that_builds(path):
    """`serve run FILE` works: Serve's schema accepts it, the proxy stays on loopback and
    the app builder accepts its args (binding loads nothing)."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from forge_ray.distributed.serve import app_builder

    assert path.read_text().startswith("# Ray Serve config")
    schema = ServeDeploySchema.parse_obj(yaml.safe_load(path.read_text()))
    assert schema.http_options.host == "127.0.0.1"
    [app] = schema.applications
    module, _, attr = app.import_path.partition(":")
    assert getattr(importlib.import_module(module), attr) is app_builder
    assert app_builder(app.args) is not None
