"""Comparing two answers to the same recorded request: the one served and a candidate's.

Replay (`shoal replay`) and shadow routes both ask a candidate what a route was asked and
compare: agreement with the served answer (exact for closed-set and JSON answers, token F1 for
free text, or a judge model's yes/no), accuracy against gold answers where known, cost and
latency. Each pair becomes two rows of an outcome table (the served model and the candidate),
which `shoal route calibrate` can fit on.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.errors import ConfigError
from shoal.messages import ChatRequest, ChatResponse
from shoal.routing.outcomes import OutcomeRow, read_rows
from shoal.traces.recordings import Recording


def slug(name: str) -> str:
    """`name` (a route, a model, `PIPELINE/STEP`) as part of a file name."""
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name)


def normalise(text: str) -> str:
    """Lower case, single spaces, no punctuation at the ends: 'Positive.' equals 'positive'."""
    return " ".join(text.lower().split()).strip(" .!?,;:'\"")


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def token_f1(a: str, b: str) -> float:
    """Overlap of the two texts' words (SQuAD's F1): 1.0 for the same words, 0.0 for none."""
    wa, wb = _words(a), _words(b)
    if not wa or not wb:
        return float(wa == wb)
    common = sum(min(wa.count(w), wb.count(w)) for w in set(wa))
    if common == 0:
        return 0.0
    precision, recall = common / len(wb), common / len(wa)
    return 2 * precision * recall / (precision + recall)


def _parsed(text: str) -> Any | None:
    try:
        return json.loads(text)
    except ValueError:
        return None


def exact(served: Recording, answer: str) -> float:
    """1.0 when the candidate gave the same answer: the same JSON value for a JSON request, the
    same words for a short one."""
    if served.parsed is not None:
        return float(_parsed(answer) == served.parsed)
    return float(normalise(answer) == normalise(served.answer))


JUDGE_SYSTEM = (
    "You compare two answers to the same request. Say yes if they mean the same thing "
    "(the same choice, fact or verdict), no otherwise. One word."
)


@dataclass(frozen=True)
class Agreement:
    """How a candidate's answer is compared with the served one: `exact`, `f1`, `judge:MODEL`,
    or `auto` (exact for JSON and short answers, F1 for longer text)."""

    kind: str
    judge: str | None = None

    @classmethod
    def parse(cls, text: str) -> Agreement:
        if text in ("auto", "exact", "f1"):
            return cls(text)
        if text.startswith("judge:") and len(text) > len("judge:"):
            return cls("judge", text.removeprefix("judge:"))
        raise ConfigError(
            f"agreement {text!r}: give auto, exact, f1 or judge:MODEL (a model or route name)"
        )

    def local(self, served: Recording, answer: str) -> float | None:
        """The agreement computed here; None when a judge must be asked."""
        if self.kind == "judge":
            return None
        if self.kind == "exact" or (
            self.kind == "auto" and (served.parsed is not None or len(_words(served.answer)) <= 3)
        ):
            return exact(served, answer)
        return token_f1(served.answer, answer)

    def judge_request(self, served: Recording, answer: str) -> ChatRequest:
        prompt = (
            f"Request: {served.input}\n\nAnswer A: {served.answer}\n\nAnswer B: {answer}\n\n"
            "Do A and B mean the same? yes or no:"
        )
        return ChatRequest.of(prompt, system=JUDGE_SYSTEM, max_tokens=3)


Judge = Callable[[str, ChatRequest], Awaitable[tuple[ChatResponse, float]]]


async def agreement_of(
    agreement: Agreement, served: Recording, answer: str, judge: Judge
) -> tuple[float, float]:
    """How far `answer` agrees with the served one, and what asking the judge cost (when the
    agreement is a judge's: `judge(model, request)` runs the call and says what it was charged)."""
    score = agreement.local(served, answer)
    if score is not None:
        return score, 0.0
    assert agreement.judge is not None
    verdict, paid = await judge(agreement.judge, agreement.judge_request(served, answer))
    return float(normalise(verdict.text).startswith("yes")), paid


@dataclass(frozen=True)
class Pair:
    """One recorded request: what was served and what the candidate answered."""

    recording: Recording
    answer: str
    cost_usd: float
    latency_s: float
    agreement: float
    gold: str | None = None


@dataclass
class Comparison:
    target: str
    candidate: str
    pairs: list[Pair] = field(default_factory=list)
    resumed: int = 0  # pairs already in the table from an earlier run
    failed: int = 0  # candidate calls that failed (counted, not compared)
    judge_usd: float = 0.0
    stopped: str | None = None  # why the replay ended before the last recording

    def summary(self) -> dict[str, Any]:
        pairs = self.pairs
        golds = [p for p in pairs if p.gold is not None]

        def side(costs: Sequence[float], latencies: Sequence[float]) -> dict[str, Any]:
            return {
                "cost_usd_per_call": statistics.fmean(costs) if costs else None,
                "p50_latency_s": statistics.median(latencies) if latencies else None,
                "p95_latency_s": _p95(latencies),
            }

        served = side([p.recording.cost_usd for p in pairs], [p.recording.latency_s for p in pairs])
        candidate = side([p.cost_usd for p in pairs], [p.latency_s for p in pairs])
        if golds:
            served["gold_accuracy"] = _accuracy([p.recording.answer for p in golds], golds)
            candidate["gold_accuracy"] = _accuracy([p.answer for p in golds], golds)
        ratio = None
        if served["cost_usd_per_call"]:
            ratio = (candidate["cost_usd_per_call"] or 0.0) / served["cost_usd_per_call"]
        return {
            "target": self.target,
            "candidate": self.candidate,
            "compared": len(pairs),
            "resumed": self.resumed,
            "failed": self.failed,
            "agreement": statistics.fmean(p.agreement for p in pairs) if pairs else None,
            "cost_ratio": ratio,
            "served": served,
            "candidate_side": candidate,
            "judge_usd": self.judge_usd,
            "stopped": self.stopped,
        }


def _p95(values: Sequence[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def _accuracy(answers: Sequence[str], golds: Sequence[Pair]) -> float:
    return statistics.fmean(
        float(normalise(a) == normalise(p.gold or "")) for a, p in zip(answers, golds, strict=True)
    )


def query_id(recording: Recording) -> str:
    return f"rec-{recording.id}"


def served_name(model: str, candidate: str) -> str:
    """The served model's name in a comparison table: its own, unless the candidate has it."""
    return model if model != candidate else f"{model} (served)"


def outcome_rows(pair: Pair, candidate: str) -> list[OutcomeRow]:
    """The pair as two rows of an outcome table: the served answer (score 1, the reference, or
    its gold accuracy) and the candidate's (its agreement, or its gold accuracy)."""
    rec = pair.recording
    qid, group, served = query_id(rec), rec.target, served_name(rec.model, candidate)
    served_score = (
        1.0 if pair.gold is None else float(normalise(rec.answer) == normalise(pair.gold))
    )
    score = (
        pair.agreement
        if pair.gold is None
        else float(normalise(pair.answer) == normalise(pair.gold))
    )
    return [
        OutcomeRow(qid, rec.input, served, served_score, rec.cost_usd, rec.latency_s,
                   group=group, answer=rec.answer),
        OutcomeRow(qid, rec.input, candidate, score, pair.cost_usd, pair.latency_s,
                   group=group, answer=pair.answer),
    ]  # fmt: skip


def pairs_from_table(table: Path, candidate: str) -> list[Pair]:
    """The pairs an outcome table written by replay or a shadow holds for `candidate`."""
    rows = read_rows(table)
    served = {r.query_id: r for r in rows if r.model != candidate}
    pairs = []
    for row in rows:
        first = served.get(row.query_id)
        if row.model != candidate or first is None:
            continue
        recording = Recording(
            target=first.group,
            model=first.model,
            messages=[{"role": "user", "content": first.prompt}],
            answer=first.answer,
            cost_usd=first.cost_usd,
            latency_s=first.latency_s,
        )
        pairs.append(Pair(recording, row.answer, row.cost_usd, row.latency_s, row.score))
    return pairs
