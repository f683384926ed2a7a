"""forge-ray pipeline: stages in order, skip finished ones, resume after an interruption."""

from __future__ import annotations

import json
import os

import pytest

from forge_ray.config import load_config
from forge_ray.distributed.pipeline import PipelineConfig, run_pipeline, summary_table
from forge_ray.errors import ConfigError

pytestmark = pytest.mark.ray

SMALL = ["synth.items=600", "synth.dim=8", "synth.users=100", "synth.branching=[4,4]", "synth.level_scales=[1.0,0.5]",
         "ingest.progress=false", "train_sid.quantizer=rq_kmeans", "train_sid.rq_kmeans.sizes=[8,8]",
         "train_sid.rq_kmeans.niter=2", "until=train_sid"]


class Stop(Exception):
    pass


def _config(*extra):
    return load_config(PipelineConfig, "configs/tiny/pipeline.yaml", [*SMALL, *extra])


def test_interrupted_pipeline_resumes_without_recomputing(ray_cluster, tmp_path):
    run = tmp_path / "run"

    def stop_after_ingest(result):
        if result.stage == "ingest":
            raise Stop

    with pytest.raises(Stop):
        run_pipeline(run, _config(), after_stage=stop_after_ingest)
    state = json.loads((run / "state.json").read_text())
    assert state["ingest"]["status"] == "done" and "train_sid" not in state
    assert not (run / "train_sid").exists()
    ingest_mtime = os.stat(run / "ingest" / "manifest.json").st_mtime_ns

    results = run_pipeline(run, _config())  # continues with train_sid only
    assert [(r.stage, r.status) for r in results] == [
        ("synth", "skipped"), ("ingest", "skipped"), ("embed", "not needed"), ("train_sid", "ran")]
    assert os.stat(run / "ingest" / "manifest.json").st_mtime_ns == ingest_mtime
    assert (run / "train_sid" / "manifest.json").is_file()
    sid_mtime = os.stat(run / "train_sid" / "manifest.json").st_mtime_ns
    assert results[1].metrics["items"] == 600
    table = summary_table(results)
    assert "train_sid" in table and "skipped" in table

    # a changed train_sid config re-runs train_sid only
    results = run_pipeline(run, _config("train_sid.rq_kmeans.sizes=[4,8]"))
    assert [r.status for r in results] == ["skipped", "skipped", "not needed", "ran"]
    assert os.stat(run / "ingest" / "manifest.json").st_mtime_ns == ingest_mtime
    assert os.stat(run / "train_sid" / "manifest.json").st_mtime_ns != sid_mtime
    assert results[-1].metrics["sizes"] == [4, 8]


def test_bad_pipeline_config_refused_before_running(tmp_path):
    with pytest.raises(ConfigError, match="assign.bogus"):
        _config("assign.bogus=1")
    with pytest.raises(ConfigError, match="nothing to ingest"):
        load_config(PipelineConfig, None, ["until=ingest"])


@pytest.mark.slow
def test_whole_tiny_pipeline(ray_cluster, tmp_path):
    """Every stage of the demo config (minutes on 2 cores): all run, then all skip."""
    cfg = load_config(PipelineConfig, "configs/tiny/pipeline.yaml")
    results = run_pipeline(tmp_path / "run", cfg)
    assert [r.status for r in results] == ["ran", "ran", "not needed", "ran", "ran", "ran", "ran", "ran"]
    ev = json.loads((tmp_path / "run" / "eval_gr" / "metrics.json").read_text())
    assert ev["num_queries"] == 800 and ev["invalid_rate"] == 0.0
    # GR reads the history (the user's current cluster); most-popular cannot (measured
    # 0.189 vs 0.074 Recall@10)
    for key in ("recall@10", "ndcg@10"):
        assert ev[key] > 2 * ev["popularity"][key], (key, ev[key], ev["popularity"][key])
    again = run_pipeline(tmp_path / "run", cfg)
    assert {r.status for r in again} == {"skipped", "not needed"}
