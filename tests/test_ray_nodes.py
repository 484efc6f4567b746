"""A node that leaves the cluster: its replicas are started again elsewhere (Ray Serve does it),
and calls to the model go on. Its own cluster of three one-CPU nodes, so where each replica runs
is decided by the CPUs: one replica on the head, one on node A, and node B spare. Also: a model
that autoscales under load, and `shoal serve --ray` on a cluster started with `ray start`. Slow;
run inside a loopback-only namespace by `tests/test_ray.py` (`-m slow`)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from ray_support import inside_namespace, ray_start

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


def _serve_until_answered(ray: str, port: int, folder: Path, env: dict[str, str]) -> int:
    """`shoal serve --ray RAY` until the official client gets an answer through it; then
    SIGTERM, as a service manager stops it. Its exit status."""
    import openai

    log_path = folder / f"serve-{ray.replace(':', '-').replace('.', '-')}.log"
    shoal = shutil.which("shoal", path=str(Path(sys.executable).parent))
    assert shoal is not None
    command = [shoal, "serve", "--ray", ray, "--no-auth", "--port", str(port)]
    command += ["--traces", str(folder / "traces.sqlite")]
    with (
        log_path.open("w") as log,
        subprocess.Popen(command, stderr=log, stdout=log, env=env) as server,
    ):
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
    return status


def test_shoal_serve_on_ray_answers_and_stops_cleanly(tmp_path: Path) -> None:
    """`shoal serve --ray local`: a cluster of its own, the gateway on two replicas; SIGTERM
    stops it with exit status 0."""
    assert _serve_until_answered("local", free_port(), tmp_path, dict(os.environ)) == 0


def test_shoal_serve_joins_a_cluster_started_with_ray_start(tmp_path: Path) -> None:
    """`ray start --head` and `ray start --address` (a second node), then `shoal serve --ray
    ADDRESS` and `--ray auto` (Ray finds the cluster from `RAY_ADDRESS`): each answers the
    official client and stops on SIGTERM, leaving the cluster running."""
    temp_dir = Path(tempfile.mkdtemp(prefix="shoal-ray-", dir="/tmp"))  # short: socket paths
    try:
        with ray_start(temp_dir, free_port()) as cluster:
            core = [p for p in cluster.processes() if p.name() in ("gcs_server", "raylet")]
            assert sorted(p.name() for p in core) == ["gcs_server", "raylet", "raylet"]
            env, port = cluster.env, free_port()
            _serve_until_answered(cluster.address, port, tmp_path, env)
            assert all(p.is_running() for p in core), "the cluster stopped with the server"
            _serve_until_answered("auto", port, tmp_path, {**env, "RAY_ADDRESS": cluster.address})
            assert all(p.is_running() for p in core), "the cluster stopped with the server"
        assert not cluster.processes()  # what the test started is stopped, and only that
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


AUTOSCALED = "tiny-autoscaled"


def _replicas(app: str) -> tuple[int, int]:
    """(running, all) replicas of a model's deployment, as Serve's status says."""
    from ray import serve

    states = serve.status().applications[app].deployments["model"].replica_states
    return int(states.get("RUNNING", 0)), sum(states.values())


async def test_a_model_scales_out_to_its_max_replicas_under_load(
    three_nodes: Any, tiny_path: Path
) -> None:
    """min 1, max 2, one call in flight per replica as the target: four calls at a time keep
    asking for more, and Serve starts the second replica (its default: after 30 s of load)."""
    spec = GGUFModelSpec(
        id=AUTOSCALED,
        path=tiny_path,
        context=2048,
        backend="ray",
        ray=RayPlacement(min_replicas=1, max_replicas=2, target_ongoing_requests=1, num_cpus=0.25),
    )
    model = Fleet(FleetSettings(models=(spec,))).model(AUTOSCALED)
    assert isinstance(model, RayModel)
    await model.load()
    app = app_name(AUTOSCALED)
    assert _replicas(app)[0] == 1
    stop = asyncio.Event()

    async def keep_busy() -> int:
        answered = 0
        request = ChatRequest(messages=[Message(role="user", content="A story.")], max_tokens=64)
        while not stop.is_set():
            answered += (await model.generate(request)).usage.output_tokens > 0
        return answered

    load = [asyncio.ensure_future(keep_busy()) for _ in range(4)]
    started = time.monotonic()
    most = 1
    try:
        while _replicas(app)[0] < 2 and time.monotonic() - started < SCALE_OUT_WAIT_S:
            most = max(most, _replicas(app)[1])
            await asyncio.sleep(1.0)
        scaled_after = time.monotonic() - started
    finally:
        stop.set()
        answered = sum(await asyncio.gather(*load))
    running, every = _replicas(app)
    assert running == 2, f"still {running} replica(s) after {scaled_after:.0f} s of load"
    assert max(most, every) == 2  # never past max_replicas
    assert answered > 0
    from ray import serve

    serve.delete(app)


SCALE_OUT_WAIT_S = 120
