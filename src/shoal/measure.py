"""Measure a model on this machine: load time, prompt and generation speed, peak memory.

Each model is measured in a fresh process (`python -m shoal.measure ID`) so that its peak memory
is its own; the process prints one JSON line per finished step and the figures last.

Another process can only slow a measurement down, never speed it up, so `shoal models bench`
measures several times and keeps the fastest figures (`best_of`). Runs whose speeds differ by
more than `NOISY_SPREAD` are flagged noisy: the machine was busy. A noisy measurement clearly
slower than the one recorded before (`should_record`) does not replace it, so a benchmark run
on a busy machine cannot skew routing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime

from shoal.cards import Measured
from shoal.fleet import Fleet
from shoal.messages import ChatRequest

STEPS = ("load", "prompt", "generate")

_PASSAGE = (
    "The harbour town woke slowly. Fishing boats came back with the tide, gulls argued over the "
    "nets, and the market opened its shutters one by one. A baker carried trays of bread across "
    "the square while two children raced a dog along the sea wall. "
)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


async def measure(fleet: Fleet, model_id: str, *, rounds: int = 3) -> Measured:
    model = fleet.model(model_id)
    started = time.perf_counter()
    await model.load()
    load_s = time.perf_counter() - started
    _report({"step": "load", "seconds": load_s})

    prompt_speeds = []
    for i in range(rounds):  # a distinct first line defeats the prompt cache
        text = f"Note {i}: summarise in one word.\n" + _PASSAGE * 6
        response = await model.generate(ChatRequest.of(text, max_tokens=1))
        prompt_speeds.append(response.usage.input_tokens / (response.ttft_s or response.compute_s))
    _report({"step": "prompt", "tok_s": statistics.median(prompt_speeds)})

    gen_speeds = []
    for i in range(rounds):
        request = ChatRequest.of(
            f"Story {i}: write a long story about a lighthouse keeper.", max_tokens=96
        )
        response = await model.generate(request)
        decode_s = response.compute_s - (response.ttft_s or 0.0)
        if response.usage.output_tokens > 1 and decode_s > 0:
            gen_speeds.append((response.usage.output_tokens - 1) / decode_s)
    _report({"step": "generate", "tok_s": statistics.median(gen_speeds) if gen_speeds else 0.0})
    await fleet.aclose()
    return Measured(
        load_s=round(load_s, 3),
        prompt_tok_s=round(statistics.median(prompt_speeds), 1),
        gen_tok_s=round(statistics.median(gen_speeds), 1) if gen_speeds else 0.0,
        peak_rss_mb=round(_peak_rss_mb(), 1),
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


NOISY_SPREAD = 0.2
"""Runs whose speeds differ by more than this share of the fastest are noisy."""
CLEARLY_SLOWER = 0.8
"""A noisy measurement under this share of the recorded speed does not replace it."""


def _spread(values: Sequence[float]) -> float:
    fastest = max(values)
    return (fastest - min(values)) / fastest if fastest > 0 else 0.0


def best_of(runs: Sequence[Measured]) -> Measured:
    """One measurement from several runs of the same model: the fastest load, prompt and
    generation figures, the largest peak memory (what the machine must hold), and how far the
    runs' speeds spread."""
    if not runs:
        raise ValueError("best_of needs at least one run")
    spread = max(_spread([m.prompt_tok_s for m in runs]), _spread([m.gen_tok_s for m in runs]))
    return Measured(
        load_s=min(m.load_s for m in runs),
        prompt_tok_s=max(m.prompt_tok_s for m in runs),
        gen_tok_s=max(m.gen_tok_s for m in runs),
        peak_rss_mb=max(m.peak_rss_mb for m in runs),
        measured_at=max(m.measured_at for m in runs),
        runs=sum(m.runs for m in runs),
        spread=round(spread, 3),
        noisy=spread > NOISY_SPREAD or any(m.noisy for m in runs),
    )


def should_record(earlier: Measured | None, new: Measured) -> bool:
    """Whether `new` replaces `earlier`: always, unless `new` is noisy and clearly slower (a
    steady measurement is trusted even when slower: the machine may have changed)."""
    if earlier is None or not new.noisy:
        return True
    slower = new.gen_tok_s < CLEARLY_SLOWER * earlier.gen_tok_s
    slower = slower or new.prompt_tok_s < CLEARLY_SLOWER * earlier.prompt_tok_s
    return not slower


def _report(event: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_id")
    parser.add_argument("--fleet", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    fleet = Fleet.from_file(args.fleet)
    measured = asyncio.run(measure(fleet, args.model_id, rounds=args.rounds))
    _report({"step": "done", "measured": measured.model_dump()})


if __name__ == "__main__":
    main()
