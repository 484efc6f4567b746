"""Live speeds: how fast each model has actually been answering on this machine, lately.

A card's speeds were measured once, on an idle machine (`shoal models bench`), or are only
expected. A laptop with another program on one core runs a model at half that speed, and a
deadline planned on the card's figures is then missed. `LiveSpeeds` keeps, per model, a moving
average of the prompt speed, the generation speed and the time calls waited in the model's
queue, from every call that completes, and the engine plans with them (`ModelCard.Speed`).

The figures persist (a small JSON file next to the traces, written at most once a minute and
when the engine closes), so a new process plans with the last known speeds instead of the idle
ones, as long as they are recent (`MAX_AGE_S`): a machine that was busy an afternoon ago is not
planned as busy now. The time calls waited in the queue is not carried over: a new process
starts with an empty queue. Only local models are followed: a hosted model's time to first
token is mostly network.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

from shoal.cards import Speed
from shoal.messages import ChatResponse

log = logging.getLogger(__name__)

# Weight of the newest call in the moving averages: the last five or so calls dominate.
NEW_WEIGHT = 0.3
# Prompts shorter than this say little about prompt speed (fixed costs dominate).
MIN_PROMPT_TOKENS = 16
MIN_OUTPUT_TOKENS = 4
SAVE_EVERY_S = 60.0
# Speeds saved longer ago than this are not loaded: the load that slowed them has likely gone.
MAX_AGE_S = 3600.0


class LiveSpeeds:
    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._speeds: dict[str, Speed] = {}
        self._seen_at: dict[str, float] = {}  # Unix time of each model's latest observation
        self._warm: set[str] = set()
        self._lock = threading.Lock()
        self._saved_at = time.monotonic()
        if self.path is not None and self.path.is_file():
            self._load(self.path)

    def get(self, model: str) -> Speed | None:
        return self._speeds.get(model)

    def observe(self, response: ChatResponse) -> None:
        """Fold one completed call into its model's averages. A model's first call in a process
        is left out: it pays for reading the weights from disk, which later calls do not."""
        with self._lock:
            if response.model not in self._warm:
                self._warm.add(response.model)
                return
        usage, compute = response.usage, response.compute_s
        ttft = response.ttft_s
        if compute <= 0 or ttft is None or ttft <= 0:
            return
        prompt = usage.input_tokens / ttft if usage.input_tokens >= MIN_PROMPT_TOKENS else None
        generating = compute - ttft
        gen = (
            (usage.output_tokens - 1) / generating
            if usage.output_tokens >= MIN_OUTPUT_TOKENS and generating > 0
            else None
        )
        wait = max(response.latency_s - compute, 0.0)
        with self._lock:
            old = self._speeds.get(response.model)
            self._speeds[response.model] = Speed(
                prompt_tok_s=_mix(old.prompt_tok_s if old else None, prompt),
                gen_tok_s=_mix(old.gen_tok_s if old else None, gen),
                wait_s=_mix(old.wait_s if old else None, wait) or 0.0,
            )
            self._seen_at[response.model] = time.time()
            due = time.monotonic() - self._saved_at >= SAVE_EVERY_S
        if due:
            self.save()

    def save(self) -> None:
        """Write the averages (atomically; a failure is logged, never raised)."""
        if self.path is None:
            return
        with self._lock:
            now = time.time()
            data = {
                m: {**s._asdict(), "at": self._seen_at.get(m, now)} for m, s in self._speeds.items()
            }
            self._saved_at = time.monotonic()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".speeds-")
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(data, out)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("could not save live speeds to %s: %s", self.path, exc)

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            now = time.time()
            for model, saved in data.items():
                at = float(saved.pop("at", 0.0))
                if now - at <= MAX_AGE_S:  # recent enough to plan with; the queue starts empty
                    self._speeds[model] = Speed(**saved)._replace(wait_s=0.0)
                    self._seen_at[model] = at
        except (OSError, ValueError, TypeError) as exc:
            log.warning("ignoring unreadable live speeds in %s: %s", path, exc)


def _mix(old: float | None, new: float | None) -> float | None:
    if new is None:
        return old
    if old is None:
        return new
    return (1 - NEW_WEIGHT) * old + NEW_WEIGHT * new
