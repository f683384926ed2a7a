"""`train-sid` on the real 2-node loopback cluster: Ray Train + DeepSpeed RQ-VAE
(crash restart, resume, NaN stop, bad inputs) and distributed RQ-KMeans."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from forge_ray.config import load_config
from forge_ray.core.quantize.registry import load_quantizer
from forge_ray.core.quantize.rq_kmeans import RQKMeans, RQKMeansConfig
from forge_ray.data.schema import PAIRS_SCHEMA, ShardWriter, embedding_array, items_schema
from forge_ray.distributed.kmeans_ray import ShardedData
from forge_ray.distributed.sid_outputs import read_jsonl
from forge_ray.distributed.train_common import FAULT_ENV, TrainingError
from forge_ray.distributed.train_quantizer import TrainSidConfig, train_sid
from forge_ray.errors import InputError
from forge_ray.io import read_manifest, write_manifest

pytestmark = pytest.mark.ray

TINY = "configs/ci/train_sid.yaml"
N, DIM = 1024, 16


def make_dataset(folder, n=N, dim=DIM, n_pairs=512, embeddings=True, seed=0):
    """Clustered items (8 blobs) with ids 7, 10, 13, ... and same-blob pairs."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(8, dim)).astype(np.float32) * 3
    label = rng.integers(0, 8, n)
    x = (centers[label] + rng.normal(size=(n, dim))).astype(np.float32)
    ids = np.arange(n, dtype=np.int64) * 3 + 7
    schema = items_schema(dim if embeddings else 0)
    cols = {"item_id": ids, **({"embedding": embedding_array(x)} if embeddings else {})}
    with ShardWriter(folder / "items", schema, rows_per_shard=256) as w:
        w.write(pa.table(cols, schema=schema))
    by_label = [np.flatnonzero(label == k) for k in range(8)]
    a = rng.integers(0, n, n_pairs)
    b = np.array([rng.choice(by_label[label[i]]) for i in a], dtype=np.int64)
    with ShardWriter(folder / "pairs", PAIRS_SCHEMA) as w:
        w.write(pa.table({"item_a": ids[a], "item_b": ids[b]}, schema=PAIRS_SCHEMA))
    write_manifest(folder, "dataset", counts={"items": n, "pairs": n_pairs},
                   embedding_dim=dim if embeddings else 0,
                   embedding_dtype="float32" if embeddings else None)
    return folder, x


def tiny(*overrides: str, tmp_path=None) -> TrainSidConfig:
    extra = [f"storage_path={tmp_path / 'runs'}"] if tmp_path else []
    return load_config(TrainSidConfig, TINY, ["train.batch_size=32", "train.log_every=1",
                                              *extra, *overrides])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("sid") / "ds")


def test_rqvae_deepspeed_survives_a_killed_worker(ray_cluster, data, tmp_path, monkeypatch):
    ds, x = data
    marker = tmp_path / "killed"
    # Checkpoints at 3, 6, 9, 12. Ray Train registers a reported checkpoint when the
    # controller polls; the report at 6 waits for the one at 3, so by step 8 at least
    # step 3 is registered.
    monkeypatch.setenv(FAULT_ENV["kill_rank"], "1")
    monkeypatch.setenv(FAULT_ENV["kill_step"], "8")
    monkeypatch.setenv(FAULT_ENV["marker"], str(marker))
    cfg = tiny("train.steps=12", "scale.checkpoint_every=3", tmp_path=tmp_path)
    manifest = train_sid(ds, tmp_path / "model", cfg)
    assert marker.exists()  # rank 1 really died once
    out = tmp_path / "model"
    assert {"quantizer.json", "model.safetensors", "metrics.json", "curves.png",
            "manifest.json"} <= {p.name for p in out.iterdir()}
    assert read_manifest(out, "quantizer") == manifest
    assert manifest["steps"] == 12 and manifest["dataset_counts"]["items"] == N
    log = tmp_path / "runs" / "model" / "forge_ray" / "metrics.jsonl"
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[restart - 1] == 8 and steps[restart] in (4, 7)  # resumed from a checkpoint
    rows = read_jsonl(log)
    assert [r["step"] for r in rows] == list(range(1, 13))
    # (No loss-curve check here: 12 steps on random batches are too noisy to compare the
    # ends of; this test is about surviving the kill. Learning is tested in the core.)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["items"] == N and all(0 < metrics[f"utilization_l{i}"] <= 1 for i in range(3))
    q = load_quantizer(out)
    codes = q.encode(x[:100])
    assert codes.shape == (100, 3) and codes.max() < 16
    assert np.isfinite(metrics["recon_mse"]) and np.isfinite(metrics["train_loss"])


def test_resume_continues_and_refuses_mismatches(ray_cluster, data, tmp_path):
    ds, _ = data
    common = ["run_name=r", "scale.checkpoint_every=2", "train.warmup_steps=1"]
    train_sid(ds, tmp_path / "a", tiny("train.steps=4", *common, tmp_path=tmp_path))
    log = tmp_path / "runs" / "r" / "forge_ray" / "metrics.jsonl"
    before = len(log.read_text().splitlines())
    with pytest.raises(InputError, match="already exists.*--resume"):  # no silent continue
        train_sid(ds, tmp_path / "b", tiny("train.steps=8", *common, tmp_path=tmp_path))
    manifest = train_sid(ds, tmp_path / "b", tiny("train.steps=8", *common, tmp_path=tmp_path),
                         resume=True)
    new = [json.loads(line) for line in log.read_text().splitlines()[before:]]
    assert new[0]["step"] > 4 and new[-1]["step"] == 8 and manifest["steps"] == 8
    assert new[0]["lr"] > 0  # the schedule follows the new step budget, not the old one
    other = tiny("train.steps=8", "rqvae.sizes=[8,8,8]", *common, tmp_path=tmp_path)
    with pytest.raises(InputError, match="another config"):
        train_sid(ds, tmp_path / "c", other, resume=True)
    assert not (tmp_path / "c").exists()


def test_nan_loss_stops_with_the_step(ray_cluster, data, tmp_path, monkeypatch):
    ds, _ = data
    monkeypatch.setenv(FAULT_ENV["nan_step"], "5")
    # cache_mb=0: the shards stream from Parquet every epoch (the other tests hold them)
    cfg = tiny("train.steps=10", "scale.checkpoint_every=2", "scale.cache_mb=0", tmp_path=tmp_path)
    with pytest.raises(TrainingError, match=r"NaN at step 5.*checkpoint_"):
        train_sid(ds, tmp_path / "m", cfg)
    assert not (tmp_path / "m").exists()


def test_bad_inputs_one_line_no_output(ray_cluster, data, tmp_path):
    ds, _ = data
    no_emb, _ = make_dataset(tmp_path / "noemb", embeddings=False)
    cases = [
        (no_emb, tiny(), "no embeddings"),
        (ds, tiny("rqvae.in_dim=32"), "16-d but rqvae.in_dim is 32"),
        (ds, tiny("quantizer=rq_kmeans", "rq_kmeans.sizes=[2048]"), "larger than the 1024"),
    ]
    for dataset, cfg, message in cases:
        with pytest.raises(InputError, match=message) as err:
            train_sid(dataset, tmp_path / "out", cfg)
        assert "\n" not in str(err.value) and str(dataset) in str(err.value)
        assert not (tmp_path / "out").exists()


def test_rq_kmeans_distributed_matches_in_process(ray_cluster, data, tmp_path):
    ds, x = data
    cfg = RQKMeansConfig(sizes=[16, 8, 8], niter=2, init_niter=10, batch_size=100)
    local = RQKMeans(cfg).fit(x)  # x rows are in item-id order, as ShardedData samples them
    dist = RQKMeans(cfg).fit_data(ShardedData(ds, N, DIM, batch_size=100))
    for a, b in zip(local.codebooks, dist.codebooks):
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert (local.encode(x) == dist.encode(x)).mean() > 0.99
    # the stage: balanced RQ-KMeans forced onto the distributed path
    manifest = train_sid(ds, tmp_path / "km", tiny("quantizer=rq_kmeans_balanced",
                                                   "in_process_max_items=0", "rq_kmeans.niter=1",
                                                   "rq_kmeans.balance_iters=1"))
    q = load_quantizer(tmp_path / "km")
    assert q.config.balanced and manifest["quantizer"] == "rq_kmeans_balanced"
    metrics = json.loads((tmp_path / "km" / "metrics.json").read_text())
    assert metrics["distributed"] and metrics["utilization_l0"] == 1.0


def test_contrastive_pairs_from_the_sequences_training_part(ray_cluster, tmp_path):
    """pair_window=1 on a dataset without a pairs table: the RQ-VAE trains its
    contrastive objective on the co-occurrences of each user's training part, as many
    as the core function counts; without sequences it is a one-line error."""
    from forge_ray.data.cooccurrence import cooccurrence_pairs
    from forge_ray.data.schema import sequences_schema

    folder, _ = make_dataset(tmp_path / "ds", n_pairs=0)
    rng = np.random.default_rng(1)
    ids = np.arange(N, dtype=np.int64) * 3 + 7
    seqs = [ids[rng.integers(0, N, rng.integers(3, 9))] for _ in range(120)]
    with ShardWriter(folder / "sequences", sequences_schema(), rows_per_shard=50) as w:
        w.write(pa.table({"user_id": np.arange(120, dtype=np.int64), "item_ids": seqs}, schema=sequences_schema()))
    cfg = tiny("train.steps=6", "pair_window=1", "train.pair_batch_size=16",
               "scale.deepspeed_config=zero0.json", tmp_path=tmp_path)  # as configs/amazon
    train_sid(folder, tmp_path / "m", cfg)
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert metrics["contrastive_pairs"] == len(cooccurrence_pairs(seqs, 1)[0]) > 0
    logged = read_jsonl(tmp_path / "runs" / "m" / "forge_ray" / "metrics.jsonl")
    assert any(r.get("contrastive", 0) > 0 for r in logged), logged[-1]
    no_seq, _ = make_dataset(tmp_path / "ds2", n_pairs=0)
    with pytest.raises(InputError, match="needs a sequences table"):
        train_sid(no_seq, tmp_path / "m2", tiny("pair_window=1", tmp_path=tmp_path / "r2"))


def test_shard_batches_held_and_streamed(ray_cluster):
    """A worker's batches: a held shard gives every row once per epoch (less the last
    partial batch) in a new, seeded order each epoch; a streamed one the same batch
    shapes through its shuffle buffer; a shard smaller than one batch is refused."""
    import ray
    import torch

    from forge_ray.distributed.rqvae_worker import shard_batches

    shard = ray.data.from_arrow(pa.table({"x": np.arange(100, dtype=np.float32)})).iterator()

    def epochs(held: bool, shuffle: int, seed: int = 3, batch: int = 32, n: int = 2):
        it = shard_batches(shard, "train", batch, shuffle, seed, held)
        return [torch.cat([next(it)["x"] for _ in range(100 // batch)]) for _ in range(n)]

    first, second = epochs(held=True, shuffle=1)
    for rows in (first, second):
        assert len(rows) == 96 and len(set(rows.tolist())) == 96 and set(rows.tolist()) <= set(range(100))
    assert not torch.equal(first, second)  # reshuffled every epoch
    assert torch.equal(epochs(held=True, shuffle=1)[0], first)  # seeded
    assert not torch.equal(epochs(held=True, shuffle=1, seed=4)[0], first)
    assert torch.equal(epochs(held=True, shuffle=0)[1], torch.arange(96, dtype=torch.float32))
    streamed = epochs(held=False, shuffle=64)
    assert all(len(set(rows.tolist())) == 96 for rows in streamed)
    for held in (True, False):
        with pytest.raises(RuntimeError, match="fewer than 128 rows"):
            next(shard_batches(shard, "train", 128, 0, 0, held))
