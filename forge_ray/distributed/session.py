"""Connecting to (or starting) the Ray cluster a stage runs on."""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Iterator

import ray

from forge_ray import logs
from forge_ray.errors import InputError


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Use the current Ray connection, join ``address`` / ``RAY_ADDRESS``, or start one.

    A cluster started here is local and private: the dashboard and job server bind
    to loopback only. Only a connection opened here is shut down on exit, so
    library calls inside an existing session (tests, Tune trials) leave it alone.
    Log levels and Ray Data progress follow :mod:`forge_ray.logs`.
    """
    if ray.is_initialized():
        yield
        return
    given = f"--address {address}" if address else f"RAY_ADDRESS={os.environ.get('RAY_ADDRESS')}"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address, given)
        ray.init(address=address, **logs.ray_init_kwargs())
    else:
        # address="local" always starts a fresh private cluster: a bare ray.init()
        # would silently join any other Ray instance running on this machine. The
        # dashboard serves Ray's State API, which Ray Train's placement-group cleaner
        # polls every second (without it, it logs a warning each time).
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True,
                 dashboard_host="127.0.0.1", **logs.ray_init_kwargs())
    logs.configure_ray_data()
    try:
        yield
    finally:
        ray.shutdown()


def check_reachable(address: str, given: str, timeout_s: float = 5.0) -> None:
    """Refuse a cluster address that nobody answers at, in one line naming it.

    ``ray.init`` keeps retrying an unreachable GCS for many minutes without a word; a
    TCP connect with a short timeout tells at once. Addresses without a port
    (``auto``, ``local``) are left to Ray. ``given`` is how the user named it.
    """
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise InputError(given, f"no Ray cluster answers there ({e.strerror or e}); start one "
                                "with `ray start --head` or name a running one") from None
