"""`ingest` on the real 2-node cluster: FORGE npz merging, global checks, bad input.

Inputs are tiny npz files written here with numpy (FORGE's own layout); chunks are
made small and buckets > 1 so that every check really crosses chunks and tasks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from forge_ray.data.schema import embeddings_to_numpy
from forge_ray.distributed.ingest import IngestConfig, ingest, summary
from forge_ray.errors import InputError
from forge_ray.io import read_manifest

pytestmark = pytest.mark.ray

CFG = IngestConfig(chunk_rows=16, buckets=3, progress=False)
STRICT = IngestConfig(strict=True, chunk_rows=16, buckets=3, progress=False)


def contrastive(path: Path, ids: np.ndarray, emb: np.ndarray, pairs: np.ndarray) -> Path:
    """FORGE contrastive npz: itemEncID dict (id -> row, shuffled rows), pairs, embeds."""
    rows = np.random.default_rng(1).permutation(len(ids))
    enc = np.empty((), dtype=object)
    enc[()] = {int(i): int(r) for i, r in zip(ids, rows)}
    embeds = np.empty_like(emb)
    embeds[rows] = emb
    np.savez(path, itemEncID=enc, pairs=pairs, embeds=embeds)
    return path


def reconstruct(path: Path, ids: np.ndarray, emb: np.ndarray) -> Path:
    np.savez(path, ids=ids, embeds=emb)
    return path


def read_items(folder: Path) -> dict[int, np.ndarray]:
    t = pq.read_table(folder / "items")
    return dict(zip(t["item_id"].to_pylist(), embeddings_to_numpy(t["embedding"])))


def assert_nothing_left(folder: Path, inputs: set[str]) -> None:
    """No output and no hidden temp folder: only the inputs remain."""
    assert {p.name for p in folder.iterdir()} == inputs


def forge_pair(tmp: Path, dim: int = 8):
    rng = np.random.default_rng(0)
    ids = rng.choice(10**12, 90, replace=False).astype(np.int64)
    emb = rng.standard_normal((90, dim)).astype(np.float32)
    # contrastive: items 0..49; reconstruct: items 30..89 (30..49 overlap, identical)
    good = ids[rng.integers(0, 50, (77, 2))]
    bad = np.array([[ids[0], 7], [8, ids[1]], [9, 9]], np.int64)  # 3 pairs name unknown ids
    pairs = np.concatenate([good, bad])
    c = contrastive(tmp / "contrastive.npz", ids[:50], emb[:50], pairs)
    r = reconstruct(tmp / "reconstruct.npz", ids[30:], emb[30:])
    return c, r, ids, emb, good


def test_forge_merge_and_unknown_pairs(ray_cluster, tmp_path):
    c, r, ids, emb, good = forge_pair(tmp_path)
    manifest = ingest([str(c), str(r)], tmp_path / "ds", CFG)
    items = read_items(tmp_path / "ds")
    assert sorted(items) == sorted(ids.tolist())  # union, each item once
    for i, e in zip(ids, emb):
        np.testing.assert_array_equal(items[int(i)], e)
    pairs = pq.read_table(tmp_path / "ds" / "pairs")
    got = sorted(zip(pairs["item_a"].to_pylist(), pairs["item_b"].to_pylist()))
    assert got == sorted(map(tuple, good.tolist()))
    assert manifest == read_manifest(tmp_path / "ds", "dataset")
    assert manifest["counts"] == {"items": 90, "pairs": 77}
    assert manifest["dropped"] == {"pair_unknown_item": 3}
    assert manifest["merged_duplicates"] == 20
    assert manifest["sources"][1]["merged_duplicates"] == 20
    assert (manifest["embedding_dim"], manifest["embedding_dtype"]) == (8, "float32")
    text = summary(manifest)
    assert "3 pair_unknown_item" in text and "merged 20" in text
    assert_nothing_left(tmp_path, {"contrastive.npz", "reconstruct.npz", "ds"})


def test_unknown_pairs_refused_when_strict(ray_cluster, tmp_path):
    c, r, *_ = forge_pair(tmp_path)
    with pytest.raises(InputError, match=r"contrastive.npz: 3 pairs name item ids") as e:
        ingest([str(c), str(r)], tmp_path / "ds", STRICT)
    assert "\n" not in str(e.value)
    assert_nothing_left(tmp_path, {"contrastive.npz", "reconstruct.npz"})


def test_duplicate_ids_within_a_source_refused(ray_cluster, tmp_path):
    ids = np.arange(40, dtype=np.int64)
    ids[35] = 3  # repeated in another chunk
    src = reconstruct(tmp_path / "dup.npz", ids, np.ones((40, 4), np.float32))
    with pytest.raises(InputError, match=r"dup.npz: item id 3 appears more than once"):
        ingest([str(src)], tmp_path / "ds", CFG)
    assert_nothing_left(tmp_path, {"dup.npz"})


def test_conflicting_copies_across_sources_refused(ray_cluster, tmp_path):
    ids = np.arange(20, dtype=np.int64)
    a = reconstruct(tmp_path / "a.npz", ids, np.zeros((20, 4), np.float32))
    emb = np.zeros((20, 4), np.float32)
    emb[5, 2] = 1.0  # item 5 differs
    b = reconstruct(tmp_path / "b.npz", ids, emb)
    with pytest.raises(InputError, match=r"b.npz: item id 5 appears also in .*a.npz with "
                                         r"different embedding"):
        ingest([str(a), str(b)], tmp_path / "ds", CFG)
    assert_nothing_left(tmp_path, {"a.npz", "b.npz"})


def test_dim_mismatch_names_both_files(ray_cluster, tmp_path):
    a = reconstruct(tmp_path / "a.npz", np.arange(5), np.zeros((5, 4), np.float32))
    b = reconstruct(tmp_path / "b.npz", np.arange(5, 10), np.zeros((5, 6), np.float32))
    with pytest.raises(InputError, match=r"b.npz: embeddings are 6-d float32 but .*a.npz has 4-d"):
        ingest([str(a), str(b)], tmp_path / "ds", CFG)
    assert_nothing_left(tmp_path, {"a.npz", "b.npz"})


def test_nan_embeddings_dropped_and_counted(ray_cluster, tmp_path):
    emb = np.ones((40, 4), np.float32)
    emb[[3, 20, 39], 1] = np.nan
    src = reconstruct(tmp_path / "nan.npz", np.arange(40), emb)
    manifest = ingest([str(src)], tmp_path / "ds", CFG)
    assert manifest["counts"]["items"] == 37
    assert manifest["dropped"] == {"nan_embedding": 3}
    assert manifest["sources"][0]["dropped"] == {"nan_embedding": 3}
    assert sorted(read_items(tmp_path / "ds")) == sorted(set(range(40)) - {3, 20, 39})
    with pytest.raises(InputError, match=r"nan.npz: 1 embedding row\(s\) hold NaN"):
        ingest([str(src)], tmp_path / "strict", STRICT)
    assert_nothing_left(tmp_path, {"nan.npz", "ds"})


def test_corrupt_npz_leaves_nothing(ray_cluster, tmp_path):
    good = reconstruct(tmp_path / "good.npz", np.arange(64), np.ones((64, 4), np.float32))
    data = good.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut.npz: ") as e:
        ingest([str(good), str(tmp_path / "cut.npz")], tmp_path / "ds", CFG)
    assert "\n" not in str(e.value)
    assert_nothing_left(tmp_path, {"good.npz", "cut.npz"})


def test_existing_output_needs_overwrite(ray_cluster, tmp_path):
    src = reconstruct(tmp_path / "a.npz", np.arange(10), np.ones((10, 4), np.float32))
    ingest([str(src)], tmp_path / "ds", CFG)
    with pytest.raises(InputError, match="already exists"):
        ingest([str(src)], tmp_path / "ds", CFG)
    assert ingest([str(src)], tmp_path / "ds", CFG, overwrite=True)["counts"]["items"] == 10
