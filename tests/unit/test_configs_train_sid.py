"""Every shipped train_sid config loads, validates and names its command."""

from __future__ import annotations

from pathlib import Path

import pytest

from forge_ray.config import load_config
from forge_ray.errors import ConfigError
from forge_ray.distributed.train_quantizer import TrainSidConfig

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(REPO.glob("configs/*/train_sid.yaml"))


def test_all_three_ship():
    assert {p.parent.name for p in CONFIGS} >= {"tiny", "forge", "amazon"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.parent.name)
def test_config_loads(path):
    cfg = load_config(TrainSidConfig, path)
    assert path.read_text().startswith("# forge-ray train-sid ")
    assert len(cfg.sizes) == 3
    if path.parent.name == "forge":
        assert cfg.rqvae.sizes == [8192] * 3 and cfg.rqvae.in_dim == 512
        assert (cfg.train.batch_size, cfg.train.lr, cfg.epochs, cfg.warmup_epochs) == (2048, 2e-3, 150, 40)
        assert cfg.scale.use_gpu and cfg.scale.deepspeed_config == "zero2.json"


def test_validation_is_one_line():
    with pytest.raises(ConfigError, match="warmup_epochs must not exceed epochs"):
        load_config(TrainSidConfig, None, ["epochs=2", "warmup_epochs=3"])
    with pytest.raises(ConfigError, match="quantizer"):
        load_config(TrainSidConfig, None, ["quantizer=pq"])
    cfg = load_config(TrainSidConfig, None, ["quantizer=rq_kmeans_balanced"])
    assert cfg.rq_kmeans.balanced
