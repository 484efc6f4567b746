"""The OpenAI-compatible HTTP server: `create_app(engine, settings)`, run by `shoal serve`."""

from shoal.server.app import create_app
from shoal.server.state import ServerState

__all__ = ["ServerState", "create_app"]
