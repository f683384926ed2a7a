"""Benchmark of `train-sid` against in-process baselines, measured side by side.

1. RQ-VAE training throughput (samples/s): Ray Train + DeepSpeed with 1 and 2 workers
   vs the plain single-process torch loop (core ``train_rqvae``) on the same model,
   batch and data -> framework overhead ratio and 1 -> 2 worker scaling.
   ``--forge-size``: instead, FORGE's model (512 -> 256 -> 256 -> 64, 3 x 8192 codes,
   batch 2048 per worker, contrastive pairs on), 1 vs 2 Ray Train workers at 1 thread
   each: the data-parallel scaling of one step's compute against its all-reduces.
   ``--dataset DIR``: instead, the shipped Amazon RQ-VAE (configs/amazon/train_sid.yaml,
   contrastive pairs from ``pair_window=1``) on an embedded dataset such as Beauty's,
   2 workers, with ``scale.cache_mb`` 256 (the old default: the pairs stream from
   Parquet every epoch) and 1024 (the default: both tables cached in the object store).
   With ``--trained MODEL_DIR`` (that dataset's trained RQ-VAE): instead, one process,
   1 thread, the forward + backward time of a pair step and of a reconstruction step
   (batch 1024) with subnormal floats kept and flushed to zero (what the workers do).
2. RQ-KMeans fit time: distributed (Ray tasks over shards) and in-process (core) vs
   ``faiss.ResidualQuantizer`` on identical data and sizes (power-of-2 codebooks),
   with each one's reconstruction MSE.

Usage: python bench/bench_train_sid.py [--items 20000] [--dim 64] [--steps 60]
       python bench/bench_train_sid.py --forge-size [--items 40000] [--steps 40]
           [--deepspeed zero2.json zero0.json]
       python bench/bench_train_sid.py --dataset runs/beauty_cpu/dataset [--steps 300]
       python bench/bench_train_sid.py --dataset runs/beauty_cpu/dataset --trained runs/beauty_cpu/quantizer
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from forge_ray.config import load_config  # noqa: E402
from forge_ray.core.quantize.rq_kmeans import RQKMeans, RQKMeansConfig  # noqa: E402
from forge_ray.core.quantize.rqvae import RQVAE  # noqa: E402
from forge_ray.core.quantize.train_loop import train_rqvae  # noqa: E402
from forge_ray.data.schema import PAIRS_SCHEMA, ShardWriter, embedding_array, items_schema  # noqa: E402
from forge_ray.distributed.kmeans_ray import ShardedData  # noqa: E402
from forge_ray.distributed.session import ray_session  # noqa: E402
from forge_ray.distributed.sid_outputs import read_jsonl  # noqa: E402
from forge_ray.distributed.train_quantizer import TrainSidConfig, train_sid  # noqa: E402
from forge_ray.io import write_manifest  # noqa: E402


def make_dataset(folder: Path, n: int, dim: int, seed: int = 0, n_pairs: int = 0) -> np.ndarray:
    """n clustered (n, dim) items; ``n_pairs`` same-cluster co-occurrence pairs (0: none, so
    the core loop and Ray Train run the same reconstruction-only steps)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(64, dim)).astype(np.float32) * 2
    label = rng.integers(0, 64, n)
    x = (centers[label] + rng.normal(size=(n, dim))).astype(np.float32)
    schema = items_schema(dim)
    with ShardWriter(folder / "items", schema, rows_per_shard=max(1, n // 8)) as w:
        w.write(pa.table({"item_id": np.arange(n, dtype=np.int64),
                          "embedding": embedding_array(x)}, schema=schema))
    if n_pairs:
        order = np.argsort(label, kind="stable")  # neighbours in this order share a cluster
        a = rng.integers(0, n - 1, n_pairs)
        pairs = np.stack([order[a], order[a + 1]], 1).astype(np.int64)
        with ShardWriter(folder / "pairs", PAIRS_SCHEMA) as w:
            w.write(pa.table({"item_a": pairs[:, 0], "item_b": pairs[:, 1]}, schema=PAIRS_SCHEMA))
    write_manifest(folder, "dataset", counts={"items": n, **({"pairs": n_pairs} if n_pairs else {})},
                   embedding_dim=dim, embedding_dtype="float32")
    return x


def rqvae_bench(ds: Path, x: np.ndarray, work: Path, dim: int, steps: int) -> dict:
    common = [f"rqvae.in_dim={dim}", "rqvae.hidden_dims=[128]", "rqvae.latent_dim=16",
              "rqvae.sizes=[64,64,64]", "rqvae.kmeans_init_samples=4096", "train.batch_size=256",
              "train.pair_batch_size=256", f"train.steps={steps}", "train.log_every=10",
              "scale.checkpoint_every=1000000", f"storage_path={work / 'runs'}", "scale.torch_threads=1"]
    out = {}
    cfg = load_config(TrainSidConfig, "configs/ci/train_sid.yaml", common)
    # Baseline: the core single-process loop, same model / batch / steps.
    torch.set_num_threads(1)
    model = RQVAE(cfg.rqvae)
    model.init_codebooks(x[:4096])
    train_cfg = cfg.train
    t = time.perf_counter()
    train_rqvae(model, x, None, None, train_cfg)
    out["core_loop_samples_per_s"] = steps * train_cfg.batch_size / (time.perf_counter() - t)
    for workers in (1, 2):
        rate, wall = ray_rates(ds, work, common, workers)
        out[f"ray_{workers}w_samples_per_s"], out[f"ray_{workers}w_stage_wall_s"] = rate, wall
    return out


def ray_rates(ds: Path, work: Path, overrides: list[str], workers: int,
              run: str = "", config: str = "configs/ci/train_sid.yaml") -> tuple[float, float]:
    """-> (median samples/s of the workers' log windows after the first, stage wall s)."""
    run = run or f"w{workers}"
    cfg = load_config(TrainSidConfig, config,
                      [*overrides, f"scale.num_workers={workers}", f"run_name={run}"])
    t = time.perf_counter()
    train_sid(ds, work / f"model_{run}", cfg)
    wall = time.perf_counter() - t
    rows = read_jsonl(work / "runs" / run / "forge_ray" / "metrics.jsonl")
    return float(np.median([r["samples_per_s"] for r in rows[1:]])), wall  # rows[0]: warm-up


def forge_size_bench(work: Path, items: int, steps: int, ds_configs: list[str]) -> dict:
    """FORGE's RQ-VAE size, pairs on: 1 worker with the first of ``ds_configs`` vs 2
    workers with each of them (1 thread per worker)."""
    make_dataset(work / "ds", items, 512, n_pairs=items)
    overrides = ["rqvae.in_dim=512", "rqvae.hidden_dims=[256,256]", "rqvae.latent_dim=64",
                 "rqvae.sizes=[8192,8192,8192]", "rqvae.kmeans_init_samples=16384",
                 "rqvae.kmeans_init_iters=2", "train.batch_size=2048", "train.pair_batch_size=2048",
                 "train.loss.mixing=alternate", "train.loss.pair_every=2", f"train.steps={steps}",
                 "train.log_every=4", "train.warmup_steps=2", "scale.checkpoint_every=1000000",
                 "scale.cpus_per_worker=0.5", "scale.cache_mb=1024", f"storage_path={work / 'runs'}",
                 "scale.torch_threads=1"]
    out = {"items": items, "steps": steps}
    for workers, ds in [(1, ds_configs[0]), *((2, d) for d in ds_configs)]:
        key = f"ray_{workers}w_{Path(ds).stem}"
        rate, wall = ray_rates(work / "ds", work, [*overrides, f"scale.deepspeed_config={ds}"], workers,
                               run=key)
        out[f"{key}_samples_per_s"], out[f"{key}_stage_wall_s"] = rate, wall
    one = out[f"ray_1w_{Path(ds_configs[0]).stem}_samples_per_s"]
    for ds in ds_configs:
        out[f"ray_2w_{Path(ds).stem}_over_1w"] = out[f"ray_2w_{Path(ds).stem}_samples_per_s"] / one
    return out


def cache_bench(dataset: Path, work: Path, steps: int) -> dict:
    """The shipped Amazon RQ-VAE on ``dataset``, 2 workers: the training tables streamed
    from Parquet above 256 MiB (the old ``scale.cache_mb``) vs cached up to 1 GiB."""
    overrides = ["pair_window=1", f"train.steps={steps}", "train.log_every=25", "train.progress=false",
                 "scale.checkpoint_every=1000000", f"storage_path={work / 'runs'}"]
    out = {"dataset": os.fspath(dataset), "steps": steps}
    for mb in (256, 1024):
        rate, wall = ray_rates(dataset, work, [*overrides, f"scale.cache_mb={mb}"], 2,
                               run=f"cache{mb}", config="configs/amazon/train_sid.yaml")
        out[f"cache_mb_{mb}_samples_per_s"], out[f"cache_mb_{mb}_stage_wall_s"] = rate, wall
    out["cached_over_streamed"] = out["cache_mb_1024_samples_per_s"] / out["cache_mb_256_samples_per_s"]
    return out


def denormal_bench(dataset: Path, model_dir: Path, reps: int = 6, rounds: int = 3) -> dict:
    """ms per forward + backward of a trained RQ-VAE on 1024 real items / pairs of items,
    subnormals kept vs flushed, alternating ``rounds`` times (medians)."""
    from forge_ray.core.quantize.losses import LossConfig
    from forge_ray.core.quantize.registry import load_quantizer
    from forge_ray.core.quantize.train_loop import compute_loss
    from forge_ray.distributed.sid_outputs import load_embeddings

    torch.set_num_threads(1)
    model = load_quantizer(model_dir)
    model.train()
    _, x = load_embeddings(dataset)
    rng = np.random.default_rng(0)
    rows = lambda: torch.from_numpy(x[rng.integers(0, len(x), 1024)])  # noqa: E731
    recon, pair, cfg = rows(), (rows(), rows()), LossConfig()

    def ms(flush: bool, batch, pairs) -> float:
        torch.set_flush_denormal(flush)
        compute_loss(model, batch, pairs, cfg)[0].backward()  # warm-up
        t = time.perf_counter()
        for _ in range(reps):
            model.zero_grad()
            compute_loss(model, batch, pairs, cfg)[0].backward()
        return (time.perf_counter() - t) / reps * 1000

    times = {f"{kind}_{mode}_ms": [] for kind in ("pair", "recon") for mode in ("kept", "flushed")}
    for _ in range(rounds):
        for flush, mode in ((False, "kept"), (True, "flushed")):
            times[f"pair_{mode}_ms"].append(ms(flush, None, pair))
            times[f"recon_{mode}_ms"].append(ms(flush, recon, None))
    torch.set_flush_denormal(False)
    out = {k: float(np.median(v)) for k, v in times.items()}
    for kind in ("pair", "recon"):
        out[f"{kind}_flushed_speedup"] = out[f"{kind}_kept_ms"] / out[f"{kind}_flushed_ms"]
    return out


def kmeans_bench(ds: Path, x: np.ndarray, dim: int) -> dict:
    cfg = RQKMeansConfig(sizes=[64, 64, 64], niter=5, init_niter=10, batch_size=8192)
    out = {}
    t = time.perf_counter()
    local = RQKMeans(cfg).fit(x)
    out["core_in_process_s"] = time.perf_counter() - t
    t = time.perf_counter()
    dist = RQKMeans(cfg).fit_data(ShardedData(ds, len(x), dim, cfg.batch_size))
    out["sharded_ray_s"] = time.perf_counter() - t
    rq = faiss.ResidualQuantizer(dim, 3, 6)  # 3 levels x 2^6 = 64 codes
    rq.train_type = faiss.ResidualQuantizer.Train_default
    rq.max_beam_size = 1  # greedy residual assignment, like RQ-KMeans
    t = time.perf_counter()
    rq.train(x)
    out["faiss_residual_quantizer_s"] = time.perf_counter() - t
    mse = lambda xh: float(((xh - x) ** 2).mean())  # noqa: E731
    out["mse_core"] = mse(local.decode(local.encode(x)))
    out["mse_sharded"] = mse(dist.decode(dist.encode(x)))
    out["mse_faiss"] = mse(rq.decode(rq.compute_codes(x)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--forge-size", action="store_true",
                        help="FORGE-size RQ-VAE with pairs, 1 vs 2 workers only")
    parser.add_argument("--dataset", type=Path,
                        help="an embedded Amazon dataset: the shipped RQ-VAE streamed vs cached only")
    parser.add_argument("--trained", type=Path,
                        help="with --dataset: its trained RQ-VAE; subnormals kept vs flushed only")
    parser.add_argument("--deepspeed", nargs="+", default=["zero2.json"],
                        help="--forge-size: DeepSpeed JSONs (cluster/deepspeed/); 1 worker runs the "
                             "first, 2 workers run each")
    args = parser.parse_args()
    if args.trained and not args.dataset:
        parser.error("--trained needs --dataset (the items the model was trained on)")
    faiss.omp_set_num_threads(1)
    if args.trained:
        print(json.dumps(denormal_bench(args.dataset.resolve(), args.trained.resolve()), indent=2))
        return
    if args.dataset:
        with tempfile.TemporaryDirectory() as tmp, ray_session():  # as the Beauty job: every CPU
            print(json.dumps(cache_bench(args.dataset.resolve(), Path(tmp), args.steps), indent=2))
        return
    if args.forge_size:
        with tempfile.TemporaryDirectory() as tmp, ray_session(num_cpus=4):
            print(json.dumps(forge_size_bench(Path(tmp), args.items, args.steps, args.deepspeed), indent=2))
        return
    with tempfile.TemporaryDirectory() as tmp, ray_session(num_cpus=4):
        work = Path(tmp)
        x = make_dataset(work / "ds", args.items, args.dim)
        res = {"items": args.items, "dim": args.dim, "steps": args.steps}
        res.update(kmeans_bench(work / "ds", x, args.dim))
        res.update(rqvae_bench(work / "ds", x, work, args.dim, args.steps))
    res["ray_1w_over_core"] = res["ray_1w_samples_per_s"] / res["core_loop_samples_per_s"]
    res["ray_2w_over_1w"] = res["ray_2w_samples_per_s"] / res["ray_1w_samples_per_s"]
    res["sharded_over_faiss_time"] = res["sharded_ray_s"] / res["faiss_residual_quantizer_s"]
    res["core_over_faiss_time"] = res["core_in_process_s"] / res["faiss_residual_quantizer_s"]
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
