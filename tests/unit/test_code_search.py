"""Nearest-code search: the fused cost GEMM and its row blocks against brute force."""

from __future__ import annotations

import pytest
import torch

from forge_ray.core.quantize import base


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_blocked_search_matches_brute_force(monkeypatch, distance, with_bias):
    g = torch.Generator().manual_seed(0)
    r, cb = torch.randn(300, 8, generator=g), torch.randn(50, 8, generator=g)
    bias = torch.rand(50, generator=g) * 0.1 if with_bias else None
    r64, cb64 = r.double(), cb.double()
    if distance == "l2":
        want = torch.cdist(r64, cb64) ** 2
    else:
        want = 1 - torch.nn.functional.normalize(r64, dim=1) @ torch.nn.functional.normalize(cb64, dim=1).T
    if with_bias:
        want = want - bias.double()[None, :]
    torch.testing.assert_close(base.code_costs(r, cb, distance, bias).double(), want, atol=1e-4, rtol=1e-4)
    unblocked = base.nearest_codes(r, cb, distance, bias), base.ranked_codes(r, cb, 5, distance, bias)
    monkeypatch.setattr(base, "COST_BLOCK", 50 * 7)  # 7 rows a block: 43 blocks, the last partial
    nearest, ranked = base.nearest_codes(r, cb, distance, bias), base.ranked_codes(r, cb, 5, distance, bias)
    assert torch.equal(nearest, want.argmin(1)) and torch.equal(nearest, unblocked[0])
    assert torch.equal(ranked, want.argsort(1)[:, :5]) and torch.equal(ranked, unblocked[1])
    assert torch.equal(ranked[:, 0], nearest)
