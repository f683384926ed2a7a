"""`ingest` of each text/log format on the real cluster, incl. the real samples."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from forge_ray.distributed.ingest import IngestConfig, ingest
from forge_ray.errors import InputError

pytestmark = pytest.mark.ray


def test_amazon_beauty(ray_cluster, shared_data, tmp_path):
    m = ingest([str(shared_data / "amazon" / "Beauty")], tmp_path / "ds",
               IngestConfig(chunk_rows=4096, progress=False))
    assert m["counts"] == {"items": 12_101, "sequences": 22_363, "interactions": 198_502}
    assert m["dropped"] == {} and m["embedding_dim"] == 0
    assert m["item_columns"] == ["item_id", "item_key", "text"]
    items = pq.read_table(tmp_path / "ds" / "items", columns=["item_id"])["item_id"].to_numpy()
    seqs = pq.read_table(tmp_path / "ds" / "sequences")
    flat = np.concatenate(seqs["item_ids"].to_numpy(zero_copy_only=False))
    assert np.isin(flat, items).all() and len(np.unique(items)) == 12_101
    assert seqs["item_ids"].to_pylist()[0]  # non-empty, order checked by the reader's tests


def test_amazon_named_by_its_two_files(ray_cluster, tmp_path):
    """`ingest user_sequence.txt item_text.txt` (as a user names them) reads their folder."""
    folder = tmp_path / "Shop"
    folder.mkdir()
    (folder / "item_text.txt").write_text("A1 red shoe\nB2 blue hat\nC3 green bag\n")
    (folder / "user_sequence.txt").write_text("u1 A1 B2\nu2 C3 A1 B2\n")
    m = ingest([str(folder / "user_sequence.txt"), str(folder / "item_text.txt")], tmp_path / "ds",
               IngestConfig(progress=False))
    assert m["counts"] == {"items": 3, "sequences": 2, "interactions": 5}
    assert [(s["path"], s["format"]) for s in m["sources"]] == [(str(folder), "amazon")]


def test_all_nan_embeddings_dropped_and_counted(ray_cluster, tmp_path):
    """A Parquet items file whose every embedding is NaN: all dropped and counted (the
    empty chunk's fingerprint used to crash), refused under --strict."""
    import pyarrow as pa

    path = tmp_path / "items.parquet"
    pq.write_table(pa.table({"item_id": pa.array([1, 2, 3], pa.int64()),
                             "embedding": pa.array([[float("nan"), 0.5]] * 3, pa.list_(pa.float32(), 2))}),
                   path)
    m = ingest([str(path)], tmp_path / "ds", IngestConfig(progress=False))
    assert m["counts"] == {} and m["dropped"] == {"nan_embedding": 3}  # no items left to write
    with pytest.raises(InputError, match=r"items.parquet: 3 embedding row\(s\) hold NaN/Inf"):
        ingest([str(path)], tmp_path / "strict", IngestConfig(strict=True, progress=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "items.parquet"]


def test_algr_sample_and_malformed_lines(ray_cluster, shared_data, tmp_path):
    sample = shared_data / "algr" / "train_data_sample.tsv"
    bad = tmp_path / "bad.tsv"
    rows = sample.read_bytes().rstrip(b"\n") + b"\n"
    bad.write_bytes(rows + b"x1\tsys\tno tokens here\tC1C2C3\nbroken line\n")
    cfg = IngestConfig(chunk_rows=3, buckets=2, progress=False)
    m = ingest([str(sample), str(bad)], tmp_path / "ds", cfg)
    # the same 10 rows twice: sequences add up, SIDs are merged into one row each
    assert m["counts"]["sequences"] == 20
    assert sum(m["dropped"].values()) == 2 and m["sources"][1]["dropped"] == m["dropped"]
    sids = pq.read_table(tmp_path / "ds" / "sids")
    ids = sids["item_id"].to_numpy()
    assert len(np.unique(ids)) == len(ids) == m["counts"]["sids"]
    flat = np.concatenate(pq.read_table(tmp_path / "ds" / "sequences")["item_ids"]
                          .to_numpy(zero_copy_only=False))
    assert set(flat.tolist()) == set(ids.tolist())  # every item keeps exactly one SID row
    with pytest.raises(InputError, match=r"bad.tsv: .* in the row at byte \d+$"):
        ingest([str(bad)], tmp_path / "strict", IngestConfig(strict=True, progress=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tsv", "ds"]


def test_interaction_log_grouping_matches_pandas(ray_cluster, tmp_path):
    rng = np.random.default_rng(3)
    n = 400
    log = pd.DataFrame({"user": rng.integers(0, 37, n), "item_id": rng.integers(0, 90, n),
                        "timestamp": rng.integers(1_600_000_000, 1_600_000_050, n)})
    log.to_csv(tmp_path / "log.csv", index=False)
    m = ingest([str(tmp_path / "log.csv")], tmp_path / "ds",
               IngestConfig(chunk_rows=64, progress=False))
    assert m["counts"]["sequences"] == log["user"].nunique()
    assert m["counts"]["interactions"] == n
    got = pq.read_table(tmp_path / "ds" / "sequences").to_pandas().set_index("user_id")
    ref = log.sort_values(["user", "timestamp", "item_id"]).groupby("user")
    for user, g in ref:
        assert got.loc[user, "item_ids"].tolist() == g["item_id"].tolist()
        assert got.loc[user, "timestamps"].tolist() == g["timestamp"].tolist()
    # one Parquet row group per file, not one per user (those read back 60x slower)
    for f in (tmp_path / "ds" / "sequences").glob("*.parquet"):
        assert pq.ParquetFile(f).metadata.num_row_groups == 1


def test_canonical_parquet_files(ray_cluster, tmp_path):
    import pyarrow as pa

    from forge_ray.data.schema import PAIRS_SCHEMA, embedding_array, items_schema

    emb = np.random.default_rng(0).standard_normal((30, 8)).astype(np.float32)
    pq.write_table(pa.table({"item_id": np.arange(30, dtype=np.int64),
                             "embedding": embedding_array(emb)}, schema=items_schema(8)),
                   tmp_path / "items.parquet", row_group_size=8)
    pq.write_table(pa.table({"item_a": [0, 1, 2], "item_b": [3, 4, 99]}, schema=PAIRS_SCHEMA),
                   tmp_path / "pairs.parquet")
    m = ingest([str(tmp_path / "items.parquet"), str(tmp_path / "pairs.parquet")],
               tmp_path / "ds", IngestConfig(chunk_rows=8, buckets=2, progress=False))
    assert m["counts"] == {"items": 30, "pairs": 2}
    assert m["dropped"] == {"pair_unknown_item": 1}
    assert [s["format"] for s in m["sources"]] == ["parquet", "parquet"]
    got = pq.read_table(tmp_path / "ds" / "items").sort_by("item_id")
    np.testing.assert_array_equal(np.stack(got["embedding"].to_numpy(zero_copy_only=False)), emb)
