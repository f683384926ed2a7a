"""Every shipped train_gr / eval_gr config loads and validates; bad values are one-line errors."""

from pathlib import Path

import pytest

from forge_ray.config import load_config
from forge_ray.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted(REPO.glob("configs/*/train_gr.yaml")), ids=lambda p: p.parent.name)
def test_train_gr_configs_load(path):
    from forge_ray.distributed.train_gr import TrainGRConfig

    assert path.read_text().startswith("# forge-ray train-gr ")
    cfg = load_config(TrainGRConfig, path)
    assert cfg.train.micro_batch >= 1 and cfg.scale.num_workers >= 1


@pytest.mark.parametrize("path", sorted(REPO.glob("configs/*/eval_gr.yaml")), ids=lambda p: p.parent.name)
def test_eval_gr_configs_load(path):
    from forge_ray.distributed.evaluate import EvalGRConfig

    assert path.read_text().startswith("# forge-ray eval-gr ")
    cfg = load_config(EvalGRConfig, path)
    assert cfg.accumulator().max_k >= 5


def test_shipped_configs_exist():
    assert {p.parent.name for p in REPO.glob("configs/*/train_gr.yaml")} >= {"tiny", "amazon", "forge"}
    assert {p.parent.name for p in REPO.glob("configs/*/eval_gr.yaml")} >= {"tiny", "amazon", "forge"}


@pytest.mark.parametrize("override, message", [
    ("train.early_stop_metric=recall@50", "early_stop_metric"),
    ("train.micro_batch=0", "micro_batch"),
    ("data.min_history=30", "min_history"),
    ("model.preset=qwen2.5-0.5b", "not defined for arch"),
    ("train.valid_beams=0", "needs train.valid_beams"),
])
def test_bad_train_values(override, message):
    from forge_ray.distributed.train_gr import TrainGRConfig

    with pytest.raises(ConfigError, match=message):
        load_config(TrainGRConfig, REPO / "configs/ci/train_gr.yaml", [override])


def test_bad_eval_values():
    from forge_ray.distributed.evaluate import EvalGRConfig

    with pytest.raises(ConfigError, match="cpus_per_actor"):
        load_config(EvalGRConfig, REPO / "configs/ci/eval_gr.yaml", ["cpus_per_actor=0"])
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(EvalGRConfig, REPO / "configs/ci/eval_gr.yaml", ["beams=3"])
