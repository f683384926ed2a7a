"""GR model presets, save/load round trip and starting from local pretrained weights."""

import pytest
import torch

from forge_ray.config import load_config
from forge_ray.core.gr.models import GRModelConfig, build_model, count_parameters, load_model, save_model
from forge_ray.core.gr.vocab import SIDVocab
from forge_ray.errors import ConfigError, InputError

FORGE_VOCAB = SIDVocab((8192, 8192, 8192))


def test_paper_presets_have_the_published_sizes_without_allocating():
    # Qwen2.5-0.5B has 494,032,768 parameters with its 151,936-token vocabulary (tied
    # embeddings); only the embedding rows change with the SID vocabulary.
    qwen = count_parameters(GRModelConfig(arch="qwen2", preset="qwen2.5-0.5b"), FORGE_VOCAB)
    assert qwen == 494_032_768 - (151_936 - len(FORGE_VOCAB)) * 896
    # t5-base: 222,903,552 parameters with 32,128 tokens (tied)
    t5 = count_parameters(GRModelConfig(arch="t5", preset="t5-base"), FORGE_VOCAB)
    assert t5 == 222_903_552 - (32_128 - len(FORGE_VOCAB)) * 768


def test_config_validation():
    with pytest.raises(ConfigError, match="not defined for arch"):
        load_config(GRModelConfig, None, ["arch=qwen2", "preset=tiger"])
    cfg = load_config(GRModelConfig, None, ["preset=tiger", "overrides={num_layers: 2}"])
    model = build_model(cfg, SIDVocab((16, 16, 16)))
    assert model.config.num_layers == 2 and model.config.num_decoder_layers == 4
    assert model.config.d_model == 128 and model.config.num_heads == 6


@pytest.mark.parametrize("arch", ["t5", "qwen2", "gpt2"])
def test_save_load_round_trip_and_loss(tmp_path, arch):
    vocab = SIDVocab((8, 8, 8))
    torch.manual_seed(0)
    model = build_model(GRModelConfig(arch=arch, preset="tiny"), vocab).eval()
    assert model.get_input_embeddings().num_embeddings == len(vocab)
    save_model(model, vocab, tmp_path / "m")
    loaded, vocab2 = load_model(tmp_path / "m")
    assert vocab2 == vocab and type(loaded) is type(model)
    x = torch.tensor([[5, 14, 22, 1]])
    kw = {"decoder_input_ids": torch.tensor([[2, 6]])} if arch == "t5" else {}
    torch.testing.assert_close(loaded.eval()(input_ids=x, **kw).logits, model(input_ids=x, **kw).logits)
    with pytest.raises(InputError, match="no config.json"):
        load_model(tmp_path / "missing")


def test_pretrained_path_is_resized_to_the_sid_vocabulary(tmp_path):
    small = SIDVocab((4, 4, 4))
    torch.manual_seed(0)
    base = build_model(GRModelConfig(arch="t5", preset="tiny"), small)
    base.save_pretrained(tmp_path / "base")
    big = SIDVocab((16, 16, 16))
    model = build_model(GRModelConfig(arch="t5", preset="tiny", pretrained_path=str(tmp_path / "base")), big)
    assert model.get_input_embeddings().num_embeddings == len(big)
    assert model.config.decoder_start_token_id == big.bos_id
    # the pretrained rows are kept
    torch.testing.assert_close(model.get_input_embeddings().weight[: len(small)],
                               base.get_input_embeddings().weight)
    with pytest.raises(InputError, match="no config.json"):
        build_model(GRModelConfig(pretrained_path=str(tmp_path / "nope")), big)
