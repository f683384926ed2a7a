"""RQ-VAE: losses on hand-computed cases, straight-through gradients, codebook
maintenance (k-means init, dead-code restart, EMA), Sinkhorn training, persistence."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from forge_ray.core.quantize.base import Quantizer
from forge_ray.core.quantize.registry import load_quantizer
from forge_ray.core.quantize.losses import (LossConfig, commitment_loss, contrastive_loss, info_nce,
                                            reconstruction_loss)
from forge_ray.core.quantize.rqvae import RQVAE, RQVAEConfig
from forge_ray.core.quantize.train_loop import TrainConfig, batch_kinds, compute_loss, train_rqvae


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/unit/conftest.py


def tiny(**kw) -> RQVAE:
    base = dict(in_dim=16, hidden_dims=[32], latent_dim=8, sizes=[16, 16, 8],
                kmeans_init_samples=256, seed=0)
    return RQVAE(RQVAEConfig(**{**base, **kw}))


def popular_and_tail(n=1000, d=16, seed=0):
    rng = np.random.default_rng(seed)
    m = n * 9 // 10
    return np.concatenate([rng.standard_normal((m, d)) * 0.3 + 2.0,
                           rng.standard_normal((n - m, d)) * 3]).astype(np.float32)


# ----------------------------------------------------------------------------- losses

def test_commitment_loss_value_and_gradients_by_hand():
    r = torch.tensor([[1.0, 2.0]], requires_grad=True)
    q = torch.tensor([[0.0, 0.0]], requires_grad=True)
    loss = commitment_loss([r], [q], commit_weight=0.5, codebook_weight=0.25)
    # mse = (1 + 4) / 2 = 2.5 for both terms -> 0.5 * 2.5 + 0.25 * 2.5
    assert loss.item() == pytest.approx(1.875)
    loss.backward()
    # d/dr 0.5 * mean((r - q)^2) = 0.5 * (r - q); d/dq 0.25 * mean((r - q)^2) = -0.25 * (r - q)
    assert r.grad[0].tolist() == pytest.approx([0.5, 1.0])
    assert q.grad[0].tolist() == pytest.approx([-0.25, -0.5])
    assert reconstruction_loss(torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 0.0]])).item() == 5.0


def test_info_nce_on_a_2x2_similarity_by_hand():
    a = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    s = 2.0
    c = 1 / math.sqrt(2)  # cosine similarities: [[1, c], [0, c]]
    rows = -math.log(math.exp(s) / (math.exp(s) + math.exp(s * c))) \
        - math.log(math.exp(s * c) / (1 + math.exp(s * c)))
    cols = -math.log(math.exp(s) / (math.exp(s) + 1)) - math.log(0.5)
    expected = 0.5 * (rows / 2 + cols / 2)
    assert info_nce(a, b, torch.tensor(s)).item() == pytest.approx(expected, rel=1e-5)


def test_info_nce_equals_cross_entropy_both_ways_with_the_same_gradients():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(64, 24, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    s = torch.tensor(14.0, dtype=torch.float64)
    logits = s * torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T
    t = torch.arange(64)
    ref = 0.5 * (torch.nn.functional.cross_entropy(logits, t) + torch.nn.functional.cross_entropy(logits.T, t))
    ref_grads = torch.autograd.grad(ref, (a, b))
    got = info_nce(a, b, s)
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    for want, have in zip(ref_grads, torch.autograd.grad(got, (a, b))):
        assert torch.allclose(want, have, rtol=1e-10, atol=1e-14)


def test_contrastive_loss_terms_and_scale_clamp():
    g = torch.Generator().manual_seed(0)
    xa, xb, ha, hb = (torch.randn(4, 6, generator=g) for _ in range(4))
    total, parts = contrastive_loss(xa, xb, ha, hb, torch.full((4,), math.log(1000.0)), 100.0)
    s = torch.tensor(100.0)  # clamped
    assert parts["recon_raw"].item() == pytest.approx(info_nce(ha, xb, s).item(), rel=1e-5)
    assert parts["raw_recon"].item() == pytest.approx(info_nce(xa, hb, s).item(), rel=1e-5)
    assert parts["self"].item() == pytest.approx(
        0.5 * (info_nce(ha, xa, s) + info_nce(hb, xb, s)).item(), rel=1e-5)
    assert total.item() == pytest.approx(sum(p.item() for p in parts.values()), rel=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match="codebook size"):
        RQVAEConfig(sizes=[8, 0])
    with pytest.raises(ValueError, match="commit_weight"):
        LossConfig(commit_weight=-1.0)
    with pytest.raises(ValueError, match="kmeans_init_samples"):
        RQVAEConfig(sizes=[1024], kmeans_init_samples=100)


# ----------------------------------------------------------------------------- model

def test_straight_through_gradients_reach_the_encoder():
    m = tiny(kmeans_init=False)
    x = torch.randn(32, 16)
    out = m(x)
    out.z.retain_grad()
    reconstruction_loss(out.x_hat, x).backward()
    # identity gradient through the quantizer: dL/dz equals dL/dz_q
    assert out.z.grad is not None and out.z.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.encoder.parameters())
    assert all(cb.grad is None for cb in m.codebooks)  # codes learn from the codebook term only
    # forward value is the quantized latent
    torch.testing.assert_close(out.z_q, torch.stack(out.quantized).sum(0))


def usage(m: RQVAE, x: np.ndarray) -> int:
    return len(np.unique(m.encode(x)[:, 0]))


def test_kmeans_init_and_dead_code_restart_raise_usage():
    """Codes start as VQ-VAE's uniform(-1/K, 1/K) near the origin, far from the skewed
    latents, so without help few of the 64 level-1 codes ever win."""
    x = popular_and_tail()

    def trained(steps, **kw):
        m = tiny(sizes=[64, 16, 8], **kw)
        hist = train_rqvae(m, x, cfg=TrainConfig(steps=steps, batch_size=128, warmup_steps=1,
                                                 lr=1e-3, log_every=1))
        return usage(m, x), hist

    (u_plain, _), (u_init, _) = trained(5, kmeans_init=False, dead_code_steps=0), \
        trained(5, kmeans_init=True, dead_code_steps=0)
    assert u_init > u_plain + 8, (u_plain, u_init)
    (u_plain, _), (u_restart, hist) = trained(20, kmeans_init=False, dead_code_steps=0), \
        trained(20, kmeans_init=False, dead_code_steps=2)
    assert sum(h["restarted_l0"] for h in hist) > 0
    assert u_restart > u_plain + 16, (u_plain, u_restart)


def test_ema_moves_codes_toward_assigned_means():
    m = tiny(ema=True, kmeans_init=False, dead_code_steps=0, ema_decay=0.5)
    assert not any(cb.requires_grad for cb in m.codebooks)
    m.train()
    out = m(torch.randn(64, 16))
    old = m.codebooks[0].detach().clone()
    r, c = out.residuals[0].detach(), out.codes[:, 0]
    m.update_codebooks()
    new = m.codebooks[0].detach()
    for k in torch.unique(c).tolist():
        mean = r[c == k].mean(0)
        assert (new[k] - mean).norm() < (old[k] - mean).norm()
    unused = torch.ones(16, dtype=torch.bool)
    unused[torch.unique(c)] = False
    # unused codes: their EMA sum and count decay together, so they barely move
    torch.testing.assert_close(new[unused], old[unused], rtol=1e-3, atol=1e-4)
    # the codebook term drops out of the loss with EMA (and counts without it)
    xb = torch.randn(8, 16)
    losses = {w: compute_loss(m, xb, None, LossConfig(codebook_weight=w))[1]["commit"] for w in (0.0, 9.0)}
    assert losses[0.0] == losses[9.0]
    no_ema = tiny(kmeans_init=False)
    losses = {w: compute_loss(no_ema, xb, None, LossConfig(codebook_weight=w))[1]["commit"] for w in (0.0, 9.0)}
    assert losses[9.0] > losses[0.0]


@pytest.mark.parametrize("ema", [False, True])
def test_summed_codebook_stats_of_two_replicas_equal_one_process_on_both_halves(ema):
    """Data parallelism's one all-reduce per step: two replicas that each forward half a
    batch and update from the sum of their ``codebook_stats`` end with the codebooks
    and counters of one model that forwarded the whole batch (dead codes restarted on
    one replica reach the other through the broadcast hook, as from rank 0)."""
    kw = dict(ema=ema, kmeans_init=False, dead_code_steps=2, ema_decay=0.5)
    whole, a, b = tiny(**kw), tiny(**kw), tiny(**kw)
    x = torch.randn(64, 16)
    sent: list[torch.Tensor] = []
    for step in range(2):  # step 1 restarts the codes unused in both steps
        for m in (whole, a, b):
            m.train()
        whole(x)
        a(x[:32])
        b(x[32:])
        summed = a.codebook_stats() + b.codebook_stats()
        torch.testing.assert_close(summed, whole.codebook_stats())
        info = whole.update_codebooks()
        info_a = a.update_codebooks(summed, broadcast=lambda t: sent.append(t.clone()))
        info_b = b.update_codebooks(summed, broadcast=lambda t: t.copy_(sent.pop(0)))
        assert info == info_a == info_b
        assert not sent  # every broadcast rank 0 made was received
    assert sum(info.values()) > 0  # the restart path ran
    for m in (a, b):
        for level in range(3):
            torch.testing.assert_close(getattr(m, f"unused_steps_{level}"), getattr(whole, f"unused_steps_{level}"))
            if ema:
                torch.testing.assert_close(getattr(m, f"ema_count_{level}"), getattr(whole, f"ema_count_{level}"))
    # replicas agree exactly; the single process differs only in its own restart rows
    for cb_a, cb_b in zip(a.codebooks, b.codebooks):
        torch.testing.assert_close(cb_a, cb_b, rtol=0, atol=0)
    if ema:
        for level in range(3):
            torch.testing.assert_close(getattr(a, f"ema_sum_{level}"), getattr(b, f"ema_sum_{level}"), rtol=0, atol=0)
    # without EMA the stats are counts only: K floats per level
    assert tiny(ema=False).codebook_stats().shape == (16 + 16 + 8,)


def test_read_only_input_as_ray_hands_it_over_encodes_without_a_warning():
    x = popular_and_tail(300)
    m = tiny()
    m.init_codebooks(x)
    codes = m.encode(x)
    x.setflags(write=False)  # Ray Data batches and ray.get arrays are read-only
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on sharing a read-only buffer
        np.testing.assert_array_equal(m.encode(x), codes)
        np.testing.assert_allclose(m.embed(x), m.embed(x.copy()))


def test_mixing_schedule():
    alt, both = LossConfig(mixing="alternate", pair_every=2), LossConfig(mixing="sum")
    assert [batch_kinds(s, True, alt) for s in range(4)] == [(True, False), (False, True)] * 2
    assert batch_kinds(0, True, both) == (True, True)
    assert batch_kinds(1, False, alt) == (True, False)


@pytest.mark.parametrize("assignment,ema", [("argmin", False), ("sinkhorn", True)])
def test_training_with_pairs_reduces_loss_and_round_trips(tmp_path, assignment, ema):
    x = popular_and_tail(600)
    rng = np.random.default_rng(0)
    pairs = np.stack([np.arange(0, 600, 2), np.arange(1, 600, 2)], 1)[rng.permutation(300)]
    m = tiny(train_assignment=assignment, ema=ema, dead_code_steps=5)
    assert isinstance(m, Quantizer)
    m.fit(x, pairs, train_config=TrainConfig(steps=40, batch_size=64, pair_batch_size=32,
                                             warmup_steps=4, log_every=1))
    recon = [h["recon"] for h in m.history if "recon" in h]
    assert np.mean(recon[-5:]) < np.mean(recon[:5])
    assert any("nce_self" in h for h in m.history)
    codes = m.encode(x)
    assert codes.shape == (600, 3) and codes.dtype == np.int64
    assert m.decode(codes).shape == x.shape
    cand_codes, cand = m.rank_last_level(x, 5)
    np.testing.assert_array_equal(cand_codes, codes)
    np.testing.assert_array_equal(cand[:, 0], codes[:, -1])
    assert all(len(set(row)) == 5 for row in cand.tolist())
    # ranked by distance of the last residual under the row's own prefix
    with torch.no_grad():
        z = torch.from_numpy(m.embed(x))
        r = z - m.codebooks[0][codes[:, 0]] - m.codebooks[1][codes[:, 1]]
        d = torch.cdist(r, m.codebooks[2]).pow(2).gather(1, torch.from_numpy(cand)).numpy()
    assert (np.diff(d, axis=1) >= -1e-4).all()
    m.save(tmp_path / "q")
    m2 = load_quantizer(tmp_path / "q")
    assert isinstance(m2, RQVAE) and m2.config == m.config
    np.testing.assert_array_equal(m2.encode(x), codes)
    np.testing.assert_allclose(m2.decode(codes), m.decode(codes), rtol=1e-6)
