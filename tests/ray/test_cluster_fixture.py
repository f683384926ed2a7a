"""The shared fixture really starts a two-node cluster on loopback."""

import pytest

pytestmark = pytest.mark.ray


def test_two_nodes(ray_cluster):
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2
    assert all(n["NodeManagerAddress"].startswith("127.") for n in nodes)
    assert ray.cluster_resources()["CPU"] == 4
