"""`shoal keys ...` in process: a key is printed once, stored only hashed, listed without it."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from shoal.cli.main import app
from shoal.server.keys import KEY_PREFIX, KeyRecord, KeyStore, hash_key

runner = CliRunner()


def test_keys_create_list_revoke(tmp_path: Path) -> None:
    keys = tmp_path / "keys.sqlite"
    created = runner.invoke(
        app, ["keys", "create", "my-app", "--budget", "1.5", "--rpm", "60", "--keys", str(keys)]
    )
    assert created.exit_code == 0, created.output
    key = created.stdout.strip()
    assert key.startswith(KEY_PREFIX)
    with sqlite3.connect(keys) as db:
        stored = db.execute("SELECT hash, hint FROM keys").fetchall()
    db.close()
    assert stored == [(hash_key(key), key[: len(KEY_PREFIX) + 4])]
    assert key not in keys.read_bytes().decode("latin-1")

    again = runner.invoke(app, ["keys", "create", "my-app", "--keys", str(keys)])
    assert again.exit_code == 2
    assert "already exists" in again.output

    listed = runner.invoke(app, ["keys", "list", "--keys", str(keys)], env={"COLUMNS": "200"})
    assert listed.exit_code == 0, listed.output
    assert "my-app" in listed.stdout
    assert "1.5" in listed.stdout
    assert key not in listed.stdout

    assert runner.invoke(app, ["keys", "revoke", "my-app", "--keys", str(keys)]).exit_code == 0
    assert runner.invoke(app, ["keys", "revoke", "nobody", "--keys", str(keys)]).exit_code == 2
    store = KeyStore(keys)
    record = store.record("my-app")
    store.close()
    assert record is not None
    assert record.revoked


def test_serve_refuses_bad_settings() -> None:
    result = runner.invoke(app, ["serve", "--max-body-bytes", "10"])
    assert result.exit_code == 2


def _spend(keys: Path, name: str, pusd: int) -> None:
    with sqlite3.connect(keys) as db:
        db.execute("UPDATE keys SET spent_pusd = ?, requests = 3 WHERE name = ?", (pusd, name))
    db.close()


@pytest.mark.parametrize("columns", ["80", "40"])
def test_keys_list_money_is_readable_at_any_width(tmp_path: Path, columns: str) -> None:
    keys = tmp_path / "keys.sqlite"
    runner.invoke(
        app, ["keys", "create", "a-rather-long-app-name", "--budget", "0.5", "--keys", str(keys)]
    )
    _spend(keys, "a-rather-long-app-name", 117_000_000)  # $0.000117
    listed = runner.invoke(app, ["keys", "list", "--keys", str(keys)], env={"COLUMNS": columns})
    assert listed.exit_code == 0, listed.output
    assert "$0.000117" in listed.stdout
    assert "$0.50" in listed.stdout
    assert listed.stdout.count("…") == 1  # the key's hint, never a figure


def test_keys_list_as_json(tmp_path: Path) -> None:
    keys = tmp_path / "keys.sqlite"
    runner.invoke(
        app, ["keys", "create", "app", "--budget", "1.5", "--rpm", "60", "--keys", str(keys)]
    )
    runner.invoke(app, ["keys", "create", "free", "--keys", str(keys)])
    _spend(keys, "app", 117_000_000)
    listed = runner.invoke(app, ["keys", "list", "--json", "--keys", str(keys)])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    assert [r["name"] for r in rows] == ["app", "free"]
    first = rows[0]
    assert set(first) == {
        "name",
        "id",
        "hint",
        "budget_usd",
        "spent_usd",
        "requests",
        "rpm",
        "revoked",
        "created_at",
        "admin",
    }
    assert (first["budget_usd"], first["spent_usd"], first["requests"]) == (1.5, 0.000117, 3)
    assert (first["rpm"], first["revoked"], first["admin"]) == (60, False, False)
    assert rows[1]["budget_usd"] is None
    assert rows[1]["rpm"] is None
    datetime.fromisoformat(first["created_at"])


def test_keys_update(tmp_path: Path) -> None:
    keys = tmp_path / "keys.sqlite"
    runner.invoke(
        app, ["keys", "create", "app", "--budget", "1", "--rpm", "10", "--keys", str(keys)]
    )
    _spend(keys, "app", 400_000_000_000)

    def record() -> KeyRecord:
        store = KeyStore(keys)
        try:
            found = store.record("app")
        finally:
            store.close()
        assert found is not None
        return found

    def update(*args: str) -> Result:
        return runner.invoke(app, ["keys", "update", "app", *args, "--keys", str(keys)])

    assert update("--budget", "2.5").exit_code == 0
    assert (record().budget_usd, record().rpm, record().spent_usd) == (2.5, 10, 0.4)
    assert update("--no-rpm", "--reset-spend").exit_code == 0
    assert (record().budget_usd, record().rpm, record().spent_usd) == (2.5, None, 0.0)
    done = update("--no-budget", "--rpm", "30")
    assert done.exit_code == 0, done.output
    assert (record().budget_usd, record().rpm) == (None, 30)
    assert "no budget" in done.stderr

    for bad in (["--budget", "-1"], ["--rpm", "0"], ["--budget", "1", "--no-budget"], []):
        refused = update(*bad)
        assert refused.exit_code == 2, (bad, refused.output)
        assert "Traceback" not in refused.output
    assert (record().budget_usd, record().rpm) == (None, 30)
    missing = runner.invoke(app, ["keys", "update", "nobody", "--rpm", "5", "--keys", str(keys)])
    assert missing.exit_code == 2
    assert "no key named 'nobody'" in missing.stderr


def test_key_store_update_refuses_bad_limits(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.sqlite")
    try:
        store.create("app", budget_usd=None, rpm=None)
        with pytest.raises(ValueError, match="negative"):
            store.update("app", budget_usd=-0.01)
        with pytest.raises(ValueError, match="at least 1"):
            store.update("app", rpm=0)
        assert store.update("nobody", rpm=5) is None
        updated = store.update("app", budget_usd=0.25)
        assert updated is not None
        assert (updated.budget_usd, updated.rpm) == (0.25, None)
    finally:
        store.close()


def test_serve_metrics_auth_needs_keys() -> None:
    result = runner.invoke(app, ["serve", "--no-auth", "--metrics-auth"])
    assert result.exit_code == 2
    assert "metrics_auth" in result.stderr
