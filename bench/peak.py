"""The machine's measured matmul rate, the peak the benchmarks compare their kernels with."""

from __future__ import annotations

import time

import torch


def matmul_gflops(n: int = 2048, repeat: int = 3, dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s (2 n^3 per product) of the fastest of ``repeat`` (n, n) @ (n, n) torch
    matmuls in ``dtype``, on this process's torch threads. The best of several leaves out
    the first call's kernel selection (oneDNN picks AMX kernels for bf16 on first use)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9
