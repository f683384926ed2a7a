"""Sweep throughput with 1 vs 2 concurrent trials, and the demo pipeline's time per stage.

    python bench/bench_sweep.py [--out /tmp/bench_sweep] [--trials 4] [--skip-pipeline]

1. Builds a small dataset (synth -> ingest) once, then runs the same tiny sweep
   (``configs/sweep/tiny.yaml``, RQ-KMeans + RQ-VAE points, GR stage off) twice in
   one Ray session: ``max_concurrent=1`` (the baseline) and ``max_concurrent=2``;
   prints trials/hour of each and the ratio.
2. Runs ``configs/tiny/pipeline.yaml`` (the ``make demo`` pipeline) into a fresh
   RUN_DIR and prints the seconds of every stage (from its state.json).
Results go to docs/benchmarks.md by hand ("Sweeps" and "Pipeline" sections).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/bench_sweep")
    parser.add_argument("--skip-pipeline", action="store_true")
    args = parser.parse_args()

    from forge_ray.config import load_config
    from forge_ray.data import synth
    from forge_ray.distributed.ingest import IngestConfig, ingest
    from forge_ray.distributed.pipeline import PipelineConfig, run_pipeline, summary_table
    from forge_ray.distributed.session import ray_session
    from forge_ray.distributed.sweep import SweepConfig, sweep

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    (out / "raw").mkdir(parents=True)
    with ray_session():
        scfg = load_config(synth.SynthConfig, None, ["items=2000", "dim=16", "users=500"])
        synth.generate(scfg, out / "raw", progress=False)
        srcs = [str(out / "raw" / f) for f in (synth.CONTRASTIVE_FILE, synth.RECONSTRUCT_FILE,
                                               synth.INTERACTIONS_DIR)]
        ingest(srcs, out / "ds", IngestConfig(progress=False))
        rates = {}
        for conc in (1, 2):
            cfg = load_config(SweepConfig, REPO / "configs/sweep/tiny.yaml", [
                f"data={out / 'ds'}", f"max_concurrent={conc}", "gr.top_k=0", "scheduler=fifo",
                f"name=c{conc}"])
            t0 = time.perf_counter()
            report = sweep(None, out / f"sweep_c{conc}", cfg)
            sec = time.perf_counter() - t0
            rates[conc] = report["trials"] / sec * 3600
            print(f"max_concurrent={conc}: {report['trials']} trials in {sec:.1f} s "
                  f"= {rates[conc]:.0f} trials/hour", flush=True)
        print(f"ratio 2 concurrent / 1 concurrent: {rates[2] / rates[1]:.2f}x")
        if not args.skip_pipeline:
            cfg = load_config(PipelineConfig, REPO / "configs/tiny/pipeline.yaml")
            t0 = time.perf_counter()
            results = run_pipeline(out / "pipeline", cfg)
            print(summary_table(results))
            print(f"pipeline total: {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
