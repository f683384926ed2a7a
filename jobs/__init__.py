"""Entry points for ``ray job submit``: one module per stage plus the pipeline.

Usage (from the repo root, against a cluster's job server)::

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env cluster/runtime_env.yaml -- python -m jobs.<stage> ARGS...

Inside a Ray job ``RAY_ADDRESS`` is set, so every stage joins the cluster that runs
the job instead of starting its own.
"""

from __future__ import annotations

import sys


def run_stage(stage: str, argv: list[str] | None = None) -> int:
    """Run ``forge-ray <stage> ARGS`` in this process and return its exit code."""
    from forge_ray.cli import main

    return main([stage, *(sys.argv[1:] if argv is None else argv)])
