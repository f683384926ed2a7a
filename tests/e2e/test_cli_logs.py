"""What `forge-ray pipeline` prints off a terminal, at the default verbosity and with -q.

One small pipeline (Ray Data jobs and an actor pool, Ray Train with DeepSpeed on two
workers; about a minute) run as a user runs it, with stdout and stderr captured
together as by ``2>&1 | cat``. The whole tiny pipeline printed 1,044 lines this way
before (each ``[train-gr] step`` line twice, Ray Data progress, Ray Train's reports).
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

import pytest

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny" / "pipeline.yaml"
ENV = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
SMALL = ["synth.items=600", "synth.dim=8", "synth.users=150", "synth.branching=[4,4]",
         "synth.level_scales=[1.0,0.5]", "train_sid.rq_kmeans.sizes=[8,8]", "train_sid.rq_kmeans.niter=2",
         "train_gr.train.max_steps=40", "train_gr.train.log_every=5", "train_gr.train.eval_every=20",
         "train_gr.train.valid_samples=16", "train_gr.scale.checkpoint_every=20",
         "sid_metrics.with_data=false", "until=train_gr"]


def pipeline(*args: str) -> list[str]:
    """Lines of ``forge-ray pipeline`` stdout + stderr, interleaved (exit status 0)."""
    r = subprocess.run([sys.executable, "-m", "forge_ray", "pipeline", "--config", str(CONFIG),
                        *args, *SMALL],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:]
    return r.stdout.splitlines()


@pytest.mark.own_cluster
@pytest.mark.timeout(900)
def test_pipeline_log_is_short_and_clean(tmp_path):
    run = tmp_path / "run"
    lines = pipeline("--out", str(run))
    text = "\n".join(lines)
    steps = [ln for ln in lines if "[train-gr] step" in ln]
    assert len(steps) == 40 // 5 + 2, text  # one per log_every, plus the two validations
    assert not [s for s, n in collections.Counter(steps).items() if n > 1], text
    assert "Traceback" not in text
    assert "Loading faiss" not in text  # faiss's loader at INFO in Ray Train workers
    assert "non-writable" not in text and "not writable" not in text
    assert "Failed to query Ray Train Controller" not in text  # the State API is up
    assert not [ln for ln in lines if "INFO" in ln and "streaming_executor" in ln], text  # Ray Data at INFO
    assert [ln for ln in lines if ln.startswith("[pipeline] ")] == [
        f"[pipeline] {s} -> {run / s}" for s in
        ("synth", "ingest", "train_sid", "assign", "sid_metrics", "train_gr")]
    assert len(lines) < 50, text

    # -q: results only (every stage is finished, so all are skipped)
    quiet = pipeline("--out", str(run), "-q")
    assert quiet[0].split() == ["stage", "status", "seconds", "key", "metrics"], quiet
    assert len(quiet) == 2 + 7, quiet  # header, rule, one row per stage up to train_gr
