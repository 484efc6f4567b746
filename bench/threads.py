"""llama.cpp's thread count when another program holds a core: every core, or the free ones.

llama.cpp's threads wait for each other at every barrier, so a thread that shares its core with
another program slows every token. shoal runs as many threads as other programs leave cores
free (`shoal.models.llamacpp.FreeCores`); this compares that with always using every core, on
the same model and request, alternating, while a busy loop holds one core.

    compute_s   the call's compute time (prompt and generation)
    ttft_s      time to the first token (the prompt)
    ratio       compute_s with every core / with the free cores (>1: the choice pays)

Prints one JSON object.

    python bench/threads.py --model qwen2.5-coder-1.5b --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
from typing import Any

from shoal import ChatRequest, Fleet
from shoal.models import llamacpp

PROMPT = "Write a short story about a harbour at dawn, in plain words. " * 3


async def measure(model_id: str, rounds: int, max_tokens: int) -> dict[str, Any]:
    fleet = Fleet()
    model = fleet.model(model_id)
    await model.load()
    chosen = llamacpp.free_cores
    every = os.cpu_count() or 1
    await asyncio.sleep(2.0)  # the free-cores reading sees the busy loop
    runs: dict[str, list[dict[str, float]]] = {"every core": [], "free cores": []}
    try:
        for i in range(rounds):
            for label in ("every core", "free cores"):
                llamacpp.free_cores = chosen if label == "free cores" else lambda: every  # type: ignore[assignment]
                request = ChatRequest.of(f"({label} {i}) {PROMPT}", max_tokens=max_tokens)
                response = await model.generate(request)
                runs[label].append(
                    {"compute_s": response.compute_s, "ttft_s": response.ttft_s or 0.0}
                )
                await asyncio.sleep(1.1)
    finally:
        llamacpp.free_cores = chosen
        await fleet.aclose()
    figures: dict[str, Any] = {
        label: {
            key: round(statistics.median(r[key] for r in rows), 2)
            for key in ("compute_s", "ttft_s")
        }
        for label, rows in runs.items()
    }
    figures["threads"] = {"every core": every, "free cores": chosen()}
    figures["ratio"] = round(
        figures["every core"]["compute_s"] / figures["free cores"]["compute_s"], 2
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # holds one core
    try:
        figures = asyncio.run(measure(args.model, args.rounds, args.max_tokens))
    finally:
        busy.kill()
    figures["model"] = args.model
    figures["load_average_1m_before"] = round(load, 2)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
