"""The pieces of assign's one-pass checks that need no Ray: the order-independent id
checksum, the per-group guarantee check of resolve_groups, and quantizers encoding on
an explicit device (``cpu`` here) exactly as before."""

from __future__ import annotations

import numpy as np
import pytest

from forge_ray.core.quantize.registry import load_quantizer
from forge_ray.core.quantize.rq_kmeans import RQKMeans
from forge_ray.core.quantize.rqvae import RQVAE
from forge_ray.core.sid import collisions
from forge_ray.core.sid.collisions import CollisionConfig, resolve_all, resolve_groups
from forge_ray.core.sid.metrics import sid_counts
from forge_ray.distributed.assign_parts import combine_checksums, id_checksum
from forge_ray.errors import InputError


def test_id_checksum_is_order_independent_and_sees_every_change():
    rng = np.random.default_rng(0)
    ids = rng.choice(10**12, 5000, replace=False).astype(np.int64)
    whole = id_checksum(ids)
    parts = np.array_split(rng.permutation(ids), 7)
    assert combine_checksums(id_checksum(p) for p in parts) == whole  # any split, any order
    assert whole[0] == len(ids)
    missing = id_checksum(ids[1:])
    dup = combine_checksums([whole, id_checksum(ids[[0, 0]])])  # one item twice more: same xor
    changed = id_checksum(np.r_[ids[:-1], ids[-1] + 1])
    assert dup[2] == whole[2] and dup != whole
    for bad in (missing, changed):
        assert bad != whole
    assert changed[0] == whole[0] and changed[1] != whole[1]
    assert id_checksum(np.zeros(0, np.int64)) == (0, 0, 0)


def _case(seed=0, n=150, k=6, K=8):
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.integers(0, 3, n), rng.integers(0, 2, n),
                      np.minimum(rng.geometric(0.4, n) - 1, K - 1)], axis=1)
    ids = rng.choice(10**9, n, replace=False).astype(np.int64)
    cand = np.stack([np.r_[c, rng.permutation(np.setdiff1d(np.arange(K), [c]))][:k] for c in codes[:, 2]])
    return ids, codes, cand


@pytest.mark.parametrize("strategy", ["suffix", "cap", "random", "sinkhorn"])
def test_resolve_groups_histograms_add_up_over_disjoint_blocks(strategy):
    ids, codes, cand = _case()
    cfg = CollisionConfig(strategy=strategy, cap=4, candidates=6, seed=1)
    whole = resolve_groups(ids, codes, cand, cfg, last_size=8)
    np.testing.assert_array_equal(whole.before[1:], np.bincount(sid_counts(codes))[1:])
    after = np.bincount(sid_counts(whole.codes))
    np.testing.assert_array_equal(whole.after[:after.size], after)
    limit = 1 if strategy == "suffix" else 4
    assert whole.after.size - 1 <= limit < whole.before.size - 1  # collisions were resolved
    # two blocks holding whole groups (split by the first code): same rows, summable histograms
    a, b = codes[:, 0] == 0, codes[:, 0] != 0
    ra, rb = (resolve_groups(ids[m], codes[m], cand[m], cfg, last_size=8) for m in (a, b))
    np.testing.assert_array_equal(ra.codes, whole.codes[a])
    np.testing.assert_array_equal(rb.codes, whole.codes[b])
    for field in ("before", "after"):
        x, y = getattr(ra, field), getattr(rb, field)
        total = np.zeros(max(x.size, y.size), np.int64)
        total[:x.size] += x
        total[:y.size] += y
        np.testing.assert_array_equal(total, getattr(whole, field))


def test_resolve_groups_rejects_a_group_that_breaks_the_cap(monkeypatch):
    """A resolved group over the cap (a bug in a strategy) fails loudly, naming the prefix."""
    ids, codes, cand = _case(2)
    real = collisions.resolve_group

    def keep_codes(item_ids, group_codes, *args, **kwargs):  # a "strategy" that moves nothing
        res = real(item_ids, group_codes, *args, **kwargs)
        return res._replace(codes=np.asarray(group_codes, dtype=np.int64))

    monkeypatch.setattr(collisions, "resolve_group", keep_codes)
    with pytest.raises(RuntimeError, match="items on one SID under prefix"):
        resolve_groups(ids, codes, cand, CollisionConfig(strategy="cap", cap=4, candidates=6),
                       last_size=8)
    with pytest.raises(RuntimeError, match="at most 1 allowed"):
        resolve_groups(ids, codes, None, CollisionConfig(strategy="suffix"), last_size=8)


def test_resolve_groups_rejects_duplicate_ids_across_groups():
    ids, codes, cand = _case(3)
    ids[1] = ids[0]
    codes[1, 0] = (codes[0, 0] + 1) % 3  # another prefix group than its twin
    with pytest.raises(ValueError, match="item ids must be unique"):
        resolve_all(ids, codes, cand, CollisionConfig(strategy="cap", cap=4, candidates=6), last_size=8)


def small_quantizer(kind: str, x: np.ndarray, batch: int):
    """A 3 x 8 quantizer over 16-d ``x`` (RQ-KMeans fitted, RQ-VAE as initialised),
    ``batch`` rows per encode call."""
    if kind == "rq_kmeans":
        return RQKMeans(sizes=[8, 8, 8], niter=2, seed=0, batch_size=batch).fit(x)
    return RQVAE(in_dim=16, hidden_dims=[32], latent_dim=8, sizes=[8, 8, 8], encode_batch_size=batch)


@pytest.mark.parametrize("kind", ["rq_kmeans", "rqvae"])
def test_encode_on_an_explicit_cpu_device_gives_identical_codes(tmp_path, kind):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 16)).astype(np.float32)
    q = small_quantizer(kind, x, batch=128)
    codes, (rank_codes, cand) = q.encode(x), q.rank_last_level(x, 5)
    q.save(tmp_path / "q")
    on_cpu = load_quantizer(tmp_path / "q", device="cpu")
    assert on_cpu.to("cpu") is on_cpu
    np.testing.assert_array_equal(on_cpu.encode(x), codes)
    got_codes, got_cand = on_cpu.rank_last_level(x, 5)
    np.testing.assert_array_equal(got_codes, rank_codes)
    np.testing.assert_array_equal(got_cand, cand)
    np.testing.assert_allclose(on_cpu.decode(codes), q.decode(codes), rtol=1e-6)


@pytest.mark.parametrize("kind", ["rq_kmeans", "rqvae"])
def test_rank_last_level_under_a_given_prefix(kind):
    """Ranking under the prefix an earlier encode chose equals ranking from scratch
    (assign's collision pass ranks only busy rows, under their pass-1 prefix); under
    another prefix it ranks that prefix's residual; a bad prefix is refused."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    q = small_quantizer(kind, x, batch=64)
    codes, cand = q.rank_last_level(x, 4)
    got_codes, got_cand = q.rank_last_level(x, 4, prefix=q.encode(x)[:, :2])
    np.testing.assert_array_equal(got_codes, codes)
    np.testing.assert_array_equal(got_cand, cand)
    other = (codes[:, :2] + 1) % 8
    moved_codes, moved_cand = q.rank_last_level(x, 4, prefix=other)
    np.testing.assert_array_equal(moved_codes[:, :2], other)
    assert (moved_cand != cand).any()
    with pytest.raises(InputError, match="rows of prefix codes"):
        q.rank_last_level(x, 4, prefix=other[:10])
    with pytest.raises(InputError, match="out of range"):
        q.rank_last_level(x, 4, prefix=other + 8)


def test_token_export_strings_match_sid_strings(tmp_path):
    from forge_ray.core.sid.codes import sid_strings
    from forge_ray.core.sid.export import SidTokenWriter, read_sid_tokens

    sizes = [256, 256, 256, 9]
    codes = np.random.default_rng(0).integers(0, 9, (500, 4)) * [28, 28, 28, 1]
    with SidTokenWriter(tmp_path / "t.csv", sizes) as w:
        w.write(np.arange(500), codes)
        w.write(np.zeros(0, np.int64), np.zeros((0, 4), np.int64))  # an empty batch writes nothing
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert lines[0] == "item_id,sid" and [ln.split(",")[1] for ln in lines[1:]] == sid_strings(codes, sizes)
    ids, back = read_sid_tokens(tmp_path / "t.csv", sizes)
    np.testing.assert_array_equal(back, codes)
    np.testing.assert_array_equal(ids, np.arange(500))


def test_read_units_groups_row_groups_per_file_and_names_bad_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from forge_ray.data.schema import embedding_array, items_schema
    from forge_ray.distributed.assign_parts import read_unit, read_units
    from forge_ray.errors import InputError

    x = np.arange(70 * 4, dtype=np.float32).reshape(70, 4)
    table = pa.table({"item_id": np.arange(70, dtype=np.int64), "embedding": embedding_array(x)},
                     schema=items_schema(4))
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(table, a, row_group_size=10)  # 7 row groups
    pq.write_table(table.slice(0, 5), b)
    units = read_units([str(a), str(b)], rows=25)
    assert [(u["row_groups"], u["rows"]) for u in units] == [([0, 1, 2], 30), ([3, 4, 5], 30), ([6], 10),
                                                             ([0], 5)]
    got = pa.concat_tables([read_unit(u["path"], u["row_groups"]) for u in units[:3]])
    assert got.equals(table.select(["item_id", "embedding"]))  # every row once, in order

    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(InputError, match="bad.parquet.*not a readable Parquet file"):
        read_units([str(a), str(bad)], rows=25)
    no_emb = tmp_path / "ids_only.parquet"
    pq.write_table(table.select(["item_id"]), no_emb)
    with pytest.raises(InputError, match="ids_only.parquet.*cannot read item_id and embedding"):
        read_unit(str(no_emb), [0])
