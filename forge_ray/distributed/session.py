"""Connecting to (or starting) the Ray cluster a stage runs on."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import ray


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Use the current Ray connection, join ``address`` / ``RAY_ADDRESS``, or start one.

    A cluster started here is local and private: the dashboard and job server bind
    to loopback only. Only a connection opened here is shut down on exit, so
    library calls inside an existing session (tests, Tune trials) leave it alone.
    """
    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # address="local" always starts a fresh private cluster: a bare ray.init()
        # would silently join any other Ray instance running on this machine.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 dashboard_host="127.0.0.1")
    try:
        yield
    finally:
        ray.shutdown()
