"""The Ray Train worker of ``train-sid`` for RQ-VAE (one per data-parallel rank).

Everything arrives through the loop config (never globals). Each rank reads its
shard of the items (``get_dataset_shard("train")``) and, when the dataset has
co-occurrence pairs, of the joined pair embeddings (``"pairs"``), cycling through
epochs until the step budget is spent. A dataset the driver cached (below
``scale.cache_mb``) is read once into the rank, and each epoch is a reseeded
permutation of that copy: no Ray Data execution per epoch, whose split coordinator
and log lines took CPU from the workers on a small machine. A larger one streams
every epoch through a reseeded local shuffle buffer (``shuffle_buffer`` rows). Ray
Train splits both with ``equal=True``, so every rank reaches an epoch end at the same
step. DeepSpeed (ZeRO stage from the JSON) owns the optimizer. Per step, besides
DeepSpeed's gradient reduction, one all-reduce carries the NaN flag and every level's
codebook statistics (EMA, dead-code restart); codebooks are broadcast only at steps
that restart codes.

Memory per rank: the model, its optimizer partition, one reconstruction batch and
one pair batch (``train.batch_size`` / ``train.pair_batch_size`` rows), and per
dataset either its cached shard (at most ``scale.cache_mb`` / world MiB; twice that
while it is read in) or a shuffle buffer (``shuffle_buffer`` rows of D, or of 2 x D
floats for pairs).
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import time
from pathlib import Path

import ray.train
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from forge_ray import logs
from forge_ray.core.quantize.losses import LossConfig
from forge_ray.core.quantize.rqvae import RQVAE, RQVAEConfig
from forge_ray.core.quantize.train_loop import batch_kinds, compute_loss
from forge_ray.core.schedule import warmup_cosine_factor
from forge_ray.distributed.train_common import RunReporter, init_deepspeed, read_shard

FINAL_DIR = "final_quantizer"  # rank 0 saves the trained quantizer here, inside run_dir


def shard_batches(shard, name: str, batch_size: int, shuffle_rows: int, seed: int, held: bool):
    """Endless (B, ...) tensor batches of a dataset ``shard`` (a Ray Data iterator, this
    rank's share of dataset ``name``), in a new order every epoch (seed ``seed + epoch``;
    ``shuffle_rows`` 0: the stored order). Each epoch drops its last partial batch.

    ``held``: the shard is read into this process once and each epoch permutes all of
    it; otherwise it streams every epoch through a ``shuffle_rows``-row shuffle buffer.
    """
    rows = {k: torch.from_numpy(v) for k, v in read_shard(shard).items()} if held else None
    n = len(next(iter(rows.values()))) if rows else 0  # rows of a held shard
    for epoch in itertools.count():
        if rows is None:
            epoch_batches = shard.iter_torch_batches(
                batch_size=batch_size, drop_last=True, local_shuffle_buffer_size=shuffle_rows or None,
                local_shuffle_seed=seed + epoch if shuffle_rows else None)
        else:
            order = (torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
                     if shuffle_rows else torch.arange(n))
            epoch_batches = ({k: v[order[s: s + batch_size]] for k, v in rows.items()}  # gathers copy
                             for s in range(0, n - batch_size + 1, batch_size))
        empty = True
        for batch in epoch_batches:
            empty = False
            yield batch
        if empty:
            raise RuntimeError(f"the {name!r} shard of this worker holds fewer than {batch_size} rows")


def _broadcast_hook(device: torch.device):
    """In-place broadcast-from-rank-0 for ``update_codebooks`` (NCCL needs the codebook
    on the GPU; gloo on CPU)."""
    def broadcast(t: torch.Tensor) -> None:
        buf = t.to(device)
        dist.broadcast(buf, src=0)
        t.copy_(buf)

    return broadcast


def _kill_fault(faults: dict, rank: int, step: int) -> None:
    """Test hook (``train_common.injected_faults``): rank ``kill_rank`` dies at ``kill_step``
    once (a marker file remembers the first attempt), so a restarted worker group gets past it."""
    if rank == faults["kill_rank"] and step == faults["kill_step"] and faults["marker"]:
        marker = Path(faults["marker"])
        if not marker.exists():
            marker.write_text(f"killed rank {rank} at step {step}\n")
            os._exit(1)


def rqvae_worker(cfg: dict) -> None:
    """Train the RQ-VAE for ``cfg["total_steps"]`` optimizer steps (resuming if a
    checkpoint exists); rank 0 saves the result under ``run_dir/final_quantizer``."""
    logs.setup_worker(cfg["log_levels"])
    if cfg["torch_threads"]:
        torch.set_num_threads(cfg["torch_threads"])
    # Subnormal floats (below 1.2e-38) appear in a trained RQ-VAE's contrastive backward
    # and are slow on CPUs: flushing them to zero made the pair step of Beauty's trained
    # RQ-VAE 1.65x faster (bench/bench_train_sid.py --trained). Process-wide, which is
    # why only here: this process is the worker's own.
    torch.set_flush_denormal(True)
    rank = ray.train.get_context().get_world_rank()
    model = RQVAE(RQVAEConfig(**cfg["rqvae"]))
    model.load_state_dict(cfg["init_state"])  # k-means-initialised on the driver
    train, loss_cfg = cfg["train"], LossConfig(**cfg["train"]["loss"])
    total = cfg["total_steps"]
    engine = init_deepspeed(model, cfg["deepspeed"], functools.partial(
        warmup_cosine_factor, warmup=cfg["warmup_steps"], total=total, min_ratio=train["min_lr_ratio"]))
    reporter = RunReporter(cfg["run_dir"], cfg["fingerprint"])
    step = int(reporter.restore(engine).get("step", 0))
    module: RQVAE = engine.module
    module.train()
    broadcast = _broadcast_hook(engine.device)
    has_pairs = cfg["has_pairs"]
    # Seeds differ per rank and per resumed attempt (a resume restarts the epoch count).
    seed = train["seed"] * 1_000_003 + 1_009 * rank + step
    held = cfg["held_in_workers"]
    recon_it = shard_batches(ray.train.get_dataset_shard("train"), "train", train["batch_size"],
                             cfg["shuffle_buffer"], seed, held["train"])
    pair_it = (shard_batches(ray.train.get_dataset_shard("pairs"), "pairs", train["pair_batch_size"],
                             cfg["shuffle_buffer"], seed, held["pairs"]) if has_pairs else None)
    bar = tqdm(total=total, initial=step, desc="train-sid", disable=rank != 0 or not train["progress"])
    window: dict[str, list[float]] = {}  # metrics since the last log line (steps alternate kinds)
    world, window_rows, window_start = ray.train.get_context().get_world_size(), 0, time.perf_counter()
    while step < total:
        _kill_fault(cfg["faults"], rank, step)
        use_recon, use_pairs = batch_kinds(step, has_pairs, loss_cfg)
        recon = next(recon_it)["x"].to(engine.device) if use_recon else None
        pair = None
        if use_pairs:
            b = next(pair_it)
            pair = (b["a"].to(engine.device), b["b"].to(engine.device))
        loss, metrics = compute_loss(module, recon, pair, loss_cfg)
        if step == cfg["faults"]["nan_step"]:  # test hook
            loss = loss * float("nan")
        # One all-reduce per step besides DeepSpeed's gradients: the NaN flag (every rank
        # stops at the same step if any rank saw one) and every level's codebook statistics.
        bad = torch.tensor([0.0 if math.isfinite(loss.item()) else 1.0], device=engine.device)
        summed = torch.cat([bad, module.codebook_stats().to(engine.device)])
        dist.all_reduce(summed)
        if summed[0].item():  # no checkpoint: the last good one stays the latest
            reporter.stop(f"loss became NaN at step {step}")
            return
        engine.backward(loss)
        engine.step()
        restarted = module.update_codebooks(stats=summed[1:], broadcast=broadcast)
        metrics.update(restarted)
        for key, value in metrics.items():
            window.setdefault(key, []).append(value)
        window_rows += (len(recon) if use_recon else 0) + (2 * len(pair[0]) if use_pairs else 0)
        if any(restarted.values()) and not module.config.ema:
            # ZeRO keeps fp32 master copies of the parameters and would overwrite
            # the re-seeded codes with them at the next step: update the masters too.
            from deepspeed.utils import safe_set_full_fp32_param

            for book in module.codebooks:
                safe_set_full_fp32_param(book, book.data)
        step += 1
        reporter.progress(step)
        bar.update(1)
        if step % train["log_every"] == 0 or step == total:
            rate = world * window_rows / (time.perf_counter() - window_start)  # all ranks alike
            reporter.log({"lr": engine.get_lr()[0], "samples_per_s": rate,
                          "skipped_steps": int(engine.skipped_steps),
                          **{k: sum(v) / len(v) for k, v in window.items()}}, step)
            window, window_rows, window_start = {}, 0, time.perf_counter()
        if step == total and reporter.skipped_most(engine, step):
            return
        if step % cfg["checkpoint_every"] == 0 or step == total:
            reporter.report({"step": step, "loss": metrics["loss"]}, engine=engine,
                            client_state={"step": step})
    bar.close()
    if rank == 0:
        module.eval()
        module.save(Path(cfg["run_dir"]) / FINAL_DIR)
    reporter.close()
