"""RQ-VAE: MLP encoder, L residual codebooks, mirrored MLP decoder (FORGE / TIGER).

x (B, D) --encoder--> z (B, d) --L residual levels--> codes (B, L), z_q (B, d)
--decoder--> x_hat (B, D).  Level l picks the code nearest to r_l (r_0 = z,
r_{l+1} = r_l - q_l); z_q = sum_l q_l passes gradients to the encoder with the
straight-through estimator. Everything FORGE's reference configures but leaves
inert is done here:

* k-means init (:meth:`RQVAE.init_codebooks`): level by level on the residuals of
  a sample of encoder outputs (kmeans.py, seeded faiss init).
* dead-code restart: a code unused for ``dead_code_steps`` steps is re-seeded
  from the current batch's residuals with the highest quantization error.
* EMA codebooks (``ema=True``): codes follow the running mean of their assigned
  residuals (decay, Laplace-smoothed counts); the codebook loss term then drops out.
* assignment: training uses ``train_assignment`` ("argmin", or "sinkhorn" to balance
  codes within each batch); inference always uses argmin, so the choice is explicit.

Codebook maintenance runs after the optimizer step (:meth:`RQVAE.update_codebooks`)
from statistics the forward pass recorded. Data-parallel workers sum them as one flat
vector (:meth:`RQVAE.codebook_stats`, one all-reduce per step) and broadcast only the
codebooks of levels that restarted codes, so the replicas stay identical.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from forge_ray.config import require
from forge_ray.core.quantize.balanced import sinkhorn_assign
from forge_ray.core.quantize.base import (as_tensor, batched, check_codes, check_embeddings, code_costs,
                                          given_prefix, nearest_codes, ranked_codes,
                                          saved_config_and_weights, write_quantizer_json)
from forge_ray.core.quantize.kmeans import ArrayData, kmeans
from forge_ray.core.quantize.losses import CONTRASTIVE_TERMS
from forge_ray.errors import InputError

WEIGHTS_FILE = "model.safetensors"


@dataclasses.dataclass
class RQVAEConfig:
    """Architecture and codebook behaviour (FORGE defaults: 512 -> 256 -> 256 -> 64, 3 x 8192)."""

    in_dim: int = 512
    hidden_dims: list[int] = dataclasses.field(default_factory=lambda: [256, 256])
    latent_dim: int = 64
    sizes: list[int] = dataclasses.field(default_factory=lambda: [8192, 8192, 8192])
    distance: Literal["l2", "cosine"] = "l2"
    train_assignment: Literal["argmin", "sinkhorn"] = "argmin"
    sinkhorn_eps: float = 0.05
    sinkhorn_iters: int = 20
    kmeans_init: bool = True
    kmeans_init_samples: int = 65536  # rows of encoder output clustered for the init
    kmeans_init_iters: int = 20
    dead_code_steps: int = 100  # 0 disables restarts
    ema: bool = False
    ema_decay: float = 0.99
    ema_eps: float = 1e-5  # Laplace smoothing of EMA counts
    temperature_init: float = 0.07  # contrastive temperatures; logit scales start at 1/this
    encode_batch_size: int = 8192
    seed: int = 0

    def __post_init__(self):
        require(self.in_dim >= 1 and self.latent_dim >= 1, "in_dim and latent_dim must be >= 1")
        require(all(h >= 1 for h in self.hidden_dims), f"hidden widths must be >= 1, got {self.hidden_dims}")
        require(len(self.sizes) >= 1 and all(s >= 1 for s in self.sizes),
                f"sizes must list >= 1 level, each codebook size >= 1, got {self.sizes}")
        require(self.sinkhorn_eps > 0 and self.sinkhorn_iters >= 1, "sinkhorn_eps > 0, sinkhorn_iters >= 1")
        require(self.kmeans_init_samples >= max(self.sizes) or not self.kmeans_init,
                "kmeans_init_samples must be >= the largest codebook size")
        require(self.kmeans_init_iters >= 1, "kmeans_init_iters must be >= 1")
        require(self.dead_code_steps >= 0, "dead_code_steps must be >= 0")
        require(0.0 < self.ema_decay < 1.0 and self.ema_eps > 0, "ema_decay in (0, 1), ema_eps > 0")
        require(0.0 < self.temperature_init, "temperature_init must be > 0")
        require(self.encode_batch_size >= 1, "encode_batch_size must be >= 1")


@dataclasses.dataclass
class RQVAEOutput:
    """z: (B, d) encoder output.  z_q: (B, d) straight-through quantized latent.
    x_hat: (B, D) reconstruction.  codes: (B, L) int64.  residuals[l]: (B, d) input
    of level l (grad to the encoder).  quantized[l]: (B, d) chosen codes (grad to the
    codebook)."""

    z: torch.Tensor
    z_q: torch.Tensor
    x_hat: torch.Tensor
    codes: torch.Tensor
    residuals: list[torch.Tensor]
    quantized: list[torch.Tensor]


def mlp(widths: list[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class RQVAE(nn.Module):
    """The model (``forward``) and the numpy :class:`Quantizer` API (``encode`` ...)."""

    TYPE = "rqvae"

    def __init__(self, config: RQVAEConfig | None = None, **kwargs):
        super().__init__()
        self.config = cfg = config or RQVAEConfig(**kwargs)
        self.sizes = list(cfg.sizes)
        with torch.random.fork_rng():  # seeded weights without touching the caller's RNG
            torch.manual_seed(cfg.seed)
            self.encoder = mlp([cfg.in_dim, *cfg.hidden_dims, cfg.latent_dim])
            self.decoder = mlp([cfg.latent_dim, *reversed(cfg.hidden_dims), cfg.in_dim])
            # VQ-VAE's uniform(-1/K, 1/K) init; replaced by k-means when kmeans_init is on.
            self.codebooks = nn.ParameterList(
                nn.Parameter(torch.empty(k, cfg.latent_dim).uniform_(-1.0 / k, 1.0 / k),
                             requires_grad=not cfg.ema) for k in self.sizes)
        for level, k in enumerate(self.sizes):
            self.register_buffer(f"unused_steps_{level}", torch.zeros(k, dtype=torch.int64))
            if cfg.ema:
                self.register_buffer(f"ema_count_{level}", torch.ones(k))
                self.register_buffer(f"ema_sum_{level}", self.codebooks[level].detach().clone())
        self.register_buffer("initialized", torch.tensor(not cfg.kmeans_init))
        self.log_logit_scales = nn.Parameter(
            torch.full((len(CONTRASTIVE_TERMS),), math.log(1.0 / cfg.temperature_init)))
        self._pending: list[tuple[list[torch.Tensor], torch.Tensor]] = []  # (residuals, codes)

    # ------------------------------------------------------------------ forward
    def _assign(self, r: torch.Tensor, level: int) -> torch.Tensor:
        """(B, d) residuals -> (B,) codes for this level (no gradient)."""
        cb = self.codebooks[level].detach()
        if self.training and self.config.train_assignment == "sinkhorn":
            cost = code_costs(r.detach(), cb, self.config.distance)
            return sinkhorn_assign(cost, self.config.sinkhorn_eps, self.config.sinkhorn_iters)
        return nearest_codes(r.detach(), cb, self.config.distance)

    def quantize(self, z: torch.Tensor, levels: int | None = None):
        """(B, d) latents -> (codes (B, levels), residuals, quantized) for the first levels."""
        levels = len(self.sizes) if levels is None else levels
        residuals, quantized, codes = [], [], []
        r = z
        for level in range(levels):
            c = self._assign(r, level)
            q = self.codebooks[level][c]  # (B, d)
            residuals.append(r)
            quantized.append(q)
            codes.append(c)
            r = r - q.detach()  # each level's commitment sees only its own code's gradient
        codes_t = torch.stack(codes, dim=1) if codes else z.new_zeros((len(z), 0), dtype=torch.int64)
        return codes_t, residuals, quantized

    def forward(self, x: torch.Tensor) -> RQVAEOutput:
        """(B, D) -> RQVAEOutput. In training mode, records codebook statistics that
        :meth:`update_codebooks` consumes after the optimizer step."""
        z = self.encoder(x)
        codes, residuals, quantized = self.quantize(z)
        q_sum = torch.stack(quantized).sum(0)
        z_q = z + (q_sum - z).detach()  # straight-through: forward q_sum, backward identity
        if self.training:
            self._pending.append(([r.detach() for r in residuals], codes))
        return RQVAEOutput(z, z_q, self.decoder(z_q), codes, residuals, quantized)

    # ------------------------------------------------------------------ codebook maintenance
    @torch.no_grad()
    def init_codebooks(self, x: np.ndarray) -> list[list[dict]]:
        """k-means init from (N, D) inputs (N >= max(sizes)): cluster the encoder outputs
        level by level on residuals. Returns the per-level k-means stats."""
        z = self.embed(x)
        data, stats = ArrayData(z), []
        for level, k in enumerate(self.sizes):
            res = kmeans(data, k, niter=1, seed=self.config.seed + level,
                         init_niter=self.config.kmeans_init_iters)
            cb = torch.from_numpy(res.centroids)
            self.codebooks[level].copy_(cb)
            if self.config.ema:
                getattr(self, f"ema_count_{level}").fill_(1.0)
                getattr(self, f"ema_sum_{level}").copy_(cb)
            stats.append(res.stats)
            data = data.residual(res.centroids)
        self.initialized.fill_(True)
        return stats

    def _stat_sizes(self) -> list[int]:
        """Per level, the length of its slice of :meth:`codebook_stats`: K counts, plus
        K x d sums with EMA (without EMA the sums are never used, so never sent)."""
        d = self.config.latent_dim
        return [k * (1 + d) if self.config.ema else k for k in self.sizes]

    @torch.no_grad()
    def codebook_stats(self) -> torch.Tensor:
        """(S,) float32: every level's per-code counts (and, with EMA, per-code residual
        sums) from the forward passes since the last :meth:`update_codebooks`, flattened
        into one vector so data-parallel workers sum them with a single all-reduce."""
        if not self._pending:
            return torch.zeros(sum(self._stat_sizes()), device=self.codebooks[0].device)
        parts = []
        for level, k in enumerate(self.sizes):
            c = torch.cat([p[1][:, level] for p in self._pending])  # (n,)
            parts.append(torch.bincount(c, minlength=k).float())  # (K,)
            if self.config.ema:  # residuals are needed only for the sums
                r = torch.cat([p[0][level] for p in self._pending])  # (n, d)
                sums = torch.zeros(k, r.shape[1], dtype=r.dtype, device=r.device).index_add_(0, c, r)
                parts.append(sums.reshape(-1))  # (K * d,)
        return torch.cat(parts)

    @torch.no_grad()
    def update_codebooks(self, stats: torch.Tensor | None = None,
                         broadcast: Callable[[torch.Tensor], None] | None = None) -> dict[str, float]:
        """EMA update and dead-code restart from the forward passes since the last call.

        ``stats``: :meth:`codebook_stats`, summed over data-parallel workers (None: this
        process's own). ``broadcast`` (in place, from one worker) is applied to the
        codebooks of the levels that restarted codes: the re-seeded rows come from this
        worker's residuals, while everything else follows from the summed statistics
        and so is already identical on every worker. Whether a level restarts depends
        only on the summed counts, so all workers make the same broadcasts.
        Returns {"restarted_l{l}": number of codes re-seeded}."""
        cfg = self.config
        if not self._pending:
            return {}
        if stats is None:
            stats = self.codebook_stats()
        pending, self._pending = self._pending, []
        info, offset = {}, 0
        for level, (k, size) in enumerate(zip(self.sizes, self._stat_sizes())):
            part, offset = stats[offset: offset + size], offset + size
            counts = part[:k]  # (K,)
            cb = self.codebooks[level]
            if cfg.ema:
                sums = part[k:].view(k, -1)  # (K, d)
                ema_n, ema_s = getattr(self, f"ema_count_{level}"), getattr(self, f"ema_sum_{level}")
                ema_n.mul_(cfg.ema_decay).add_(counts, alpha=1 - cfg.ema_decay)
                ema_s.mul_(cfg.ema_decay).add_(sums, alpha=1 - cfg.ema_decay)
                n = ema_n.sum()
                smoothed = (ema_n + cfg.ema_eps) / (n + k * cfg.ema_eps) * n  # Laplace
                cb.copy_(ema_s / smoothed[:, None])
            unused = getattr(self, f"unused_steps_{level}")
            unused.copy_(torch.where(counts > 0, torch.zeros_like(unused), unused + 1))
            restarted = 0
            if cfg.dead_code_steps:
                dead = torch.nonzero(unused >= cfg.dead_code_steps).squeeze(1)
                restarted = len(dead)
                if restarted:
                    r = torch.cat([p[0][level] for p in pending])  # (n, d)
                    c = torch.cat([p[1][:, level] for p in pending])  # (n,)
                    err = (r - cb[c]).pow(2).sum(1)  # (n,) quantization error per row
                    order = torch.argsort(err, descending=True)
                    pick = order[torch.arange(restarted) % len(order)]  # top-error rows, cycled
                    new = r[pick] + 1e-3 * r.std() * torch.randn(restarted, r.shape[1], device=r.device, dtype=r.dtype)
                    cb[dead] = new
                    unused[dead] = 0
                    if cfg.ema:
                        getattr(self, f"ema_count_{level}")[dead] = 1.0
                        getattr(self, f"ema_sum_{level}")[dead] = new
                    if broadcast is not None:
                        broadcast(cb.data)
                        if cfg.ema:  # the restarted EMA state follows the broadcast rows
                            getattr(self, f"ema_sum_{level}")[dead] = cb.data[dead]
            info[f"restarted_l{level}"] = float(restarted)
        return info

    # ------------------------------------------------------------------ numpy Quantizer API
    def _run(self, fn, x: np.ndarray, *more: np.ndarray):
        """Apply ``fn`` to tensor batches (of ``x`` and, sliced alike, ``more``) in eval
        mode without grad, on the device the weights are on
        (:meth:`torch.nn.Module.to`): each batch moves there per call."""
        was = self.training
        device = self.codebooks[0].device
        self.eval()
        try:
            with torch.no_grad():
                return batched(lambda *b: fn(*(as_tensor(a).to(device) for a in b)),  # Ray's are read-only
                               x, self.config.encode_batch_size, *more)
        finally:
            self.train(was)

    def embed(self, x: np.ndarray) -> np.ndarray:
        """(N, D) -> (N, d) float32 encoder outputs."""
        x = check_embeddings(x, self.config.in_dim)
        return self._run(lambda xb: self.encoder(xb).cpu().numpy(), x)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """(N, D) float32 -> (N, L) int64 codes (argmin assignment)."""
        x = check_embeddings(x, self.config.in_dim)
        return self._run(lambda xb: self.quantize(self.encoder(xb))[0].cpu().numpy(), x)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """(N, L) int64 -> (N, D) float32 reconstructions decoder(sum of codes)."""
        codes = check_codes(codes, self.sizes)
        return self._run(lambda cb: self.decoder(
            sum(book[cb[:, i]] for i, book in enumerate(self.codebooks))).cpu().numpy(), codes)

    def rank_last_level(self, x: np.ndarray, k: int,
                        prefix: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """-> (codes (N, L), candidates (N, k)): last-level codes, nearest first, under
        each row's own first L-1 codes, or under the (N, L-1) ``prefix`` codes given."""
        x = check_embeddings(x, self.config.in_dim)
        if not 1 <= k <= self.sizes[-1]:
            raise InputError("k", f"must be in [1, {self.sizes[-1]}], got {k}")
        last = len(self.sizes) - 1

        def one(xb, given=None):
            z = self.encoder(xb)
            if given is None:
                codes, _, quantized = self.quantize(z, last)
            else:
                codes, quantized = given, [self.codebooks[i][given[:, i]] for i in range(last)]
            r = z - sum(quantized) if quantized else z  # residual left for the last level
            cand = ranked_codes(r, self.codebooks[last], k, self.config.distance)
            return torch.cat([codes, cand[:, :1]], dim=1).cpu().numpy(), cand.cpu().numpy()

        if prefix is None:
            return self._run(one, x)
        return self._run(one, x, given_prefix(prefix, len(x), self.sizes[:last]))

    def fit(self, x: np.ndarray, pairs: np.ndarray | None = None,
            pair_embeds: np.ndarray | None = None, train_config=None) -> "RQVAE":
        """Single-process training (train_loop.train_rqvae); pairs are (P, 2) row
        indices into ``pair_embeds`` (default ``x``). Returns self; the logged
        metrics are in ``self.history``."""
        from forge_ray.core.quantize.train_loop import TrainConfig, train_rqvae

        self.history = train_rqvae(self, x, pairs, pair_embeds, train_config or TrainConfig())
        return self

    def save(self, folder: str | os.PathLike) -> None:
        folder = write_quantizer_json(folder, self.TYPE, self.sizes, dataclasses.asdict(self.config))
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "RQVAE":
        config, path = saved_config_and_weights(folder, cls.TYPE, RQVAEConfig, WEIGHTS_FILE)
        model = cls(config)
        try:
            model.load_state_dict(load_file(str(path)), strict=True)
        except (RuntimeError, OSError) as e:
            raise InputError(path, f"weights do not match the config: {str(e)[:200]}") from None
        return model.eval()
