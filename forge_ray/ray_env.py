"""Where a Ray cluster that forge_ray starts listens: loopback, unless a cluster is named.

Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when ``ray`` is first imported;
"0" makes it take 127.0.0.1 as the node address, so the GCS, raylets, agents and
workers of a cluster started on this machine listen there, not on its public
interfaces (with authentication off). The package ``__init__`` calls
:func:`default_to_loopback`, so every entry point (the CLI, jobs, benchmarks, tests,
library use) has it before anything can import ray. Joining a cluster
(``RAY_ADDRESS`` or ``--address``) needs the machine's real address instead.
"""

from __future__ import annotations

import os
import sys

FLAG = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_set_here = False  # whether the flag is ours (a user's own setting is left alone)


def default_to_loopback() -> None:
    """Set the flag to "0" unless the user set it or ``RAY_ADDRESS`` names a cluster."""
    global _set_here
    if FLAG not in os.environ and not os.environ.get("RAY_ADDRESS"):
        os.environ[FLAG] = "0"
        _set_here = True


def joining_a_cluster() -> None:
    """Undo :func:`default_to_loopback` for a driver that will join a cluster at an
    address given on the command line (call before ray is imported)."""
    global _set_here
    if _set_here and "ray" not in sys.modules:
        del os.environ[FLAG]
        _set_here = False
