"""The sweep report from a finished results table (no Ray: write_report is plain pandas)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from forge_ray.config import load_config
from forge_ray.distributed.sweep import GR_TARGET, SID_METRICS, SweepConfig, write_report
from forge_ray.distributed.sweep_trial import TrialParams


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
