"""``forge-ray train-gr``: a GR model (T5 / Qwen2) on SID sequences, Ray Train + DeepSpeed.

Driver: builds the streaming example datasets (:mod:`forge_ray.distributed.gr_data`),
counts them, takes the validation windows, and runs :func:`_worker` on
``scale.num_workers`` Ray Train workers (gloo on CPU, NCCL on GPU). Each worker streams
its shard with ``get_dataset_shard("train")``, trains through DeepSpeed (ZeRO-1/2 JSON
from ``cluster/deepspeed/``) with linear warm-up + cosine decay, all-reduces the loss
(a NaN on any rank stops the run with the last good checkpoint kept), and checkpoints
every ``scale.checkpoint_every`` optimizer steps. Every ``train.eval_every`` steps the
workers score the validation windows in parallel, each its share (loss, and
Recall/NDCG@K with constrained beam search when ``train.valid_beams > 0``), and
all-reduce the sums, so every rank takes the same early-stopping decision.

Training examples are sliding windows (T5 or decoder-only) or, for a decoder-only
model, whole sequences (``data.train_examples: sequences``): one forward pass then
trains every target of a user's chunk (:mod:`forge_ray.core.gr.data`).

Checkpoints carry the step, the epoch position, the metric history and the best
weights so far (rank 0's client state), so a re-run with the same run storage and name
resumes the step count and early-stopping state. The driver writes MODEL_DIR from the
final checkpoint: the best weights (``save_pretrained``) + SID vocabulary/tokenizer,
``metrics.json``, ``history.jsonl``, ``curves.png`` and a ``gr_model`` manifest that
references the SID table the model was trained on.

Memory: a worker holds its model, optimizer shard and one shuffle buffer of examples;
every rank holds the validation windows and, when beams are on, the trie
(8 x (L + 1) bytes per item).
ZeRO-3 is not supported (rank 0 validates with the full local weights).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from forge_ray import logs
from forge_ray.config import ScaleConfig, require, to_dict
from forge_ray.core.gr.data import ExampleCounts, ItemSIDTable, prompt_eos
from forge_ray.core.gr.model_card import model_card
from forge_ray.core.gr.models import MODEL_KIND, GRModelConfig, build_model, count_parameters, save_model
from forge_ray.core.gr.vocab import SIDVocab
from forge_ray.core.schedule import warmup_cosine_factor
from forge_ray.distributed.gr_data import GRDataConfig, is_algr
from forge_ray.errors import InputError

# Not print() in a Ray Train worker: Ray Train patches print to log the line, and
# also writes it to stdout because Ray workers replace sys.stdout: it shows twice.
log = logging.getLogger(__name__)


@dataclass
class GROptimConfig:
    """Optimisation, validation and early stopping.

    micro_batch: examples per worker per forward pass; global batch =
        micro_batch x grad_accum x num_workers.
    max_steps: optimizer steps cap (0 = ``epochs`` full passes).
    eval_every: optimizer steps between validations (also run at the end).
    valid_samples / valid_beams: validation windows (every user's second-to-last
        item; 0 = all of them), split across the workers; beams = 0 scores the
        validation loss only (no trie needed).
    early_stop_metric: ``valid_loss`` (lower is better) or a ``recall@K`` / ``ndcg@K``.
    patience: validations without improvement before stopping (0 = never stop early).
    length_buckets: read this many micro-batches at a time, sort them by length and
        serve them in random order, so each pads to about its own length (1 = off);
        worth it when lengths vary, as whole-sequence chunks do (2 to max_history + 1
        items).
    shuffle_buffer: rows each worker shuffles a streamed training set through,
        reseeded every epoch. A training set below ``scale.cache_mb`` is held by each
        worker instead (its shard, permuted whole every epoch); 0 keeps the stored order.
    """

    lr: float = 1e-3
    weight_decay: float = 0.01
    micro_batch: int = 64
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int = 0
    warmup_steps: int = 100
    eval_every: int = 500
    valid_samples: int = 512
    valid_beams: int = 20
    valid_ks: tuple[int, ...] = (5, 10)
    early_stop_metric: str = "recall@10"
    patience: int = 5
    log_every: int = 20
    shuffle_buffer: int = 4096
    length_buckets: int = 1
    seed: int = 0

    def __post_init__(self):
        require(self.lr > 0 and self.weight_decay >= 0, "train.lr must be > 0 and weight_decay >= 0")
        require(self.micro_batch >= 1 and self.grad_accum >= 1, "train.micro_batch/grad_accum must be >= 1")
        require(self.epochs >= 1 and self.max_steps >= 0, "train.epochs must be >= 1, max_steps >= 0")
        require(self.warmup_steps >= 0 and self.eval_every >= 1 and self.log_every >= 1,
                "train.warmup_steps >= 0, eval_every/log_every >= 1")
        require(self.valid_samples >= 0 and self.valid_beams >= 0, "train.valid_samples >= 0, valid_beams >= 0")
        require(bool(self.valid_ks) and min(self.valid_ks) >= 1, "train.valid_ks must be positive")
        allowed = {"valid_loss"} | {f"{m}@{k}" for m in ("recall", "ndcg") for k in self.valid_ks}
        require(self.early_stop_metric in allowed,
                f"train.early_stop_metric must be one of {sorted(allowed)}")
        require(self.early_stop_metric == "valid_loss" or self.valid_beams > 0,
                "train.early_stop_metric needs train.valid_beams > 0 unless it is valid_loss")
        require(self.patience >= 0 and self.shuffle_buffer >= 0, "train.patience/shuffle_buffer must be >= 0")
        require(self.length_buckets >= 1, "train.length_buckets must be >= 1")


@dataclass
class GRRunConfig:
    """Where Ray Train keeps checkpoints; the same storage + name resumes a run.

    storage_path: default ``<MODEL_DIR>.runs`` next to the output.
    """

    storage_path: str | None = None
    name: str = "train_gr"

    def storage(self, out: str | os.PathLike) -> Path:
        """Ray Train's storage path for MODEL_DIR ``out``; the run itself is
        ``storage / name`` (the only folder of it this run owns)."""
        return Path(self.storage_path or f"{os.fspath(out)}.runs")


@dataclass
class TrainGRConfig:
    """Everything ``forge-ray train-gr`` reads (see configs/*/train_gr.yaml)."""

    model: GRModelConfig = field(default_factory=GRModelConfig)
    data: GRDataConfig = field(default_factory=GRDataConfig)
    train: GROptimConfig = field(default_factory=GROptimConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    run: GRRunConfig = field(default_factory=GRRunConfig)

    def __post_init__(self):
        require(self.data.train_examples == "windows" or self.model.arch != "t5",
                "data.train_examples=sequences needs a decoder-only model (model.arch=qwen2)")


# ---- the worker -------------------------------------------------------------------
def _worker(cfg: dict) -> None:
    """Ray Train worker: everything comes through ``cfg`` (no globals)."""
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    from forge_ray.core.gr.data import IGNORE, collate_causal, collate_seq2seq, collate_sequences
    from forge_ray.distributed.train_common import RunReporter, autocast, init_deepspeed, native_bf16, read_shard

    logs.setup_worker(cfg["log_levels"])
    if cfg["torch_threads"]:
        torch.set_num_threads(cfg["torch_threads"])
    if cfg["autocast"] == "bf16" and not native_bf16():
        log.warning("[train-gr] scale.autocast=bf16, but this worker's device has no bf16 matrix "
                    "units (no AMX or AVX512-BF16 CPU, no bf16 GPU): bf16 is emulated and slower "
                    "than float32; set scale.autocast=none")
    t = cfg["train"]
    torch.manual_seed(t["seed"])
    vocab = SIDVocab(tuple(cfg["sizes"]))
    model_cfg = GRModelConfig(**cfg["model"])
    model = build_model(model_cfg, vocab)
    total = cfg["total_steps"]
    engine = init_deepspeed(model, cfg["ds_config"],
                            functools.partial(warmup_cosine_factor, warmup=t["warmup_steps"], total=total))
    reporter = RunReporter(cfg["run_dir"], cfg["fingerprint"])
    state = reporter.restore(engine)
    rank = reporter.rank
    step = int(engine.global_steps)
    epoch, done_in_epoch = state.get("epoch", 0), state.get("micro_in_epoch", 0)
    history, best = state.get("history", []), state.get("best")
    bad, best_state, best_step = state.get("bad_evals", 0), state.get("best_state"), state.get("best_step")
    world = dist.get_world_size()
    valid = {k: v[rank::world] for k, v in ray.get(cfg["valid_ref"]).items()}  # this rank's share
    trie = ray.get(cfg["trie_ref"])
    if cfg["sequences"]:
        collate = collate_sequences
    else:
        collate = collate_seq2seq if model_cfg.arch == "t5" else collate_causal
    shard = ray.train.get_dataset_shard("train")
    # a cached training set: read this rank's shard once; epochs then permute it in place
    # of a Ray Data execution each (whose coordinator took CPU from the workers)
    held = read_shard(shard) if cfg["held_in_workers"] else None
    higher = t["early_stop_metric"] != "valid_loss"
    # Rates are over the window since the last log line, so start-up, checkpoints and
    # validation passes do not blur the steady state; ``data_wait`` is the share of the
    # window this rank spent blocked on its Ray Data shard and the collate.
    tokens, targets, t0, stop, waiting = 0.0, 0.0, time.perf_counter(), False, _Wait()

    def checkpoint(metrics: dict, finished: bool = False) -> None:
        client = {"epoch": epoch, "micro_in_epoch": micro, "history": history, "best": best,
                  "best_step": best_step, "bad_evals": bad, "best_state": best_state, "finished": finished}
        reporter.report({"step": step, **metrics}, engine=engine, client_state=client if rank == 0 else {})

    micro = done_in_epoch
    while epoch < t["epochs"] and step < total and not stop:
        for i, batch in enumerate(waiting.timed(_micro_batches(shard, held, t, epoch))):
            if i < done_in_epoch:  # resumed mid-epoch: skip what was trained on
                continue
            collate_start = time.perf_counter()
            # batches are read-only views: copy rows before torch takes them
            b = collate([np.array(x) for x in batch["input_ids"]], list(batch["labels"]), vocab)
            waiting.seconds += time.perf_counter() - collate_start
            with autocast(cfg["autocast"]):
                loss = engine(**b).loss
            if int(engine.global_steps) + 1 == cfg["nan_step"]:  # fault injection for tests
                loss = loss * float("nan")
            engine.backward(loss)
            engine.step()
            micro = i + 1
            # one all-reduce for the loss and both throughput counts
            stats = torch.tensor([loss.detach().float().item(), float(b["attention_mask"].sum()),
                                  float((b["labels"] != IGNORE).sum()) / vocab.n_levels])
            dist.all_reduce(stats)
            tokens, targets = tokens + float(stats[1]), targets + float(stats[2])
            if not math.isfinite(float(stats[0])):  # the sum is NaN if any rank's loss is
                reporter.stop(f"loss became NaN at step {step + 1}")
                return
            if int(engine.global_steps) == step:
                continue  # inside a gradient accumulation window
            step = int(engine.global_steps)
            reporter.progress(step)
            if step % t["log_every"] == 0:
                elapsed = time.perf_counter() - t0
                rate = tokens / elapsed
                row = {"train/loss": float(stats[0]) / world,
                       "train/lr": engine.get_lr()[0], "train/tokens_per_s": rate,
                       "train/targets_per_s": targets / elapsed, "train/data_wait": waiting.seconds / elapsed,
                       "train/skipped_steps": int(engine.skipped_steps)}
                reporter.log(row, step)
                if rank == 0:
                    log.info(f"[train-gr] step {step}/{total} epoch {epoch} loss {row['train/loss']:.4f} "
                             f"{rate:,.0f} tok/s, {row['train/data_wait']:.0%} waiting for data")
                tokens, targets, waiting.seconds, t0 = 0.0, 0.0, 0.0, time.perf_counter()
            paused = time.perf_counter()  # validation and checkpoints stay out of the rates
            if cfg["validate"] and (step % t["eval_every"] == 0 or step >= total):
                metrics = _validate(engine.module, vocab, trie, valid, t)  # the same on every rank
                value = metrics[t["early_stop_metric"]]
                if best is None or (value > best if higher else value < best):
                    best, bad, best_step = value, 0, step
                    if rank == 0:  # rank 0 writes the model: only it keeps the best weights
                        best_state = {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}
                else:
                    bad += 1
                history.append({"step": step, **metrics})
                if rank == 0:
                    reporter.log({f"valid/{k}": v for k, v in metrics.items()}, step)
                    log.info(f"[train-gr] step {step} validation {json.dumps(metrics)}")
                stop = t["patience"] > 0 and bad >= t["patience"]
            if stop or step >= total:
                break
            if step % cfg["checkpoint_every"] == 0:
                checkpoint({})
            t0 += time.perf_counter() - paused
        else:  # the epoch ran out (no break): the next one starts from its beginning
            epoch, done_in_epoch, micro = epoch + 1, 0, 0
    if reporter.skipped_most(engine, step):
        return
    checkpoint({"best": best, "stopped_early": stop}, finished=True)
    reporter.close()


class _Wait:
    """Seconds spent waiting for input since the last reset (``seconds = 0``)."""

    def __init__(self):
        self.seconds = 0.0

    def timed(self, items: Iterator) -> Iterator:
        """Yield from ``items``, adding the time each ``next`` blocks to ``seconds``."""
        it, end = iter(items), object()
        while True:
            start = time.perf_counter()
            item = next(it, end)
            self.seconds += time.perf_counter() - start
            if item is end:
                return
            yield item


def _micro_batches(shard, held: dict[str, np.ndarray] | None, t: dict,
                   epoch: int) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of this worker's shard as micro-batches (``train.length_buckets``):
    streamed through the shuffle buffer, or, for a ``held`` shard, a permutation of it.

    Deterministic for a seed and epoch, so a resumed epoch skips the same ones. Every
    worker yields the same number (Ray Train splits the rows equally; a remainder
    smaller than a micro-batch is dropped, as ``drop_last`` does without buckets), so
    the all-reduces stay in step.
    """
    mb, groups = t["micro_batch"], t["length_buckets"]
    size = mb * groups
    if held is None:
        big = shard.iter_batches(batch_size=size, batch_format="numpy", drop_last=groups == 1,
                                 local_shuffle_buffer_size=t["shuffle_buffer"] or None,
                                 local_shuffle_seed=t["seed"] + epoch)
    else:
        n = len(held["input_ids"])
        perm = (np.random.default_rng([t["seed"], epoch, 1]).permutation(n) if t["shuffle_buffer"]
                else np.arange(n))
        stop = n - n % size if groups == 1 else n
        big = ({k: v[perm[s: s + size]] for k, v in held.items()} for s in range(0, stop, size))
    if groups == 1:
        yield from big
        return
    rng = np.random.default_rng([t["seed"], epoch])
    for batch in big:
        order = np.argsort([len(x) for x in batch["input_ids"]], kind="stable")
        cuts = [order[s: s + mb] for s in range(0, len(order) - mb + 1, mb)]
        for j in rng.permutation(len(cuts)):
            yield {k: v[cuts[j]] for k, v in batch.items()}


def _validate(model, vocab: SIDVocab, trie, valid: dict, t: dict) -> dict[str, float]:
    """Every rank scores its share of the validation windows; the sums are
    all-reduced -> validation loss (mean per window) and, with beams, Recall/NDCG@K."""
    import torch
    import torch.distributed as dist

    from forge_ray.core.gr.data import collate_causal, collate_seq2seq
    from forge_ray.core.gr.decoding import generate_sids
    from forge_ray.core.gr.metrics import RetrievalMetrics

    was_training = model.training
    model.eval()
    collate = collate_seq2seq if model.config.is_encoder_decoder else collate_causal
    n, loss_sum = len(valid["input_ids"]), 0.0
    acc = RetrievalMetrics(recall_ks=tuple(t["valid_ks"]), ndcg_ks=tuple(t["valid_ks"]))
    names = [f"{m}@{k}" for m in ("ndcg", "recall") for k in sorted(t["valid_ks"])]
    chunk = max(1, t["micro_batch"])
    device = next(model.parameters()).device
    with torch.no_grad():
        for s in range(0, n, chunk):
            ids, labels = valid["input_ids"][s: s + chunk], valid["labels"][s: s + chunk]
            batch = {k: v.to(device) for k, v in collate(ids, labels, vocab).items()}
            loss_sum += float(model(**batch).loss) * len(ids)
            if t["valid_beams"] > 0:
                beams = generate_sids(model, vocab, trie, ids, num_beams=t["valid_beams"])
                acc.update_from_beams(beams, trie, [np.asarray([x]) for x in valid["target_item"][s: s + chunk]])
    model.train(was_training)
    sums = torch.tensor([loss_sum, float(n)] + [acc.sums.get(k, 0.0) for k in names], dtype=torch.float64)
    dist.all_reduce(sums)  # one all-reduce for the loss, the count and every metric
    total = max(float(sums[1]), 1.0)
    out = {"valid_loss": float(sums[0]) / total}
    if t["valid_beams"] > 0:
        out.update({k: float(v) / total for k, v in zip(names, sums[2:].tolist())})
    return out


# ---- the driver -------------------------------------------------------------------
def _example_inputs(cfg: TrainGRConfig, data: str, sids: str | None, refit: bool):
    """(vocab, train dataset, valid rows, counts, trie or None, SID table reference);
    ``refit`` (:func:`refits`): no validation rows and no trie."""
    from forge_ray.core.gr.trie import SIDTrie
    from forge_ray.distributed import gr_data

    t = cfg.train
    eos = prompt_eos(cfg.model.arch == "t5")
    if gr_data.is_algr(data):
        if cfg.data.train_examples != "windows":
            raise InputError(data, "an AL-GR file holds ready-made windows; set data.train_examples=windows")
        sizes = gr_data.sid_sizes(sids) if sids else tuple(cfg.data.algr_sizes)
        vocab = SIDVocab(sizes)
        train = gr_data.algr_examples(data, vocab, valid_every=50, part="train", add_eos=eos)
        with gr_data.algr_read_errors(data):
            valid = gr_data.algr_examples(data, vocab, valid_every=50, part="valid", add_eos=eos)
            valid = valid.take(t.valid_samples) if t.valid_samples else valid.take_all()
        if t.valid_beams > 0:
            raise InputError(data, "AL-GR training input has no item table for beam validation; "
                                   "set train.valid_beams=0 and train.early_stop_metric=valid_loss")
        with gr_data.algr_read_errors(data):
            counts = ExampleCounts(examples=train.count())
        return vocab, train, valid, counts, None
    if sids is None:
        raise InputError(data, "a canonical dataset needs --sids SIDS_DIR")
    vocab = SIDVocab(gr_data.sid_sizes(sids))
    beams = t.valid_beams > 0 and not refit
    item_ids, codes = gr_data.load_sid_arrays(sids) if (
        beams or gr_data.use_broadcast(sids, cfg.data)) else (None, None)
    table = ItemSIDTable(item_ids, codes) if gr_data.use_broadcast(sids, cfg.data) else None
    trie = SIDTrie(codes, item_ids, vocab.sizes) if beams else None
    train = gr_data.sequence_examples(data, sids, vocab, "train", cfg.data, table=table, add_eos=eos
                                      ).select_columns(["input_ids", "labels"])
    counts = gr_data.count_examples(data, sids, vocab, "train", cfg.data, table=table)
    if not refit:
        valid = gr_data.sequence_examples(data, sids, vocab, "valid", cfg.data, table=table, add_eos=eos
                                          ).select_columns(["input_ids", "labels", "target_item"])
        valid = valid.take(t.valid_samples) if t.valid_samples else valid.take_all()
    else:  # the validation items are training targets: nothing is left to validate on
        valid = []
    return vocab, train, valid, counts, trie


def refits(cfg: TrainGRConfig, data: str) -> bool:
    """A final refit (``data.train_holdout`` 1): the validation items are trained on,
    so the run validates nothing and keeps its last weights."""
    return cfg.data.train_holdout < 2 and not is_algr(data)


def _selection(t: GROptimConfig, state: dict, history: list[dict], refit: bool) -> dict:
    """Which weights MODEL_DIR holds and why (recorded in metrics.json and the manifest)."""
    step = state.get("best_step")
    if refit:
        return {"step": int(state.get("global_steps", 0)),
                "why": "the last step: a refit (data.train_holdout=1) trains on the validation items, "
                       "so there is nothing held out to select by"}
    if not history or step is None:
        return {"step": int(state.get("global_steps", 0)), "why": "the last step (no validation ran)"}
    order = "highest" if t.early_stop_metric != "valid_loss" else "lowest"
    return {"step": int(step), "metric": t.early_stop_metric, "value": state["best"],
            "why": f"{order} {t.early_stop_metric} ({state['best']:.4f}) of {len(history)} validations "
                   f"(every {t.eval_every} steps), at step {step}"}


def _final_state(result) -> dict:
    """Client state of the run's final checkpoint (written by rank 0, our own file)."""
    import torch

    if result.checkpoint is None:
        raise InputError(None, "training finished without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        tag = (Path(folder) / "latest").read_text().strip()
        # Our own DeepSpeed checkpoint (not a user file): DeepSpeed stores it pickled.
        return torch.load(Path(folder) / tag / "mp_rank_00_model_states.pt",
                          map_location="cpu", weights_only=False)


def _plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for h in history for k in h if k != "step"})
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4 * max(1, len(keys)), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(h["step"], h[key]) for h in history if key in h]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        ax.set_title(key)
        ax.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def train_gr(data: str | os.PathLike, sids: str | os.PathLike | None, out: str | os.PathLike,
             cfg: TrainGRConfig | None = None, *, overwrite: bool = False) -> dict:
    """Train on ``data`` (dataset folder or AL-GR TSV) with the SID table ``sids`` and
    write MODEL_DIR ``out``; returns its manifest. Needs a Ray connection."""
    import ray

    from forge_ray.distributed.remote_errors import surface_user_errors
    from forge_ray.distributed.train_common import (cached_if_small, deepspeed_config, fingerprint, fit,
                                                    fits_cache, injected_faults)
    from forge_ray.io import atomic_dir, check_output, read_manifest, write_manifest

    cfg = cfg or TrainGRConfig()
    out, data = Path(out), os.fspath(data)
    sids = None if sids is None else os.fspath(sids)
    check_output(out, overwrite, kind=MODEL_KIND, inputs=(data, sids))  # before training
    t, scale = cfg.train, cfg.scale
    world = scale.num_workers
    # a bad DeepSpeed JSON fails here, before the counting passes over the data
    ds_config = deepspeed_config(scale.deepspeed_config, micro_batch=t.micro_batch, grad_accum=t.grad_accum,
                                 world_size=world, lr=t.lr, weight_decay=t.weight_decay, use_gpu=scale.use_gpu)
    with surface_user_errors():  # a bad row found by a Ray task reads as one line
        refit = refits(cfg, data)
        vocab, train_ds, valid_rows, counts, trie = _example_inputs(cfg, data, sids, refit)
    per_step = t.micro_batch * t.grad_accum * world
    if counts.examples < per_step:
        raise InputError(data, f"{counts.examples} training examples, fewer than one global batch "
                               f"({per_step}); lower train.micro_batch or scale.num_workers")
    # int64 history tokens (+ eos) and labels per example, an upper bound of its size
    example_mb = counts.examples * ((cfg.data.max_history + 1) * vocab.n_levels + 3) * 8 / 2**20
    held = fits_cache(example_mb, scale)
    train_ds = cached_if_small(train_ds, example_mb, scale)  # and then held by the workers
    total = (counts.examples // per_step) * t.epochs
    total = min(total, t.max_steps) if t.max_steps else total
    valid = {"input_ids": [np.asarray(r["input_ids"], np.int64) for r in valid_rows],
             "labels": [np.asarray(r["labels"], np.int64) for r in valid_rows],
             "target_item": [int(r["target_item"]) for r in valid_rows]}
    if not valid["input_ids"] and not refit:
        raise InputError(data, "no validation examples (every sequence is too short)")
    storage = cfg.run.storage(out)
    shape = {"model": to_dict(cfg.model), "sizes": list(vocab.sizes), "data": to_dict(cfg.data),
             "train": {k: v for k, v in to_dict(t).items()
                       if k in ("micro_batch", "grad_accum", "seed", "length_buckets")},
             "world": world}
    loop = {"train": to_dict(t), "model": to_dict(cfg.model), "sizes": list(vocab.sizes),
            "total_steps": total, "checkpoint_every": scale.checkpoint_every,
            "sequences": cfg.data.train_examples == "sequences" and not is_algr(data),
            "validate": not refit,
            "nan_step": injected_faults()["nan_step"],  # tests only: FORGE_RAY_FAULT_NAN_STEP
            "ds_config": ds_config,
            "run_dir": os.fspath((storage / cfg.run.name / "logs").resolve()),
            "fingerprint": fingerprint(shape), "valid_ref": ray.put(valid), "trie_ref": ray.put(trie),
            "log_levels": logs.worker_levels(), "torch_threads": scale.torch_threads,
            "autocast": scale.autocast, "held_in_workers": held}
    log.info(f"[train-gr] {counts.examples:,} training {cfg.data.train_examples} "
             f"({counts.targets or counts.examples:,} targets; {len(valid['input_ids']):,} validation windows) "
             f"({'cached' if held else 'streamed'}, <= {example_mb:,.1f} MiB), "
             f"{total} optimizer steps of {per_step}, "
             f"{count_parameters(cfg.model, vocab):,} parameters, {world} workers")
    result = fit(_worker, loop, scale, storage, cfg.run.name,
                 datasets={"train": train_ds.randomize_block_order(seed=t.seed)})
    state = _final_state(result)
    model = build_model(cfg.model, vocab)
    model.load_state_dict(state["best_state"] or state["module"])
    history = state["history"]
    with atomic_dir(out, overwrite, kind=MODEL_KIND, inputs=(data, sids)) as tmp:
        save_model(model, vocab, tmp)
        (tmp / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        selected = _selection(t, state, history, refit)
        final = {"best": state["best"], "steps": int(state.get("global_steps", total)), "selected": selected,
                 "skipped_steps": int(state.get("skipped_steps", 0)),
                 "stopped_early": bool(result.metrics.get("stopped_early")), "last": history[-1] if history else {}}
        (tmp / "metrics.json").write_text(json.dumps(final, indent=2) + "\n")
        if history:
            _plot(history, tmp / "curves.png")
        manifest = write_manifest(
            tmp, MODEL_KIND, arch=cfg.model.arch, sizes=list(vocab.sizes), data=os.path.abspath(data),
            sids=os.path.abspath(sids) if sids else None, config=to_dict(cfg), counts=counts.__dict__,
            steps=final["steps"], skipped_steps=final["skipped_steps"],
            best={t.early_stop_metric: state["best"]}, selected=selected, valid_windows=len(valid["input_ids"]),
            run=os.fspath(storage.resolve()))
        sid_manifest = read_manifest(sids, "sids") if sids else None
        (tmp / "README.md").write_text(model_card(manifest, final, sid_manifest))
    return manifest
