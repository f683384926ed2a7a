"""Balanced (size-constrained) code assignment with Sinkhorn.

Plain nearest-code assignment piles many items onto a few popular codes, which
turns into SID collisions. Sinkhorn solves the entropic optimal-transport problem
"send every row (mass 1/N) to the codes so that every code receives mass 1/K, at
minimal cost". Its column potential ``g`` (K,) is a per-code *bias*: the transport
plan's row maximum is ``argmin_k cost[i, k] - bias[k]``. So a balanced quantizer is
just a nearest-code quantizer with a learned (K,) bias, which makes its assignment
deterministic per item, batch-independent and streamable at inference time (the
bias is fitted once on a sample and stored with the codebook).

Memory: one (N, K) float32 cost matrix plus two of the same size during the
updates, so fit the bias on a bounded sample (e.g. 16k rows x 8192 codes = 0.5 GiB).
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def sinkhorn_bias(cost: torch.Tensor, eps: float = 0.05, n_iter: int = 50) -> torch.Tensor:
    """Per-code bias that balances ``argmin_k cost - bias`` over the rows of ``cost``.

    Args:
        cost: (N, K) assignment costs (e.g. squared distances), lower is better.
        eps: entropic regularisation relative to the mean cost (costs are divided by
            their mean first, so ``eps`` is scale-free). Smaller is closer to a hard,
            exactly balanced assignment but needs more iterations.
        n_iter: Sinkhorn iterations (each is two log-sum-exps over the matrix).
    Returns:
        (K,) float32 bias in the units of ``cost``.
    """
    n, k = cost.shape
    scale = cost.mean().clamp_min(1e-12)
    logits = -(cost.float() / scale) / eps  # (N, K) log of the Gibbs kernel
    log_a, log_b = -math.log(n), -math.log(k)  # uniform row / column marginals
    g = torch.zeros(k, dtype=logits.dtype, device=cost.device)
    for _ in range(n_iter):
        f = log_a - torch.logsumexp(logits + g[None, :], dim=1)  # (N,) row potentials
        g = log_b - torch.logsumexp(logits + f[:, None], dim=0)  # (K,) column potentials
    # plan[i, k] ~ exp(logits + f_i + g_k): the row argmax is argmin cost - eps*scale*g.
    bias = g * eps * scale
    return bias - bias.mean()  # only differences between codes matter


@torch.no_grad()
def sinkhorn_assign(cost: torch.Tensor, eps: float = 0.05, n_iter: int = 50) -> torch.Tensor:
    """(N, K) costs -> (N,) int64 balanced hard assignment of this batch."""
    return (cost - sinkhorn_bias(cost, eps, n_iter)[None, :]).argmin(dim=1)
