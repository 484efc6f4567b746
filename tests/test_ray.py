"""The Ray tests (`test_ray_*.py`), run on a real local Ray cluster inside a network namespace
that has only loopback: Ray probes the machine's addresses and cloud metadata hosts when it
starts, and nothing here may reach beyond this machine. `unshare -n` needs root (CI runs as
root); the namespace is this test's child, and goes with it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RAY_TESTS = [
    "tests/test_ray_models.py",
    "tests/test_ray_gateway.py",
    "tests/test_ray_nodes.py",
]
LIMIT_S = 600


def run_in_namespace(marks: str) -> subprocess.CompletedProcess[str]:
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("the Ray tests need root and `unshare -n` (CI runs as root on Linux)")
    pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[ray]'")
    inner = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-m", marks]
    script = 'ip link set lo up && exec "$@"'
    env = {**os.environ, "SHOAL_RAY_NETNS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    command = ["unshare", "-n", "sh", "-c", script, "sh", *inner, *RAY_TESTS]
    # Its own process group: a run past the limit is stopped with every process it started.
    with subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=LIMIT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(f"the Ray tests ran past {LIMIT_S} s:\n{(stdout + stderr)[-8000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def check(done: subprocess.CompletedProcess[str]) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-8000:]
    last = done.stdout.strip().splitlines()[-1]  # pytest's summary (Ray writes on stderr)
    assert " passed" in last, last
    assert "skipped" not in last, output[-4000:]  # inside the namespace nothing is skipped


def test_ray_on_a_local_cluster_in_a_loopback_namespace() -> None:
    check(run_in_namespace("not slow"))


@pytest.mark.slow
def test_ray_slow_cases_in_a_loopback_namespace() -> None:
    check(run_in_namespace("slow"))


def test_serve_on_ray_refuses_tls_it_cannot_serve(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from shoal.cli.main import app

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("-")
    key.write_text("-")
    result = CliRunner().invoke(
        app,
        ["serve", "--ray", "local", "--tls-cert", str(cert), "--tls-key", str(key), "--no-auth"],
    )
    assert result.exit_code == 2, result.output
    assert "ConfigError" in result.output
    assert "TLS proxy in front" in result.output


def test_a_ray_placement_in_the_fleet_file_is_checked() -> None:
    from shoal.errors import ConfigError
    from shoal.fleet import Fleet
    from shoal.settings import parse_fleet

    fleet = Fleet(parse_fleet("backend: ray\nray: {replicas: 2, num_cpus: 0.5}", source="f"))
    assert fleet.placement("smollm2-135m") == fleet.settings.ray
    assert fleet.card("smollm2-135m").where == "llama.cpp on ray"
    local = Fleet(parse_fleet("ray: {replicas: 2}", source="f"))
    assert local.placement("smollm2-135m") is None  # backend local: placement unused
    for bad, says in (
        ("ray: {replicas: 2, min_replicas: 1, max_replicas: 3}", "either 'replicas'"),
        ("ray: {min_replicas: 1}", "needs both"),
        ("ray: {min_replicas: 3, max_replicas: 2}", "more than max_replicas"),
        ("ray: {num_cpus: 0}", "greater than 0"),
        ("backend: spark", "backend"),
        ("ray: {replica: 2}", "replica"),
    ):
        with pytest.raises(ConfigError, match=says):
            parse_fleet(bad, source="f")


def test_an_error_raised_in_a_replica_crosses_back_as_itself() -> None:
    import pickle

    from shoal.backends.ray_model import Failure
    from shoal.errors import ContextWindowExceededError, OverloadedError

    sent = ContextWindowExceededError("tiny", 5000, 64, 4096)
    back = pickle.loads(pickle.dumps(Failure.of(sent))).error()
    assert type(back) is ContextWindowExceededError
    assert str(back) == str(sent)
    assert (back.prompt_tokens, back.context, back.param) == (5000, 4096, "messages")
    assert back.bad_input
    busy = pickle.loads(pickle.dumps(Failure.of(OverloadedError("full", retry_after_s=3)))).error()
    assert isinstance(busy, OverloadedError)
    assert busy.retry_after_s == 3
    assert busy.retryable
    unknown = Failure("NotAShoalError", "boom").error()
    assert type(unknown).__name__ == "BackendError"
    assert "NotAShoalError: boom" in str(unknown)


def upper_item(item: str) -> str:
    return item.upper()


def test_a_python_step_on_ray_round_trips_through_yaml() -> None:
    from shoal.errors import ConfigError
    from shoal.pipeline.graph import Pipeline, PythonStep
    from shoal.pipeline.spec import dump_yaml, load_yaml

    pipeline = Pipeline(
        "fan",
        inputs=("items",),
        steps=[PythonStep("each", upper_item, inputs=("items",), map_over="items", executor="ray")],
        output="each",
    )
    text = dump_yaml(pipeline)
    assert "executor: ray" in text
    step = load_yaml(text).steps["each"]
    assert isinstance(step, PythonStep)
    assert step.executor == "ray"
    with pytest.raises(ConfigError, match="executor"):
        load_yaml(text.replace("executor: ray", "executor: spark"))


def test_a_placement_becomes_serve_options(tiny_path: Path) -> None:
    from shoal.backends.ray_model import Deployment, app_name
    from shoal.fleet import Fleet
    from shoal.settings import RayPlacement

    card = Fleet().card("smollm2-135m")
    fixed = Deployment(card, tiny_path, RayPlacement(replicas=3, num_cpus=0.5)).options()
    assert fixed["num_replicas"] == 3
    assert "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 0.5}
    assert (fixed["max_ongoing_requests"], fixed["max_queued_requests"]) == (16, 64)
    scaled = RayPlacement(min_replicas=1, max_replicas=4, target_ongoing_requests=3)
    options = Deployment(card, tiny_path, scaled).options()
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 3,
    }
    assert app_name("org/model:q4") == "shoal-model-org-model-q4"
