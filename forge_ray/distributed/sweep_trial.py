"""What one sweep trial computes, in-process, with the core APIs (no Ray calls here
beyond Tune's report/checkpoint in :func:`quantizer_trial`).

A trial gets the sweep's shared sample (:class:`Sample`, from the object store) and a
point of the search space (:class:`TrialParams`): it trains a quantizer (RQ-VAE
epoch by epoch, reporting the quantised reconstruction MSE after each epoch so ASHA
can stop bad trials early; RQ-KMeans in one go), assigns one SID per item with the
chosen collision strategy and computes the SID metrics of the raw codes (``raw_``:
collision rate, Gini, utilization, reconstruction MSE, Embedding HitRate@K) and the
final SIDs' unique ratio. :func:`gr_trial` trains a tiny
T5 GR model on a trial's SIDs and returns Recall/NDCG on the held-out last items.

Memory per trial: the sample (N x D float32 + its pairs and sequences) plus the
quantizer and a few N x L code arrays; the GR step adds the examples (~E x history x
L int64) and a tiny model.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np

from forge_ray.config import require
from forge_ray.core.sid.collisions import Strategy

# The key of a trial's last report, the one with the SID metrics. Not Tune's ``done``:
# Tune sets that on every trial it ends, also on one ASHA stops early.
COMPLETE = "sid_metrics_done"


@dataclasses.dataclass
class TrialParams:
    """One point of the search space (every key a sweep may vary).

    codebook_size: codes per level (``levels`` levels). epochs x steps_per_epoch:
    RQ-VAE optimizer steps (ASHA's time unit is the epoch). recon/contrastive/commit
    weights: the RQ-VAE loss terms (core LossConfig).
    """

    quantizer: Literal["rqvae", "rq_kmeans", "rq_kmeans_balanced"] = "rqvae"
    levels: int = 3
    codebook_size: int = 16
    latent_dim: int = 8
    hidden_dim: int = 32
    recon_weight: float = 1.0
    contrastive_weight: float = 1.0
    commit_weight: float = 0.5
    collision: Strategy = "suffix"  # core.sid.collisions: the one list of strategies
    cap: int = 5
    epochs: int = 3
    steps_per_epoch: int = 20
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0

    def __post_init__(self):
        require(self.levels >= 1, "levels must be >= 1")
        require(self.codebook_size >= 1, f"codebook_size must be > 0, got {self.codebook_size}")
        require(self.latent_dim >= 1 and self.hidden_dim >= 1, "latent_dim and hidden_dim must be > 0")
        require(min(self.recon_weight, self.contrastive_weight, self.commit_weight) >= 0,
                "loss weights must be >= 0")
        require(self.epochs >= 1 and self.steps_per_epoch >= 1 and self.batch_size >= 1,
                "epochs, steps_per_epoch and batch_size must be >= 1")
        require(self.lr > 0 and self.cap >= 1, "lr must be > 0 and cap >= 1")


@dataclasses.dataclass
class Sample:
    """The sweep's data, shared by every trial.

    item_ids (N,) int64, x (N, D) float32, pairs (P, 2) int64 row indices into x
    (contrastive pairs whose both items are sampled; may be empty), users (S,) int64
    and seqs (list of S int64 arrays, time-ordered, restricted to sampled items).
    """

    item_ids: np.ndarray
    x: np.ndarray
    pairs: np.ndarray
    users: np.ndarray
    seqs: list


# ----------------------------------------------------------------------------- quantizer

def build_quantizer(p: TrialParams, dim: int, n: int):
    from forge_ray.core.quantize.rq_kmeans import RQKMeans, RQKMeansConfig
    from forge_ray.core.quantize.rqvae import RQVAE, RQVAEConfig

    sizes = [p.codebook_size] * p.levels
    if p.quantizer == "rqvae":
        return RQVAE(RQVAEConfig(in_dim=dim, hidden_dims=[p.hidden_dim], latent_dim=p.latent_dim,
                                 sizes=sizes, kmeans_init_samples=min(n, 4096),
                                 kmeans_init_iters=10, dead_code_steps=10, seed=p.seed))
    return RQKMeans(RQKMeansConfig(sizes=sizes, niter=5, init_niter=10, seed=p.seed,
                                   balanced=p.quantizer == "rq_kmeans_balanced",
                                   balance_sample=min(n, 16384)))


def train_epoch(q, p: TrialParams, s: Sample, epoch: int) -> None:
    """One epoch of RQ-VAE training (a fresh warm-up/cosine schedule per epoch), or
    the whole RQ-KMeans fit."""
    from forge_ray.core.quantize.losses import LossConfig
    from forge_ray.core.quantize.train_loop import TrainConfig, train_rqvae

    if p.quantizer != "rqvae":
        q.fit(s.x)
        return
    loss = LossConfig(recon_weight=p.recon_weight, contrastive_weight=p.contrastive_weight,
                      commit_weight=p.commit_weight)
    cfg = TrainConfig(steps=p.steps_per_epoch, batch_size=p.batch_size, pair_batch_size=p.batch_size,
                      lr=p.lr, warmup_steps=min(5, p.steps_per_epoch - 1), seed=p.seed * 1000 + epoch,
                      log_every=p.steps_per_epoch, loss=loss)
    train_rqvae(q, s.x, s.pairs if len(s.pairs) else None, cfg=cfg)


def recon_mse(q, x: np.ndarray) -> float:
    from forge_ray.core.sid.metrics import reconstruction_mse

    return reconstruction_mse(x, q.decode(q.encode(x)))


def sid_metrics(q, p: TrialParams, s: Sample, hitrate_topk: int) -> tuple[dict, np.ndarray]:
    """Assign SIDs to the sample and measure them; returns (metrics, final codes)."""
    from forge_ray.core.sid.collisions import CollisionConfig, resolve_all
    from forge_ray.core.sid.metrics import (SidMetricsConfig, embedding_hitrate, hitrate_key, level_counts,
                                            reconstruction_mse, sid_counts, sid_quality)

    coll = CollisionConfig(strategy=p.collision, cap=p.cap, candidates=min(50, p.codebook_size),
                           seed=p.seed)
    if coll.needs_candidates:
        codes, cand = q.rank_last_level(s.x, coll.candidates)
    else:
        codes, cand = q.encode(s.x), None
    final, stats = resolve_all(s.item_ids, codes, cand, coll, last_size=p.codebook_size)
    sizes = [p.codebook_size] * p.levels + ([int(final[:, -1].max()) + 1] if p.collision == "suffix" else [])
    # The quantizer's own spread is measured on the raw codes (a suffix level would make
    # every final SID unique and hide it); the final codes give the unique ratio after handling.
    raw = sid_quality(sid_counts(codes), level_counts(codes, sizes[: p.levels]))
    final_unique = sid_quality(sid_counts(final), level_counts(final, sizes))["unique_sid_ratio"]
    recon = q.decode(codes)
    hist = [seq[:-1] for seq in s.seqs if len(seq) >= 2]
    targets = np.asarray([seq[-1] for seq in s.seqs if len(seq) >= 2], np.int64)
    hr = embedding_hitrate(s.item_ids, recon, hist, targets, SidMetricsConfig(topk=hitrate_topk))
    metrics = {
        "raw_collision_rate": float(raw["collision_rate"]), "raw_gini": float(raw["gini"]),
        "raw_unique_sid_ratio": float(raw["unique_sid_ratio"]),
        "raw_max_items_per_sid": int(raw["max_items_per_sid"]),
        "raw_utilization": float(np.mean(raw["utilization"])),  # mean over the levels
        "final_unique_sid_ratio": float(final_unique),
        "moved": int(stats["moved"]), "fallback": int(stats["fallback"]),
        "raw_recon_mse": reconstruction_mse(s.x, recon),
        "raw_" + hitrate_key(hitrate_topk): float(hr["hitrate"]),
        "sid_levels": len(sizes)}
    return metrics, final


def quantizer_trial(config: dict, sample_ref, base: dict, hitrate_topk: int) -> None:
    """The Tune function trainable: resumes from its last epoch checkpoint, reports
    ``raw_recon_mse`` every epoch and the SID metrics at the end (marked :data:`COMPLETE`,
    with the SIDs saved in the final checkpoint for the GR stage)."""
    import ray
    from ray import tune

    from forge_ray.core.quantize.registry import load_quantizer

    p = TrialParams(**{**base, **config})
    s: Sample = ray.get(sample_ref[0]) if isinstance(sample_ref, list) else sample_ref
    start, q = 0, None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            start = json.loads((Path(d) / "epoch.json").read_text())["epoch"] + 1
            q = load_quantizer(Path(d) / "quantizer")
    q = q or build_quantizer(p, s.x.shape[1], len(s.x))
    epochs = p.epochs if p.quantizer == "rqvae" else 1
    for epoch in range(start, epochs):
        train_epoch(q, p, s, epoch)
        report = {"epoch": epoch + 1, "raw_recon_mse": recon_mse(q, s.x)}
        with tempfile.TemporaryDirectory() as d:
            q.save(Path(d) / "quantizer")
            (Path(d) / "epoch.json").write_text(json.dumps({"epoch": epoch}))
            if epoch == epochs - 1:
                metrics, final = sid_metrics(q, p, s, hitrate_topk)
                report.update(metrics, **{COMPLETE: True})
                np.savez(Path(d) / "sids.npz", item_ids=s.item_ids, codes=final)
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))


# ----------------------------------------------------------------------------- GR

@dataclasses.dataclass
class SweepGRConfig:
    """The optional second stage: a tiny GR model on the ``top_k`` trials' SIDs
    (ranked by the sweep's ``select_metric``); 0 disables it."""

    top_k: int = 0
    preset: str = "tiny"
    steps: int = 150
    batch_size: int = 64
    lr: float = 5e-3
    max_history: int = 10
    num_beams: int = 10
    cpus: float = 0.5

    def __post_init__(self):
        require(self.top_k >= 0, "gr.top_k must be >= 0")
        require(self.steps >= 1 and self.batch_size >= 1 and self.lr > 0, "gr.steps/batch_size/lr must be > 0")
        require(self.max_history >= 1 and self.num_beams >= 10, "gr.max_history >= 1, gr.num_beams >= 10")


def gr_trial(sids_npz: str, s: Sample, cfg: SweepGRConfig, seed: int = 0) -> dict:
    """Train a T5 GR model on leave-one-out examples of ``s.seqs`` with the SIDs in
    ``sids_npz`` and score Recall/NDCG@5/10 on each user's last item (constrained
    beam search), next to the most-popular baseline on the same queries."""
    import torch

    from forge_ray.core.gr.data import ItemSIDTable, build_examples, collate_seq2seq
    from forge_ray.core.gr.decoding import generate_sids
    from forge_ray.core.gr.metrics import RetrievalMetrics
    from forge_ray.core.gr.models import GRModelConfig, build_model
    from forge_ray.core.gr.popularity import PopularityCounter
    from forge_ray.core.gr.trie import SIDTrie
    from forge_ray.core.gr.vocab import SIDVocab

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    with np.load(sids_npz, allow_pickle=False) as z:
        ids, codes = z["item_ids"], z["codes"]
    sizes = tuple(int(codes[:, l].max()) + 1 for l in range(codes.shape[1]))
    vocab, table = SIDVocab(sizes), ItemSIDTable(ids, codes)
    train, _ = build_examples(s.users, s.seqs, table, vocab, "train", cfg.max_history)
    test, _ = build_examples(s.users, s.seqs, table, vocab, "test", cfg.max_history)
    model = build_model(GRModelConfig(arch="t5", preset=cfg.preset), vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(cfg.steps):
        rows = rng.integers(0, len(train["labels"]), cfg.batch_size)
        loss = model(**collate_seq2seq(train["input_ids"][rows], train["labels"][rows], vocab)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    trie = SIDTrie(codes, ids, vocab.sizes)
    gr, pop = RetrievalMetrics(), RetrievalMetrics()
    counter = PopularityCounter()
    counter.update_from_sequences(s.seqs, holdout=2)
    with torch.no_grad():
        for lo in range(0, len(test["labels"]), 64):
            prompts = list(test["input_ids"][lo:lo + 64])
            truths = [np.asarray([t]) for t in test["target_item"][lo:lo + 64]]
            gr.update_from_beams(generate_sids(model, vocab, trie, prompts, cfg.num_beams), trie, truths)
            pop.update(counter.rank(len(truths), pop.max_k), truths)
    out = {f"gr_{k}": float(v) for k, v in gr.result().items() if "@" in k}
    out.update({f"pop_{k}": float(v) for k, v in pop.result().items() if "@" in k})
    out["gr_queries"] = int(gr.result()["queries"])
    return out
