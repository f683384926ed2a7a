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


@pytest.mark.parametrize("k", [1, 5, 40, 64])  # 4k <= K partitions first, larger k sorts whole rows
def test_smallest_first_is_a_stable_argsort(k):
    """The CPU ranking's packed integer keys order as torch's stable sort does: negative
    costs (biased), exact ties (lower index first), -0.0 beside +0.0, and infinities."""
    g = torch.Generator().manual_seed(1)
    cost = torch.randn(200, 64, generator=g)
    cost[:, 10] = cost[:, 3]  # exact ties
    cost[:, 20], cost[:, 21] = -0.0, 0.0
    cost[::7, 30], cost[::5, 31] = float("inf"), float("-inf")
    cost = torch.round(cost * 4) / 4  # many more ties
    want = torch.sort(cost, dim=1, stable=True).indices[:, :k]
    got = torch.from_numpy(base.smallest_first(cost.numpy(), k))
    assert got.dtype == torch.int64 and torch.equal(got, want)
