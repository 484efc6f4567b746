"""Joining a Ray cluster, or starting a local one, with settings safe for a shared machine.

    connect("auto")            # the cluster `ray start --head` runs on this node
    connect("10.0.0.5:6379")   # a cluster's head at that address
    connect(None)              # a new local cluster, for this process only

Usage statistics and the dashboard are off. Ray is imported here, when called, never at import
time: without the `shoal[ray]` extra the rest of shoal works and this raises `ConfigError`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from shoal.errors import ConfigError

log = logging.getLogger(__name__)

INSTALL = "pip install 'shoal[ray]'"
# Serve logs every request by default: on a busy gateway that is a large share of its CPU.
QUIET_LOGS: dict[str, Any] = {"enable_access_log": False, "log_level": "WARNING"}


def import_ray() -> Any:
    """The `ray` module, or a `ConfigError` saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(f"running models on Ray needs the ray extra: {INSTALL}") from exc
    return ray


def connect(address: str | None, *, num_cpus: float | None = None) -> None:
    """Join the cluster at `address` ("auto": the one this node belongs to), or start a local
    one (`num_cpus`: the CPUs it offers; default: the machine's). Does nothing when this
    process is already connected."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = import_ray()
    if ray.is_initialized():
        return
    quiet: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address is None:
        ray.init(
            address="local",
            num_cpus=None if num_cpus is None else int(num_cpus),
            include_dashboard=False,
            **quiet,
        )
    else:
        try:
            ray.init(address=address, **quiet)
        except ConnectionError as exc:
            raise ConfigError(f"cannot join the Ray cluster at {address!r}: {exc}") from exc
    log.info("joined Ray cluster: %s", ray.get_runtime_context().gcs_address)


def start_serve(host: str, port: int) -> None:
    """Start Ray Serve on the cluster, its HTTP proxy on `host`:`port`, without access logs."""
    import_ray()
    from ray import serve

    serve.start(http_options={"host": host, "port": port}, logging_config=QUIET_LOGS)
