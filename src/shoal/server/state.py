"""What a server holds (`app.state.shoal`): the engine that answers, the key store, the metrics,
and the pipelines it serves with their runs. Nothing lives at module level, so several apps
(tests) coexist."""

from __future__ import annotations

from dataclasses import dataclass

from shoal.engine import Engine
from shoal.server.keys import KeyStore
from shoal.server.metrics import Metrics
from shoal.server.runbook import RunBook
from shoal.settings import ServerSettings

KEYS_FILE = "keys.sqlite"


@dataclass
class ServerState:
    engine: Engine
    settings: ServerSettings
    keys: KeyStore | None
    metrics: Metrics
    runs: RunBook
