"""Structured (JSON-schema) output: shoal's greedy grammar sampler against llama-cpp-python's.

The thing a user would use instead is llama-cpp-python's own `create_chat_completion` with a
grammar built from the schema (`LlamaGrammar.from_json_schema`, as shoal builds it), which
filters the whole vocabulary through the grammar before every token. Both sides load the same
GGUF file with the same settings in one process, answer the same prompts greedily (the rental
assistant's criteria and scorer prompts, with their schemas), interleaved, the order alternating
per round. Figures are medians over pairs whose two texts are identical (mismatches counted):

- ms per output token: each side first answers the prompt with max_tokens=1, so that the prompt
  is in its cache; the measured call then evaluates one prompt token and generates, and its
  wall latency over its output tokens is the time per token;
- the ratio of shoal's ms per token to direct's, and of whole-call latency.

    python bench/json_decode.py [--model qwen2.5-coder-0.5b] [--rounds 3]

Prints one JSON object to stdout; progress to stderr. About two minutes per model on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from typing import Any

from shoal import Fleet
from shoal.messages import ChatRequest, Message
from shoal.models.llamacpp import LlamaCppModel
from shoal.pipeline.graph import ModelStep
from shoal.settings import GGUFModelSpec
from shoal_examples.rental import pipeline as rental
from shoal_examples.rental.data import load_listings, review_sample

REQUESTS = [
    "quiet 2-bedroom near downtown under $150 with parking",
    "family of 5 needs a whole house with a kitchen and washer, up to $300 a night",
    "close to the university, 2 guests, kitchen, under $100",
]


def prompts() -> list[tuple[str, str, dict[str, Any], int]]:
    """(system, user, schema, max_tokens): the criteria step's and the scorer's."""
    pipeline = rental.build()
    read, scores = pipeline.steps["read"], pipeline.steps["scores"]
    assert isinstance(read, ModelStep)
    assert isinstance(scores, ModelStep)
    out = []
    for request in REQUESTS:
        out.append(
            (
                read.system or "",
                read.prompt.format(request=request),
                rental.Reading.model_json_schema(),
                read.max_tokens,
            )
        )
    for listing in sorted(load_listings("albany"), key=lambda x: -x.reviews)[:3]:
        card = rental.Finalist(listing=listing, reviews=review_sample("albany", listing.id)).card()
        user = scores.prompt.format(
            request=REQUESTS[0], wishes="parking (required); quiet", item=card
        )
        out.append((scores.system or "", user, rental.Fit.model_json_schema(), scores.max_tokens))
    return out


async def shoal_call(
    model: LlamaCppModel, p: tuple[str, str, dict[str, Any], int], n: int
) -> tuple[float, int, str]:
    system, user, schema, _ = p
    request = ChatRequest(
        messages=(Message(role="system", content=system), Message(role="user", content=user)),
        max_tokens=n,
        json_schema=schema,
    )
    started = time.perf_counter()
    try:
        response = await model.generate(request)
    except Exception:  # cut short at max_tokens=1: only its latency counts
        return time.perf_counter() - started, 1, ""
    return time.perf_counter() - started, response.usage.output_tokens, response.text


def direct_call(
    llama: Any, p: tuple[str, str, dict[str, Any], int], n: int
) -> tuple[float, int, str]:
    from llama_cpp.llama_grammar import LlamaGrammar

    system, user, schema, _ = p
    started = time.perf_counter()
    result = llama.create_chat_completion(
        [{"role": "system", "content": system}, {"role": "user", "content": user}],
        max_tokens=n,
        temperature=0.0,
        top_p=1.0,
        top_k=40,
        min_p=0.0,
        repeat_penalty=1.0,
        grammar=LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False),
    )
    text = result["choices"][0]["message"]["content"] or ""
    return time.perf_counter() - started, result["usage"]["completion_tokens"], text


async def bench(model_id: str, rounds: int) -> dict[str, Any]:
    from llama_cpp import Llama

    fleet = Fleet()
    spec = fleet.spec(model_id)
    if not isinstance(spec, GGUFModelSpec):
        raise SystemExit(f"model {model_id!r} is not a local GGUF model")
    model = fleet.model(model_id)
    assert isinstance(model, LlamaCppModel)
    await model.load()
    threads = spec.threads or os.cpu_count() or 1
    llama = Llama(
        model_path=str(fleet.gguf_path(model_id).resolve()),
        n_ctx=fleet.card(model_id).context,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=spec.batch,
        n_gpu_layers=0,
        verbose=False,
    )
    per_token: list[float] = []
    whole: list[float] = []
    mismatches = 0
    for r in range(rounds):
        for i, p in enumerate(prompts()):
            sides = ["shoal", "direct"] if (r + i) % 2 == 0 else ["direct", "shoal"]
            got: dict[str, tuple[float, int, str]] = {}
            for side in sides:
                if side == "shoal":
                    await shoal_call(model, p, 1)  # the prompt into the cache
                    got[side] = await shoal_call(model, p, p[3])
                else:
                    direct_call(llama, p, 1)
                    got[side] = direct_call(llama, p, p[3])
            if got["shoal"][2] != got["direct"][2]:
                mismatches += 1
                continue
            tokens = got["shoal"][1]
            if tokens < 4:
                continue
            ms = {s: got[s][0] / tokens * 1000 for s in got}
            per_token.append(ms["shoal"] / ms["direct"])
            whole.append(got["shoal"][0] / got["direct"][0])
            print(
                f"[{model_id} round {r + 1}, prompt {i + 1}] {tokens} tokens: "
                f"{ms['shoal']:.1f} vs {ms['direct']:.1f} ms/token",
                file=sys.stderr,
            )
    await fleet.aclose()
    return {
        "model": model_id,
        "pairs": len(per_token),
        "text_mismatches": mismatches,
        "ms_per_token_ratio_median": round(statistics.median(per_token), 3) if per_token else None,
        "call_latency_ratio_median": round(statistics.median(whole), 3) if whole else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="default: the small and large models")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    models = args.model or [rental.SMALL, rental.LARGE]
    results = [asyncio.run(bench(m, args.rounds)) for m in models]
    print(json.dumps({"load_avg": os.getloadavg(), "models": results}, indent=2))


if __name__ == "__main__":
    main()
