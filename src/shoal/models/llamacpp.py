"""A GGUF model run in this process by llama.cpp (through llama-cpp-python), on the CPU.

One llama.cpp instance per model file per process, shared by every `LlamaCppModel` that points at
it. Each instance has one worker thread: llama.cpp calls are blocking and not thread-safe, so
they run there, off the event loop, one at a time; at most `max_queue` calls wait behind it.

Generation is a token loop over `Llama.generate` rather than `create_chat_completion`, which lets
shoal read each token's log-probability from the last logits for free (no `logits_all`), stop a
generation whose caller went away, and constrain output with a grammar built from the JSON schema
(llama-cpp-python ignores OpenAI's `json_schema` response format).

A long prompt is evaluated first, one batch (`batch` tokens) at a time, so a call whose caller
went away, or whose cost cap (`ChatRequest.max_cost_usd`) the next batch would pass, stops using
the CPU within one batch: a cancelled call overruns by at most one batch's compute, and a capped
call stops before the batch that would pass its cap (answering nothing, finish reason "length").
The batches are the ones llama.cpp itself would evaluate, so answers are the same token for
token; a prompt of one batch or less is evaluated whole, and its cost can pass the cap by that
one batch (the cap then stops generation before the first token after it).
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shoal.cards import ModelCard
from shoal.errors import (
    ConfigError,
    ContextWindowExceededError,
    InvalidRequestError,
    ModelNotInstalledError,
    OverloadedError,
)
from shoal.messages import (
    ChatRequest,
    ChatResponse,
    Completed,
    FinishReason,
    StreamEvent,
    TextDelta,
    TokenLogprob,
    Usage,
)
from shoal.models.base import Model
from shoal.models.output import check_json
from shoal.models.sampling import GreedyGrammarSampler

log = logging.getLogger(__name__)

Emit = Callable[[TextDelta], None]


class _Cancelled(Exception):
    """The caller stopped listening; generation stopped between two tokens or prompt chunks."""


class _CapReached(Exception):
    """The next prompt chunk would cost more than the caller allowed."""


@dataclass(frozen=True)
class _Key:
    path: str
    context: int
    threads: int
    batch: int


@dataclass
class _Instance:
    """One loaded llama.cpp model and the single thread allowed to touch it."""

    key: _Key
    executor: ThreadPoolExecutor
    lock: threading.Lock = field(default_factory=threading.Lock)
    pending: int = 0
    llama: Any = None
    formatter: Any = None
    load_s: float = 0.0
    grammars: GrammarCache = field(default_factory=lambda: GrammarCache())

    def __del__(self) -> None:
        self.executor.shutdown(wait=False)


@dataclass
class GrammarCache:
    """Compiled grammars by schema, least recently used first out: at most `max_entries`, and
    at most `max_bytes` of schema text (a compiled grammar grows with its schema)."""

    max_entries: int = 64
    max_bytes: int = 4 << 20
    entries: OrderedDict[str, Any] = field(default_factory=OrderedDict)
    bytes: int = 0
    evictions: int = 0

    def get(self, key: str) -> Any:
        found = self.entries.get(key)
        if found is not None:
            self.entries.move_to_end(key)
        return found

    def put(self, key: str, grammar: Any) -> None:
        if len(key) > self.max_bytes:
            return  # larger than the whole cache: compiled for this call only
        self.entries[key] = grammar
        self.bytes += len(key)
        while len(self.entries) > self.max_entries or self.bytes > self.max_bytes:
            old, _ = self.entries.popitem(last=False)
            self.bytes -= len(old)
            self.evictions += 1


def grammar_cache_stats() -> tuple[int, int, int]:
    """(entries, bytes of schema text, evictions) over every loaded model of this process."""
    with _instances_lock:
        caches = [inst.grammars for inst in _instances.values()]
    return (
        sum(len(c.entries) for c in caches),
        sum(c.bytes for c in caches),
        sum(c.evictions for c in caches),
    )


class FreeCores:
    """How many cores other processes leave free, from the machine's CPU time over the last
    moment less this process's own: llama.cpp's threads wait on each other at every barrier, so
    a thread on a core another program holds slows every token (two threads with one core taken
    ran a 1.5B model slower than one thread alone)."""

    def __init__(self, every_s: float = 1.0) -> None:
        self.every_s = every_s
        self.cores = os.cpu_count() or 1
        self._lock = threading.Lock()
        self._at = 0.0
        self._busy = self._own = 0.0
        self._free = self.cores

    def __call__(self) -> int:
        import psutil

        now = time.monotonic()
        with self._lock:
            if now - self._at < self.every_s:
                return self._free
            times = psutil.cpu_times()
            busy = sum(times) - times.idle - getattr(times, "iowait", 0.0)
            own = sum(psutil.Process().cpu_times()[:2])
            if self._at:
                wall = now - self._at
                others = max(0.0, (busy - self._busy) - (own - self._own)) / wall
            else:  # the first reading: the machine's load over the last minute
                others = os.getloadavg()[0]
            self._free = max(1, min(self.cores, round(self.cores - others)))
            self._at, self._busy, self._own = now, busy, own
            return self._free


free_cores = FreeCores()


# Loaded weights are a process resource (hundreds of MB each): one instance per file and
# settings, alive while any model uses it.
_instances: weakref.WeakValueDictionary[_Key, _Instance] = weakref.WeakValueDictionary()
_instances_lock = threading.Lock()


def _instance(key: _Key) -> _Instance:
    with _instances_lock:
        found = _instances.get(key)
        if found is None:
            found = _Instance(key, ThreadPoolExecutor(1, thread_name_prefix="llama"))
            _instances[key] = found
        return found


class LlamaCppModel(Model):
    # Greedy JSON through `GreedyGrammarSampler` (the same tokens, sooner); off: llama.cpp's
    # own grammar sampler.
    fast_grammar = True

    def __init__(
        self,
        card: ModelCard,
        *,
        path: str | Path,
        threads: int | None = None,
        batch: int = 512,
        max_queue: int = 64,
    ) -> None:
        self.card = card
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelNotInstalledError(f"model {card.id!r}: GGUF file {self.path} does not exist")
        self.max_queue = max_queue
        key = _Key(str(self.path.resolve()), card.context, threads or os.cpu_count() or 1, batch)
        self._instance = _instance(key)

    # -- loading (in the worker thread) --------------------------------------------------------

    @property
    def load_s(self) -> float:
        return self._instance.load_s

    async def load(self) -> None:
        """Load the weights now rather than on the first call."""
        free_cores()  # the first reading: the next ones measure from here
        await self._submit(lambda: self._loaded())

    def _loaded(self) -> Any:
        inst = self._instance
        if inst.llama is None:
            from llama_cpp import Llama
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            started = time.perf_counter()
            try:
                llama = Llama(
                    model_path=inst.key.path,
                    n_ctx=inst.key.context,
                    n_threads=inst.key.threads,
                    n_threads_batch=inst.key.threads,
                    n_batch=inst.key.batch,
                    n_gpu_layers=0,
                    logits_all=False,
                    verbose=False,
                )
            except ValueError as exc:  # llama-cpp-python's way of saying "could not load"
                raise ModelNotInstalledError(
                    f"model {self.id!r}: llama.cpp cannot load {inst.key.path}: {exc}"
                ) from exc
            template = llama.metadata.get("tokenizer.chat_template")
            if not template:
                raise ConfigError(
                    f"model {self.id!r} has no chat template in its GGUF metadata "
                    "(a base model, not a chat model)"
                )
            eos, bos = llama.token_eos(), llama.token_bos()
            inst.formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=llama._model.token_get_text(eos) if eos != -1 else "",
                bos_token=llama._model.token_get_text(bos) if bos != -1 else "",
                stop_token_ids=[eos],
            )
            inst.llama = llama
            inst.load_s = time.perf_counter() - started
            log.info("loaded %s in %.2f s", inst.key.path, inst.load_s)
        return inst.llama

    def _grammar(self, request: ChatRequest) -> Any:
        if not request.wants_json:
            return None
        from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

        # Not sorted: the grammar writes the properties in the schema's order, which is the
        # order the caller wants them generated in (a reason after the verdict it explains).
        key = json.dumps(request.json_schema) if request.json_schema else ""
        grammars = self._instance.grammars
        grammar = grammars.get(key)
        if grammar is None:
            try:
                grammar = (
                    LlamaGrammar.from_json_schema(key, verbose=False)
                    if key
                    else LlamaGrammar.from_string(JSON_GBNF, verbose=False)
                )
            except Exception as exc:  # the converter raises bare exceptions on bad schemas
                raise InvalidRequestError(f"unsupported JSON schema: {exc}") from exc
            grammars.put(key, grammar)
        return grammar

    # -- running on the worker thread ----------------------------------------------------------

    async def _submit(self, work: Callable[[], Any]) -> Any:
        inst = self._instance
        with inst.lock:
            if inst.pending >= self.max_queue + 1:
                raise OverloadedError(
                    f"{self.id}: {inst.pending} calls already queued for this model",
                    retry_after_s=1,
                )
            inst.pending += 1

        def release(_: object) -> None:
            # Runs when the job ends, fails, or is cancelled while still queued (a caller that
            # left): the slot is given back in every case.
            with inst.lock:
                inst.pending -= 1

        job = inst.executor.submit(work)
        job.add_done_callback(release)
        return await asyncio.wrap_future(job)

    def _generate_blocking(
        self, request: ChatRequest, emit: Emit | None, cancelled: threading.Event
    ) -> ChatResponse:
        llama = self._loaded()
        started = time.perf_counter()
        formatted = self._instance.formatter(
            messages=[{"role": m.role, "content": m.content} for m in request.messages]
        )
        prompt = llama.tokenize(
            formatted.prompt.encode("utf-8"), add_bos=not formatted.added_special, special=True
        )
        if len(prompt) + request.max_tokens > self.card.context:
            raise ContextWindowExceededError(
                self.id, len(prompt), request.max_tokens, self.card.context
            )
        grammar = self._grammar(request)
        threads = min(self._instance.key.threads, free_cores())
        llama._ctx.set_n_threads(threads, threads)
        try:
            self._prefill(llama, prompt, cancelled, started, self._compute_cap(request))
        except _CapReached:
            compute = time.perf_counter() - started
            usage = Usage(input_tokens=len(prompt), output_tokens=0)
            return ChatResponse(
                model=self.id,
                text="",
                finish_reason="length",
                usage=usage,
                latency_s=compute,
                compute_s=compute,
                ttft_s=compute,
                cost_usd=self.card.cost(usage, compute),
                logprobs=() if request.logprobs else None,
            )
        if request.seed is not None:
            llama.set_seed(request.seed)
        # Greedy JSON: a sampler that asks the grammar about the chosen token only, put where
        # `generate` builds its sampler chain (this instance is used by one thread at a time).
        greedy_json = grammar is not None and not request.temperature
        fast = GreedyGrammarSampler(llama, grammar) if greedy_json and self.fast_grammar else None
        if fast is not None:
            llama._init_sampler = lambda **_: fast
        tokens = llama.generate(
            prompt,
            temp=request.temperature,
            top_p=request.top_p,
            top_k=40,
            min_p=0.05 if request.temperature > 0 else 0.0,
            repeat_penalty=1.0,
            grammar=None if fast else grammar,
        )
        try:
            return self._decode(request, llama, prompt, tokens, emit, cancelled, started)
        finally:
            tokens.close()
            if fast is not None:
                del llama._init_sampler
                fast.close()

    def _prefill(
        self,
        llama: Any,
        prompt: list[int],
        cancelled: threading.Event,
        started: float,
        cap_s: float,
    ) -> None:
        """Evaluate the prompt's full batches but the last, reusing what the context already
        holds; `generate` then finds them cached and evaluates the last batch, so the batches
        are the ones llama.cpp would have made. Stops between batches when the caller went away
        or the cap would be passed."""
        if llama._is_recurrent or llama._is_hybrid:
            return  # their state cannot be cut back to a prefix: let `generate` evaluate
        held = llama.n_tokens
        common = 0
        for a, b in zip(llama._input_ids[:held], prompt, strict=False):
            if a != b:
                break
            common += 1
        batch = self._instance.key.batch
        last = common + (len(prompt) - 1 - common) // batch * batch  # where the last batch starts
        if last <= common:
            return  # one batch or less to evaluate (or all of it cached): `generate` does it
        llama.n_tokens = common
        todo = prompt[common:last]
        speed = self.card.measured.prompt_tok_s if self.card.measured else self.card.prompt_tok_s
        per_token = 1.0 / speed if speed else 0.0
        for i in range(0, len(todo), batch):
            if cancelled.is_set():
                raise _Cancelled
            chunk = todo[i : i + batch]
            elapsed = time.perf_counter() - started
            if elapsed + per_token * (len(chunk) + 1) > cap_s:
                raise _CapReached
            llama.eval(chunk)
            per_token = (time.perf_counter() - started) / (i + len(chunk))

    def _decode(
        self,
        request: ChatRequest,
        llama: Any,
        prompt: list[int],
        tokens: Any,
        emit: Emit | None,
        cancelled: threading.Event,
        started: float,
    ) -> ChatResponse:
        import llama_cpp

        vocab = llama._model.vocab
        ctx = llama._ctx.ctx
        n_vocab = llama.n_vocab()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        holdback = max((len(s) - 1 for s in request.stop), default=0)
        text, sent, n_out, cut = "", 0, 0, None
        ttft: float | None = None
        finish: FinishReason = "length"
        logprobs: list[TokenLogprob] = []
        pending_lp: list[TokenLogprob] = []
        cap_s = self._compute_cap(request)
        for token in tokens:
            if cancelled.is_set():
                raise _Cancelled
            now = time.perf_counter() - started
            if ttft is None:
                ttft = now
            elif now + (now - ttft) / n_out > cap_s:
                break  # the next token would cost more than the caller allowed: "length"
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                finish = "stop"
                break
            n_out += 1
            piece = llama.detokenize([token])
            if request.logprobs:
                logits = np.ctypeslib.as_array(
                    llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)
                )
                lp = _token_logprob(llama, logits, token, piece, request.top_logprobs)
                logprobs.append(lp)
                pending_lp.append(lp)
            text += decoder.decode(piece)
            if request.stop:
                cut = _find_stop(text, request.stop, max(0, sent - holdback))
                if cut is not None:
                    text = text[:cut]
                    finish = "stop"
                    break
            if emit is not None:
                safe = len(text) - holdback if request.stop else len(text)
                if safe > sent:
                    emit(TextDelta(text=text[sent:safe], logprobs=tuple(pending_lp)))
                    sent, pending_lp = safe, []
            if n_out >= request.max_tokens:
                break
        if cut is None:
            text += decoder.decode(b"", final=True)
        if emit is not None and (len(text) > sent or pending_lp):
            emit(TextDelta(text=text[sent:], logprobs=tuple(pending_lp)))
        compute = time.perf_counter() - started
        usage = Usage(input_tokens=len(prompt), output_tokens=n_out)
        return ChatResponse(
            model=self.id,
            text=text,
            finish_reason=finish,
            usage=usage,
            latency_s=compute,
            compute_s=compute,
            ttft_s=ttft if ttft is not None else compute,
            cost_usd=self.card.cost(usage, compute),
            logprobs=tuple(logprobs) if request.logprobs else None,
        )

    def _compute_cap(self, request: ChatRequest) -> float:
        """Seconds of compute `request.max_cost_usd` buys here (unbounded when none is set)."""
        per_hour = getattr(self.card.price, "per_hour", 0.0)
        if request.max_cost_usd is None or not per_hour:
            return float("inf")
        return request.max_cost_usd / per_hour * 3600.0

    # -- the async face ------------------------------------------------------------------------

    async def generate(self, request: ChatRequest) -> ChatResponse:
        called = time.perf_counter()
        cancelled = threading.Event()
        try:
            response = await self._submit(lambda: self._generate_blocking(request, None, cancelled))
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return self._finish(request, response, called)

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        called = time.perf_counter()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TextDelta | None] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(delta: TextDelta) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, delta)

        def work() -> ChatResponse:
            try:
                return self._generate_blocking(request, emit, cancelled)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        job = asyncio.ensure_future(self._submit(work))
        # A call refused before it reaches the worker (a full queue) never runs `work`: its end
        # still ends the wait (after every delta, which the worker queued before it returned).
        job.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while (delta := await queue.get()) is not None:
                yield delta
            response = await job
        finally:
            # The consumer left early (disconnect, break, cancel): stop between two tokens.
            cancelled.set()
            if not job.done():
                job.add_done_callback(_swallow)
        yield Completed(response=self._finish(request, response, called))

    def _finish(self, request: ChatRequest, response: ChatResponse, called: float) -> ChatResponse:
        response = response.model_copy(update={"latency_s": time.perf_counter() - called})
        if request.wants_json:
            check_json(request, response)
        return response


def _swallow(job: asyncio.Future[Any]) -> None:
    """Retrieve the outcome of a generation nobody waits for any more."""
    if not job.cancelled() and job.exception() is not None:
        log.debug("abandoned generation ended: %r", job.exception())


def _find_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    found = [i for s in stops if (i := text.find(s, start)) != -1]
    return min(found) if found else None


def _token_logprob(
    llama: Any, logits: np.ndarray[Any, Any], token: int, piece: bytes, top: int
) -> TokenLogprob:
    peak = float(logits.max())
    log_z = peak + float(np.log(np.exp(logits - peak).sum()))
    alternatives: tuple[tuple[str, float], ...] = ()
    if top:
        best = np.argpartition(logits, -top)[-top:]
        best = best[np.argsort(logits[best])[::-1]]
        alternatives = tuple(
            (llama.detokenize([int(t)]).decode("utf-8", errors="replace"), float(logits[t]) - log_z)
            for t in best
        )
    return TokenLogprob(
        token=piece.decode("utf-8", errors="replace"),
        logprob=float(logits[token]) - log_z,
        top=alternatives,
    )
