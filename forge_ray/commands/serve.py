"""``forge-ray serve --model GR_DIR [--port N]``: the model on Ray Serve, POST /recommend.

Runs until SIGINT / SIGTERM, then shuts Serve (and a cluster it started) down. The HTTP
proxy listens on 127.0.0.1 unless ``host=`` says otherwise. Settings: ``--config``
YAML or ``key=value`` (see :class:`forge_ray.distributed.serve.ServeConfig`).
"""

from __future__ import annotations

import argparse
import signal
import threading


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, nargs="+",
                        help="GR_DIR from `forge-ray train-gr`; several: one ensemble (as eval-gr)")
    parser.add_argument("--sids", default=None, help="SIDS_DIR to answer from (default: the model's)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (default: RAY_ADDRESS, else a local cluster)")
    parser.add_argument("--config", default=None, help="serve YAML config (ServeConfig fields)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="ServeConfig overrides")


def run(args: argparse.Namespace) -> int:
    from forge_ray.commands import stage_config
    from forge_ray.distributed.serve import ServeConfig, start
    from forge_ray.distributed.session import ray_session
    from forge_ray.core.gr.models import MODEL_KIND
    from forge_ray.io import read_manifest
    from ray import serve

    cfg = stage_config(ServeConfig, args, port=args.port)
    for folder in args.model:
        read_manifest(folder, MODEL_KIND)  # a wrong folder fails before Ray starts
    stop = threading.Event()
    with ray_session(args.address):
        # after ray.init, which installs its own SIGTERM handler (a stack dump and exit)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        url = start(args.model, args.sids, cfg)
        print(f"serving {' + '.join(args.model)} at {url} ({cfg.replicas} replica(s)); Ctrl-C or SIGTERM stops", flush=True)
        try:
            stop.wait()
        finally:
            serve.shutdown()
    print("stopped", flush=True)
    return 0
