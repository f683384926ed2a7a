"""What the Ray Train + DeepSpeed stages (train-sid, train-gr) share.

The per-worker function of each stage gets everything through its config dict
(never globals), builds its model, calls :func:`init_deepspeed` and reports through
:class:`RunReporter`, which checkpoints with DeepSpeed's own format (ZeRO shards
included), tags every checkpoint with a fingerprint of the model-shaping config,
and writes TensorBoard events plus ``metrics.jsonl`` on rank 0.

Resume: Ray Train restores a run from the latest checkpoint when the same run name
and storage path are used again, both after a worker crash (``FailureConfig``)
and after the whole job was stopped.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from forge_ray import logs
from forge_ray.config import ScaleConfig
from forge_ray.errors import ForgeRayError, InputError

REPO_DEEPSPEED_DIR = Path(__file__).resolve().parents[2] / "cluster" / "deepspeed"
FINGERPRINT_FILE = "forge_ray_fingerprint.json"


class TrainingError(ForgeRayError):
    """Training stopped for a reason the user must act on (NaN loss, bad resume)."""


def fingerprint(shape_config: dict) -> str:
    """Stable hash of the config entries that decide tensor shapes / semantics."""
    return hashlib.sha256(json.dumps(shape_config, sort_keys=True).encode()).hexdigest()[:16]


def deepspeed_config(name: str, *, micro_batch: int, grad_accum: int, world_size: int,
                     lr: float, weight_decay: float, use_gpu: bool) -> dict:
    """Load a DeepSpeed JSON and fill in batch sizes, optimizer lr and precision.

    bf16/fp16 sections are dropped on CPU workers (gloo training runs in fp32).
    """
    path = Path(name)
    if not path.is_absolute() and not path.exists():
        path = REPO_DEEPSPEED_DIR / name
    if not path.is_file():
        raise InputError(name, "DeepSpeed config not found (looked in cluster/deepspeed/ too)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(path, f"invalid DeepSpeed JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise InputError(path, f"invalid DeepSpeed JSON: expected an object of settings, found "
                               f"{type(cfg).__name__}")
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = grad_accum
    cfg["train_batch_size"] = micro_batch * grad_accum * world_size
    opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
    opt.setdefault("params", {}).update({"lr": lr, "weight_decay": weight_decay})
    if not use_gpu:
        cfg.pop("bf16", None)
        cfg.pop("fp16", None)
    return cfg


def init_deepspeed(model, ds_config: dict, lr_lambda: Callable[[int], float] | None = None):
    """``deepspeed.initialize`` inside a Ray Train worker; returns the engine.

    ``lr_lambda(step) -> factor`` (warm-up / cosine schedules) becomes a LambdaLR
    over DeepSpeed's optimizer, stepped by the engine.
    """
    import torch

    cpu = not torch.cuda.is_available()
    if cpu:
        # DeepSpeed probes for accelerators on import and warns when it settles on
        # the CPU; naming it skips the probe (and the warning) on a CPU worker.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.ops import __compatible_ops__ as ds_ops

    if cpu:
        # The shared-memory allreduce op only speeds up CPU collectives and costs a
        # C++ compile (about a minute) on first use; gloo does the job without it.
        ds_ops["deepspeed_shm_comm"] = False
    scheduler = None
    if lr_lambda is not None:
        def scheduler(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=copy.deepcopy(ds_config), lr_scheduler=scheduler)
    return engine


class RunReporter:
    """Metrics, checkpoints and resume for one worker of a DeepSpeed run.

    Args:
        run_dir: folder for TensorBoard events and ``metrics.jsonl`` (rank 0 writes).
        shape_fingerprint: :func:`fingerprint` of the model-shaping config; a resume
            from a checkpoint with another fingerprint is refused.
    """

    def __init__(self, run_dir: str, shape_fingerprint: str):
        self.ctx = ray.train.get_context()
        self.rank = self.ctx.get_world_rank()
        self.fingerprint = shape_fingerprint
        self.run_dir = Path(run_dir)
        self._tb = None
        self._jsonl = None
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a")

    def restore(self, engine) -> dict:
        """Load the latest checkpoint into ``engine``; returns its client state ({} if none)."""
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return {}
        with ckpt.as_directory() as folder:
            fp_path = Path(folder) / FINGERPRINT_FILE
            found = json.loads(fp_path.read_text())["fingerprint"] if fp_path.exists() else None
            if found != self.fingerprint:
                raise TrainingError(
                    f"{ckpt.path}: checkpoint was written by another config "
                    f"(fingerprint {found}, this config {self.fingerprint}); "
                    "use a new run name or the original config")
            _, client_state = engine.load_checkpoint(folder)
        return client_state or {}

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Rank 0: append to TensorBoard and metrics.jsonl."""
        if self.rank != 0:
            return
        for key, value in metrics.items():
            self._tb.add_scalar(key, value, step)
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()

    def report(self, metrics: dict[str, Any], engine=None, client_state: dict | None = None) -> None:
        """Report ``metrics`` to Ray Train, with a DeepSpeed checkpoint when ``engine`` is given.

        Every rank must call this together when checkpointing: ZeRO shards are
        saved by each rank into the same checkpoint.
        """
        if engine is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            engine.save_checkpoint(folder, client_state=client_state or {})
            if self.rank == 0:
                (Path(folder) / FINGERPRINT_FILE).write_text(
                    json.dumps({"fingerprint": self.fingerprint}))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._jsonl.close()


def fit(train_fn: Callable[[dict], None], loop_config: dict, scale: ScaleConfig,
        storage_path: str | os.PathLike, name: str,
        datasets: dict[str, "ray.data.Dataset"] | None = None) -> ray.train.Result:
    """Run ``train_fn`` on ``scale.num_workers`` Ray Train workers (gloo on CPU, NCCL on GPU).

    Re-running with the same ``storage_path``/``name`` resumes from the latest
    checkpoint. Raises :class:`TrainingError` with the worker's message on failure.
    """
    if datasets:
        _check_room_for_data(scale)
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=scale.num_workers, use_gpu=scale.use_gpu,
            resources_per_worker={"CPU": scale.cpus_per_worker, **({"GPU": 1} if scale.use_gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if scale.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name, storage_path=os.fspath(Path(storage_path).resolve()),
            failure_config=FailureConfig(max_failures=scale.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=scale.keep_checkpoints),
            # Ray Train's own console logs (worker group start, every checkpoint
            # report) are INFO: shown with -v only
            logging_config=LoggingConfig(log_level=logging.getLevelName(logs.ray_level()))),
        datasets=datasets,
    )
    try:
        return trainer.fit()
    except Exception as e:  # Ray wraps worker errors; surface the root cause in one line
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        if isinstance(root, ForgeRayError):
            raise root from None
        raise TrainingError(f"training run {name!r} failed: {type(root).__name__}: "
                            f"{' '.join(str(root).split())[:500]}") from e


def _check_room_for_data(scale: ScaleConfig) -> None:
    """Refuse a worker layout that leaves Ray Data no whole CPU (it would hang, silently).

    Ray Data's file listing and read tasks ask for 1 CPU each and run beside the
    training workers. When the cluster already holds every worker (so no autoscaling
    is coming) but less than one CPU is left over, those tasks never start.
    """
    total = ray.cluster_resources().get("CPU", 0.0)
    needed = scale.num_workers * scale.cpus_per_worker
    if needed <= total < needed + 1:
        raise TrainingError(
            f"scale.num_workers ({scale.num_workers}) x scale.cpus_per_worker "
            f"({scale.cpus_per_worker:g}) = {needed:g} of the cluster's {total:g} CPUs leaves "
            f"{total - needed:g} for Ray Data, whose read tasks need 1; lower "
            f"scale.cpus_per_worker (fractions are fine: torch still uses one thread per worker)")


def cached_if_small(ds: "ray.data.Dataset", estimate_mb: float, scale: ScaleConfig) -> "ray.data.Dataset":
    """``ds`` executed once into the object store when ``estimate_mb`` <= ``scale.cache_mb``
    (each epoch then reads blocks, not files), else ``ds`` itself (streamed per epoch)."""
    from forge_ray.distributed.remote_errors import surface_user_errors

    if estimate_mb > scale.cache_mb:
        return ds
    with surface_user_errors():  # a bad row found while building reads as one line
        return ds.materialize()
