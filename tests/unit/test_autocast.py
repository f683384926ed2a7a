"""scale.autocast: train-gr's forward pass in bfloat16, weights and gradients in float32."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from forge_ray.config import ScaleConfig, load_config
from forge_ray.core.gr.models import GRModelConfig, build_model
from forge_ray.core.gr.vocab import SIDVocab
from forge_ray.distributed.train_common import autocast, native_bf16
from forge_ray.distributed.train_quantizer import TrainSidConfig
from forge_ray.errors import ConfigError


def _step(model, ids, mode):
    torch.manual_seed(0)  # the same dropout masks in both precisions
    with autocast(mode):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_bf16_autocast_keeps_the_loss_and_gradients_float32_and_close():
    torch.manual_seed(0)
    vocab = SIDVocab((8, 8, 8))
    model = build_model(GRModelConfig(arch="qwen2", preset="tiny"), vocab).train()
    ids = torch.randint(5, len(vocab), (4, 13))
    loss32, g32 = _step(model, ids, "none")
    loss16, g16 = _step(model, ids, "bf16")
    with autocast("bf16"):
        assert model.model.layers[0].mlp.up_proj(torch.randn(2, 32)).dtype == torch.bfloat16
    with autocast("none"):
        assert model.model.layers[0].mlp.up_proj(torch.randn(2, 32)).dtype == torch.float32
    assert loss16.dtype == torch.float32 and all(g.dtype == torch.float32 for g in g16.values())
    assert float(loss16) != float(loss32)  # bf16 matmuls really ran
    assert float(loss16) == pytest.approx(float(loss32), rel=2e-2)
    for name, g in g32.items():  # same direction: bf16 rounds, it does not change the maths
        cos = torch.nn.functional.cosine_similarity(g.flatten(), g16[name].flatten(), dim=0)
        assert cos > 0.95, name


def test_autocast_setting_is_checked():
    assert ScaleConfig().autocast == "none"
    with pytest.raises(ConfigError, match="autocast"):
        load_config(ScaleConfig, None, ["autocast=fp16"])
    with pytest.raises(ConfigError, match="train-gr setting"):
        load_config(TrainSidConfig, None, ["scale.autocast=bf16"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
def test_native_bf16_matches_the_cpu_flags():
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    if torch.cuda.is_available():
        pytest.skip("a GPU process answers for its GPU")
    assert native_bf16() == bool(flags & {"amx_tile", "avx512_bf16"})
