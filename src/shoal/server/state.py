"""What a server holds (`app.state.shoal`): the engine that answers, the key store, the metrics,
the pipelines it serves with their runs, and the dashboard's sessions. Nothing lives at module
level, so several apps (tests) coexist."""

from __future__ import annotations

from dataclasses import dataclass, field

from shoal.engine import Engine
from shoal.server.keys import KeyStore
from shoal.server.metrics import Metrics
from shoal.server.runbook import RunBook
from shoal.server.sessions import Sessions
from shoal.settings import ServerSettings

KEYS_FILE = "keys.sqlite"


@dataclass
class ServerState:
    engine: Engine
    settings: ServerSettings
    keys: KeyStore | None
    metrics: Metrics
    runs: RunBook
    sessions: Sessions = field(default_factory=Sessions)
