"""forge-ray assign on a real 2-node Ray cluster: same table as the in-process core
path, every collision strategy keeps its invariants, an actor crash loses nothing, a
lost / duplicated / changed item fails the exactly-once check, bad inputs fail cleanly."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from forge_ray.config import load_config
from forge_ray.core.quantize.registry import load_quantizer
from forge_ray.core.quantize.rq_kmeans import RQKMeans
from forge_ray.core.sid.collisions import CollisionConfig, resolve_all
from forge_ray.core.sid.export import read_sid_table, read_sid_tokens
from forge_ray.core.sid.metrics import histogram_quality, level_counts, sid_counts, sid_quality
from forge_ray.data.schema import ShardWriter, embedding_array, items_schema, sequences_schema
from forge_ray.distributed import assign as assign_stage
from forge_ray.distributed.assign import AssignConfig, assign
from forge_ray.distributed.sid_metrics import SidMetricsStageConfig, sid_metrics
from forge_ray.errors import InputError
from forge_ray.io import read_manifest, write_manifest
from forge_ray.sid_table import list_codes

pytestmark = pytest.mark.ray

SIZES = [8, 8, 8]
DIM = 8


def make_dataset(folder: Path, n_items: int = 300, dim: int = DIM, seed: int = 0,
                 users: int = 40, unknown_ref: int | None = None) -> Path:
    """Clustered embeddings (so SIDs collide) + random sequences, as a canonical dataset."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(40, dim)).astype(np.float32)
    x = centers[rng.integers(0, 40, n_items)] + 0.3 * rng.normal(size=(n_items, dim)).astype(np.float32)
    ids = np.arange(n_items, dtype=np.int64) * 3 + 7  # non-contiguous ids
    with ShardWriter(folder / "items", items_schema(dim), rows_per_shard=128) as w:
        w.write(pa.table({"item_id": ids, "embedding": embedding_array(x)}))
    seqs = [rng.choice(ids, size=int(rng.integers(1, 7)), replace=False).tolist() for _ in range(users)]
    if unknown_ref is not None:
        seqs[0] = seqs[0][:1] + [unknown_ref] + seqs[0][1:]
    with ShardWriter(folder / "sequences", sequences_schema(), rows_per_shard=16) as w:
        w.write(pa.table({"user_id": np.arange(users, dtype=np.int64), "item_ids": seqs},
                         schema=sequences_schema()))
    write_manifest(folder, "dataset", counts={"items": n_items, "sequences": users},
                   embedding_dim=dim, embedding_dtype="float32")
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(dataset, model_dir, embeddings, ids) with a quantizer fitted in-process."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("assign")
    data = make_dataset(root / "data", unknown_ref=10**9)
    t = pq.read_table(data / "items")
    x = np.stack(t["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    ids = t["item_id"].to_numpy()
    q = RQKMeans(sizes=SIZES, niter=3, seed=0).fit(x)
    q.save(root / "model")
    return data, root / "model", x, ids


def read_out(out: Path, n_levels: int, sid_levels: int):
    t = pq.read_table([str(p) for p in sorted(out.glob("*.parquet"))][0]).schema  # schema check
    assert {"item_id", "codes", "sid", "fallback"} <= set(t.names)
    tab = __import__("pyarrow").concat_tables([pq.read_table(p) for p in sorted(out.glob("*.parquet"))])
    order = np.argsort(tab["item_id"].to_numpy())
    ids = tab["item_id"].to_numpy()[order]
    return ids, list_codes(tab["codes"], n_levels)[order], list_codes(tab["sid"], sid_levels)[order]


def run_assign(tiny, out, **overrides):
    data, model, _, _ = tiny
    cfg = load_config(AssignConfig, None, [f"{k}={v}" for k, v in overrides.items()])
    return assign(model, data, out, cfg)


def test_cap_matches_in_process_core(ray_cluster, tiny, tmp_path):
    data, model, x, ids = tiny
    out = tmp_path / "sids"
    m = run_assign(tiny, out, **{"collisions.strategy": "cap", "collisions.cap": 3,
                                 "collisions.candidates": 8, "pool.actors": 2, "pool.batch_size": 64})
    got_ids, got_codes, got_sid = read_out(out, 3, 3)
    q = load_quantizer(model)
    codes, cand = q.rank_last_level(x, 8)
    want, stats = resolve_all(ids, codes, cand, CollisionConfig(strategy="cap", cap=3, candidates=8),
                              last_size=SIZES[-1])
    order = np.argsort(ids)
    np.testing.assert_array_equal(got_ids, ids[order])
    np.testing.assert_array_equal(got_codes, codes[order])
    np.testing.assert_array_equal(got_sid, want[order])
    assert stats["moved"] > 0  # the data really collides, so collision handling was exercised
    cs = m["collision_stats"]
    assert (cs["moved"], cs["fallback"]) == (stats["moved"], stats["fallback"])
    assert cs["after"]["max_items_per_sid"] <= 3 < cs["before"]["max_items_per_sid"]
    # the collision pass revisited only parts holding busy groups, and the histogram it
    # patched equals a direct count of the final SIDs
    assert 0 < cs["revisited_rows"] <= len(ids) and cs["revisited_parts"] >= 1
    assert cs["after"] == pytest.approx(histogram_quality(
        np.bincount(np.unique(got_sid, axis=0, return_counts=True)[1])))
    assert m["counts"] == {"input_items": len(ids), "items": len(ids), "distinct_items": len(ids)}
    assert m["sizes"] == SIZES and m["code_sizes"] == SIZES and read_manifest(out, "sids")
    # exports: FORGE table and token strings, one part per Parquet file, same rows
    tab = [read_sid_table(p, SIZES) for p in sorted((out / "export/sid_table").glob("*.csv"))]
    tok = [read_sid_tokens(p, SIZES) for p in sorted((out / "export/sid_tokens").glob("*.csv"))]
    for parts in (tab, tok):
        e_ids = np.concatenate([p[0] for p in parts])
        e_codes = np.concatenate([p[1] for p in parts])[np.argsort(e_ids)]
        np.testing.assert_array_equal(np.sort(e_ids), ids[order])
        np.testing.assert_array_equal(e_codes, want[order])


def test_cap_without_an_over_full_sid_keeps_the_first_pass(ray_cluster, tiny, tmp_path):
    """A cap no SID exceeds: no part is revisited and the table is strategy none's."""
    _, _, x, ids = tiny
    runs = {s: run_assign(tiny, tmp_path / s, **{"collisions.strategy": s, "collisions.cap": len(ids)})
            for s in ("cap", "none")}
    cs = runs["cap"]["collision_stats"]
    assert (cs["revisited_parts"], cs["revisited_rows"], cs["moved"]) == (0, 0, 0)
    assert cs["before"] == cs["after"] == runs["none"]["collision_stats"]["after"]
    for a, b in zip(read_out(tmp_path / "cap", 3, 3), read_out(tmp_path / "none", 3, 3)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("strategy", [
    "suffix", *(pytest.param(s, marks=pytest.mark.slow) for s in ("none", "random", "sinkhorn"))])
def test_strategy_invariants(ray_cluster, tiny, tmp_path, strategy):
    _, _, x, ids = tiny
    out = tmp_path / "sids"
    m = run_assign(tiny, out, **{"collisions.strategy": strategy, "collisions.cap": 3,
                                 "collisions.candidates": 8, "pool.batch_size": 100, "partitions": 2})
    sid_levels = 4 if strategy == "suffix" else 3
    got_ids, codes, sid = read_out(out, 3, sid_levels)
    np.testing.assert_array_equal(got_ids, np.sort(ids))  # exactly once
    _, per_sid = np.unique(sid, axis=0, return_counts=True)
    if strategy == "none":
        np.testing.assert_array_equal(sid, codes)
        # the task shuffle's items-per-SID histogram, over 2 buckets, equals one direct count
        assert m["collision_stats"]["before"] == pytest.approx(histogram_quality(np.bincount(per_sid)))
    elif strategy == "suffix":
        np.testing.assert_array_equal(sid[:, :3], codes)
        assert per_sid.max() == 1 and m["sizes"] == SIZES + [int(sid[:, 3].max()) + 1]
    else:
        np.testing.assert_array_equal(sid[:, :2], codes[:, :2])  # prefix kept
        assert per_sid.max() <= 3  # cap
    assert m["collision_stats"]["after"]["max_items_per_sid"] == per_sid.max()
    rows = sum(len(read_sid_tokens(p, m["sizes"])[0]) for p in (out / "export/sid_tokens").glob("*.csv"))
    assert rows == len(ids)
    # sid-metrics' task-shuffle counts of this table, over 2 buckets, equal the core's
    got = sid_metrics(out, None, tmp_path / "m", load_config(SidMetricsStageConfig, None, ["partitions=2"]))
    for name, rows in (("raw", codes), ("final", sid)):
        want = sid_quality(sid_counts(rows), level_counts(rows, m["sizes"][:rows.shape[1]]))
        for k in ("collision_rate", "unique_sid_ratio", "max_items_per_sid", "gini", "utilization",
                  "perplexity"):
            assert got[name][k] == pytest.approx(want[k]), (name, k)
    assert got["items"] == len(ids) and got["sids"] == len(per_sid)


@pytest.mark.slow  # ~1.5 min each on the shared 2-core box
@pytest.mark.parametrize("strategy", ["cap", "none"])  # none: the actor writes its parts too
def test_actor_crash_loses_and_duplicates_nothing(ray_cluster, tiny, tmp_path, monkeypatch, strategy):
    _, _, x, ids = tiny
    marker = tmp_path / "crashed"
    out = tmp_path / "sids"

    class CrashOnce(assign_stage.Encoder):  # a local class: Ray ships it by value
        def __call__(self, batch):
            try:  # exclusive create: exactly one batch of the whole run crashes, once
                with open(marker, "x"):
                    pass
                os._exit(1)  # the actor process dies mid-run
            except FileExistsError:
                pass
            return super().__call__(batch)

    monkeypatch.setattr(assign_stage, "Encoder", CrashOnce)
    m = run_assign(tiny, out, **{"collisions.strategy": strategy, "collisions.cap": 3,
                                 "pool.batch_size": 50})
    assert marker.exists()  # an actor really died mid-run
    got_ids, _, sid = read_out(out, 3, 3)
    np.testing.assert_array_equal(got_ids, np.sort(ids))
    assert m["counts"]["distinct_items"] == len(ids)
    if strategy == "cap":
        assert np.unique(sid, axis=0, return_counts=True)[1].max() <= 3


@pytest.mark.parametrize("strategy,fault", [("none", "missing"), ("none", "duplicated"),
                                            ("none", "changed"), ("cap", "changed")])
def test_exactly_once_check_catches_lost_duplicated_or_changed_items(ray_cluster, tiny, tmp_path,
                                                                     monkeypatch, strategy, fault):
    """A part writer that loses a row, runs twice on one block, or writes a wrong item id is
    caught by the row count + item-id checksum against the input: no output. Strategy
    ``none`` writes its parts in the encoder actors, the others in writer tasks."""

    def tamper(write, block):  # local: Ray ships it (and the fault) by value
        if fault == "missing":
            return write(block.slice(1))
        if fault == "duplicated":  # as if a retried writer's first output were kept too
            return pa.concat_tables([write(block), write(block)])
        ids = block["item_id"].to_numpy().copy()
        ids[0] += 1  # ids are 3k + 7: id + 1 is no item of the dataset
        return write(block.set_column(block.schema.get_field_index("item_id"), "item_id", pa.array(ids)))

    if strategy == "none":
        class Tampered(assign_stage.Encoder):
            def process(self, items):
                return tamper(super().process, items)

        monkeypatch.setattr(assign_stage, "Encoder", Tampered)
    else:
        real = assign_stage.write_block
        monkeypatch.setattr(assign_stage, "write_block", lambda block, spec: tamper(
            lambda b: real(b, spec), block))
    out = tmp_path / "sids"
    with pytest.raises(InputError, match="SID table is inconsistent"):
        run_assign(tiny, out, **{"collisions.strategy": strategy, "collisions.cap": 3,
                                 "collisions.candidates": 8})
    assert not out.exists() and not list(tmp_path.glob(".sids*"))


def test_bad_inputs(ray_cluster, tiny, tmp_path):
    data, model, _, _ = tiny
    other = make_dataset(tmp_path / "wide", n_items=20, dim=DIM + 4, users=3)
    with pytest.raises(InputError, match="12-d but the quantizer"):
        assign(model, other, tmp_path / "o1")
    assert not (tmp_path / "o1").exists()
    with pytest.raises(InputError, match="quantizer.json"):
        assign(tmp_path, data, tmp_path / "o2")
    (tmp_path / "o3").mkdir()
    with pytest.raises(InputError, match="already exists"):
        assign(model, data, tmp_path / "o3")
    # a prefix group too large for cap x K: one-line error, no output left behind
    cfg = load_config(AssignConfig, None, ["collisions.strategy=random", "collisions.cap=1"])
    bad = make_dataset(tmp_path / "dense", n_items=200, users=2, seed=1)
    # every item identical -> one prefix with 200 > 1 x 8 items
    t = pq.read_table(bad / "items")
    one = np.tile(np.ones(DIM, np.float32), (t.num_rows, 1))
    for p in (bad / "items").glob("*.parquet"):
        p.unlink()
    pq.write_table(pa.table({"item_id": t["item_id"], "embedding": embedding_array(one)},
                            schema=items_schema(DIM)), bad / "items" / "part-00000.parquet")
    with pytest.raises(InputError, match="raise the cap"):
        assign(model, bad, tmp_path / "o4", cfg)
    assert not (tmp_path / "o4").exists()
    assert not list(tmp_path.glob(".o4*"))
