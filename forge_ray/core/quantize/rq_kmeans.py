"""RQ-KMeans: residual k-means, level by level, with a codebook size per level.

Level l runs k-means (kmeans.py) on what levels < l left over. Unlike
``faiss.ResidualQuantizer`` every level may have its own size (e.g. [32, 16, 8]).
The balanced variant additionally learns a per-code bias with Sinkhorn
(balanced.py) on a sample of each level's residuals and then assigns
``argmin_k ||r - c_k||^2 - bias_k`` during fitting *and* encoding, so codes are
spread evenly and full-SID collisions drop, at a small cost in reconstruction.

Memory: ``fit`` on an array keeps the input plus one residual copy (2 x N x D
float32); ``fit_data`` takes any :class:`~forge_ray.core.quantize.kmeans.KMeansData`
(e.g. sharded over a cluster). ``encode`` and friends work in batches of
``batch_size`` rows (``batch_size x max(sizes)`` float32 costs at a time), on
``device`` (:meth:`RQKMeans.to`: codebooks move there once, each batch per call; the
codes come back as numpy).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

import numpy as np
import torch

from forge_ray.config import require
from forge_ray.core.quantize.balanced import sinkhorn_bias
from forge_ray.core.quantize.base import (as_tensor, batched, check_codes, check_embeddings, code_costs,
                                          given_prefix, nearest_codes, ranked_codes,
                                          saved_config_and_weights, write_quantizer_json)
from forge_ray.core.quantize.kmeans import ArrayData, KMeansData, kmeans
from forge_ray.errors import InputError

WEIGHTS_FILE = "codebooks.npz"


@dataclasses.dataclass
class RQKMeansConfig:
    """sizes: codes per level.  niter: full Lloyd passes per level after the init.
    init / init_sample / init_niter: see :func:`kmeans`.  balanced: learn Sinkhorn
    biases (balance_sample rows per level, sinkhorn_eps relative to the mean cost,
    balance_iters rounds of bias + balanced centroid update).  batch_size: rows per
    assignment batch."""

    sizes: list[int] = dataclasses.field(default_factory=lambda: [256, 256, 256])
    niter: int = 5
    init: Literal["faiss", "random"] = "faiss"
    init_sample: int = 0  # 0: min(N, 256 * K)
    init_niter: int = 20
    seed: int = 0
    balanced: bool = False
    balance_sample: int = 16384
    balance_iters: int = 2
    sinkhorn_eps: float = 0.05
    sinkhorn_iters: int = 100
    batch_size: int = 16384

    def __post_init__(self):
        require(len(self.sizes) >= 1, "sizes must list at least one level")
        require(all(s >= 1 for s in self.sizes), f"every codebook size must be >= 1, got {self.sizes}")
        require(self.niter >= 0 and self.init_niter >= 1, "niter must be >= 0, init_niter >= 1")
        require(self.init_sample >= 0, "init_sample must be >= 0")
        require(self.balance_sample >= 1 and self.balance_iters >= 0, "balance_sample >= 1, balance_iters >= 0")
        require(self.sinkhorn_eps > 0 and self.sinkhorn_iters >= 1, "sinkhorn_eps > 0, sinkhorn_iters >= 1")
        require(self.batch_size >= 1, "batch_size must be >= 1")


class RQKMeans:
    """Residual k-means quantizer (implements :class:`~forge_ray.core.quantize.base.Quantizer`).

    After ``fit``: ``codebooks[l]`` is (sizes[l], D) float32, ``biases[l]`` (sizes[l],)
    float32 (all zero unless balanced), ``stats[l]`` the per-pass k-means stats.
    """

    TYPE = "rq_kmeans"

    def __init__(self, config: RQKMeansConfig | None = None, **kwargs):
        self.config = config or RQKMeansConfig(**kwargs)
        self.sizes = list(self.config.sizes)
        self.codebooks: list[np.ndarray] = []
        self.biases: list[np.ndarray] = []
        self.stats: list[list[dict]] = []
        self.device = "cpu"
        self._device_tensors = None  # (codebooks, biases) as tensors on self.device

    def to(self, device: str | torch.device) -> "RQKMeans":
        """Encode on ``device`` (``cpu``, ``cuda``, ...) from now on; returns self."""
        self.device = str(device)
        self._device_tensors = None
        return self

    # ------------------------------------------------------------------ fitting
    def fit(self, x: np.ndarray) -> "RQKMeans":
        """Fit on an in-memory (N, D) float32 array."""
        x = check_embeddings(x)
        return self.fit_data(ArrayData(x, self.config.batch_size))

    def fit_data(self, data: KMeansData) -> "RQKMeans":
        """Fit level by level on any KMeansData (in-memory or distributed)."""
        cfg = self.config
        self.codebooks, self.biases, self.stats = [], [], []
        self._device_tensors = None
        for level, k in enumerate(self.sizes):
            seed = cfg.seed + 1000 * level
            res = kmeans(data, k, niter=cfg.niter, seed=seed, init=cfg.init,
                         init_sample=cfg.init_sample or None, init_niter=cfg.init_niter)
            centroids, bias = res.centroids, np.zeros(k, dtype=np.float32)
            if cfg.balanced:
                centroids, bias = self._balance(data, centroids, seed)
            self.codebooks.append(centroids)
            self.biases.append(bias)
            self.stats.append(res.stats)
            if level + 1 < len(self.sizes):
                data = data.residual(centroids, bias)
        return self

    def _balance(self, data: KMeansData, centroids: np.ndarray, seed: int):
        """Sinkhorn bias on a sample; move centroids to the means of the balanced
        assignment (balance_iters times); return (centroids, bias) float32."""
        cfg = self.config
        sample = torch.from_numpy(data.sample(cfg.balance_sample, seed + 7))

        def bias_for(c: np.ndarray) -> np.ndarray:
            cost = code_costs(sample, torch.from_numpy(c))  # (S, K)
            return sinkhorn_bias(cost, cfg.sinkhorn_eps, cfg.sinkhorn_iters).numpy()

        bias = bias_for(centroids)
        for _ in range(cfg.balance_iters):
            a = data.assign_to(centroids, bias)
            used = a.counts > 0
            centroids = centroids.copy()
            centroids[used] = (a.sums[used] / a.counts[used, None]).astype(np.float32)
            bias = bias_for(centroids)
        return centroids, bias.astype(np.float32)

    # ------------------------------------------------------------------ inference
    def _check_fitted(self):
        if not self.codebooks:
            raise RuntimeError("RQKMeans is not fitted (call fit or load)")

    def _tensors(self):
        """Codebooks and biases on ``self.device``, converted once (zero-copy on CPU)."""
        if self._device_tensors is None:
            self._device_tensors = ([as_tensor(c).to(self.device) for c in self.codebooks],
                                    [as_tensor(b).to(self.device) for b in self.biases])
        return self._device_tensors

    def _prefix(self, xb: np.ndarray, levels: int):
        """(B, D) -> ((B, levels) codes, (B, D) residual after those levels)."""
        cbs, biases = self._tensors()
        # a copy (on CPU): updated in place below, and xb may be read-only
        r = torch.from_numpy(np.array(xb)).to(self.device)
        codes = torch.empty(len(xb), levels, dtype=torch.int64, device=self.device)
        for level in range(levels):
            codes[:, level] = nearest_codes(r, cbs[level], "l2", biases[level])
            r -= cbs[level][codes[:, level]]
        return codes, r

    def encode(self, x: np.ndarray) -> np.ndarray:
        """(N, D) float32 -> (N, L) int64 codes."""
        self._check_fitted()
        x = check_embeddings(x, self.codebooks[0].shape[1])
        return batched(lambda xb: self._prefix(xb, len(self.sizes))[0].cpu().numpy(), x,
                       self.config.batch_size)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """(N, L) int64 -> (N, D) float32: the sum of the chosen codes."""
        self._check_fitted()
        codes = check_codes(codes, self.sizes)
        out = np.zeros((len(codes), self.codebooks[0].shape[1]), dtype=np.float32)
        for level, cb in enumerate(self.codebooks):
            out += cb[codes[:, level]]
        return out

    def _residual(self, xb: np.ndarray, codes: np.ndarray) -> torch.Tensor:
        """(B, D) and (B, l) given codes -> (B, D) residual after those levels, by the
        same subtractions as :meth:`_prefix`."""
        cbs, _ = self._tensors()
        r = torch.from_numpy(np.array(xb)).to(self.device)
        for level in range(codes.shape[1]):
            r -= cbs[level][torch.from_numpy(np.ascontiguousarray(codes[:, level])).to(self.device)]
        return r

    def rank_last_level(self, x: np.ndarray, k: int,
                        prefix: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """-> (codes (N, L), candidates (N, k)) with the last level ranked by the same
        (biased) cost that ``encode`` minimises, under each row's own prefix, or under
        the (N, L-1) ``prefix`` codes given."""
        self._check_fitted()
        x = check_embeddings(x, self.codebooks[0].shape[1])
        if not 1 <= k <= self.sizes[-1]:
            raise InputError("k", f"must be in [1, {self.sizes[-1]}], got {k}")
        cbs, biases = self._tensors()
        levels = len(self.sizes) - 1

        def one(xb, given=None):
            if given is None:
                codes, r = self._prefix(xb, levels)
            else:
                codes, r = torch.from_numpy(given).to(self.device), self._residual(xb, given)
            cand = ranked_codes(r, cbs[-1], k, "l2", biases[-1])
            return torch.cat([codes, cand[:, :1]], dim=1).cpu().numpy(), cand.cpu().numpy()

        if prefix is None:
            return batched(one, x, self.config.batch_size)
        return batched(one, x, self.config.batch_size, given_prefix(prefix, len(x), self.sizes[:levels]))

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | os.PathLike) -> None:
        self._check_fitted()
        folder = write_quantizer_json(folder, self.TYPE, self.sizes, dataclasses.asdict(self.config))
        arrays = {f"codebook_{i}": c for i, c in enumerate(self.codebooks)}
        arrays.update({f"bias_{i}": b for i, b in enumerate(self.biases)})
        np.savez(folder / WEIGHTS_FILE, **arrays)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "RQKMeans":
        config, path = saved_config_and_weights(folder, cls.TYPE, RQKMeansConfig, WEIGHTS_FILE)
        q = cls(config)
        with np.load(path, allow_pickle=False) as z:
            for i, k in enumerate(q.sizes):
                if f"codebook_{i}" not in z or z[f"codebook_{i}"].shape[0] != k:
                    raise InputError(path, f"codebook_{i} missing or not {k} codes")
                q.codebooks.append(z[f"codebook_{i}"].astype(np.float32))
                q.biases.append(z[f"bias_{i}"].astype(np.float32))
        return q
