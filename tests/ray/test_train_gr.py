"""`train-gr` on a real 2-node Ray cluster: DeepSpeed ZeRO-2 over gloo, resume, counted drops."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
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

    return load_config(TrainGRConfig, "configs/ci/train_gr.yaml", list(overrides))


def test_two_worker_deepspeed_training_then_resume(ray_cluster, tmp_path):
    from forge_ray.distributed.train_gr import train_gr

    ds, sids, items, codes, users, seqs = build_gr_data(tmp_path)
    runs = tmp_path / "runs"
    first = train_gr(ds, sids, tmp_path / "m1", tiny_config(
        "train.max_steps=4", "train.eval_every=4", "train.log_every=1", f"run.storage_path={runs}"))
    assert first["steps"] == 4 and first["kind"] == "gr_model" and first["sizes"] == list(SIZES)
    # unknown items and the empty sequence are counted, never silently lost
    _, ref = build_examples(users, seqs, ItemSIDTable(items, codes), SIDVocab(SIZES), "train", 5)
    assert first["counts"] == ref.__dict__ and ref.unknown_items == 6 and ref.too_short == 1
    # same run storage + name: resumes at step 4 and continues the step count
    second = train_gr(ds, sids, tmp_path / "m2", tiny_config(
        "train.max_steps=8", "train.eval_every=4", "train.log_every=1", f"run.storage_path={runs}"))
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
    # what plain HF and a person reading the folder need: one SID per generate, a model card
    assert model.generation_config.max_new_tokens == len(SIZES) and model.generation_config.num_beams >= 1
    card = (tmp_path / "m2" / "README.md").read_text()
    assert str(list(SIZES)) in card and "Recommender.from_dir" in card and "8 optimizer steps" in card


def test_bad_training_inputs(ray_cluster, tmp_path):
    from forge_ray.distributed.train_common import TrainingError
    from forge_ray.distributed.train_gr import train_gr
    from forge_ray.errors import InputError

    ds, sids, *_ = build_gr_data(tmp_path, n_users=3)
    with pytest.raises(InputError, match="fewer than one global batch"):
        train_gr(ds, sids, tmp_path / "m", tiny_config("train.micro_batch=64"))
    with pytest.raises(InputError, match="needs --sids"):
        train_gr(ds, None, tmp_path / "m", tiny_config())
    # workers taking every CPU of the (4-CPU) cluster would starve Ray Data's reads: a
    # silent hang, so refused up front
    ds, sids, *_ = build_gr_data(tmp_path / "full")
    with pytest.raises(TrainingError, match=r"= 4 of the cluster's 4 CPUs leaves 0 for Ray Data"):
        train_gr(ds, sids, tmp_path / "m", tiny_config("scale.num_workers=4", "scale.cpus_per_worker=1"))
    assert not (tmp_path / "m").exists()


def listening_sockets(root_pid: int, stop: threading.Event, found: set) -> None:
    """Until ``stop``: add (address, port, process name) of every listening TCP socket of
    process ``root_pid`` and its descendants (the Ray processes it started) to ``found``."""
    while not stop.is_set():
        root = psutil.Process(root_pid)
        for proc in [root, *root.children(recursive=True)]:
            try:
                found.update((c.laddr.ip, c.laddr.port, proc.name())
                             for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        stop.wait(0.3)


def not_loopback(found: set) -> list:
    return sorted(s for s in found if not ipaddress.ip_address(s[0].removeprefix("::ffff:")).is_loopback)


def test_nan_loss_stops_on_loopback_keeping_the_last_checkpoint(ray_cluster, tmp_path, monkeypatch):
    """A NaN loss at step 5 stops the run: the error names the step and the step-4
    checkpoint, no MODEL_DIR is written. Every socket the cluster's processes listen on
    meanwhile (Ray's and the torch.distributed rendezvous of rank 0) is on loopback."""
    from forge_ray.distributed.train_common import TrainingError, newest_checkpoint
    from forge_ray.distributed.train_common import FAULT_ENV
    from forge_ray.distributed.train_gr import train_gr

    ds, sids, *_ = build_gr_data(tmp_path)
    runs = tmp_path / "runs"
    monkeypatch.setenv(FAULT_ENV["nan_step"], "5")
    cfg = tiny_config("train.max_steps=8", "train.eval_every=100", "scale.checkpoint_every=2",
                      f"run.storage_path={runs}")
    stop, found = threading.Event(), set()
    sampler = threading.Thread(target=listening_sockets, args=(os.getpid(), stop, found))
    sampler.start()
    try:
        with pytest.raises(TrainingError, match=r"NaN at step 5; stopped, last good checkpoint: .*checkpoint_"):
            train_gr(ds, sids, tmp_path / "m", cfg)
    finally:
        stop.set()
        sampler.join()
    assert not (tmp_path / "m").exists()
    newest = newest_checkpoint(runs / "train_gr")
    assert json.loads((newest / "forge_ray_rank0.done").read_text())["step"] == 4
    assert any("RayTrainWorker" in name for *_, name in found)  # sampled during training
    assert not_loopback(found) == []


def test_a_run_whose_steps_were_mostly_skipped_fails(ray_cluster, tmp_path):
    """A huge weight decay blows the weights up until the loss saturates: from step 7 on
    every gradient overflows and DeepSpeed skips the step ("OVERFLOW! Skipping step"),
    10 of 16. Counted and logged, and the run fails instead of writing a model."""
    from forge_ray.distributed.train_common import TrainingError
    from forge_ray.distributed.train_gr import train_gr

    ds, sids, *_ = build_gr_data(tmp_path)
    runs = tmp_path / "runs"
    cfg = tiny_config("train.max_steps=16", "train.weight_decay=1e4", "train.eval_every=100",
                      "train.valid_beams=0", "train.early_stop_metric=valid_loss", "train.log_every=1",
                      f"run.storage_path={runs}")
    with pytest.raises(TrainingError, match=r"DeepSpeed skipped 10 of 16 optimizer steps"):
        train_gr(ds, sids, tmp_path / "m", cfg)
    assert not (tmp_path / "m").exists()
    logged = [json.loads(x) for x in (runs / "train_gr" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/skipped_steps"] for r in logged if "train/skipped_steps" in r][-1] == 10


def deepspeed_complete_steps(run) -> list[int]:
    """Steps of the checkpoint folders whose DeepSpeed files are all there (2 ranks,
    ZeRO-2), read without forge_ray's own completion marks."""
    steps = []
    for folder in run.glob("checkpoint_*"):
        tag = folder / "latest"
        names = ["mp_rank_00_model_states.pt"] + [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
        if tag.is_file() and all((folder / tag.read_text().strip() / n).is_file() for n in names):
            steps.append(int(tag.read_text().strip().removeprefix("global_step")))
    return sorted(steps)


@pytest.mark.slow
def test_interrupted_cli_run_says_where_and_resumes_from_the_newest_checkpoint(ray_cluster, tmp_path):
    """Ctrl-C on `forge-ray train-gr` (its own local cluster, nothing listening beyond
    loopback) exits 130 with one line naming the step and the checkpoint; the rerun
    continues from that checkpoint, the newest complete one on disk, which Ray's own
    run snapshot may not name yet."""
    from forge_ray.distributed.train_gr import train_gr

    ds, sids, *_ = build_gr_data(tmp_path)
    runs, run = tmp_path / "runs", tmp_path / "runs" / "train_gr"
    overrides = ["train.max_steps=400", "train.eval_every=1000", "train.valid_beams=0",
                 "train.early_stop_metric=valid_loss", "train.log_every=1",
                 "scale.checkpoint_every=2", f"run.storage_path={runs}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "forge_ray", "train-gr", "--config", "configs/ci/train_gr.yaml",
             "--data", str(ds), "--sids", str(sids), "--out", str(tmp_path / "m"), *overrides],
            stdout=subprocess.DEVNULL, stderr=err, env=env)
        stop, found = threading.Event(), set()
        sampler = threading.Thread(target=listening_sockets, args=(proc.pid, stop, found), daemon=True)
        sampler.start()
        deadline = time.monotonic() + 400
        while proc.poll() is None and time.monotonic() < deadline \
                and max(deepspeed_complete_steps(run), default=0) < 6:
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
        stop.set()
    last = (tmp_path / "stderr").read_text().strip().splitlines()[-1]
    assert rc == 130, last
    said = re.fullmatch(r"forge-ray train-gr: interrupted at step (\d+); rerun the same command to "
                        r"resume from the checkpoint of step (\d+) \((.+)\)", last)
    assert said, last
    step, resume_step = int(said[1]), int(said[2])
    # every checkpoint before step N is complete (both ranks passed its report to train
    # on); the one of step N itself may still have been uploading
    assert max(s for s in deepspeed_complete_steps(run) if s < step) <= resume_step <= step
    snapshot = run / "checkpoint_manager_snapshot.json"  # Ray's own record, often behind
    recorded = json.loads(snapshot.read_text())["latest_checkpoint_result"] if snapshot.is_file() else None
    assert (recorded["metrics"]["step"] if recorded else 0) <= resume_step
    assert not (tmp_path / "m").exists()
    assert any("RayTrainWorker" in name for *_, name in found) and not_loopback(found) == []
    # the rerun (same run storage and name) starts right after that checkpoint
    log = run / "logs" / "metrics.jsonl"
    before = len(log.read_text().splitlines())
    cfg = tiny_config(*overrides[1:], f"train.max_steps={resume_step + 2}")
    assert train_gr(ds, sids, tmp_path / "m", cfg)["steps"] == resume_step + 2
    resumed = [json.loads(x)["step"] for x in log.read_text().splitlines()[before:]]
    assert resumed[:2] == [resume_step + 1, resume_step + 2]


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


def test_decoder_only_trains_on_whole_sequences(ray_cluster, tmp_path):
    """data.train_examples=sequences: the same targets as the windows in fewer examples,
    validation on every user's window split across both workers, the kept checkpoint
    the one with the lowest validation loss, and why, in the manifest."""
    from forge_ray.core.gr.models import load_model
    from forge_ray.distributed.train_gr import train_gr

    ds, sids, items, codes, users, seqs = build_gr_data(tmp_path)
    cfg = tiny_config("model.arch=qwen2", "data.train_examples=sequences", "train.max_steps=8",
                      "train.eval_every=4", "train.valid_samples=0", "train.early_stop_metric=valid_loss",
                      "train.log_every=1", "train.length_buckets=2", f"run.storage_path={tmp_path / 'runs'}",
                      "scale.deepspeed_config=zero0.json",  # as configs/amazon/causal/train_gr.yaml
                      "scale.autocast=bf16")
    m = train_gr(ds, sids, tmp_path / "m", cfg)
    table, vocab = ItemSIDTable(items, codes), SIDVocab(SIZES)
    _, windows = build_examples(users, seqs, table, vocab, "train", 5)
    _, valid = build_examples(users, seqs, table, vocab, "valid", 5)
    assert m["counts"]["targets"] == windows.examples > m["counts"]["examples"]
    assert m["counts"]["repeats"] == windows.repeats == 0  # these users never come back to an item
    assert m["valid_windows"] == valid.examples  # train.valid_samples=0: all of them
    history = [json.loads(x) for x in (tmp_path / "m" / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [4, 8] and all("recall@10" in h for h in history)
    best = min(history, key=lambda h: h["valid_loss"])
    assert m["selected"]["step"] == best["step"] and m["selected"]["metric"] == "valid_loss"
    assert m["selected"]["value"] == pytest.approx(best["valid_loss"]) and "lowest valid_loss" in m["selected"]["why"]
    logged = [json.loads(x) for x in (tmp_path / "runs" / "train_gr" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train/targets_per_s"] > 0 for r in logged if "train/loss" in r)
    model, _ = load_model(tmp_path / "m")
    assert not model.config.is_encoder_decoder
    assert "sequences" in (tmp_path / "m" / "README.md").read_text()
    with pytest.raises(Exception, match="needs a decoder-only model"):
        tiny_config("data.train_examples=sequences")


def test_refit_trains_on_the_validation_items_and_is_scored_on_test_only(ray_cluster, tmp_path):
    """data.train_holdout=1: the validation item of every user becomes a training
    target, nothing is validated, the last weights are kept and say why; eval-gr refuses
    to score such a model on validation and counts most-popular on the same items."""
    from forge_ray.core.gr.popularity import PopularityCounter
    from forge_ray.distributed.evaluate import EvalGRConfig, evaluate, popular_items
    from forge_ray.errors import InputError
    from forge_ray.distributed.train_gr import train_gr

    ds, sids, items, codes, users, seqs = build_gr_data(tmp_path)
    m = train_gr(ds, sids, tmp_path / "m", tiny_config(
        "model.arch=qwen2", "data.train_examples=sequences", "data.train_holdout=1", "train.max_steps=3",
        "train.eval_every=1", f"run.storage_path={tmp_path / 'runs'}",
        "scale.cache_mb=0"))  # streamed every epoch (the other tests' workers hold their shards)
    _, refit = build_examples(users, seqs, ItemSIDTable(items, codes), SIDVocab(SIZES), "train", 5, holdout=1)
    _, protocol = build_examples(users, seqs, ItemSIDTable(items, codes), SIDVocab(SIZES), "train", 5)
    assert m["counts"]["targets"] == refit.examples == protocol.examples + 40  # + one per non-empty user
    assert m["steps"] == 3 and m["selected"]["step"] == 3 and "train_holdout=1" in m["selected"]["why"]
    assert m["valid_windows"] == 0 and (tmp_path / "m" / "history.jsonl").read_text() == ""
    with pytest.raises(InputError, match="score it on split=test"):
        evaluate(tmp_path / "m", tmp_path / "e", EvalGRConfig(split="valid"))
    assert not (tmp_path / "e").exists()
    pop = PopularityCounter()
    pop.update_from_sequences(seqs, holdout=1)
    np.testing.assert_array_equal(popular_items(ds, 10, holdout=1), pop.top(10))
