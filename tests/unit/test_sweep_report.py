"""The sweep results table and report from what Tune kept of its trials: finished,
stopped early by the scheduler, failed, interrupted (no Ray: plain dicts and pandas)."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest

from forge_ray.config import load_config
from forge_ray.distributed.sweep import GR_TARGET, SweepConfig, gr_candidates, sid_metric_names, trial_row, write_report
from forge_ray.distributed.sweep_trial import COMPLETE, TrialParams

SID_METRICS = sid_metric_names(10)  # configs/sweep/tiny.yaml's hitrate_topk
HR = "raw_embedding_hitrate@10"
KEYS = SweepConfig().trial_metrics


def _rows(n: int, failed: int = 0) -> list[dict]:
    rows = []
    for i in range(n):
        row = {"trial": f"t{i}", "status": "ok", **dataclasses.asdict(TrialParams(codebook_size=4 + i))}
        row.update({m: float(i) for m in SID_METRICS})
        row[GR_TARGET] = 0.1 * i  # rises with every metric: rho = +1
        rows.append(row)
    for j in range(failed):
        rows.append({"trial": f"f{j}", "status": "failed", "error": "codebook larger than the items"})
    return rows


@pytest.mark.parametrize("failed", [0, 1])
def test_report_with_and_without_failed_trials(tmp_path, failed):
    cfg = load_config(SweepConfig, "configs/sweep/tiny.yaml")
    report = write_report(_rows(4, failed), cfg, tmp_path)
    assert report["trials"] == 4 + failed and report["finished"] == 4
    assert [f["trial"] for f in report["failed"]] == [f"f{j}" for j in range(failed)]
    assert report["best"]["trial"] == ("t3" if cfg.select_mode == "max" else "t0")
    assert all(rho == pytest.approx(1.0) for rho in report["spearman"].values())
    assert json.loads((tmp_path / "report.json").read_text())["trials"] == 4 + failed
    assert (tmp_path / f"scatter_{SID_METRICS[0]}.png").stat().st_size > 0
    assert ("## Failed trials" in (tmp_path / "report.md").read_text()) == bool(failed)


def _complete(hitrate: float) -> dict:
    """What Tune keeps of a trial that ran to its end: the last report + Tune's ``done``."""
    return {"epoch": 3, **{m: 0.5 for m in SID_METRICS}, HR: hitrate,
            "final_unique_sid_ratio": 1.0, "moved": 0, "fallback": 0, COMPLETE: True, "done": True,
            "training_iteration": 3}


PARAMS = dataclasses.asdict(TrialParams())
# An ASHA-stopped trial: its last per-epoch report, which Tune marks done.
STOPPED = {"epoch": 2, "raw_recon_mse": 0.4, "done": True, "training_iteration": 2}


def test_trial_rows_by_status():
    ok = trial_row("t0", PARAMS, _complete(0.3), None, "/ck/t0", KEYS)
    stopped = trial_row("t1", PARAMS, STOPPED, None, "/ck/t1", KEYS)
    failed = trial_row("t2", PARAMS, None, RuntimeError("Traceback ...\nValueError: 5000 codes > 800 items"), None, KEYS)
    unfinished = trial_row("t3", PARAMS, {"epoch": 1, "raw_recon_mse": 0.6, "done": False}, None, "/ck/t3", KEYS)
    assert [r["status"] for r in (ok, stopped, failed, unfinished)] == ["ok", "stopped early", "failed", "unfinished"]
    assert ok["_sids"] == "/ck/t0/sids.npz" and ok[HR] == 0.3
    # the stopped trial keeps the metrics it reached and nothing it did not
    assert stopped["_sids"] is None and stopped["epoch"] == 2 and stopped["raw_recon_mse"] == 0.4
    assert stopped[HR] is None and stopped["raw_gini"] is None
    assert failed["error"] == "ValueError: 5000 codes > 800 items" and "raw_recon_mse" not in failed


@pytest.mark.parametrize("mode, expected", [("max", ["t2", "t0"]), ("min", ["t3", "t0"])])
def test_gr_ranks_only_finished_trials_with_the_metric(mode, expected):
    cfg = load_config(SweepConfig, "configs/sweep/tiny.yaml", ["gr.top_k=2", f"select_mode={mode}"])
    rows = [trial_row("t0", PARAMS, _complete(0.3), None, "/ck/t0", KEYS),
            trial_row("t1", PARAMS, _complete(float("nan")), None, "/ck/t1", KEYS),
            trial_row("t2", PARAMS, _complete(0.9), None, "/ck/t2", KEYS),
            trial_row("t3", PARAMS, _complete(0.1), None, "/ck/t3", KEYS),
            trial_row("s0", PARAMS, STOPPED, None, "/ck/s0", KEYS),
            trial_row("f0", PARAMS, None, ValueError("boom"), None, KEYS)]
    if mode == "min":
        rows[2][HR] = None  # a finished trial that lacks the metric is not ranked
        rows[0][HR] = 0.2
    assert [r["trial"] for r in gr_candidates(rows, cfg)] == expected
    assert gr_candidates(rows, load_config(SweepConfig, "configs/sweep/tiny.yaml", ["gr.top_k=0"])) == []


def test_report_and_table_with_stopped_early_and_failed_trials(tmp_path):
    cfg = load_config(SweepConfig, "configs/sweep/tiny.yaml")
    rows = [trial_row("t0", PARAMS, _complete(0.3), None, "/ck/t0", KEYS),
            trial_row("s0", PARAMS, STOPPED, None, "/ck/s0", KEYS),
            trial_row("f0", PARAMS, None, ValueError("more codes than items"), None, KEYS)]
    rows[0].update({GR_TARGET: 0.2, "pop_recall@10": 0.1})
    report = write_report(rows, cfg, tmp_path)
    assert (report["trials"], report["finished"], report["stopped_early"]) == (3, 1, 1)
    assert report["failed"] == [{"trial": "f0", "error": "more codes than items"}]
    assert report["best"]["trial"] == "t0"
    df = pd.read_csv(tmp_path / "results.csv")
    assert list(df["status"]) == ["ok", "stopped early", "failed"]
    assert df.loc[1, "raw_recon_mse"] == 0.4 and df.loc[1, "epoch"] == 2 and pd.isna(df.loc[1, HR])
    pq = pd.read_parquet(tmp_path / "results.parquet")
    assert pq[HR].dtype == float and pq["status"].tolist() == df["status"].tolist()
    md = (tmp_path / "report.md").read_text()
    assert "1 stopped early" in md and "| s0 | stopped early |" in md and "nan" not in md


def test_report_when_every_trial_stopped_early_or_failed(tmp_path):
    cfg = load_config(SweepConfig, "configs/sweep/tiny.yaml")
    rows = [trial_row("s0", PARAMS, STOPPED, None, "/ck/s0", KEYS), trial_row("s1", PARAMS, STOPPED, None, "/ck/s1", KEYS),
            trial_row("f0", PARAMS, None, ValueError("boom"), None, KEYS)]
    report = write_report(rows, cfg, tmp_path)
    assert (report["finished"], report["stopped_early"], len(report["failed"])) == (0, 2, 1)
    assert "best" not in report and report["spearman"] == {} and not (tmp_path / "best_config.yaml").exists()
    # a metric no trial reached is a numeric (all-NaN) column, not the text "None"
    assert pd.read_parquet(tmp_path / "results.parquet")[HR].isna().all()
    assert pd.read_parquet(tmp_path / "results.parquet")[HR].dtype == float
