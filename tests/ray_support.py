"""A real Ray cluster for the Ray tests: a head and a second node on this machine.

Ray reaches beyond loopback when it starts (it probes the machine's addresses and cloud
metadata hosts), so these tests run only inside a network namespace that has nothing but
loopback: `tests/test_ray.py` starts them there (`unshare -n`, as root) with
`SHOAL_RAY_NETNS=1` set. Outside it they are skipped, saying so.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

INSIDE = os.environ.get("SHOAL_RAY_NETNS") == "1"

inside_namespace = pytest.mark.skipif(
    not INSIDE, reason="runs in a loopback-only network namespace, started by tests/test_ray.py"
)


@dataclass
class LocalCluster:
    """The cluster the tests started (stopped by its own handles, never `ray stop`)."""

    cluster: Any
    head: Any
    worker: Any
    http_port: int


def start_cluster(http_port: int) -> Iterator[LocalCluster]:
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    from ray import serve
    from ray.cluster_utils import Cluster

    from shoal.backends.ray_cluster import connect, start_serve

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": False},
    )
    worker = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    connect(cluster.address)
    start_serve("127.0.0.1", http_port)
    try:
        yield LocalCluster(cluster, cluster.head_node, worker, http_port)
    finally:
        import ray

        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
