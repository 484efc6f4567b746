"""The 135M model, for real, in process."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import jsonschema
import pytest

from shoal import (
    ChatRequest,
    Completed,
    ContextWindowExceededError,
    Model,
    ModelCard,
    ModelNotInstalledError,
    OutputTruncatedError,
    OverloadedError,
    TextDelta,
)
from shoal.models.llamacpp import (
    FreeCores,
    GrammarCache,
    LlamaCppModel,
    grammar_cache_stats,
)

LISTING_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "bedrooms": {"type": "integer"},
        "parking": {"type": "boolean"},
    },
    "required": ["city", "bedrooms", "parking"],
    "additionalProperties": False,
}


async def test_answers_a_real_prompt(tiny: Model) -> None:
    response = await tiny.generate(ChatRequest.of("What is the capital of France?", max_tokens=24))
    assert response.model == "smollm2-135m"
    assert response.text.strip()
    assert response.usage.input_tokens > 5
    assert 0 < response.usage.output_tokens <= 24
    assert response.finish_reason in ("stop", "length")
    assert 0 < response.ttft_s <= response.compute_s <= response.latency_s  # type: ignore[operator]
    assert response.cost_usd == pytest.approx(tiny.card.cost(response.usage, response.compute_s))
    assert response.cost_usd > 0


async def test_greedy_output_is_deterministic(tiny: Model) -> None:
    request = ChatRequest.of("Name a fruit.", max_tokens=12)
    first, second = await tiny.generate(request), await tiny.generate(request)
    assert first.text == second.text
    assert first.usage == second.usage


async def test_stream_yields_tokens_in_order_and_the_same_answer(tiny: Model) -> None:
    request = ChatRequest.of("Count from one to ten in words.", max_tokens=40)
    expected = await tiny.generate(request)
    deltas: list[str] = []
    arrival: list[float] = []
    completed = None
    async for event in tiny.stream(request):
        if isinstance(event, TextDelta):
            deltas.append(event.text)
            arrival.append(time.perf_counter())
        else:
            assert isinstance(event, Completed)
            completed = event.response
    assert completed is not None
    assert len(deltas) > 3, "a stream of one chunk is not streaming"
    assert arrival == sorted(arrival)
    assert "".join(deltas) == completed.text == expected.text
    assert completed.usage == expected.usage
    # Streamed and non-streamed calls are costed by the same rule.
    assert completed.cost_usd == pytest.approx(tiny.card.cost(completed.usage, completed.compute_s))


async def test_json_schema_output_parses_and_validates(tiny: Model) -> None:
    request = ChatRequest.of(
        "Describe a 2-bedroom apartment in Albany with parking as JSON.",
        max_tokens=120,
        json_schema=LISTING_SCHEMA,
    )
    response = await tiny.generate(request)
    value = json.loads(response.text)
    jsonschema.validate(value, LISTING_SCHEMA)


CRITERIA_SCHEMA = {
    "type": "object",
    "properties": {
        "max_price": {"anyOf": [{"type": "number"}, {"type": "null"}]},
        "area": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "must_haves": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "verdict": {"enum": ["poor", "fair", "good", "great"]},
    },
    "required": ["max_price", "area", "must_haves", "verdict"],
}


@pytest.mark.parametrize(
    ("prompt", "schema"),
    [
        ("Describe a 2-bedroom apartment in Albany with parking as JSON.", LISTING_SCHEMA),
        ("A quiet flat downtown under $120 with wifi and a desk: what is wanted?", CRITERIA_SCHEMA),
        ("Write a poem about the sea.", CRITERIA_SCHEMA),  # far from JSON: many refusals
    ],
)
async def test_greedy_json_takes_the_same_tokens_as_llama_cpps_grammar_sampler(
    tiny: Model, monkeypatch: pytest.MonkeyPatch, prompt: str, schema: dict[str, object]
) -> None:
    request = ChatRequest.of(prompt, max_tokens=80, json_schema=schema, logprobs=True)
    fast = await tiny.generate(request)
    monkeypatch.setattr(LlamaCppModel, "fast_grammar", False)
    library = await tiny.generate(request)
    assert fast.text == library.text
    assert fast.usage == library.usage
    # Token for token (their logprobs differ in rounding: the second call reuses the first
    # one's prompt cache, and so evaluates in other batches).
    assert fast.logprobs
    assert library.logprobs
    assert [lp.token for lp in fast.logprobs] == [lp.token for lp in library.logprobs]
    jsonschema.validate(json.loads(fast.text), schema)


async def test_json_properties_come_in_the_schemas_order(tiny: Model) -> None:
    schema = {
        "type": "object",
        "properties": {"verdict": {"enum": ["good", "bad"]}, "because": {"type": "string"}},
        "required": ["verdict", "because"],
    }
    request = ChatRequest.of("Is Albany nice? Answer as JSON.", max_tokens=60, json_schema=schema)
    text = (await tiny.generate(request)).text
    assert list(json.loads(text)) == ["verdict", "because"]


async def test_json_object_mode_gives_an_object(tiny: Model) -> None:
    request = ChatRequest.of(
        "Give a colour and its hex code as JSON.", max_tokens=60, json_object=True
    )
    assert isinstance(json.loads((await tiny.generate(request)).text), dict)


async def test_json_cut_short_by_max_tokens_is_an_error_not_an_answer(tiny: Model) -> None:
    request = ChatRequest.of("Describe an apartment.", max_tokens=4, json_schema=LISTING_SCHEMA)
    with pytest.raises(OutputTruncatedError) as caught:
        await tiny.generate(request)
    assert caught.value.text  # the partial output is kept for the caller to inspect
    with pytest.raises(OutputTruncatedError):
        async for _ in tiny.stream(request):
            pass


async def test_logprobs_cover_every_generated_token(tiny: Model) -> None:
    request = ChatRequest.of(
        "Is 'dirty and noisy' positive or negative?", max_tokens=8, logprobs=True, top_logprobs=3
    )
    response = await tiny.generate(request)
    assert response.logprobs is not None
    assert len(response.logprobs) == response.usage.output_tokens
    assert "".join(lp.token for lp in response.logprobs) == response.text
    for lp in response.logprobs:
        assert lp.logprob <= 0.0
        assert len(lp.top) == 3
        scores = [score for _, score in lp.top]
        assert scores == sorted(scores, reverse=True)
        # Greedy decoding picks the most likely token.
        assert lp.logprob == pytest.approx(scores[0])
    plain = await tiny.generate(request.model_copy(update={"logprobs": False, "top_logprobs": 0}))
    assert plain.text == response.text
    assert plain.logprobs is None


async def test_stop_sequences_end_the_answer(tiny: Model) -> None:
    request = ChatRequest.of("List the numbers 1 to 9, one per line.", max_tokens=60)
    full = await tiny.generate(request)
    assert "4" in full.text
    stopped = await tiny.generate(request.model_copy(update={"stop": ("4",)}))
    assert stopped.finish_reason == "stop"
    assert "4" not in stopped.text
    assert full.text.startswith(stopped.text)
    streamed = [e async for e in tiny.stream(request.model_copy(update={"stop": ("4",)}))]
    assert "".join(e.text for e in streamed if isinstance(e, TextDelta)) == stopped.text


async def test_prompt_over_the_context_window_is_rejected(tiny: Model) -> None:
    long_prompt = "apartment " * (tiny.card.context + 100)
    with pytest.raises(ContextWindowExceededError) as caught:
        await tiny.generate(ChatRequest.of(long_prompt, max_tokens=16))
    assert caught.value.prompt_tokens > tiny.card.context
    assert caught.value.context == tiny.card.context
    # max_tokens counts too: a prompt that fits but leaves no room to answer is rejected.
    with pytest.raises(ContextWindowExceededError):
        await tiny.generate(ChatRequest.of("hello", max_tokens=tiny.card.context))
    # And the model still answers afterwards.
    assert (await tiny.generate(ChatRequest.of("hello", max_tokens=4))).text


def test_missing_gguf_file(tiny_card: ModelCard, tmp_path: Path) -> None:
    with pytest.raises(ModelNotInstalledError, match="does not exist"):
        LlamaCppModel(tiny_card, path=tmp_path / "absent.gguf")


async def test_a_file_that_is_not_gguf_is_a_clear_error(
    tiny_card: ModelCard, tmp_path: Path
) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf file" * 100)
    model = LlamaCppModel(tiny_card, path=bogus)
    with pytest.raises(ModelNotInstalledError, match="cannot load"):
        await model.generate(ChatRequest.of("hi"))


async def test_models_on_one_file_share_one_loaded_instance(
    tiny: LlamaCppModel, tiny_card: ModelCard, tiny_path: Path
) -> None:
    other = LlamaCppModel(tiny_card, path=tiny_path)
    assert other._instance is tiny._instance


async def test_concurrent_calls_are_served_one_at_a_time_and_all_answered(tiny: Model) -> None:
    requests = [ChatRequest.of(f"Say the number {i}.", max_tokens=6) for i in range(6)]
    responses = await asyncio.gather(*(tiny.generate(r) for r in requests))
    assert all(r.text for r in responses)
    # Queueing shows in latency, never in the compute time a call is charged for.
    assert max(r.latency_s for r in responses) > max(r.compute_s for r in responses)


async def test_a_full_queue_answers_overloaded(tiny_card: ModelCard, tiny_path: Path) -> None:
    model = LlamaCppModel(tiny_card, path=tiny_path, max_queue=1)
    request = ChatRequest.of("Write a long poem about the sea.", max_tokens=30)
    results = await asyncio.gather(
        *(model.generate(request) for _ in range(4)), return_exceptions=True
    )
    overloaded = [r for r in results if isinstance(r, OverloadedError)]
    assert overloaded, results
    assert all(e.retryable for e in overloaded)
    assert sum(1 for r in results if not isinstance(r, Exception)) >= 2


async def test_a_stream_on_a_full_queue_answers_overloaded(
    tiny_card: ModelCard, tmp_path: Path
) -> None:
    weights = tmp_path / "queued.gguf"  # never loaded: the queue refuses the call first
    weights.write_bytes(b"")
    model = LlamaCppModel(tiny_card, path=weights, max_queue=0)
    model._instance.pending = 1  # one call running, none may wait
    with pytest.raises(OverloadedError):
        async with asyncio.timeout(5):
            async for _ in model.stream(ChatRequest.of("hi", max_tokens=2)):
                pass
    model._instance.pending = 0


async def test_a_stream_left_early_stops_generating(tiny: Model) -> None:
    probe = await tiny.generate(ChatRequest.of("Write a story about a harbour.", max_tokens=20))
    per_token = probe.compute_s / probe.usage.output_tokens
    request = ChatRequest.of("Write a very long story about a harbour.", max_tokens=400)
    async for event in tiny.stream(request):
        assert isinstance(event, TextDelta)
        break
    # The next call waits for a token or two of abandoned work, not for 400 tokens nobody reads.
    quick = await tiny.generate(ChatRequest.of("Say hi.", max_tokens=3))
    waited = quick.latency_s - quick.compute_s
    assert waited < 100 * per_token, (waited, per_token)


async def test_sampling_with_a_seed_is_reproducible(tiny: Model) -> None:
    request = ChatRequest.of("Invent a name for a cat.", max_tokens=10, temperature=1.0, seed=7)
    assert (await tiny.generate(request)).text == (await tiny.generate(request)).text


async def test_a_cost_cap_stops_generation_in_time(tiny: Model) -> None:
    per_hour = tiny.card.price.per_hour  # type: ignore[union-attr]
    cap = per_hour * 0.5 / 3600  # half a second of compute
    request = ChatRequest.of("Write a long story about a harbour.", max_tokens=2000)
    capped = await tiny.generate(request.model_copy(update={"max_cost_usd": cap}))
    assert capped.finish_reason == "length"
    assert 1 <= capped.usage.output_tokens < 2000
    # It stops before a token expected to pass the cap; only a first token (the prompt's cost)
    # or one unusually slow token on a busy host can go over.
    assert capped.usage.output_tokens == 1 or capped.cost_usd <= cap * 2


async def test_calls_cancelled_in_the_queue_give_their_slot_back(
    tiny_card: ModelCard, tiny_path: Path
) -> None:
    model = LlamaCppModel(tiny_card, path=tiny_path, max_queue=2)
    request = ChatRequest.of("Write a poem about the sea.", max_tokens=20)
    for _ in range(3):  # more rounds than the queue has slots: a leak would overload it
        waiting = [asyncio.ensure_future(model.generate(request)) for _ in range(3)]
        await asyncio.sleep(0.05)
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
    assert (await model.generate(ChatRequest.of("Hi", max_tokens=2))).text
    await asyncio.sleep(0.1)
    assert model._instance.pending == 0


def _long_prompt(topic: str, words: int = 700) -> str:
    return f"About {topic}: " + " ".join(f"harbour{i % 50}" for i in range(words))


async def test_a_cost_cap_stops_prompt_evaluation_within_a_batch(tiny: Model) -> None:
    full = await tiny.generate(ChatRequest.of(_long_prompt("boats"), max_tokens=1))
    per_token = full.compute_s / full.usage.input_tokens
    cap = full.cost_usd / 4  # a quarter of what the prompt alone costs
    request = ChatRequest.of(_long_prompt("ships"), max_tokens=50, max_cost_usd=cap)
    capped = await tiny.generate(request)
    assert (capped.finish_reason, capped.usage.output_tokens, capped.text) == ("length", 0, "")
    # It stopped before the chunk that would pass the cap: at most one chunk over, and on a busy
    # host one more chunk of slack.
    batch = tiny._instance.key.batch  # type: ignore[attr-defined]
    slack = tiny.card.price.per_hour * 2 * batch * per_token / 3600  # type: ignore[union-attr]
    assert capped.cost_usd <= cap + slack


async def test_a_call_cancelled_during_its_prompt_stops_within_a_batch(tiny: Model) -> None:
    full = await tiny.generate(ChatRequest.of(_long_prompt("gulls"), max_tokens=1))
    events = tiny.stream(ChatRequest.of(_long_prompt("nets"), max_tokens=50))
    task = asyncio.ensure_future(anext(events))  # type: ignore[arg-type]
    await asyncio.sleep(full.compute_s / 5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await events.aclose()  # type: ignore[attr-defined]
    quick = await tiny.generate(ChatRequest.of("Say hi.", max_tokens=3))
    waited = quick.latency_s - quick.compute_s
    # The rest of the prompt (about 4/5 of it) is not evaluated for nobody.
    assert waited < full.compute_s / 2, (waited, full.compute_s)


def test_the_grammar_cache_drops_the_least_recently_used() -> None:
    cache = GrammarCache(max_entries=3, max_bytes=100)
    for key in ("a" * 10, "b" * 10, "c" * 10):
        cache.put(key, key.upper())
    assert cache.get("a" * 10) == "A" * 10  # now the most recently used
    cache.put("d" * 10, "D")
    assert list(cache.entries) == ["c" * 10, "a" * 10, "d" * 10]
    cache.put("e" * 80, "E")  # over the byte bound: the oldest go until it fits
    assert list(cache.entries) == ["a" * 10, "d" * 10, "e" * 80]
    assert (cache.bytes, cache.evictions) == (100, 2)
    cache.put("f" * 101, "F")  # larger than the whole cache: not kept
    assert "f" * 101 not in cache.entries


async def test_compiled_grammars_stay_bounded(tiny: Model) -> None:
    assert isinstance(tiny, LlamaCppModel)
    await tiny.load()
    before = grammar_cache_stats()
    for i in range(GrammarCache.max_entries + 6):
        schema = {"type": "object", "properties": {f"field_{i}": {"type": "integer"}}}
        tiny._grammar(ChatRequest.of("x", json_schema=schema))
    entries, size, evictions = grammar_cache_stats()
    assert entries <= GrammarCache.max_entries
    assert evictions >= before[2] + 6
    assert size <= GrammarCache.max_bytes
    from shoal.server.metrics import Metrics  # the server shows the same figures

    scraped = Metrics()
    assert scraped.sample("shoal_grammar_cache_evictions_total") == evictions
    assert scraped.sample("shoal_grammar_cache_entries") == entries


def test_threads_follow_the_cores_other_programs_leave_free(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import collections

    import psutil

    machine = collections.namedtuple("machine", "user system idle iowait")
    own = collections.namedtuple("own", "user system children_user children_system")
    clock = {"now": 100.0, "busy": 0.0, "own": 0.0}
    monkeypatch.setattr(time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(psutil, "cpu_times", lambda: machine(clock["busy"], 0.0, 50.0, 0.0))

    class Me:
        def cpu_times(self) -> tuple[float, ...]:
            return own(clock["own"], 0.0, 0.0, 0.0)

    monkeypatch.setattr(psutil, "Process", Me)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 1.0, 1.0))
    cores = FreeCores(every_s=1.0)
    cores.cores = 4
    assert cores() == 3  # the first reading: the load over the last minute
    clock.update(now=102.0, busy=4.0, own=2.0)  # others used one core for two seconds
    assert cores() == 3
    clock.update(now=102.5, busy=100.0)  # within `every_s`: the last answer stands
    assert cores() == 3
    clock.update(now=104.0, busy=108.0, own=2.0)  # others held every core and more
    assert cores() == 1  # never fewer than one


async def test_a_prompt_the_context_holds_is_not_evaluated_again(tiny: Model) -> None:
    request = ChatRequest.of(_long_prompt("quays", words=150), max_tokens=1)
    first = await tiny.generate(request)
    again = await tiny.generate(request)
    assert again.text == first.text
    assert again.ttft_s is not None
    assert first.ttft_s is not None
    assert again.ttft_s < first.ttft_s / 3  # sampled from the cached state, nothing decoded
