"""Overhead of shoal's `LlamaCppModel` over calling llama-cpp-python directly.

Same GGUF file, same settings (context, threads, batch), same prompts, greedy decoding, one
process, one run. The two sides are interleaved per prompt (the order alternates every round)
and every figure is a median, so that drift and a busy machine hit both sides alike.

- shoal: `Fleet().model(id)`, `await model.load()`, then `model.generate` / `model.stream`.
  llama.cpp runs in shoal's worker thread.
- direct: `Llama(...)` with the settings shoal uses, then `create_chat_completion` (and
  `stream=True`) on the event-loop thread. This is a second loaded copy of the same file.

Definitions (see "Measuring" in DESIGN.md):

- latency: wall time of one call, measured around building the request and the call, on
  both sides.
- added latency per call: the median over pairs (same prompt, same round) of shoal's latency
  minus direct's, in ms. The goal is judged on short calls (`--short-tokens`, default 1 token),
  which repeat each prompt `--short-rounds` times in a row: from the second on, both sides find
  the whole prompt cached and llama-cpp-python samples from the cached logits without a decode,
  so a call is its fixed cost alone (template, tokenize, sample; for shoal also the worker
  thread hop), and llama.cpp's jitter (tens of ms on a long call on a busy machine) does not
  drown a difference of a fraction of a millisecond. The same figure over the long calls is
  reported next to it; per-token cost shows in the tok/s ratio.
- generation tok/s, non-streamed calls: output tokens / wall latency, on both sides alike
  (a non-streamed direct call has no time to first token; prefill is the same work on both).
  Tokens are what each side reports (shoal `usage.output_tokens`, direct
  `usage.completion_tokens`). The ratio is the median over pairs of shoal / direct.
- streaming: time to first token is the wall time to the first chunk carrying text; decode
  tok/s is (tokens - 1) / (total - ttft). Direct's streamed tokens are its text-bearing chunks
  (one per token for ASCII text without stop strings).
- paired figures use only pairs whose two sides generated the same text, so that both did the
  same work; mismatches are counted and reported.

Prints one JSON object to stdout and draws a PNG (`--plot`). Progress goes to stderr.

    python bench/models.py [--model smollm2-135m] [--rounds 4] [--stream-rounds 2]

The defaults take about two minutes on 2 cores with SmolLM2-135M (about 30 tok/s there).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from shoal import Fleet
from shoal.messages import ChatRequest, Completed, Message, TextDelta
from shoal.models.llamacpp import LlamaCppModel
from shoal.settings import GGUFModelSpec

log = logging.getLogger("bench.models")

GOAL_TOK_S_RATIO = 0.97
GOAL_ADDED_LATENCY_MS = 2.0

# (system, user): short, varied, mostly ending well before max_tokens or right at it.
PROMPTS: tuple[tuple[str | None, str], ...] = (
    (None, "Name three primary colours."),
    (None, "Write a haiku about the sea."),
    (None, "What is 17 times 23? Answer with the number only."),
    (None, "Explain what a hash table is in two sentences."),
    ("You are a terse translator.", "Translate 'good morning' into French, Spanish and German."),
    (None, "Give a Python one-liner that reverses a string."),
    ("Answer in one short paragraph.", "Why is the sky blue?"),
    (None, "List four planets of the solar system, one per line."),
)
WARM_PROMPT: tuple[str | None, str] = (None, "Say hello.")


@dataclass
class Call:
    """One timed call on one side."""

    latency_s: float
    tokens: int
    text: str
    ttft_s: float | None = None  # streamed calls only
    inner_s: float | None = None  # shoal only: time spent inside the worker (compute_s)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.latency_s

    @property
    def decode_tok_s(self) -> float | None:
        if self.ttft_s is None or self.tokens < 2 or self.latency_s <= self.ttft_s:
            return None
        return (self.tokens - 1) / (self.latency_s - self.ttft_s)


# -- the two sides ------------------------------------------------------------------------------


def _messages(prompt: tuple[str | None, str]) -> list[dict[str, str]]:
    system, user = prompt
    out = [{"role": "system", "content": system}] if system else []
    out.append({"role": "user", "content": user})
    return out


class Shoal:
    def __init__(self, model: LlamaCppModel, max_tokens: int) -> None:
        self.model = model
        self.max_tokens = max_tokens

    def request(self, prompt: tuple[str | None, str], max_tokens: int) -> ChatRequest:
        messages = tuple(Message.model_validate(m) for m in _messages(prompt))
        return ChatRequest(messages=messages, max_tokens=max_tokens, temperature=0.0)

    async def call(self, prompt: tuple[str | None, str], max_tokens: int | None = None) -> Call:
        started = time.perf_counter()
        request = self.request(prompt, max_tokens or self.max_tokens)
        response = await self.model.generate(request)
        latency = time.perf_counter() - started
        return Call(latency, response.usage.output_tokens, response.text, None, response.compute_s)

    async def stream(self, prompt: tuple[str | None, str]) -> Call:
        ttft: float | None = None
        response = None
        started = time.perf_counter()
        request = self.request(prompt, self.max_tokens)
        async for event in self.model.stream(request):
            if isinstance(event, TextDelta):
                if ttft is None and event.text:
                    ttft = time.perf_counter() - started
            elif isinstance(event, Completed):
                response = event.response
        latency = time.perf_counter() - started
        assert response is not None, "a shoal stream ends with a Completed event"
        return Call(latency, response.usage.output_tokens, response.text, ttft, response.compute_s)


class Direct:
    # Greedy, and the sampler settings shoal passes to `Llama.generate` at temperature 0.
    SAMPLING: dict[str, Any] = {  # noqa: RUF012
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 40,
        "min_p": 0.0,
        "repeat_penalty": 1.0,
    }

    def __init__(self, llama: Any, max_tokens: int) -> None:
        self.llama = llama
        self.max_tokens = max_tokens

    async def call(self, prompt: tuple[str | None, str], max_tokens: int | None = None) -> Call:
        started = time.perf_counter()
        messages = _messages(prompt)
        result = self.llama.create_chat_completion(
            messages, max_tokens=max_tokens or self.max_tokens, **self.SAMPLING
        )
        latency = time.perf_counter() - started
        text = result["choices"][0]["message"]["content"] or ""
        return Call(latency, result["usage"]["completion_tokens"], text)

    async def stream(self, prompt: tuple[str | None, str]) -> Call:
        ttft: float | None = None
        pieces: list[str] = []
        started = time.perf_counter()
        messages = _messages(prompt)
        for chunk in self.llama.create_chat_completion(
            messages, max_tokens=self.max_tokens, stream=True, **self.SAMPLING
        ):
            piece = chunk["choices"][0]["delta"].get("content")
            if piece:
                if ttft is None:
                    ttft = time.perf_counter() - started
                pieces.append(piece)
        latency = time.perf_counter() - started
        return Call(latency, len(pieces), "".join(pieces), ttft)


# -- running ------------------------------------------------------------------------------------


Side = Callable[[tuple[str | None, str]], Any]


async def interleaved(
    shoal: Side,
    direct: Side,
    prompts: Sequence[tuple[str | None, str]],
    rounds: int,
    label: str,
    *,
    repeat: bool = False,
) -> list[list[tuple[Call, Call]]]:
    """pairs[p][r] = (shoal, direct) for prompt p in round r; who goes first alternates.

    Round after round over all prompts; with `repeat`, all rounds of one prompt in a row instead,
    so that from the second round on each side finds the whole prompt in its KV cache.
    """
    pairs: list[list[tuple[Call, Call]]] = [[] for _ in prompts]
    order = [(r, p) for r in range(rounds) for p in range(len(prompts))]
    if repeat:
        order.sort(key=lambda rp: (rp[1], rp[0]))
    for r, p in order:
        if (r + p) % 2 == 0:
            s = await shoal(prompts[p])
            d = await direct(prompts[p])
        else:
            d = await direct(prompts[p])
            s = await shoal(prompts[p])
        pairs[p].append((s, d))
    log.info("%s: %d rounds done", label, rounds)
    return pairs


def _median(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def _r(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def summarise(pairs: list[list[tuple[Call, Call]]], streamed: bool) -> dict[str, Any]:
    flat = [pair for per_prompt in pairs for pair in per_prompt]
    same = [(s, d) for s, d in flat if s.text == d.text]
    token_mismatch = sum(1 for s, d in flat if s.tokens != d.tokens)
    out: dict[str, Any] = {
        "calls_per_side": len(flat),
        "pairs_compared": len(same),
        "text_mismatches": len(flat) - len(same),
        "token_count_mismatches": token_mismatch,
        "latency_ms": {
            "shoal": _ms(_median([s.latency_s for s, _ in flat])),
            "direct": _ms(_median([d.latency_s for _, d in flat])),
        },
        "added_latency_ms": _ms(_median([s.latency_s - d.latency_s for s, d in same])),
        "added_latency_ms_mean": _ms(
            statistics.fmean([s.latency_s - d.latency_s for s, d in same]) if same else None
        ),
        "tok_s": {
            "shoal": _r(_median([s.tok_s for s, _ in flat])),
            "direct": _r(_median([d.tok_s for _, d in flat])),
        },
        "tok_s_ratio": _r(_median([s.tok_s / d.tok_s for s, d in same]), 4),
    }
    out["tok_s_ratio_of_medians"] = (
        _r(out["tok_s"]["shoal"] / out["tok_s"]["direct"], 4) if out["tok_s"]["direct"] else None
    )
    # Time shoal spends outside its worker's generation loop (thread hop, queueing, result copy).
    out["shoal_outside_worker_ms"] = _ms(
        _median([s.latency_s - s.inner_s for s, _ in flat if s.inner_s is not None])
    )
    if streamed:
        out["ttft_ms"] = {
            "shoal": _ms(_median([s.ttft_s for s, _ in flat])),
            "direct": _ms(_median([d.ttft_s for _, d in flat])),
        }
        out["added_ttft_ms"] = _ms(
            _median(
                [
                    s.ttft_s - d.ttft_s
                    for s, d in same
                    if s.ttft_s is not None and d.ttft_s is not None
                ]
            )
        )
        out["decode_tok_s"] = {
            "shoal": _r(_median([s.decode_tok_s for s, _ in flat])),
            "direct": _r(_median([d.decode_tok_s for _, d in flat])),
        }
        out["decode_tok_s_ratio"] = _r(
            _median(
                [
                    s.decode_tok_s / d.decode_tok_s
                    for s, d in same
                    if s.decode_tok_s is not None and d.decode_tok_s
                ]
            ),
            4,
        )
    return out


def per_prompt(
    prompts: Sequence[tuple[str | None, str]],
    calls: list[list[tuple[Call, Call]]],
    streams: list[list[tuple[Call, Call]]],
) -> list[dict[str, Any]]:
    rows = []
    for p, prompt in enumerate(prompts):
        row: dict[str, Any] = {
            "prompt": prompt[1],
            "system": prompt[0],
            "output_tokens": {
                "shoal": statistics.median_low([s.tokens for s, _ in calls[p]]),
                "direct": statistics.median_low([d.tokens for _, d in calls[p]]),
            },
            "latency_ms": {
                "shoal": _ms(_median([s.latency_s for s, _ in calls[p]])),
                "direct": _ms(_median([d.latency_s for _, d in calls[p]])),
            },
            "text_mismatches": sum(1 for s, d in calls[p] if s.text != d.text),
        }
        if streams[p]:
            row["stream_ttft_ms"] = {
                "shoal": _ms(_median([s.ttft_s for s, _ in streams[p]])),
                "direct": _ms(_median([d.ttft_s for _, d in streams[p]])),
            }
        rows.append(row)
    return rows


def plot(path: Path, rows: list[dict[str, Any]], model_id: str, summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{i + 1}" for i in range(len(rows))]
    xs = list(range(len(rows)))
    width = 0.4
    has_stream = all("stream_ttft_ms" in row for row in rows)
    fig, axes = plt.subplots(1, 2 if has_stream else 1, figsize=(12 if has_stream else 7, 4.5))
    axes = list(axes) if has_stream else [axes]
    panels = [("latency_ms", "median latency per call (ms)")]
    if has_stream:
        panels.append(("stream_ttft_ms", "median streamed time to first token (ms)"))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for offset, side, colour in (
            (-width / 2, "shoal", "tab:blue"),
            (width / 2, "direct", "tab:orange"),
        ):
            ax.bar(
                [x + offset for x in xs],
                [row[key][side] or 0 for row in rows],
                width,
                label=side,
                color=colour,
            )
        ax.set_xticks(xs, labels)
        ax.set_xlabel("prompt")
        ax.set_title(title)
        ax.legend()
    goals = summary["goals"]
    fig.suptitle(
        f"shoal LlamaCppModel vs llama-cpp-python, {model_id}: "
        f"added latency {goals['added_latency_ms']} ms/call, tok/s ratio {goals['tok_s_ratio']}"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _llama_settings(llama: Any) -> dict[str, Any]:
    params = llama.context_params
    return {
        "n_ctx": llama.n_ctx(),
        "n_threads": params.n_threads,
        "n_threads_batch": params.n_threads_batch,
        "n_batch": params.n_batch,
        "chat_template": bool(llama.metadata.get("tokenizer.chat_template")),
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    from llama_cpp import Llama

    began = time.perf_counter()
    load_start = os.getloadavg()
    fleet = Fleet()
    spec = fleet.spec(args.model)
    if not isinstance(spec, GGUFModelSpec):
        raise SystemExit(f"model {args.model!r} is not a local GGUF model")
    card = fleet.card(args.model)
    path = fleet.gguf_path(args.model)
    threads = spec.threads or os.cpu_count() or 1
    batch = spec.batch

    model = fleet.model(args.model)
    assert isinstance(model, LlamaCppModel)
    started = time.perf_counter()
    await model.load()
    shoal_load = time.perf_counter() - started

    started = time.perf_counter()
    llama = Llama(
        model_path=str(path.resolve()),
        n_ctx=card.context,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=batch,
        n_gpu_layers=0,
        logits_all=False,
        verbose=False,
    )
    direct_load = time.perf_counter() - started

    # Read back what each loaded llama.cpp context actually got (shoal's through its instance).
    settings = {
        "shoal": _llama_settings(model._instance.llama),
        "direct": _llama_settings(llama),
    }
    if settings["shoal"] != settings["direct"]:
        raise SystemExit(f"the two sides run with different settings: {settings}")

    shoal = Shoal(model, args.max_tokens)
    direct = Direct(llama, args.max_tokens)
    prompts = PROMPTS[: args.prompts]

    # Page the weights in, fill caches, start the thread pools.
    for _ in range(2):
        await shoal.call(WARM_PROMPT, max_tokens=8)
        await direct.call(WARM_PROMPT, max_tokens=8)
    if args.stream_rounds:
        await shoal.stream(WARM_PROMPT)
        await direct.stream(WARM_PROMPT)
    log.info("warm; %d prompts x %d rounds", len(prompts), args.rounds)

    short: list[list[tuple[Call, Call]]] = [[] for _ in prompts]
    if args.short_rounds:
        short = await interleaved(
            functools.partial(shoal.call, max_tokens=args.short_tokens),
            functools.partial(direct.call, max_tokens=args.short_tokens),
            prompts,
            args.short_rounds,
            "short calls",
            repeat=True,
        )
    calls = await interleaved(shoal.call, direct.call, prompts, args.rounds, "calls")
    streams: list[list[tuple[Call, Call]]] = [[] for _ in prompts]
    if args.stream_rounds:
        streams = await interleaved(
            shoal.stream, direct.stream, prompts, args.stream_rounds, "streams"
        )

    summary: dict[str, Any] = {
        "bench": "models",
        "model": args.model,
        "gguf": str(path),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "llama_cpp_python": metadata.version("llama-cpp-python"),
            "shoal": metadata.version("shoal"),
            "loadavg_start": [round(x, 2) for x in load_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        },
        "settings": {
            **settings["direct"],
            "max_tokens": args.max_tokens,
            "temperature": 0.0,
            "rounds": args.rounds,
            "short_rounds": args.short_rounds,
            "short_tokens": args.short_tokens,
            "stream_rounds": args.stream_rounds,
            "prompts": len(prompts),
            "tok_s": "output tokens / wall latency per call, both sides; ratio = median of "
            "per-pair shoal/direct over pairs with identical text",
            "added_latency": "median per-pair shoal - direct latency of the short calls "
            "(max_tokens=short_tokens, each prompt repeated so it is cached), where "
            "llama.cpp's own noise is smallest",
        },
        "load_s": {"shoal": _r(shoal_load, 3), "direct": _r(direct_load, 3)},
        "calls": summarise(calls, streamed=False),
    }
    if args.short_rounds:
        summary["short_calls"] = summarise(short, streamed=False)
    if args.stream_rounds:
        summary["stream"] = summarise(streams, streamed=True)
    rows = per_prompt(prompts, calls, streams)
    summary["per_prompt"] = rows

    c = summary["calls"]
    added = summary["short_calls"]["added_latency_ms"] if args.short_rounds else None
    if added is None:
        added = c["added_latency_ms"]
    ratio_met = c["tok_s_ratio"] is not None and c["tok_s_ratio"] >= GOAL_TOK_S_RATIO
    added_met = added is not None and added <= GOAL_ADDED_LATENCY_MS
    summary["goals"] = {
        "tok_s_ratio_min": GOAL_TOK_S_RATIO,
        "added_latency_ms_max": GOAL_ADDED_LATENCY_MS,
        "tok_s_ratio": c["tok_s_ratio"],
        "added_latency_ms": added,
        "added_latency_ms_long_calls": c["added_latency_ms"],
        "tok_s_ratio_met": ratio_met,
        "added_latency_met": added_met,
        "met": ratio_met and added_met,
    }
    if args.stream_rounds:
        s = summary["stream"]
        summary["goals"]["stream_decode_tok_s_ratio_met"] = (
            s["decode_tok_s_ratio"] is not None and s["decode_tok_s_ratio"] >= GOAL_TOK_S_RATIO
        )
        summary["goals"]["stream_added_ttft_met"] = (
            s["added_ttft_ms"] is not None and s["added_ttft_ms"] <= GOAL_ADDED_LATENCY_MS
        )

    if args.plot is not None:
        plot(args.plot, rows, args.model, summary)
        summary["plot"] = str(args.plot)
    summary["wall_s"] = _r(time.perf_counter() - began, 1)
    await fleet.aclose()
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a local model of the fleet")
    parser.add_argument("--rounds", type=int, default=4, help="non-streamed rounds per prompt")
    parser.add_argument("--stream-rounds", type=int, default=2, help="streamed rounds (0: none)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument(
        "--short-rounds", type=int, default=8, help="rounds of short calls for added latency"
    )
    parser.add_argument("--short-tokens", type=int, default=1, help="max_tokens of a short call")
    parser.add_argument(
        "--prompts", type=int, default=len(PROMPTS), help=f"use the first N of {len(PROMPTS)}"
    )
    parser.add_argument("--plot", type=Path, default=Path("bench/out/models.png"))
    parser.add_argument("--no-plot", dest="plot", action="store_const", const=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(json.dumps(asyncio.run(bench(args)), indent=2))


if __name__ == "__main__":
    main()
