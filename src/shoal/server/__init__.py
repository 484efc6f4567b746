"""The OpenAI-compatible HTTP server: `create_app(engine, settings)`, run by `shoal serve`."""

from shoal.server.app import ServerState, create_app

__all__ = ["ServerState", "create_app"]
