"""`shoal keys ...` in process: a key is printed once, stored only hashed, listed without it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from typer.testing import CliRunner

from shoal.cli.main import app
from shoal.server.keys import KEY_PREFIX, KeyStore, hash_key

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
