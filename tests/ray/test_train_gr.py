"""`train-gr` on a real 2-node Ray cluster: DeepSpeed ZeRO-2 over gloo, resume, counted drops."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from forge_ray.config import load_config
from forge_ray.core.gr.data import ExampleCounts, ItemSIDTable, build_examples
from forge_ray.core.gr.vocab import SIDVocab
from forge_ray.data.schema import ShardWriter, sequences_schema
from forge_ray.io import read_manifest, write_manifest

pytestmark = pytest.mark.ray

SIZES = (4, 4, 4)
UNKNOWN_ITEM = 99_999
SID_SCHEMA = pa.schema([("item_id", pa.int64()), ("codes", pa.list_(pa.int64())),
                        ("sid", pa.list_(pa.int64()))])


def build_gr_data(folder, n_items=48, n_users=40, seed=0):
    """A dataset whose users walk item ids upwards (learnable), plus a SIDS_DIR in
    `forge-ray assign`'s schema. Every 7th user names an item without a SID and one
    user has an empty sequence. Returns (dataset, sids, item_ids, codes, users, seqs)."""
    rng = np.random.default_rng(seed)
    items = np.arange(n_items, dtype=np.int64) * 7 + 3
    codes = np.stack([np.arange(n_items) % 4, (np.arange(n_items) // 4) % 4, np.arange(n_items) // 16], 1)
    sids = folder / "sids"
    with ShardWriter(sids, SID_SCHEMA, rows_per_shard=20) as w:
        w.write(pa.table({"item_id": items, "codes": list(codes), "sid": list(codes)}, schema=SID_SCHEMA))
    write_manifest(sids, "sids", sizes=list(SIZES), counts={"items": n_items})
    users, seqs = [], []
    for u in range(n_users):
        start, n = rng.integers(n_items), rng.integers(4, 10)
        s = list(items[(start + np.arange(n)) % n_items])
        if u % 7 == 0:
            s.insert(1, UNKNOWN_ITEM)
        users.append(u)
        seqs.append(np.asarray(s, np.int64))
    users.append(n_users)
    seqs.append(np.zeros(0, np.int64))
    ds = folder / "ds"
    schema = sequences_schema()
    with ShardWriter(ds / "sequences", schema, rows_per_shard=16) as w:
        w.write(pa.table({"user_id": np.asarray(users, np.int64), "item_ids": seqs}, schema=schema))
    write_manifest(ds, "dataset", counts={"sequences": len(users)})
    return ds, sids, items, codes, np.asarray(users), seqs


def tiny_config(*overrides):
    from forge_ray.distributed.train_gr import TrainGRConfig

    return load_config(TrainGRConfig, "configs/tiny/train_gr.yaml", list(overrides))


def test_two_worker_deepspeed_training_then_resume(ray_cluster, tmp_path):
    from forge_ray.distributed.train_gr import train_gr

    ds, sids, items, codes, users, seqs = build_gr_data(tmp_path)
    runs = tmp_path / "runs"
    first = train_gr(tiny_config("train.max_steps=4", "train.eval_every=4", "train.log_every=1",
                                 f"run.storage_path={runs}"), ds, sids, tmp_path / "m1")
    assert first["steps"] == 4 and first["kind"] == "gr_model" and first["sizes"] == list(SIZES)
    # unknown items and the empty sequence are counted, never silently lost
    _, ref = build_examples(users, seqs, ItemSIDTable(items, codes), SIDVocab(SIZES), "train", 5)
    assert first["counts"] == ref.__dict__ and ref.unknown_items == 6 and ref.too_short == 1
    # same run storage + name: resumes at step 4 and continues the step count
    second = train_gr(tiny_config("train.max_steps=8", "train.eval_every=4", "train.log_every=1",
                                  f"run.storage_path={runs}"), ds, sids, tmp_path / "m2")
    assert second["steps"] == 8
    history = [json.loads(x) for x in (tmp_path / "m2" / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [4, 8]
    logged = [json.loads(x) for x in (runs / "train_gr" / "logs" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in logged if "train/loss" in r]
    assert [r["step"] for r in logged if "train/loss" in r] == list(range(1, 9))
    assert np.mean(losses[-2:]) < np.mean(losses[:2])  # loss falls
    assert history[-1]["valid_loss"] < history[0]["valid_loss"] * 1.5
    for name in ("model.safetensors", "sid_vocab.json", "tokenizer.json", "curves.png", "metrics.json"):
        assert (tmp_path / "m2" / name).is_file()
    from forge_ray.core.gr.models import load_model

    model, vocab = load_model(tmp_path / "m2")
    assert vocab == SIDVocab(SIZES) and model.config.vocab_size == len(vocab)
    assert read_manifest(tmp_path / "m2", "gr_model")["sids"] == str(sids.resolve())


def test_bad_training_inputs(ray_cluster, tmp_path):
    from forge_ray.distributed.train_common import TrainingError
    from forge_ray.distributed.train_gr import train_gr
    from forge_ray.errors import InputError

    ds, sids, *_ = build_gr_data(tmp_path, n_users=3)
    with pytest.raises(InputError, match="fewer than one global batch"):
        train_gr(tiny_config("train.micro_batch=64"), ds, sids, tmp_path / "m")
    with pytest.raises(InputError, match="needs --sids"):
        train_gr(tiny_config(), ds, None, tmp_path / "m")
    # workers taking every CPU of the (4-CPU) cluster would starve Ray Data's reads: a
    # silent hang, so refused up front
    ds, sids, *_ = build_gr_data(tmp_path / "full")
    with pytest.raises(TrainingError, match=r"= 4 of the cluster's 4 CPUs leaves 0 for Ray Data"):
        train_gr(tiny_config("scale.num_workers=4", "scale.cpus_per_worker=1"), ds, sids, tmp_path / "m")
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_hash_join_equals_broadcast_join(ray_cluster, tmp_path):
    from forge_ray.distributed.gr_data import GRDataConfig, count_examples, sequence_examples

    ds, sids, items, codes, users, seqs = build_gr_data(tmp_path, n_users=20)
    vocab = SIDVocab(SIZES)
    ref, ref_counts = build_examples(users, seqs, ItemSIDTable(items, codes), vocab, "train", 5)
    expected = sorted(zip(ref["user_id"].tolist(), ref["target_item"].tolist(),
                          [tuple(x) for x in ref["input_ids"]]))
    for join in ("broadcast", "hash"):
        cfg = GRDataConfig(max_history=5, join=join)
        rows = sequence_examples(ds, sids, vocab, "train", cfg).take_all()
        got = sorted((r["user_id"], r["target_item"], tuple(r["input_ids"])) for r in rows)
        assert got == expected, join
        assert count_examples(ds, sids, vocab, "train", cfg) == ref_counts
    assert isinstance(ref_counts, ExampleCounts)
