"""forge-ray sweep: Tune trials with SID metrics, GR on the best, Spearman report,
a failing trial recorded, invalid spaces refused up front, resume (also of a sweep
killed mid-way, with a trial ASHA stopped early)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pandas as pd
import pytest

from forge_ray.config import load_config
from forge_ray.data import synth
from forge_ray.distributed.sweep import SweepConfig, sweep
from forge_ray.errors import ConfigError, InputError

pytestmark = pytest.mark.ray

TINY = "configs/sweep/tiny.yaml"


@pytest.fixture(scope="module")
def dataset(ray_cluster, tmp_path_factory):
    from forge_ray.distributed.ingest import IngestConfig, ingest

    root = tmp_path_factory.mktemp("sweepdata")
    cfg = load_config(synth.SynthConfig, None, ["items=800", "dim=8", "users=200", "branching=[4,4]", "level_scales=[1.0,0.5]"])
    (root / "raw").mkdir()
    synth.generate(cfg, root / "raw", progress=False)
    srcs = [str(root / "raw" / f) for f in (synth.CONTRASTIVE_FILE, synth.RECONSTRUCT_FILE, synth.INTERACTIONS_DIR)]
    ingest(srcs, root / "ds", IngestConfig(progress=False))
    return root / "ds"


@pytest.mark.parametrize("override, message", [
    ("space.bogus={grid: [1]}", "unknown search-space key 'bogus'"),
    ("space.levels={normal: [1, 2]}", "expected one of"),
    ("space.lr={uniform: [0.1, 0.01]}", "low < high"),
    ("space.codebook_size={grid: [8, 0]}", "codebook_size=0"),
])
def test_invalid_space_refused_before_any_trial(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        load_config(SweepConfig, TINY, [override])


def test_sweep_reports_correlations_and_records_failures(dataset, tmp_path):
    cfg = load_config(SweepConfig, TINY, [
        f"data={dataset}", "base.epochs=2", "base.steps_per_epoch=8", "base.latent_dim=4",
        "space={quantizer: {grid: [rq_kmeans, rqvae]}, codebook_size: {grid: [4, 8, 5000]}}",
        "grace_period=2", "gr.top_k=4", "gr.steps=20"])
    out = tmp_path / "sweep"
    report = sweep(None, out, cfg)
    df = pd.read_csv(out / "results.csv")
    assert len(df) == 6 and report["trials"] == 6
    failed = df[df["status"] == "failed"]
    assert sorted(failed["codebook_size"]) == [5000, 5000]  # more codes than the 800 items
    assert len(report["failed"]) == 2 and report["finished"] == 4
    ok = df[df["status"] == "ok"]
    assert ok["raw_embedding_hitrate@10"].between(0, 1).all() and ok["raw_gini"].between(0, 1).all()
    assert ok["gr_recall@10"].notna().all() and ok["pop_recall@10"].notna().all()
    assert set(report["spearman"]) >= {"raw_gini", "raw_embedding_hitrate@10", "raw_collision_rate",
                                       "raw_utilization"}
    assert all((out / p).is_file() for p in report["plots"]) and len(report["plots"]) >= 4
    assert pd.read_parquet(out / "results.parquet").shape[0] == 6
    assert "Spearman" in (out / "report.md").read_text()
    best = load_config(SweepConfig, out / "best_config.yaml")
    assert best.base.codebook_size in (4, 8)

    with pytest.raises(InputError, match="--resume"):
        sweep(None, out, cfg)
    again = sweep(None, out, cfg, resume=True)  # everything finished: nothing re-runs
    assert again["finished"] == 4 and len(again["failed"]) == 2
    assert json.loads((out / "report.json").read_text())["trials"] == 6


def _ended(trial_dir) -> dict | None:
    """The last result.json line of a trial Tune has ended (finished or stopped), else None."""
    lines = (trial_dir / "result.json").read_text().splitlines() if (trial_dir / "result.json").is_file() else []
    last = json.loads(lines[-1]) if lines else {}
    return last if last.get("done") else None


def test_sweep_killed_midway_resumes_without_rerunning_ended_trials(dataset, ray_cluster, tmp_path):
    # Trials run one at a time in grid order: codebook 16 finishes; codebook 2 reconstructs
    # worse at epoch 1 and ASHA stops it there (grace_period=1); codebook 8 is still to come
    # when the driver is killed.
    overrides = [f"data={dataset}", "base.epochs=3", "base.steps_per_epoch=8", "base.latent_dim=4",
                 "space={codebook_size: {grid: [16, 2, 8]}}", "grace_period=1", "max_concurrent=1",
                 "gr.top_k=3", "gr.steps=20"]
    out = tmp_path / "sweep"
    exp = out / "tune" / "sweep"
    log = open(tmp_path / "sweep.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "forge_ray", "sweep", "--config", TINY, "--out", str(out),
                             "--address", ray_cluster.address, *overrides], stdout=log, stderr=subprocess.STDOUT)
    ended, deadline = {}, time.time() + 240
    while len(ended) < 2:
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "sweep.log").read_text()[-3000:]
        ended = {d.name: m for d in exp.glob("quantizer_trial_*") if (m := _ended(d))}
        time.sleep(0.2)
    # Snapshot what the ended trials left on disk; give Tune a moment to save its
    # experiment state (it does so right after processing a trial's last result).
    before = {name: ((exp / name / "result.json").read_bytes(), sorted(p.name for p in (exp / name).iterdir()))
              for name in ended}
    time.sleep(1.0)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    proc.kill()
    proc.wait(timeout=60)
    log.close()
    assert not (out / "report.json").exists()

    cfg = load_config(SweepConfig, TINY, overrides)
    report = sweep(None, out, cfg, resume=True)
    for name, (results, files) in before.items():  # not rerun: nothing appended or re-checkpointed
        assert (exp / name / "result.json").read_bytes() == results, name
        assert sorted(p.name for p in (exp / name).iterdir()) == files, name
    df = pd.read_csv(out / "results.csv").set_index("codebook_size")
    assert report["trials"] == 3 and report["failed"] == []
    assert df.loc[2, "status"] == "stopped early" and df.loc[2, "epoch"] == 1 and df.loc[2, "raw_recon_mse"] > 0
    assert df.loc[2, ["raw_embedding_hitrate@10", "raw_gini", "gr_recall@10"]].isna().all()
    assert (df.loc[[16, 8], "status"] == "ok").all() and df.loc[[16, 8], "gr_recall@10"].notna().all()
    assert report["finished"] == 2 and report["stopped_early"] == 1
    assert report["best"]["trial"] in set(df.loc[[16, 8], "trial"])
