"""A Ray cluster that forge_ray starts listens on loopback: importing forge_ray sets
Ray's node-address flag before ray is imported, for every entry point (the CLI, the
benchmarks, library use), unless a cluster address is given."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

FLAG = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# what Ray itself concluded at import time: False = every node address is 127.0.0.1
PROBE = ("import ray; from ray._private import ray_constants as c; "
         "print(c.ENABLE_RAY_CLUSTER, ray.util.get_node_ip_address())")


def ray_sees(before: str = "", **env: str) -> str:
    """Ray's conclusion in a fresh interpreter that runs ``before`` after importing forge_ray."""
    clean = {k: v for k, v in os.environ.items() if k not in (FLAG, "RAY_ADDRESS")}
    code = f"import forge_ray; from forge_ray import ray_env; {before or 'pass'}; {PROBE}"
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True,
                         text=True, timeout=120, check=True)
    return out.stdout.strip()


@pytest.mark.parametrize("before, env, expected", [
    ("", {}, "False 127.0.0.1"),                          # our own cluster: loopback
    ("", {FLAG: "1"}, "True"),                            # the user's own setting wins
    ("", {"RAY_ADDRESS": "10.0.0.5:6379"}, "True"),       # joining a cluster: the real address
    ("ray_env.joining_a_cluster()", {}, "True"),          # forge-ray ... --address ADDR
], ids=["default", "user-flag", "ray-address", "address-option"])
def test_ray_node_address_follows_the_entry_point(before, env, expected):
    assert ray_sees(before, **env).startswith(expected)
