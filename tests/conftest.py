"""Shared fixtures: a real local multi-node Ray cluster on loopback.

The cluster is started once per test session (starting Ray costs seconds) with a
head and a worker node, each claiming 2 logical CPUs on this 2-core machine so
that actor pools with fractional CPUs and read tasks can run side by side.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Makes Ray take 127.0.0.1 as every node's address (read when ray is imported).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``own_cluster`` run before anything starts the session cluster.

    A CLI run that starts its own local cluster while the session cluster is up finds
    two Ray instances on the machine: Ray Train's placement-group cleaner then picks
    "the latest" one and says so on every poll (and could pick the wrong one), which a
    user's machine with one cluster never sees. The sort is stable.
    """
    items.sort(key=lambda item: item.get_closest_marker("own_cluster") is None)


@pytest.fixture(scope="session")
def ray_cluster():
    """A head + one worker node on 127.0.0.1; the driver is connected to it."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": False,
                        "object_store_memory": 512 * 1024**2,
                        "_system_config": {"num_workers_soft_limit": 8,
                                           "idle_worker_killing_time_threshold_ms": 600_000}},
    )
    cluster.add_node(num_cpus=2, object_store_memory=512 * 1024**2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def shared_data() -> Path:
    """The real data samples in ../shared/data.

    A clone without them skips the real-data tests (with the reason); under CI
    (``CI=true``) their absence is a failure, so CI never passes without running them.
    """
    if not SHARED_DATA.is_dir():
        why = f"{SHARED_DATA} is missing: real-data tests read the samples from ../shared/data"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(why)
        pytest.skip(why)
    return SHARED_DATA
