"""What every command module shares: the consoles, the `--fleet` option, and one way to turn
shoal's errors into a message and an exit status (2: bad input or configuration; 1: a model or
backend failed), with no traceback for an expected failure."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Coroutine
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
