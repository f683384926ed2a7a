"""Every shipped `ray up` YAML, runtime env and DeepSpeed JSON is valid and safe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
CLUSTER_YAMLS = sorted(p for p in CLUSTER.glob("*.yaml") if p.name != "runtime_env.yaml")


def validate_against_ray_schema(config: dict) -> None:
    """Ray's own cluster-config JSON schema (what `ray up` validates against)."""
    import jsonschema
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(config, json.loads(schema_path.read_text()))


def test_there_are_aws_and_gcp_configs():
    providers = {yaml.safe_load(p.read_text())["provider"]["type"] for p in CLUSTER_YAMLS}
    assert {"aws", "gcp"} <= providers


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_cluster_yaml_matches_rays_schema(path):
    config = yaml.safe_load(path.read_text())
    validate_against_ray_schema(config)  # raises on any schema violation
    assert config["head_node_type"] in config["available_node_types"]
    assert any("gpu" in name for name in config["available_node_types"])


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_dashboard_and_job_server_stay_on_loopback(path):
    config = yaml.safe_load(path.read_text())
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in path.read_text()


def test_broken_cluster_yaml_is_rejected():
    import jsonschema

    config = yaml.safe_load(CLUSTER_YAMLS[0].read_text())
    config["available_node_types"]["head"]["min_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        validate_against_ray_schema(config)


def test_runtime_env_is_valid():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # Ray's own validation
    assert ".venv" in env["excludes"]


@pytest.mark.parametrize("path", sorted((CLUSTER / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_deepspeed_configs_fill_in(path):

    from forge_ray.distributed.train_common import deepspeed_config

    for use_gpu in (False, True):
        cfg = deepspeed_config(path.name, micro_batch=4, grad_accum=2, world_size=2,
                               lr=2e-3, weight_decay=0.01, use_gpu=use_gpu)
        assert cfg["train_batch_size"] == 16
        assert cfg["optimizer"]["params"]["lr"] == 2e-3
        assert cfg["optimizer"]["params"].get("torch_adam") is True
        assert ("bf16" in cfg) == (use_gpu and "bf16" in json.loads(path.read_text()))
