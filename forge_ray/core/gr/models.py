"""GR model builders: T5 encoder-decoder, Qwen2 and GPT-2 decoder-only over a SID vocabulary.

Models are built from config (no downloads). Presets:

============  ======  ==========================================================
preset        arch    dims
============  ======  ==========================================================
tiny          all     d 32, 1+1 (T5) / 2 (Qwen2, GPT-2) layers: CI only
tiger         t5      TIGER: 4+4 layers, d_model 128, d_ff 1024, 6 heads x d_kv 64
small         qwen2   SASRec/RPG-sized causal decoder: hidden 128, 2 layers, 4 heads, ff 512
small         gpt2    the same size with SASRec's regularisers: dropout 0.3 on the
                      embeddings, every residual branch and attention; tied embeddings
t5-base       t5      FORGE: 12+12 layers, d_model 768, d_ff 3072, 12 heads x 64
qwen2.5-0.5b  qwen2   FORGE: hidden 896, 24 layers, 14 heads (2 KV), ff 4864
============  ======  ==========================================================

``pretrained_path`` loads local HF weights of the same architecture instead and
resizes the token embeddings to the SID vocabulary (the FORGE recipe fine-tunes
T5-base / Qwen2.5-0.5B this way). A saved model folder holds the HF files plus the
vocabulary (``sid_vocab.json`` and tokenizer files).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from transformers import (GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM, T5Config,
                          T5ForConditionalGeneration)

from forge_ray.config import require
from forge_ray.core.gr.constraint import sid_generation_config
from forge_ray.core.gr.vocab import SIDVocab
from forge_ray.errors import InputError

Arch = Literal["t5", "qwen2", "gpt2"]
# HF model class per arch; a saved folder's arch is its config's model_type
_CLASSES = {"t5": T5ForConditionalGeneration, "qwen2": Qwen2ForCausalLM, "gpt2": GPT2LMHeadModel}
MODEL_KIND = "gr_model"  # manifest kind of a saved GR model folder (train-gr's output)

PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    ("t5", "tiny"): dict(d_model=32, d_ff=64, num_layers=1, num_decoder_layers=1,
                         num_heads=2, d_kv=16),
    ("t5", "tiger"): dict(d_model=128, d_ff=1024, num_layers=4, num_decoder_layers=4,
                          num_heads=6, d_kv=64, dropout_rate=0.1),
    ("t5", "t5-base"): dict(d_model=768, d_ff=3072, num_layers=12, num_decoder_layers=12,
                            num_heads=12, d_kv=64, dropout_rate=0.1),
    ("qwen2", "tiny"): dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1,
                            max_position_embeddings=1024),
    ("qwen2", "small"): dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, attention_dropout=0.1,
                             max_position_embeddings=1024),
    ("gpt2", "tiny"): dict(n_embd=32, n_inner=64, n_layer=2, n_head=2, n_positions=1024),
    ("gpt2", "small"): dict(n_embd=128, n_inner=512, n_layer=2, n_head=4, n_positions=1024,
                            embd_pdrop=0.3, resid_pdrop=0.3, attn_pdrop=0.3),
    ("qwen2", "qwen2.5-0.5b"): dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
        rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
}


@dataclass
class GRModelConfig:
    """Which GR model to build.

    arch: ``t5`` (encoder-decoder), ``qwen2`` or ``gpt2`` (decoder-only).
    preset: a row of the table above valid for ``arch``.
    overrides: HF config fields replacing the preset's (e.g. ``{"num_layers": 2}``).
    pretrained_path: local HF model folder to start from (resized to the SID vocab).
    """

    arch: Arch = "t5"
    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    pretrained_path: str | None = None

    def __post_init__(self) -> None:
        valid = sorted(p for a, p in PRESETS if a == self.arch)
        require((self.arch, self.preset) in PRESETS,
                f"preset {self.preset!r} is not defined for arch {self.arch!r}; choose one of {valid}")


def hf_config(cfg: GRModelConfig, vocab: SIDVocab) -> T5Config | Qwen2Config:
    """The HF config of ``cfg`` with the SID vocabulary's size and special ids."""
    kw = {**PRESETS[(cfg.arch, cfg.preset)], **cfg.overrides,
          "vocab_size": len(vocab), "pad_token_id": vocab.pad_id, "eos_token_id": vocab.eos_id}
    if cfg.arch == "t5":
        return T5Config(decoder_start_token_id=vocab.bos_id, **kw)
    if cfg.arch == "gpt2":
        return GPT2Config(bos_token_id=vocab.bos_id, **kw)
    return Qwen2Config(bos_token_id=vocab.bos_id, **kw)


def _model_class(arch: str):
    return _CLASSES[arch]


def build_model(cfg: GRModelConfig, vocab: SIDVocab):
    """A randomly initialised (or ``pretrained_path``-initialised) HF model for ``vocab``."""
    cls = _model_class(cfg.arch)
    if cfg.pretrained_path is None:
        return cls(hf_config(cfg, vocab))
    path = Path(cfg.pretrained_path)
    if not (path / "config.json").is_file():
        raise InputError(path, "pretrained_path has no config.json (expected a HF model folder)")
    model = cls.from_pretrained(path, local_files_only=True)
    model.resize_token_embeddings(len(vocab))
    for name, value in (("pad_token_id", vocab.pad_id), ("eos_token_id", vocab.eos_id)):
        setattr(model.config, name, value)
        setattr(model.generation_config, name, value)
    if cfg.arch == "t5":
        model.config.decoder_start_token_id = vocab.bos_id
        model.generation_config.decoder_start_token_id = vocab.bos_id
    return model


def count_parameters(cfg: GRModelConfig, vocab: SIDVocab) -> int:
    """Parameter count of ``cfg`` without allocating weights (built on the meta device).

    Tied embeddings are counted once.
    """
    with torch.device("meta"):
        model = _model_class(cfg.arch)(hf_config(cfg, vocab))
    return sum(p.numel() for p in model.parameters())


def save_model(model, vocab: SIDVocab, folder: str | os.PathLike, num_beams: int = 20) -> None:
    """``save_pretrained`` plus the vocabulary, into ``folder`` (created).

    The saved ``generation_config.json`` decodes one SID (L tokens, ``num_beams``
    beams, summed log-probs): see :mod:`forge_ray.core.gr.constraint`.
    """
    model.generation_config = sid_generation_config(vocab, model.config.is_encoder_decoder, num_beams)
    model.save_pretrained(folder)
    vocab.save(folder)


def load_model(folder: str | os.PathLike):
    """Inverse of :func:`save_model` -> (model, vocab)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise InputError(folder, "not a saved GR model (no config.json)")
    vocab = SIDVocab.load(folder)
    from transformers import AutoConfig

    arch = AutoConfig.from_pretrained(folder).model_type
    if arch not in _CLASSES:
        raise InputError(folder, f"model type {arch!r} is not a GR architecture ({sorted(_CLASSES)})")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar on every load is noise
    model = _model_class(arch).from_pretrained(folder, local_files_only=True)
    if model.config.vocab_size != len(vocab):
        raise InputError(folder, f"model vocab_size {model.config.vocab_size} != SID vocabulary {len(vocab)}")
    return model, vocab


def model_dirs(folders: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """One model folder or a list of them (an ensemble) -> a non-empty list of paths."""
    dirs = [Path(folders)] if isinstance(folders, (str, os.PathLike)) else [Path(f) for f in folders]
    if not dirs:
        raise ValueError("no model folder given")
    return dirs


def check_same_kind(folder: str | os.PathLike, first: str | os.PathLike, encoder_decoder: bool,
                    first_encoder_decoder: bool) -> None:
    """Refuse an ensemble member of another kind than the first member: an encoder-decoder's
    prompt ends with ``</s>`` and feeds the encoder, a decoder-only model's is its prefix."""
    if encoder_decoder != first_encoder_decoder:
        raise InputError(folder, f"ensemble mixes an encoder-decoder and a decoder-only model "
                                 f"(this one and {first}): their prompts differ")


def load_models(folders: str | os.PathLike | Sequence[str | os.PathLike]):
    """:func:`load_model` for an ensemble -> (list of models, the shared vocab).

    Members must share the vocabulary (same SID codebook sizes) and the kind of model
    (all encoder-decoder or all decoder-only: their prompts differ).
    """
    dirs = model_dirs(folders)
    models, vocab = [], None
    for folder in dirs:
        model, own = load_model(folder)
        if vocab is not None and own != vocab:
            raise InputError(folder, f"ensemble member has codebook sizes {list(own.sizes)} but "
                                     f"{dirs[0]} has {list(vocab.sizes)}: train every member on one SID table")
        if models:
            check_same_kind(folder, dirs[0], model.config.is_encoder_decoder,
                            models[0].config.is_encoder_decoder)
        models.append(model)
        vocab = own
    return models, vocab
