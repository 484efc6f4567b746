"""Who may reach the server, and who owns its keys file.

One server per keys file: a second one (another process) is refused at startup, naming the
process that holds the file, while `shoal keys ...` keeps working; the lock dies with its
process. The server binds loopback unless told `--public`, never public without keys, and serves
HTTPS with `--tls-cert`/`--tls-key`. A key revoked or re-budgeted from the command line counts
from the server's next request.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import sqlite3
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import uvicorn
from conftest import free_port
from openai.types.chat import ChatCompletionMessageParam
from server_support import fake_upstream, make_key, serving
from typer.testing import CliRunner

from shoal import FakeModel, Fleet, FunctionModel, TokenPrice
from shoal.cli.main import app as cli
from shoal.engine import Engine
from shoal.errors import KeysInUseError
from shoal.ledger import to_pico
from shoal.server import create_app
from shoal.server.keys import KeyStore, hash_key
from shoal.settings import ServerSettings

runner = CliRunner()
USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there shoal"}]
CENT_A_TOKEN = TokenPrice(input_per_mtok=0.0, output_per_mtok=10_000.0)

# A second process that serves a keys file (holds it) until its stdin closes.
HOLDER = """
import sys
from shoal.server.keys import KeyStore
store = KeyStore(sys.argv[1], serving=True)
print("serving", flush=True)
sys.stdin.read()
store.close()
"""


def write_fleet(tmp: Path, upstream: str = "http://127.0.0.1:9/v1") -> Path:
    """A fleet of one OpenAI-compatible model at `upstream` (nothing listens on the default)."""
    fleet = tmp / "fleet.yaml"
    model = {
        "id": "upstream",
        "kind": "openai",
        "base_url": upstream,
        "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0},
        "context": 4096,
    }
    fleet.write_text(
        json.dumps({"include_default": False, "cache_dir": str(tmp / "cache"), "models": [model]})
    )
    return fleet


def shoal_serve(tmp: Path, fleet: Path, keys: Path, port: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "shoal.cli.main",
        "serve",
        "--fleet",
        str(fleet),
        "--keys",
        str(keys),
        "--traces",
        str(tmp / "traces.sqlite"),
        "--port",
        str(port),
        *extra,
    ]


def base_flags(tmp: Path) -> list[str]:
    """`shoal serve` flags that keep every file in `tmp`."""
    fleet = write_fleet(tmp)
    keys, traces = tmp / "keys.sqlite", tmp / "traces.sqlite"
    return ["--fleet", str(fleet), "--keys", str(keys), "--traces", str(traces), "--port", "0"]


# -- one server per keys file ----------------------------------------------------------------


def test_a_second_server_on_one_keys_file_is_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys.sqlite"
    command = [sys.executable, "-c", HOLDER, str(keys)]
    with subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as held:
        try:
            assert held.stdout is not None
            assert held.stdout.readline().strip() == "serving"

            with pytest.raises(KeysInUseError) as caught:
                KeyStore(keys, serving=True)
            assert str(keys) in str(caught.value)
            assert f"pid {held.pid}" in str(caught.value)

            serve = shoal_serve(tmp_path, write_fleet(tmp_path), keys, free_port())
            second = subprocess.run(serve, capture_output=True, text=True, timeout=60)
            assert second.returncode == 2, second.stderr
            assert "KeysInUseError" in second.stderr
            assert str(keys) in second.stderr
            assert f"pid {held.pid}" in second.stderr
            assert "Traceback" not in second.stderr

            # The command line administers keys while the server holds the file.
            created = runner.invoke(cli, ["keys", "create", "ops-team", "--keys", str(keys)])
            assert created.exit_code == 0, created.output
            listed = runner.invoke(
                cli, ["keys", "list", "--keys", str(keys)], env={"COLUMNS": "200"}
            )
            assert listed.exit_code == 0, listed.output
            assert "ops-team" in listed.stdout
        finally:
            held.kill()  # no chance to clean up: the lock must go with the process
    KeyStore(keys, serving=True).close()
    KeyStore(keys, serving=True).close()  # and closing a store released it


def test_a_server_app_holds_its_keys_file_until_it_stops(tmp_path: Path) -> None:
    keys = tmp_path / "keys.sqlite"
    engine = Engine(Fleet(), trace_path=tmp_path / "traces.sqlite")
    engine.add_route("echo", FakeModel())
    app = create_app(engine, ServerSettings(keys_path=keys), pipelines={}, close_engine=True)
    with serving(app):
        with pytest.raises(KeysInUseError):
            create_app(engine, ServerSettings(keys_path=keys), pipelines={})
        KeyStore(keys).close()  # an administrator's store opens all the same
    KeyStore(keys, serving=True).close()


# -- binding ---------------------------------------------------------------------------------


@pytest.fixture
def uvicorn_runs(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """`shoal serve` in process, stopped where it would start uvicorn: what it would run."""
    runs: list[dict[str, Any]] = []

    def run(app: Any, **options: Any) -> None:
        runs.append(options)
        state = app.state.shoal
        if state.keys is not None:
            state.keys.close()
        asyncio.run(state.engine.aclose())

    monkeypatch.setattr(uvicorn, "run", run)
    return runs


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--host", "0.0.0.0"], "--public"),
        (["--host", "192.0.2.7"], "--public"),
        (["--host", "0.0.0.0", "--public", "--no-auth"], "--no-auth"),
        (["--host", "::", "--public", "--no-auth"], "--no-auth"),
        (["--tls-cert", "{tmp}/cert.pem"], "tls_key"),
        (["--tls-cert", "{tmp}/none.pem", "--tls-key", "{tmp}/key.pem"], "none.pem"),
    ],
)
def test_serve_refuses_unsafe_binding(
    tmp_path: Path, uvicorn_runs: list[dict[str, Any]], flags: list[str], says: str
) -> None:
    (tmp_path / "cert.pem").write_text("certificate")
    (tmp_path / "key.pem").write_text("key")
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    result = runner.invoke(cli, ["serve", *base_flags(tmp_path), *flags])
    assert result.exit_code == 2, result.output
    assert says in result.output
    assert "Traceback" not in result.output
    assert uvicorn_runs == []


def test_serve_binds_beyond_loopback_only_when_public(
    tmp_path: Path, uvicorn_runs: list[dict[str, Any]]
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("certificate")
    key.write_text("key")
    tls = ["--tls-cert", str(cert), "--tls-key", str(key)]
    warnings = []
    for flags in (
        ["--no-auth"],
        ["--host", "localhost"],
        ["--host", "0.0.0.0", "--public"],
        ["--host", "0.0.0.0", "--public", *tls],
    ):
        result = runner.invoke(cli, ["serve", *base_flags(tmp_path), *flags])
        assert result.exit_code == 0, result.output
        warnings.append("in clear" in result.output)
    hosts = ["127.0.0.1", "localhost", "0.0.0.0", "0.0.0.0"]
    assert [run["host"] for run in uvicorn_runs] == hosts
    # Public over plain HTTP is allowed, with a warning; over TLS, uvicorn gets the files.
    assert warnings == [False, False, True, False]
    assert [run["ssl_certfile"] for run in uvicorn_runs] == [None, None, None, cert]
    assert [run["ssl_keyfile"] for run in uvicorn_runs] == [None, None, None, key]


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed: no certificate to serve HTTPS with")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def test_serves_https(tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    cert, cert_key = certificate
    keys = tmp_path / "keys.sqlite"
    api_key = make_key(keys, "tls")
    trust = ssl.create_default_context(cafile=str(cert))
    port = free_port()
    with fake_upstream() as upstream:
        command = shoal_serve(tmp_path, write_fleet(tmp_path, upstream), keys, port)
        command += ["--tls-cert", str(cert), "--tls-key", str(cert_key)]
        process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
        try:
            root = f"https://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(f"{root}/healthz", timeout=5, context=trust):
                        break
                except OSError:
                    assert process.poll() is None, process.stderr and process.stderr.read()
                    assert time.monotonic() < deadline, "shoal serve did not start"
                    time.sleep(0.1)
            with (
                openai.DefaultHttpxClient(verify=trust) as trusting,
                openai.OpenAI(
                    base_url=f"{root}/v1", api_key=api_key, http_client=trusting, max_retries=0
                ) as client,
            ):
                reply = client.chat.completions.create(
                    model="upstream", messages=USER, max_tokens=8
                )
            assert reply.choices[0].message.content == "hello from the fake upstream"
            plain = f"http://127.0.0.1:{port}/healthz"
            with pytest.raises(http.client.RemoteDisconnected):  # plain HTTP is not served
                urllib.request.urlopen(plain, timeout=5)
        finally:
            process.terminate()
            process.communicate(timeout=30)


# -- key changes from the command line -------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A server on its own keys file: its base URL and the file."""
    keys = tmp_path / "keys.sqlite"
    engine = Engine(Fleet(), trace_path=tmp_path / "traces.sqlite")
    engine.add_route(
        "priced", FunctionModel(lambda r: "a b", model_id="priced", price=CENT_A_TOKEN)
    )
    app = create_app(engine, ServerSettings(keys_path=keys), pipelines={}, close_engine=True)
    with serving(app) as url:
        yield url, keys


def test_budget_and_rate_changes_count_from_the_next_request(server: tuple[str, Path]) -> None:
    url, keys = server
    key = make_key(keys, "changing", budget=1.0)
    with openai.OpenAI(base_url=url, api_key=key, max_retries=0) as client:

        def call() -> None:
            client.chat.completions.create(model="priced", messages=USER, max_tokens=4)

        call()
        with sqlite3.connect(keys) as admin:  # another connection, as the command line's
            admin.execute("UPDATE keys SET budget_pusd = ? WHERE name = 'changing'", (0,))
        admin.close()
        with pytest.raises(openai.APIStatusError) as caught:
            call()
        assert caught.value.status_code == 402

        with sqlite3.connect(keys) as admin:
            admin.execute(
                "UPDATE keys SET budget_pusd = NULL, rpm = 1 WHERE name = 'changing'",
            )
        admin.close()
        call()  # a new rate limit starts full
        with pytest.raises(openai.RateLimitError):
            call()


def test_a_reload_keeps_the_money_held_by_calls_in_flight(tmp_path: Path) -> None:
    keys = tmp_path / "keys.sqlite"
    key = make_key(keys, "busy", budget=1.0)
    store = KeyStore(keys, serving=True)
    try:
        state = store.authenticate(f"Bearer {key}")
        hold = store.reserve(state, 0.25)
        with sqlite3.connect(keys) as db:  # the command line re-budgets the key
            db.execute("UPDATE keys SET budget_pusd = ? WHERE name = 'busy'", (to_pico(2.0),))
        db.close()
        again = store.authenticate(f"Bearer {key}")
        assert again is state
        assert state.account.limit_pusd == to_pico(2.0)
        assert state.account.held_pusd == to_pico(0.25)
        hold.settle(to_pico(0.1))
        assert state.account.held_pusd == 0
        assert state.account.spent_pusd == to_pico(0.1)
    finally:
        store.close()


def test_charges_a_failed_write_kept_count_and_reach_the_file_later(tmp_path: Path) -> None:
    import sqlite3

    store = KeyStore(tmp_path / "keys.sqlite")
    key, _ = store.create("k", budget_usd=1.0, rpm=None)
    state = store.authenticate(f"Bearer {key}")
    real = store._db

    class Failing:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def executemany(self, *args: object) -> None:
            raise sqlite3.OperationalError("disk I/O error")

    store._db = Failing()  # type: ignore[assignment]
    state.account.reserve(0.25).settle(250_000_000_000)
    store.flush()  # fails: the charge is kept
    reloaded = store._load(hash_key(key), state)
    assert reloaded is not None
    assert reloaded.account.spent_pusd == 250_000_000_000  # not reset from the file
    store._db = real
    store.flush()
    record = store.record("k")
    assert record is not None
    assert (record.spent_usd, record.requests) == (0.25, 1)
    store.close()
