"""`forge-ray synth` then `forge-ray ingest` as a user runs them: subprocesses, exit
codes, stdout summary and the one-line error on a bad file (each ingest starts its
own local Ray cluster)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ENV = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def forge_ray(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "forge_ray", *args], capture_output=True,
                          text=True, env=ENV, timeout=300)


@pytest.mark.timeout(600)
def test_synth_then_ingest(tmp_path):
    raw = tmp_path / "raw"
    r = forge_ray("synth", "--out", str(raw), "--items", "3000", "--dim", "16", "--users", "200",
                  "--no-progress")
    assert r.returncode == 0, r.stderr
    srcs = [str(raw / "contrastive_data_mask.npz"), str(raw / "reconstruct_data_mask.npz"),
            str(raw / "interactions")]
    r = forge_ray("ingest", *srcs, "--out", str(tmp_path / "ds"), "--chunk-rows", "1000")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    synth = json.loads((raw / "manifest.json").read_text())["counts"]
    assert m["counts"]["items"] == synth["items"] == 3000
    assert m["counts"]["pairs"] == synth["pairs"]
    assert m["counts"]["sequences"] == synth["users"]
    assert m["counts"]["interactions"] == synth["interactions"]
    assert "dataset: 3,000 items" in r.stdout and "dropped: nothing" in r.stdout

    cut = tmp_path / "cut.npz"
    cut.write_bytes((raw / "reconstruct_data_mask.npz").read_bytes()[:5000])
    r = forge_ray("ingest", srcs[0], str(cut), "--out", str(tmp_path / "bad"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith(f"forge-ray ingest: error: {cut}: ")
    assert not [ln for ln in lines if "Traceback" in ln]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.npz", "ds", "raw"]
