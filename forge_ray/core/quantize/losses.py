"""RQ-VAE objectives (FORGE Eq. 2 and 3), as plain functions of tensors.

Reductions: every squared error is a *mean over elements* (``F.mse_loss``), i.e.
FORGE's ``||a - b||^2`` divided by the dimension, so weights do not depend on the
embedding width. Shapes: B rows, D input dims, d latent dims, L levels.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F

from forge_ray.config import require

# The four InfoNCE terms of FORGE Eq. 2, in the order of the model's logit scales.
CONTRASTIVE_TERMS = ("recon_recon", "recon_raw", "raw_recon", "self")


@dataclasses.dataclass
class LossConfig:
    """Weights and batch mixing of the RQ-VAE objective.

    recon_weight: MSE(decoder(z_q), x).  commit_weight: ``||r_l - sg(q_l)||^2`` per level
    (pulls the encoder to its codes).  codebook_weight: ``||sg(r_l) - q_l||^2`` per level
    (pulls codes to the encoder; ignored when the model uses EMA codebooks).  FORGE uses
    0.5 / 0.5.  contrastive_weight: multiplies the sum of the four InfoNCE terms.
    max_logit_scale: learnable logit scales are clamped to this (CLIP uses 100).
    mixing: ``"alternate"``: a step sees a pair batch every ``pair_every`` steps and a
    reconstruction batch otherwise (FORGE alternates: pair_every=2); ``"sum"``: every
    step sees both and adds their losses.
    """

    recon_weight: float = 1.0
    commit_weight: float = 0.5
    codebook_weight: float = 0.5
    contrastive_weight: float = 1.0
    max_logit_scale: float = 100.0
    mixing: Literal["alternate", "sum"] = "alternate"
    pair_every: int = 2

    def __post_init__(self):
        for name in ("recon_weight", "commit_weight", "codebook_weight", "contrastive_weight"):
            require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        require(self.max_logit_scale > 0, "max_logit_scale must be > 0")
        require(self.pair_every >= 1, "pair_every must be >= 1")


def reconstruction_loss(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, D), (B, D) -> scalar mean squared error."""
    return F.mse_loss(x_hat, x)


def commitment_loss(residuals: list[torch.Tensor], quantized: list[torch.Tensor],
                    commit_weight: float, codebook_weight: float) -> torch.Tensor:
    """Sum over levels of ``commit_weight * mse(r_l, sg(q_l)) + codebook_weight *
    mse(sg(r_l), q_l)``; residuals[l] and quantized[l] are (B, d)."""
    total = residuals[0].new_zeros(())
    for r, q in zip(residuals, quantized):
        total = total + commit_weight * F.mse_loss(r, q.detach())
        if codebook_weight:
            total = total + codebook_weight * F.mse_loss(r.detach(), q)
    return total


def info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with in-batch negatives (CLIP style).

    a, b: (B, D) rows where a[i] and b[i] are positives and all other rows negatives.
    logit_scale: scalar multiplier of the cosine similarities (1 / temperature).
    Returns the mean of cross-entropy over rows of ``s * cos(a, b^T)`` and over its columns.
    Each cross-entropy against the diagonal is ``logsumexp - positive``; taking the
    columns' logsumexp of the same (B, B) matrix, instead of ``cross_entropy(logits.T)``,
    skips a strided log-softmax and the transposed gradient it adds back (on CPU
    those cost about a quarter of the term: docs/benchmarks.md, Quantizer training).
    """
    logits = logit_scale * F.normalize(a, dim=1) @ F.normalize(b, dim=1).T  # (B, B)
    positive = logits.diagonal()
    return 0.5 * ((logits.logsumexp(1) - positive).mean() + (logits.logsumexp(0) - positive).mean())


def contrastive_loss(x_a: torch.Tensor, x_b: torch.Tensor, xhat_a: torch.Tensor,
                     xhat_b: torch.Tensor, log_scales: torch.Tensor,
                     max_logit_scale: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """FORGE Eq. 2 for co-occurring pairs (a_i, b_i); all inputs (B, D) except
    log_scales (4,) learnable log logit-scales, one per term of CONTRASTIVE_TERMS:
    recon(a)-recon(b), recon(a)-raw(b), raw(a)-recon(b), recon-raw of the same item
    (over both a and b rows). Returns (sum of terms, {term: value})."""
    scales = log_scales.exp().clamp(max=max_logit_scale)
    parts = {
        "recon_recon": info_nce(xhat_a, xhat_b, scales[0]),
        "recon_raw": info_nce(xhat_a, x_b, scales[1]),
        "raw_recon": info_nce(x_a, xhat_b, scales[2]),
        "self": 0.5 * (info_nce(xhat_a, x_a, scales[3]) + info_nce(xhat_b, x_b, scales[3])),
    }
    return sum(parts.values()), parts
