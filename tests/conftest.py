"""Fixtures shared across test modules."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import shoal

LLAMA_SERVER_ALIAS = "smollm2-135m-upstream"
LLAMA_SERVER_START_TIMEOUT_S = 60.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (the OS picks it; we release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The tiny real model's GGUF file (SmolLM2-135M)."""
    return shoal.Fleet().gguf_path("smollm2-135m")


@dataclass(frozen=True)
class LlamaServer:
    """llama-cpp-python's OpenAI-compatible server, running as a subprocess on loopback."""

    base_url: str
    alias: str
    process: subprocess.Popen[bytes]


def _stderr_tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(encoding="utf-8", errors="replace")[-chars:]


@pytest.fixture(scope="session")
def llama_server(
    smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LlamaServer]:
    """`python -m llama_cpp.server` serving SmolLM2-135M on a free port, for the whole session."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("llama_server") / "stderr.log"
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(smollm2_gguf),
        "--model_alias",
        LLAMA_SERVER_ALIAS,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "2048",
        # One thread: on a small shared CI box two spinning llama.cpp threads slow down 5-40x
        # whenever another process takes a core.
        "--n_threads",
        "1",
        "--n_threads_batch",
        "1",
    ]
    base_url = f"http://127.0.0.1:{port}/v1"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + LLAMA_SERVER_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"llama_cpp.server exited with {process.returncode} before it was ready:\n"
                    f"{_stderr_tail(log_path)}"
                )
            try:
                with urllib.request.urlopen(f"{base_url}/models", timeout=2) as reply:
                    models = json.load(reply)
                if any(m.get("id") == LLAMA_SERVER_ALIAS for m in models.get("data", ())):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"llama_cpp.server not ready on {base_url} after "
                    f"{LLAMA_SERVER_START_TIMEOUT_S} s:\n{_stderr_tail(log_path)}"
                )
            time.sleep(0.2)
        yield LlamaServer(base_url=base_url, alias=LLAMA_SERVER_ALIAS, process=process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


# -- the tiny real model (SmolLM2-135M), loaded once per test session --------------------------

TINY = "smollm2-135m"


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    return shoal.Fleet().gguf_path(TINY)


@pytest.fixture(scope="session")
def tiny_card() -> shoal.ModelCard:
    return shoal.Fleet().card(TINY)


@pytest.fixture(scope="session")
def tiny(tiny_card: shoal.ModelCard, tiny_path: Path) -> shoal.Model:
    """The 135M model in process; sessions share its one loaded llama.cpp instance."""
    from shoal.models.llamacpp import LlamaCppModel

    return LlamaCppModel(tiny_card, path=tiny_path)


@pytest.fixture(scope="module")
def keys_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An API key store for a module's server tests."""
    return tmp_path_factory.mktemp("keys") / "keys.sqlite"


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[object]:
    """A real local Ray cluster (head + second node), inside the loopback-only namespace that
    `tests/test_ray.py` starts; see `ray_support`."""
    from ray_support import INSIDE, start_cluster

    if not INSIDE:
        pytest.skip("Ray runs only inside the loopback-only namespace (tests/test_ray.py)")
    yield from start_cluster(free_port())
