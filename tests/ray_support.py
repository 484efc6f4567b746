"""A real Ray cluster for the Ray tests: a head and a second node on this machine.

Ray reaches beyond loopback when it starts (it probes the machine's addresses and cloud
metadata hosts), so these tests run only inside a network namespace that has nothing but
loopback: `tests/test_ray.py` starts them there (`unshare -n`, as root) with
`SHOAL_RAY_NETNS=1` set. Outside it they are skipped, saying so.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
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


@dataclass
class StartedCluster:
    """A cluster started with Ray's own `ray start` (a head and a second node) in a temp folder
    of its own: its address, and a way to tell its processes from every other Ray process on
    the machine (each one's command line names that folder)."""

    address: str
    temp_dir: Path
    env: dict[str, str]  # what a process that joins it needs: its token, no RAY_ADDRESS

    def processes(self) -> list[psutil.Process]:
        """This cluster's processes, and every process they started."""
        mine: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter(["cmdline"]):
            if str(self.temp_dir) in " ".join(proc.info["cmdline"] or ()):
                mine[proc.pid] = proc
        for proc in list(mine.values()):
            with contextlib.suppress(psutil.NoSuchProcess):
                mine.update((child.pid, child) for child in proc.children(recursive=True))
        return list(mine.values())


@contextlib.contextmanager
def ray_start(temp_dir: Path, port: int) -> Iterator[StartedCluster]:
    """`ray start --head`, then `ray start --address` for a second node; on exit, stops exactly
    the processes they started (never `ray stop`: it stops every Ray process on the machine)."""
    ray_cli = str(Path(sys.executable).parent / "ray")
    address = f"127.0.0.1:{port}"
    common = ["--temp-dir", str(temp_dir), "--disable-usage-stats"]
    common += ["--object-store-memory", str(200 * 1024 * 1024)]
    head = [ray_cli, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port)]
    head += ["--num-cpus", "2", "--include-dashboard", "false", *common]
    second = [ray_cli, "start", "--address", address, "--node-ip-address", "127.0.0.1"]
    second += ["--num-cpus", "2", *common]
    # Token authentication, with a token of its own (never the one in ~/.ray).
    token = temp_dir / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    env |= {"RAY_AUTH_TOKEN_PATH": str(token)}
    cluster = StartedCluster(address, temp_dir, env)
    try:
        for command in (head, second):
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        yield cluster
    finally:
        procs = cluster.processes()
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.terminate()
        _, alive = psutil.wait_procs(procs, timeout=15)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=15)
