"""Synthetic FORGE-shaped data: determinism, formats and the promised structure."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from forge_ray.cli import main
from forge_ray.config import ConfigError, load_config
from forge_ray.data import forge_npz, npz, sources
from forge_ray.data.synth import Structure, SynthConfig, generate

TINY = dict(items=3000, dim=16, users=400, seed=7, branching=[4, 8], level_scales=[1.0, 0.5],
            block_rows=700)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    cfg = SynthConfig(**TINY)
    counts = generate(cfg, out, progress=False)
    return cfg, out, counts


def _embeds(out):
    path = out / "contrastive_data_mask.npz"
    info = npz.members(path)["embeds"]
    return npz.read_rows(path, info, 0, info.shape[0])


def test_formats_and_counts(synth):
    cfg, out, counts = synth
    con, rec = out / "contrastive_data_mask.npz", out / "reconstruct_data_mask.npz"
    assert sources.detect(con) == "forge_contrastive_npz"
    assert sources.detect(rec) == "forge_reconstruct_npz"
    assert sources.detect(out / "interactions") == "interactions"
    with np.load(con, allow_pickle=True) as z:   # what FORGE's own loader does
        enc = z["itemEncID"].item()
        assert z["embeds"].shape == (3000, 16) and z["pairs"].shape == (counts["pairs"], 2)
    assert len(enc) == 3000 and sorted(enc.values()) == list(range(3000))
    ids = np.fromiter(enc.keys(), np.int64)
    assert ids.min() >= 10**11 and len(np.unique(ids)) == 3000
    row_ids = forge_npz.row_item_ids(con)
    with np.load(rec) as z:
        np.testing.assert_array_equal(z["ids"], row_ids[: counts["reconstruct_items"]])
        np.testing.assert_allclose(z["embeds"], _embeds(out)[: counts["reconstruct_items"]])
    norms = np.linalg.norm(_embeds(out), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    log = pq.read_table(out / "interactions")
    assert log.num_rows == counts["interactions"]
    assert set(log["item_id"].to_numpy()) <= set(ids.tolist())
    truth = json.loads((out / "truth.json").read_text())
    assert truth["counts"] == counts and truth["fine_clusters"] == 32


def test_deterministic(synth, tmp_path):
    cfg, out, _ = synth
    generate(SynthConfig(**TINY), tmp_path, progress=False)
    for name in ("contrastive_data_mask.npz", "reconstruct_data_mask.npz"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes()
    assert pq.read_table(tmp_path / "interactions").equals(pq.read_table(out / "interactions"))
    other = tmp_path / "other"
    other.mkdir()
    generate(SynthConfig(**{**TINY, "seed": 8}), other, progress=False)
    assert not np.array_equal(_embeds(other), _embeds(out))


def test_clusters_are_tight(synth):
    cfg, out, _ = synth
    st = Structure(cfg)
    emb = _embeds(out)
    fine = st.fine(st.latent(np.arange(cfg.items)))
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, cfg.items, (2, 20000))
    cos = (emb[a] * emb[b]).sum(1)
    same = fine[a] == fine[b]
    top_same = (st.ancestors(fine[a])[:, 0] == st.ancestors(fine[b])[:, 0]) & ~same
    assert cos[same].mean() > cos[top_same].mean() + 0.1 > cos[~same & ~top_same].mean() + 0.2
    # clusters are spread over the file, not laid out in blocks
    assert len(np.unique(fine[:200])) > 0.8 * cfg.fine_clusters


def test_pairs_mostly_within_fine_clusters(synth):
    cfg, out, _ = synth
    st = Structure(cfg)
    con = out / "contrastive_data_mask.npz"
    row_ids = forge_npz.row_item_ids(con)
    fine_of = dict(zip(row_ids.tolist(), st.fine(st.latent(np.arange(cfg.items))).tolist()))
    pairs = npz.read_rows(con, npz.members(con)["pairs"], 0, npz.members(con)["pairs"].shape[0])
    same = np.mean([fine_of[a] == fine_of[b] for a, b in pairs.tolist()])
    assert 0.7 < same < 0.95
    assert not (pairs[:, 0] == pairs[:, 1]).any()


def test_popularity_is_skewed(synth):
    _, out, _ = synth
    counts = np.sort(np.unique(pq.read_table(out / "interactions")["item_id"].to_numpy(),
                               return_counts=True)[1])[::-1]
    top = counts[: max(1, len(counts) // 20)].sum() / counts.sum()
    assert top > 0.3   # top 5% of items take over 30% of interactions


def test_sequences_predictable_and_time_ordered(synth):
    cfg, out, _ = synth
    st = Structure(cfg)
    row_ids = forge_npz.row_item_ids(out / "contrastive_data_mask.npz")
    fine_of = dict(zip(row_ids.tolist(), st.fine(st.latent(np.arange(cfg.items))).tolist()))
    log = pq.read_table(out / "interactions").to_pandas()
    assert (log.groupby("user_id")["timestamp"].diff().dropna() > 0).all()
    cl = log["item_id"].map(fine_of).to_numpy()
    same_user = log["user_id"].to_numpy()[1:] == log["user_id"].to_numpy()[:-1]
    follow = np.mean(cl[1:][same_user] == cl[:-1][same_user])
    share = np.bincount(cl, minlength=cfg.fine_clusters) / len(cl)
    popular_guess = share.max()   # always predicting the most popular fine cluster
    assert follow > 0.5 > 2 * popular_guess
    lengths = log.groupby("user_id").size()
    assert lengths.min() >= cfg.seq_len_min and lengths.max() <= cfg.seq_len_max
    assert len(lengths) == cfg.users


def test_config_validation():
    with pytest.raises(ConfigError, match="level_scales"):
        load_config(SynthConfig, overrides=["branching=[4,4]", "level_scales=[1.0]"])
    with pytest.raises(ConfigError, match="fine clusters"):
        load_config(SynthConfig, overrides=["items=10"])


def test_cli(tmp_path, capsys):
    out = tmp_path / "s"
    args = ["synth", "--out", str(out), "branching=[4,4]", "level_scales=[1.0,0.5]", "--items", "500",
            "--dim", "8", "--users", "20", "--seed", "1", "--no-progress"]
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "synthetic" and manifest["counts"]["items"] == 500
    assert manifest["config"]["branching"] == [4, 4]
    assert main(args) == 2                       # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


@pytest.mark.parametrize("flag,value,problem", [
    ("--dim", 10**12, "of memory but only"),          # one items block alone: exabytes
    ("--users", 10**13, "writes at least"),           # >= 4 B x 5 interactions per user
])
def test_cli_refuses_what_cannot_fit_before_writing(tmp_path, capsys, flag, value, problem):
    out = tmp_path / "s"
    args = ["synth", "--out", str(out), "branching=[4,4]", "level_scales=[1.0,0.5]", "--items", "500",
            "--dim", "8", "--users", "20", "--no-progress", flag, str(value)]
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.out + captured.err, captured.err
    assert lines[0].startswith("forge-ray synth: error: synth (500 items x ") and problem in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_memory_estimate_bounds_the_measured_peak(tmp_path):
    """The estimate is an upper bound of the real peak RSS growth, and not a wild one."""
    import subprocess
    import sys

    from forge_ray.data.synth import estimate

    kw = {"items": 150_000, "dim": 256, "users": 2_000}
    # VmHWM (peak RSS of this process image; ru_maxrss would inherit pytest's own peak)
    code = ("import re, sys; from forge_ray.data.synth import SynthConfig, generate; "
            "hwm = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]); "
            f"base = hwm(); generate(SynthConfig(**{kw!r}), sys.argv[1], progress=False); "
            "print((hwm() - base) * 1024)")
    grew = int(subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                              text=True, check=True, timeout=120).stdout)
    need = estimate(SynthConfig(**kw))
    assert grew < need["memory"] < 3 * grew + (200 << 20), (grew, need)
    written = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert need["disk"] <= written, (need, written)
