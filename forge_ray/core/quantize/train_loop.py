"""Single-process RQ-VAE training: the reusable step and a reference loop.

:func:`compute_loss` and :func:`train_step` are what a distributed trainer reuses
(it replaces the optimizer calls with its engine's and passes all-reduce /
broadcast hooks to ``model.update_codebooks``). :func:`train_rqvae` is the plain
in-memory loop used by tests, ``RQVAE.fit`` and as the benchmark baseline.
Memory of the loop: the input arrays (held by the caller) plus one batch.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from forge_ray.config import require
from forge_ray.core.quantize.base import check_embeddings
from forge_ray.core.quantize.losses import (LossConfig, commitment_loss, contrastive_loss,
                                            reconstruction_loss)
from forge_ray.core.schedule import warmup_cosine_factor
from forge_ray.errors import InputError

# ``model`` below is an RQVAE (annotated nn.Module: rqvae imports this module for
# RQVAE.fit, so importing it back would be a cycle).


@dataclasses.dataclass
class TrainConfig:
    """Optimisation settings (FORGE: batch 2048, AdamW lr 2e-3, warm-up then cosine)."""

    steps: int = 1000
    batch_size: int = 2048
    pair_batch_size: int = 2048
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    seed: int = 0
    log_every: int = 50
    progress: bool = False
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)

    def __post_init__(self):
        require(self.steps >= 1, "steps must be >= 1")
        require(self.batch_size >= 2 and self.pair_batch_size >= 2, "batch sizes must be >= 2")
        require(self.lr > 0 and self.weight_decay >= 0, "lr must be > 0, weight_decay >= 0")
        require(self.warmup_steps >= 0, "warmup_steps must be >= 0")
        require(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio must be in [0, 1]")
        require(self.log_every >= 1, "log_every must be >= 1")


def _quantization_loss(model: nn.Module, out, x: torch.Tensor, cfg: LossConfig):
    recon = reconstruction_loss(out.x_hat, x)
    codebook_w = 0.0 if model.config.ema else cfg.codebook_weight  # EMA moves the codes instead
    commit = commitment_loss(out.residuals, out.quantized, cfg.commit_weight, codebook_w)
    return cfg.recon_weight * recon + commit, recon, commit


def compute_loss(model: nn.Module, recon_batch: torch.Tensor | None,
                 pair_batch: tuple[torch.Tensor, torch.Tensor] | None,
                 cfg: LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one step: FORGE Eq. 3 on ``recon_batch`` (B, D) and, on ``pair_batch``
    ((P, D), (P, D) co-occurring rows), Eq. 3 on both sides plus ``contrastive_weight``
    times Eq. 2. Either batch may be None (alternating mixing); the losses add.
    Returns (scalar loss with grad, float metrics)."""
    if recon_batch is None and pair_batch is None:
        raise ValueError("compute_loss needs a reconstruction batch, a pair batch or both")
    loss = torch.zeros(())
    metrics: dict[str, float] = {}
    codes = []
    if recon_batch is not None:
        out = model(recon_batch)
        q_loss, recon, commit = _quantization_loss(model, out, recon_batch, cfg)
        loss = loss + q_loss
        metrics.update(recon=recon.item(), commit=commit.item())
        codes.append(out.codes)
    if pair_batch is not None:
        x_a, x_b = pair_batch
        out = model(torch.cat([x_a, x_b]))  # one pass: both sides share batch statistics
        q_loss, recon, commit = _quantization_loss(model, out, torch.cat([x_a, x_b]), cfg)
        xhat_a, xhat_b = out.x_hat.split(len(x_a))
        contrast, parts = contrastive_loss(x_a, x_b, xhat_a, xhat_b, model.log_logit_scales,
                                           cfg.max_logit_scale)
        loss = loss + q_loss + cfg.contrastive_weight * contrast
        metrics.update(pair_recon=recon.item(), pair_commit=commit.item(), contrastive=contrast.item())
        metrics.update({f"nce_{k}": v.item() for k, v in parts.items()})
        codes.append(out.codes)
    codes_t = torch.cat(codes)
    for level, k in enumerate(model.sizes):  # share of each codebook used by this step
        metrics[f"usage_l{level}"] = len(torch.unique(codes_t[:, level])) / k
    metrics["loss"] = loss.item()
    return loss, metrics


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, recon_batch, pair_batch,
               cfg: LossConfig, scheduler=None) -> dict[str, float]:
    """One optimisation step plus codebook maintenance (EMA, dead-code restart)."""
    optimizer.zero_grad(set_to_none=True)
    loss, metrics = compute_loss(model, recon_batch, pair_batch, cfg)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    metrics.update(model.update_codebooks())
    return metrics


def batch_kinds(step: int, has_pairs: bool, cfg: LossConfig) -> tuple[bool, bool]:
    """-> (use a reconstruction batch, use a pair batch) at ``step`` (0-based)."""
    if not has_pairs:
        return True, False
    if cfg.mixing == "sum":
        return True, True
    pair = (step + 1) % cfg.pair_every == 0
    return not pair, pair


def warmup_cosine(optimizer, warmup: int, total: int, min_ratio: float):
    """LambdaLR: linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
        warmup_cosine_factor, warmup=warmup, total=total, min_ratio=min_ratio))


def train_rqvae(model: nn.Module, x: np.ndarray, pairs: np.ndarray | None = None,
                pair_embeds: np.ndarray | None = None, cfg: TrainConfig | None = None) -> list[dict]:
    """Train ``model`` in place on (N, D) ``x`` and optional (P, 2) ``pairs`` of row
    indices into ``pair_embeds`` (default ``x``). k-means-initialises the codebooks
    first when the model asks for it. Returns the metrics of every ``log_every``-th step."""
    cfg = cfg or TrainConfig()
    x = check_embeddings(x, model.config.in_dim)
    pe = x if pair_embeds is None else check_embeddings(pair_embeds, model.config.in_dim, "pair_embeds")
    if pairs is not None:
        pairs = np.asarray(pairs, dtype=np.int64)
        if pairs.ndim != 2 or pairs.shape[1] != 2 or len(pairs) == 0:
            raise InputError("pairs", f"expected a non-empty (P, 2) array, got {pairs.shape}")
        if pairs.min() < 0 or pairs.max() >= len(pe):
            raise InputError("pairs", f"row index out of range [0, {len(pe)})")
    rng = np.random.default_rng(cfg.seed)
    if not bool(model.initialized):
        n = min(len(x), model.config.kmeans_init_samples)
        if n < max(model.sizes):
            raise InputError("embeddings", f"k-means init needs >= {max(model.sizes)} rows, got {len(x)}")
        model.init_codebooks(x[np.sort(rng.choice(len(x), n, replace=False))])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    model.train()
    history = []
    for step in tqdm(range(cfg.steps), disable=not cfg.progress, desc="rqvae"):
        use_recon, use_pairs = batch_kinds(step, pairs is not None, cfg.loss)
        recon_batch = pair_batch = None
        if use_recon:
            recon_batch = torch.from_numpy(x[rng.integers(0, len(x), min(cfg.batch_size, len(x)))])
        if use_pairs:
            rows = pairs[rng.integers(0, len(pairs), min(cfg.pair_batch_size, len(pairs)))]
            pair_batch = (torch.from_numpy(pe[rows[:, 0]]), torch.from_numpy(pe[rows[:, 1]]))
        metrics = train_step(model, optimizer, recon_batch, pair_batch, cfg.loss, scheduler)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            history.append({"step": step, "lr": scheduler.get_last_lr()[0], **metrics})
    model.eval()
    return history
