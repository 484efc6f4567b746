"""A node that leaves the cluster: its replicas are started again elsewhere (Ray Serve does it),
and calls to the model go on. Its own cluster of three one-CPU nodes, so where each replica runs
is decided by the CPUs: one replica on the head, one on node A, and node B spare. Slow; run
inside a loopback-only namespace by `tests/test_ray.py` (`-m slow`)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ray_support import inside_namespace

from shoal.backends.ray_model import RayModel, app_name
from shoal.fleet import Fleet
from shoal.messages import ChatRequest, Message
from shoal.settings import FleetSettings, GGUFModelSpec, RayPlacement

pytestmark = [inside_namespace, pytest.mark.slow]

MODEL = "tiny-two-nodes"


@pytest.fixture(scope="module")
def three_nodes() -> Iterator[Any]:
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from shoal.backends.ray_cluster import connect

    fast = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "_system_config": fast},
    )
    connect(cluster.address)
    try:
        yield cluster
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


async def test_a_node_that_leaves_has_its_replica_started_elsewhere(
    three_nodes: Any, tiny_path: Path
) -> None:
    node_a = three_nodes.add_node(num_cpus=1)
    three_nodes.wait_for_nodes()
    spec = GGUFModelSpec(
        id=MODEL,
        path=tiny_path,
        context=2048,
        backend="ray",
        ray=RayPlacement(replicas=2, num_cpus=1.0, max_ongoing_requests=8),
    )
    model = Fleet(FleetSettings(models=(spec,))).model(MODEL)
    assert isinstance(model, RayModel)
    await model.load()  # one replica per one-CPU node: the head and A
    node_b = three_nodes.add_node(num_cpus=1)  # room for the replica A will lose
    three_nodes.wait_for_nodes()
    request = ChatRequest(messages=[Message(role="user", content="Hi")], max_tokens=4)
    assert (await model.generate(request)).usage.output_tokens > 0

    three_nodes.remove_node(node_a, allow_graceful=False)
    started = time.monotonic()
    answered = 0
    while time.monotonic() - started < 60:  # calls go on while Serve replaces the replica
        answer = await model.generate(request)
        answered += answer.usage.output_tokens > 0
        if await _running_on(model) == {three_nodes.head_node.node_id, node_b.node_id}:
            break
        await asyncio.sleep(0.5)
    assert answered > 0
    assert await _running_on(model) == {three_nodes.head_node.node_id, node_b.node_id}

    from ray import serve

    serve.delete(app_name(MODEL))


async def _running_on(model: RayModel) -> set[str]:
    """The nodes of the model's replicas, when Serve counts two running (else none)."""
    from ray import serve

    details = serve.status().applications[app_name(model.id)].deployments["model"]
    if details.replica_states.get("RUNNING", 0) != 2:
        return set()
    handle = model.handle()
    return {str(await handle.node.remote()) for _ in range(24)}  # calls go to either replica


def test_shoal_serve_on_ray_answers_and_stops_cleanly(tmp_path: Path) -> None:
    """`shoal serve --ray local`: a cluster of its own, the gateway on two replicas; SIGTERM
    stops it with exit status 0."""
    import shutil
    import signal
    import subprocess
    import sys

    import openai
    from conftest import free_port

    port = free_port()
    log_path = tmp_path / "serve.log"
    shoal = shutil.which("shoal", path=str(Path(sys.executable).parent))
    assert shoal is not None
    command = [shoal, "serve", "--ray", "local", "--no-auth", "--port", str(port)]
    command += ["--traces", str(tmp_path / "traces.sqlite")]
    with log_path.open("w") as log, subprocess.Popen(command, stderr=log, stdout=log) as server:
        try:
            deadline = time.monotonic() + 180
            while "gateway replicas on Ray" not in log_path.read_text():
                assert server.poll() is None, log_path.read_text()[-4000:]
                assert time.monotonic() < deadline, "the gateway did not start"
                time.sleep(0.5)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
            answer = client.chat.completions.create(
                model="smollm2-135m", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
            )
            assert answer.choices[0].message.content
        finally:
            server.send_signal(signal.SIGTERM)
            status = server.wait(timeout=60)
    assert status == 0, log_path.read_text()[-4000:]
