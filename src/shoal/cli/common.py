"""What every command module shares: the consoles, the `--fleet` option, and one way to turn
shoal's errors into a message and an exit status (2: bad input or configuration; 1: a model or
backend failed), with no traceback for an expected failure."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from shoal.errors import (
    ConfigError,
    InvalidRequestError,
    ModelNotInstalledError,
    ShoalError,
    UnknownModelError,
    UnknownPipelineError,
    UnknownRouteError,
    WeightsCorruptedError,
)
from shoal.fleet import Fleet
from shoal.traces.store import TraceStore

out = Console()
err = Console(stderr=True, soft_wrap=True)

FleetOption = Annotated[
    Path | None,
    typer.Option(
        "--fleet", envvar="SHOAL_FLEET", help="Fleet YAML file (default: the embedded fleet)."
    ),
]
T = TypeVar("T")

BAD_INPUT = (
    ConfigError,
    UnknownModelError,
    UnknownPipelineError,
    UnknownRouteError,
    InvalidRequestError,
    ModelNotInstalledError,
    WeightsCorruptedError,
)


def usd(value: float, *, digits: int = 3) -> str:
    """An amount of money a person reads at a glance, never rounded to nothing: cents for a
    dollar or more, else `digits` significant digits (`$1.50`, `$0.000117`, `$0`)."""
    if value == 0:
        return "$0"
    sign, value = ("-", -value) if value < 0 else ("", value)
    decimals = 2 if value >= 1 else max(2, digits - 1 - math.floor(math.log10(value)))
    text = f"{value:,.{decimals}f}"
    if decimals > 2:  # significant digits only: no trailing zeros past the cents
        text = text.rstrip("0")
        whole, _, part = text.partition(".")
        text = f"{whole}.{part.ljust(2, '0')}"
    return f"{sign}${text}"


def fail(exc: ShoalError) -> typer.Exit:
    """Print `exc` for a user and return the exit to raise."""
    err.print(f"[bold red]error:[/] {type(exc).__name__}: {exc}", highlight=False)
    return typer.Exit(2 if isinstance(exc, BAD_INPUT) else 1)


def guard(work: Callable[[], T]) -> T:
    """Run `work()`, turning shoal errors into a clean message and exit status."""
    try:
        return work()
    except ShoalError as exc:
        raise fail(exc) from None


def run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    return guard(lambda: asyncio.run(coro))


def fleet_from(path: Path | None) -> Fleet:
    return guard(lambda: Fleet.from_file(path))


TracesOption = Annotated[
    Path | None, typer.Option("--traces", help="Trace store (default: the fleet's cache).")
]


def trace_store(fleet_file: Path | None, traces: Path | None) -> tuple[TraceStore, Fleet]:
    """The trace store a command reads (an error when nothing has run yet), and the fleet."""
    fleet = fleet_from(fleet_file)
    path = traces or fleet.cache_dir / "traces.sqlite"
    if not path.is_file():
        raise fail(ShoalError(f"no trace store at {path}: nothing has run yet"))
    return TraceStore(path), fleet


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, *, now: float | None = None) -> float:
    """A point in time from `--since`: an age (`90m`, `24h`, `7d`, `2w`) or a date
    (`2026-11-30`, `2026-11-30T08:00`), as a Unix time."""
    text = text.strip()
    unit = _UNITS.get(text[-1:].lower())
    if unit is not None:
        try:
            age = float(text[:-1])
        except ValueError:
            age = -1.0
        if age >= 0:
            return (time.time() if now is None else now) - age * unit
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise fail(
            ConfigError(f"--since {text!r}: give an age such as 24h or 7d, or a date 2026-11-30")
        ) from None
