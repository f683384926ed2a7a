"""Nearest-code search (``nearest_codes``, the kernel of RQ-VAE training, RQ-KMeans and
``assign``) against the unblocked three-pass formula it replaced, side by side.

Baseline: ``(||r||^2 - 2 r.C^T + ||c||^2).clamp(0).argmin(1)`` over the whole (B, K)
matrix at once, as forge_ray computed it until the seventeenth session. Measured:
``forge_ray.core.quantize.base.nearest_codes`` (one fused GEMM per row block of at
most ``COST_BLOCK`` costs). One process, ``--threads`` torch threads, the median of
``--rounds`` alternating rounds of ``--reps`` calls each, and the share of rows whose
code both agree on.

    python bench/bench_code_search.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from forge_ray.core.quantize.base import COST_BLOCK, nearest_codes

# (rows B, codes K, dim d, where forge_ray meets it)
SHAPES = [(2048, 8192, 64, "FORGE RQ-VAE step: batch 2,048, 8,192 codes, 64-d latent"),
          (4096, 8192, 64, "FORGE RQ-VAE pair step: 2 x 2,048 rows"),
          (8192, 8192, 512, "assign / RQ-KMeans at FORGE's 512-d, 8,192 codes"),
          (8192, 256, 64, "bench_assign.py: 8,192-row batch, 256 codes, 64-d"),
          (1024, 256, 32, "Amazon RQ-VAE: batch 1,024, 256 codes, 32-d latent")]


def unblocked(r: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    cost = r.pow(2).sum(1, keepdim=True) - 2.0 * r @ codebook.T + codebook.pow(2).sum(1)[None, :]
    return cost.clamp_min_(0.0).argmin(dim=1)


def mean_ms(fn, reps: int) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} torch thread(s); COST_BLOCK = {COST_BLOCK:,} costs; median of {args.rounds} "
          f"alternating rounds x {args.reps} calls")
    print(f"{'B':>6} {'K':>6} {'d':>4} {'unblocked ms':>13} {'nearest_codes ms':>17} {'speed-up':>9} "
          f"{'codes agree':>12}  shape")
    for b, k, d, what in SHAPES:
        g = torch.Generator().manual_seed(0)
        r, cb = torch.randn(b, d, generator=g), torch.randn(k, d, generator=g)
        agree = float((unblocked(r, cb) == nearest_codes(r, cb)).double().mean())
        times = {"old": [], "new": []}
        for _ in range(args.rounds):
            times["old"].append(mean_ms(lambda: unblocked(r, cb), args.reps))
            times["new"].append(mean_ms(lambda: nearest_codes(r, cb), args.reps))
        old, new = (float(np.median(times[key])) for key in ("old", "new"))
        print(f"{b:>6} {k:>6} {d:>4} {old:>13.1f} {new:>17.1f} {old / new:>8.2f}x {agree:>12.4f}  {what}")


if __name__ == "__main__":
    main()
