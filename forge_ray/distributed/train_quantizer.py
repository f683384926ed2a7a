"""``forge-ray train-sid``: train a SID quantizer on a canonical dataset, on Ray.

* RQ-VAE: Ray Train workers with DeepSpeed (``rqvae_worker.py``), items streamed
  from Ray Data shards, co-occurrence pairs joined to their embeddings by Ray Data.
  The k-means codebook init runs on the driver, on a seeded Ray Data sample of
  ``rqvae.kmeans_init_samples`` items, before training (one process clusters the
  sample anyway; doing it before ``fit`` keeps every rank's start identical and
  costs no collective). The initialised weights travel to the workers in the loop
  config; a resumed run takes its weights from the checkpoint instead.
* RQ-KMeans (plain or balanced): the core Lloyd loop over
  :class:`~forge_ray.distributed.kmeans_ray.ShardedData` (Ray tasks over the item shards), or over an in-memory array in the
  driver when the dataset has at most ``in_process_max_items`` items.

Runs (checkpoints, TensorBoard, ``metrics.jsonl``) live in
``storage_path/run_name`` (default ``<MODEL_DIR parent>/runs/<MODEL_DIR name>``) on
storage the driver and every worker can reach. ``resume=True`` continues the run's
newest complete checkpoint (step count, optimizer, schedule, codebooks); without it an
existing run is refused rather than silently continued or deleted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path
from typing import Literal


from forge_ray import logs
from forge_ray.config import ScaleConfig, require, to_dict
from forge_ray.core.quantize.registry import load_quantizer
from forge_ray.core.quantize.rq_kmeans import RQKMeans, RQKMeansConfig
from forge_ray.core.quantize.rqvae import RQVAE, RQVAEConfig
from forge_ray.core.quantize.train_loop import TrainConfig
from forge_ray.errors import InputError
from forge_ray.io import atomic_dir, check_output, write_manifest

QUANTIZER_KIND = "quantizer"


@dataclasses.dataclass
class TrainSidConfig:
    """Everything ``train-sid`` needs. ``train.batch_size`` is per worker.

    epochs / warmup_epochs: when > 0 they set ``train.steps`` / ``train.warmup_steps``
    from the item count (one epoch = items / (batch_size x workers) steps).
    pair_window: RQ-VAE's contrastive pairs. 0: the dataset's ``pairs`` table (FORGE
        releases ship one); N > 0: co-occurrences at most N positions apart in each
        user's training part (all but the last two items), for datasets of
        interactions only (Amazon reviews).
    shuffle_buffer: RQ-VAE on Ray Train: rows each worker shuffles its streamed shards
        through, reseeded every epoch, so batches (and the contrastive loss's in-batch
        negatives) change from epoch to epoch as the in-process loop's uniform sampling
        does; 0 keeps the stored order, the same batches every epoch. Memory per
        worker: about ``shuffle_buffer`` x 3 x D x 4 bytes (items and pairs). A
        dataset below ``scale.cache_mb`` is held whole by each worker instead (its
        shard, permuted every epoch; any value > 0 shuffles it).
    """

    quantizer: Literal["rqvae", "rq_kmeans", "rq_kmeans_balanced"] = "rqvae"
    rqvae: RQVAEConfig = dataclasses.field(default_factory=RQVAEConfig)
    rq_kmeans: RQKMeansConfig = dataclasses.field(default_factory=RQKMeansConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    epochs: float = 0.0
    warmup_epochs: float = 0.0
    pair_window: int = 0
    shuffle_buffer: int = 16_384
    in_process_max_items: int = 1_000_000  # RQ-KMeans: fit in the driver up to this many items
    scale: ScaleConfig = dataclasses.field(default_factory=ScaleConfig)
    storage_path: str = ""  # default: <MODEL_DIR parent>/runs
    run_name: str = ""      # default: MODEL_DIR's name

    def __post_init__(self):
        require(self.epochs >= 0 and self.warmup_epochs >= 0, "epochs and warmup_epochs must be >= 0")
        require(self.warmup_epochs <= self.epochs or self.epochs == 0,
                "warmup_epochs must not exceed epochs")
        require(self.in_process_max_items >= 0, "in_process_max_items must be >= 0")
        require(self.pair_window >= 0, "pair_window must be >= 0")
        require(self.shuffle_buffer >= 0, "shuffle_buffer must be >= 0")
        require(self.scale.autocast == "none", "scale.autocast is a train-gr setting: train-sid "
                                               "trains in float32 (set scale.autocast=none)")
        if self.quantizer == "rq_kmeans_balanced":
            self.rq_kmeans.balanced = True

    @property
    def sizes(self) -> list[int]:
        return list(self.rqvae.sizes if self.quantizer == "rqvae" else self.rq_kmeans.sizes)


def check_dataset(dataset: str | os.PathLike, cfg: TrainSidConfig) -> dict:
    """Validate the dataset against the config before any work; returns its manifest."""
    from forge_ray.distributed.dataset import dataset_manifest

    manifest = dataset_manifest(dataset)
    items = int(manifest.get("counts", {}).get("items", 0))
    dim = int(manifest.get("embedding_dim") or 0)
    if items == 0 or not (Path(dataset) / "items").is_dir():
        raise InputError(dataset, "dataset has no items to train on")
    if dim == 0:
        raise InputError(dataset, "items have no embeddings (run forge-ray embed first)")
    if cfg.quantizer == "rqvae" and dim != cfg.rqvae.in_dim:
        raise InputError(dataset, f"embeddings are {dim}-d but rqvae.in_dim is {cfg.rqvae.in_dim}")
    if max(cfg.sizes) > items:
        raise InputError(dataset, f"codebook size {max(cfg.sizes)} is larger than the "
                                  f"{items} training items")
    if cfg.quantizer == "rqvae":
        need = cfg.train.batch_size * cfg.scale.num_workers
        if items < need:
            raise InputError(dataset, f"{items} items are fewer than one step's batch "
                                      f"(train.batch_size {cfg.train.batch_size} x {cfg.scale.num_workers} workers)")
    return manifest


def run_location(out: str | os.PathLike, cfg: TrainSidConfig) -> tuple[Path, str]:
    """(storage_path, run_name) of this training run."""
    out = Path(out).resolve()
    storage = Path(cfg.storage_path).expanduser().resolve() if cfg.storage_path else out.parent / "runs"
    return storage, cfg.run_name or out.name


def _latest_fingerprint(run_dir: Path) -> str | None:
    """Fingerprint of the newest checkpoint of a run (None if it has none)."""
    from forge_ray.distributed.train_common import FINGERPRINT_FILE

    found = sorted(run_dir.glob(f"checkpoint_*/{FINGERPRINT_FILE}"), key=lambda p: p.stat().st_mtime)
    return json.loads(found[-1].read_text())["fingerprint"] if found else None


def train_sid(dataset: str | os.PathLike, out: str | os.PathLike, cfg: TrainSidConfig | None = None, *,
              overwrite: bool = False, resume: bool = False) -> dict:
    """Train the configured quantizer on ``dataset``'s items and write MODEL_DIR ``out``
    (quantizer files, metrics.json, curves.png, manifest.json). Needs a Ray
    connection for the distributed paths. Returns the manifest."""
    from forge_ray.distributed import sid_outputs

    cfg = cfg or TrainSidConfig()
    manifest = check_dataset(dataset, cfg)
    check_output(out, overwrite, kind=QUANTIZER_KIND, inputs=(dataset,))  # before training
    storage, name = run_location(out, cfg)
    with atomic_dir(out, overwrite, kind=QUANTIZER_KIND, inputs=(dataset,)) as tmp:
        if cfg.quantizer == "rqvae":
            quantizer, info = _train_rqvae(dataset, manifest, cfg, storage, name, resume)
        else:
            quantizer, info = _fit_rq_kmeans(dataset, manifest, cfg)
        quantizer.save(tmp)
        metrics = sid_outputs.evaluate_usage(dataset, quantizer, manifest["counts"]["items"],
                                               manifest["embedding_dim"])
        metrics.update(info.get("final", {}))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        sid_outputs.plot_curves(tmp / "curves.png", info["curves"], metrics, cfg.sizes)
        return write_manifest(
            tmp, QUANTIZER_KIND, quantizer=cfg.quantizer, dataset=os.fspath(Path(dataset).resolve()),
            dataset_counts=manifest["counts"], embedding_dim=manifest["embedding_dim"],
            sizes=cfg.sizes, config=to_dict(cfg), steps=info.get("steps"),
            run_dir=info.get("run_dir"), tensorboard=info.get("tensorboard"),
            utilization=[metrics[f"utilization_l{i}"] for i in range(len(cfg.sizes))])


def _fit_rq_kmeans(dataset, manifest: dict, cfg: TrainSidConfig):
    """Level-by-level residual k-means, distributed over the shards unless small."""
    from forge_ray.core.quantize.kmeans import ArrayData
    from forge_ray.distributed import sid_outputs
    from forge_ray.distributed.kmeans_ray import ShardedData

    n, dim = manifest["counts"]["items"], manifest["embedding_dim"]
    q = RQKMeans(cfg.rq_kmeans)
    if n <= cfg.in_process_max_items:
        _, x = sid_outputs.load_embeddings(dataset)
        q.fit_data(ArrayData(x, cfg.rq_kmeans.batch_size))
    else:
        q.fit_data(ShardedData(dataset, n, dim, cfg.rq_kmeans.batch_size))
    curves = [{"level": level, "pass": i, "objective": s["objective"] / n, "empty": s["empty"]}
              for level, stats in enumerate(q.stats) for i, s in enumerate(stats)]
    return q, {"curves": curves, "steps": sum(len(s) for s in q.stats),
               "final": {"distributed": n > cfg.in_process_max_items}}


def _train_rqvae(dataset, manifest: dict, cfg: TrainSidConfig, storage: Path, name: str,
                 resume: bool):
    """Ray Train + DeepSpeed RQ-VAE training; returns (trained model, run info)."""
    from forge_ray.distributed import sid_outputs
    from forge_ray.distributed.rqvae_worker import FINAL_DIR, rqvae_worker
    from forge_ray.distributed.train_common import (TrainingError, cached_if_small, deepspeed_config,
                                                    fingerprint, fit, fits_cache, injected_faults)

    run_dir = storage / name
    fp = fingerprint({"quantizer": "rqvae", "rqvae": to_dict(cfg.rqvae),
                      "dim": manifest["embedding_dim"], "pair_window": cfg.pair_window})
    existing = _latest_fingerprint(run_dir) if run_dir.is_dir() else None
    if run_dir.is_dir() and not resume:
        raise InputError(run_dir, "training run already exists (pass --resume to continue it, "
                                  "or set run_name / storage_path to start another)")
    if existing is not None and existing != fp:
        raise InputError(run_dir, f"checkpoint was written by another config (fingerprint "
                                  f"{existing}, this config {fp}); use a new run_name")
    items = manifest["counts"]["items"]
    workers, train = cfg.scale.num_workers, cfg.train
    steps_per_epoch = max(1, items // (train.batch_size * workers))
    total = math.ceil(cfg.epochs * steps_per_epoch) if cfg.epochs else train.steps
    warmup = math.ceil(cfg.warmup_epochs * steps_per_epoch) if cfg.epochs else train.warmup_steps
    model = RQVAE(cfg.rqvae)
    if cfg.rqvae.kmeans_init:
        sample = sid_outputs.sample_embeddings(dataset, items, manifest["embedding_dim"],
                                               cfg.rqvae.kmeans_init_samples,
                                               train.seed)
        model.init_codebooks(sample)
    datasets, n_pairs = sid_outputs.training_datasets(dataset, manifest, run_dir / "forge_ray" / "pair_embeddings",
                                                      cfg.pair_window, broadcast_mb=cfg.scale.cache_mb)
    has_pairs = n_pairs > 0
    embedding_mb = manifest["embedding_dim"] * 4 / 2**20  # one float32 embedding
    estimate_mb = {"train": items * embedding_mb, "pairs": 2 * n_pairs * embedding_mb}
    datasets = {k: cached_if_small(ds, estimate_mb[k], cfg.scale) for k, ds in datasets.items()}
    # a cached dataset is small enough for each worker to hold its shard (rqvae_worker)
    held = {k: fits_cache(v, cfg.scale) for k, v in estimate_mb.items()}
    loop = {
        # the worker's bar goes to the driver's stderr: drawn only where that is a terminal
        "rqvae": to_dict(cfg.rqvae), "train": {**to_dict(train), "progress": train.progress and logs.bars()},
        "init_state": model.state_dict(),
        "total_steps": total, "warmup_steps": warmup, "checkpoint_every": cfg.scale.checkpoint_every,
        "has_pairs": has_pairs, "shuffle_buffer": cfg.shuffle_buffer, "held_in_workers": held, "run_dir": os.fspath(run_dir / "forge_ray"), "fingerprint": fp,
        "torch_threads": cfg.scale.torch_threads, "faults": injected_faults(), "log_levels": logs.worker_levels(),
        "deepspeed": deepspeed_config(cfg.scale.deepspeed_config, micro_batch=train.batch_size,
                                      grad_accum=1, world_size=workers, lr=train.lr,
                                      weight_decay=train.weight_decay, use_gpu=cfg.scale.use_gpu),
    }
    final = run_dir / "forge_ray" / FINAL_DIR
    shutil.rmtree(final, ignore_errors=True)  # never pick up a previous attempt's result
    fit(rqvae_worker, loop, cfg.scale, storage, name, datasets=datasets,
        resume_hint="rerun with --resume (forge-ray pipeline: the same command)")
    if not final.is_dir():
        raise TrainingError(f"training run {name!r} finished without saving {final}")
    curves = sid_outputs.read_jsonl(run_dir / "forge_ray" / "metrics.jsonl")
    return load_quantizer(final), {
        "curves": curves, "steps": total, "run_dir": os.fspath(run_dir),
        "tensorboard": os.fspath(run_dir / "forge_ray" / "tensorboard"),
        "final": {"contrastive_pairs": n_pairs,
                  **{f"train_{k}": v for k, v in (curves[-1] if curves else {}).items() if k != "step"}}}
