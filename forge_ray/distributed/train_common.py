"""What the Ray Train + DeepSpeed stages (train-sid, train-gr) share.

The per-worker function of each stage gets everything through its config dict
(never globals), builds its model, calls :func:`init_deepspeed` and reports through
:class:`RunReporter`, which checkpoints with DeepSpeed's own format (ZeRO shards
included), tags every checkpoint with a fingerprint of the model-shaping config,
and writes TensorBoard events plus ``metrics.jsonl`` on rank 0.

Resume: a run continues from its newest complete checkpoint when the same run name
and storage path are used again, both after a worker crash (``FailureConfig``)
and after the whole job was stopped (see :func:`newest_checkpoint`).

Early stops: a worker that must stop the run (non-finite loss, most optimizer steps
skipped) calls :meth:`RunReporter.stop`; :func:`fit` raises the reason on the driver.
Ctrl-C on the driver raises :class:`TrainingInterrupted` naming the step reached and
the checkpoint a rerun resumes from.

Listeners: the torch.distributed rendezvous store binds to the node's Ray address
(127.0.0.1 on a local cluster), not to every interface (:class:`NodeBoundTorchConfig`).
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend

from forge_ray import logs
from forge_ray.config import ScaleConfig
from forge_ray.errors import ForgeRayError, InputError

REPO_DEEPSPEED_DIR = Path(__file__).resolve().parents[2] / "cluster" / "deepspeed"
FINGERPRINT_FILE = "forge_ray_fingerprint.json"
DONE_FILE = "forge_ray_rank{}.done"  # in a checkpoint folder: that rank's part is on storage
STOP_FILE = "forge_ray_stopped.json"  # in the run folder: why the workers stopped early
PROGRESS_FILE = "forge_ray_step"  # in the run folder: the last optimizer step rank 0 finished
# Fault injection for the tests of the training stages, read on the driver (Ray's worker
# processes were started before a test sets them) and passed to the workers.
FAULT_ENV = {"nan_step": "FORGE_RAY_FAULT_NAN_STEP", "kill_rank": "FORGE_RAY_FAULT_KILL_RANK",
             "kill_step": "FORGE_RAY_FAULT_KILL_STEP", "marker": "FORGE_RAY_FAULT_MARKER"}


class TrainingError(ForgeRayError):
    """Training stopped for a reason the user must act on (NaN loss, bad resume)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`fit`; the message says where the run stopped and how to resume
    (the CLI prints it after "interrupted" and exits 130)."""


def newest_checkpoint(run_dir: Path, registered: str | os.PathLike | None = None) -> Path | None:
    """The newest complete checkpoint folder of a Ray Train run (None if it has none).

    Ray Train V2 records a checkpoint in its run snapshot only after its controller
    has collected every rank's report, one report at a time; a run stopped (SIGINT,
    SIGKILL, driver crash) in between leaves one or two newer checkpoints on disk that
    the snapshot does not name, so Ray alone resumes from an older one. Each rank marks
    its part of a checkpoint done once ``ray.train.report`` returned (the upload is
    synchronous), so a folder with every rank's mark is complete. ``registered``
    (Ray's latest checkpoint) counts as complete; a folder half uploaded never does.
    """
    found = [p for p in Path(run_dir).glob("checkpoint_*") if _checkpoint_step(p) is not None]
    if registered is not None:
        found.append(Path(registered))
    # Ray names the folders checkpoint_<YYYY-mm-dd_HH-MM-SS.ffffff>: names sort by time
    return max(found, key=lambda p: p.name, default=None)


def _checkpoint_step(folder: Path) -> int | None:
    """The step of a complete checkpoint folder (rank 0's mark), None if incomplete."""
    mark = folder / DONE_FILE.format(0)
    if not mark.is_file():
        return None
    info = json.loads(mark.read_text())
    done = all((folder / DONE_FILE.format(r)).is_file() for r in range(1, info["world"]))
    return int(info["step"]) if done else None


def _write_small(path: Path, text: str) -> None:
    """Write a marker whole or not at all (a reader never sees half of it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def injected_faults() -> dict[str, int | str]:
    """The faults a test asked for through the environment (``FAULT_ENV``), for a loop config.

    ``nan_step``: the loss is made NaN at this optimizer step. ``kill_rank`` /
    ``kill_step`` / ``marker`` (train-sid): that rank exits at that step once, the
    ``marker`` file remembering it. -1 / "" (unset): no fault.
    """
    faults: dict[str, int | str] = {}
    for key, name in FAULT_ENV.items():
        value = os.environ.get(name, "")
        if key == "marker":
            faults[key] = value
            continue
        try:
            faults[key] = int(value) if value else -1
        except ValueError:
            raise InputError(name, f"must be an integer, got {value!r}") from None
    return faults


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


def autocast(mode: str):
    """A context manager for a training forward pass: ``torch.autocast`` in bfloat16 on
    the worker's device for ``mode == "bf16"`` (ScaleConfig.autocast), a no-op for
    ``"none"``. Backward runs outside it, as torch recommends."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device, dtype=torch.bfloat16, enabled=mode == "bf16")


def native_bf16() -> bool:
    """Whether this process computes bf16 matmuls in hardware: a CUDA GPU that supports
    bf16, or a CPU with AMX tiles or AVX512-BF16 (what torch's oneDNN kernels use).
    Elsewhere bf16 is emulated and slower than float32."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch.cpu, private
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


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
        # Ray Train's folder of this run (fit() always gives a local storage path)
        self.experiment_dir = Path(self.ctx.get_storage().experiment_fs_path)
        self._tb = None
        self._jsonl = None
        self._progress = None
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a")
            self.experiment_dir.mkdir(parents=True, exist_ok=True)
            self._progress = open(self.experiment_dir / PROGRESS_FILE, "w")

    def restore(self, engine) -> dict:
        """Load the newest complete checkpoint into ``engine``; returns its client state ({} if none)."""
        ckpt = ray.train.get_checkpoint()
        folder = newest_checkpoint(self.experiment_dir, ckpt.path if ckpt is not None else None)
        if folder is None:
            return {}
        fp_path = folder / FINGERPRINT_FILE
        found = json.loads(fp_path.read_text())["fingerprint"] if fp_path.exists() else None
        if found != self.fingerprint:
            raise TrainingError(
                f"{folder}: checkpoint was written by another config "
                f"(fingerprint {found}, this config {self.fingerprint}); "
                "use a new run name or the original config")
        _, client_state = engine.load_checkpoint(os.fspath(folder))
        self.progress(int(engine.global_steps))
        return client_state or {}

    def progress(self, step: int) -> None:
        """Rank 0: note the optimizer step just finished (read by the driver on Ctrl-C).

        Fixed-width overwrite in place: one small write per step, no new file.
        """
        if self._progress is not None:
            self._progress.seek(0)
            self._progress.write(f"{step:>20}\n")
            self._progress.flush()

    def stop(self, reason: str) -> None:
        """Every rank, together: end the run early without a checkpoint (the last good one
        stays the newest); :func:`fit` raises ``reason`` on the driver. Ray's Result keeps
        only metrics reported with a checkpoint, so rank 0 tells the driver by file."""
        if self.rank == 0:
            _write_small(self.experiment_dir / STOP_FILE, json.dumps({"reason": reason}))
        self.close()

    def skipped_most(self, engine, steps: int) -> bool:
        """True (and the run stopped) when DeepSpeed skipped most of the ``steps`` optimizer
        steps so far: on an overflow ("OVERFLOW! Skipping step") it drops the update, so the
        weights barely moved although the step count ran on. Same answer on every rank."""
        skipped = int(engine.skipped_steps)  # restored from the checkpoint on resume
        if steps > 0 and 2 * skipped > steps:
            self.stop(f"DeepSpeed skipped {skipped} of {steps} optimizer steps (gradients overflowed), "
                      f"so the model did not train; lower train.lr or train.weight_decay")
            return True
        return False

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
        # report() returned: this rank's files are on storage, in the checkpoint it now holds
        persisted = Path(ray.train.get_checkpoint().path)
        mark = {"world": self.ctx.get_world_size(), "step": int(engine.global_steps)}
        _write_small(persisted / DONE_FILE.format(self.rank), json.dumps(mark))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._jsonl.close()
            self._progress.close()
            self._tb = None


def _serve_rendezvous() -> tuple[str, int]:
    """Rank 0: start the torch.distributed TCPStore server on this node's Ray address.

    torch binds its store to every interface; given a socket of ours it serves on that
    instead. ``init_process_group`` (multi-tenant, same port) then reuses this server.
    The module global keeps it alive for the worker process's life.
    """
    import socket

    from torch.distributed import TCPStore

    addr = ray.util.get_node_ip_address()
    sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
    sock.bind((addr, 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    store = TCPStore(addr, port, is_master=True, multi_tenant=True, wait_for_workers=False,
                     master_listen_fd=sock.fileno())
    _RENDEZVOUS.append((sock, store))
    return addr, port


_RENDEZVOUS: list = []  # rank 0's (socket, TCPStore) pair, see _serve_rendezvous


def _use_rendezvous(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
    if ipaddress.ip_address(addr).is_loopback:
        # every worker is on this machine: keep the collectives' own sockets there too
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    _set_torch_distributed_env_vars()


class _NodeBoundTorchBackend(_TorchBackend):
    """Ray's torch backend, but the rendezvous store listens on the node address only."""

    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        addr, port = worker_group.execute_single(0, _serve_rendezvous)
        worker_group.execute(_use_rendezvous, addr=addr, port=port)
        ray.get([worker_group.execute_single_async(
            rank, _setup_torch_process_group, backend=backend_config.backend, world_rank=rank,
            world_size=len(worker_group), init_method="env://", timeout_s=backend_config.timeout_s)
            for rank in range(len(worker_group))])


class NodeBoundTorchConfig(TorchConfig):
    """``TorchConfig(backend=...)`` whose rank-0 rendezvous store binds to the node's Ray
    address (127.0.0.1 on a local cluster) instead of ``*``: Ray picks MASTER_ADDR but
    torch's TCPStore listens on every interface, with no authentication."""

    @property
    def backend_cls(self):
        return _NodeBoundTorchBackend


def fit(train_fn: Callable[[dict], None], loop_config: dict, scale: ScaleConfig,
        storage_path: str | os.PathLike, name: str,
        datasets: dict[str, "ray.data.Dataset"] | None = None,
        resume_hint: str = "rerun the same command") -> ray.train.Result:
    """Run ``train_fn`` on ``scale.num_workers`` Ray Train workers (gloo on CPU, NCCL on GPU).

    Re-running with the same ``storage_path``/``name`` resumes from the newest complete
    checkpoint. Raises :class:`TrainingError` with the worker's message on failure or
    early stop (:meth:`RunReporter.stop`), :class:`TrainingInterrupted` on Ctrl-C
    (``resume_hint`` says what to run next).
    """
    if datasets:
        _check_room_for_data(scale)
    run_dir = Path(storage_path).resolve() / name
    stop_file = run_dir / STOP_FILE
    stop_file.unlink(missing_ok=True)  # a previous attempt's reason is not this one's
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=scale.num_workers, use_gpu=scale.use_gpu,
            resources_per_worker={"CPU": scale.cpus_per_worker, **({"GPU": 1} if scale.use_gpu else {})}),
        torch_config=NodeBoundTorchConfig(backend="nccl" if scale.use_gpu else "gloo"),
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
        result = _fit_interruptibly(trainer, run_dir, resume_hint)
    except Exception as e:  # Ray wraps worker errors; surface the root cause in one line
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        if isinstance(root, ForgeRayError):
            raise root from None
        raise TrainingError(f"training run {name!r} failed: {type(root).__name__}: "
                            f"{' '.join(str(root).split())[:500]}") from e
    if stop_file.is_file():
        last = newest_checkpoint(run_dir, result.checkpoint.path if result.checkpoint else None)
        raise TrainingError(f"{json.loads(stop_file.read_text())['reason']}; stopped, last good "
                            f"checkpoint: {last or 'none (no checkpoint yet)'}")
    return result


def _fit_interruptibly(trainer: TorchTrainer, run_dir: Path, resume_hint: str) -> ray.train.Result:
    """``trainer.fit()`` in a helper thread, so that Ctrl-C raises here.

    On the main thread Ray Train installs its own SIGINT handler, which aborts the run
    and exits the process with status 1 and no message. The run itself ends with the
    Ray session (a cluster started by ray_session is shut down; the run's actors are
    owned by this driver and die with its connection).
    """
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # re-raised on the calling thread
            outcome["error"] = e

    thread = threading.Thread(target=target, name="forge-ray-fit", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        raise TrainingInterrupted(_interrupted_at(run_dir, resume_hint)) from None
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _interrupted_at(run_dir: Path, resume_hint: str) -> str:
    """'at step N; <hint> to resume from the checkpoint of step M (folder)'."""
    progress = run_dir / PROGRESS_FILE
    text = progress.read_text().strip() if progress.is_file() else ""
    at = f"at step {text}" if text else "before the first step"
    folder = newest_checkpoint(run_dir)
    if folder is None:
        return f"{at}, before the first checkpoint; {resume_hint} to start again"
    return f"{at}; {resume_hint} to resume from the checkpoint of step {_checkpoint_step(folder)} ({folder})"


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


def read_shard(shard) -> dict[str, "np.ndarray"]:
    """All of a Ray Train dataset shard in this worker: one (rows, ...) numpy array per
    column. For tables below ``scale.cache_mb``, which the workers then hold (each
    epoch a permutation in the worker instead of a Ray Data execution)."""
    import numpy as np

    parts: dict[str, list] = {}
    for batch in shard.iter_batches(batch_size=16_384, batch_format="numpy"):
        for key, value in batch.items():
            parts.setdefault(key, []).append(value)
    return {key: np.concatenate(values) for key, values in parts.items()}


def fits_cache(estimate_mb: float, scale: ScaleConfig) -> bool:
    """Whether a training table of about ``estimate_mb`` MiB is cached and then held by
    the workers (``scale.cache_mb``), rather than streamed from Parquet every epoch."""
    return estimate_mb <= scale.cache_mb


def cached_if_small(ds: "ray.data.Dataset", estimate_mb: float, scale: ScaleConfig) -> "ray.data.Dataset":
    """``ds`` executed once into the object store when it :func:`fits_cache` (each epoch
    then reads blocks, not files), else ``ds`` itself (streamed per epoch)."""
    from forge_ray.distributed.remote_errors import surface_user_errors

    if not fits_cache(estimate_mb, scale):
        return ds
    with surface_user_errors():  # a bad row found while building reads as one line
        return ds.materialize()
