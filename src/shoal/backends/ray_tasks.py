"""A pipeline's Python step run as a Ray task (`executor: ray`), on the cluster this process
joined. The caller awaits the task; a caller that is cancelled (the run's deadline) cancels it.
An exception the step raised comes back as itself."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

from shoal.backends.ray_cluster import import_ray

# What one task reserves: Python steps are short and mostly wait; many fit on one CPU.
TASK_CPUS = 0.25


def _call(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    if inspect.iscoroutinefunction(fn):
        return asyncio.run(fn(**kwargs))
    return fn(**kwargs)


async def run_task(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """`fn(**kwargs)` in a Ray task; its value, or the exception it raised."""
    ray = import_ray()
    ref = ray.remote(num_cpus=TASK_CPUS, max_retries=0)(_call).remote(fn, kwargs)
    try:
        return await ref
    except asyncio.CancelledError:
        ray.cancel(ref, force=True)
        raise
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, Exception):
            raise cause from None
        raise
