"""Replay: recorded requests run again on a candidate model or route, side by side with what was
served.

The recordings of a route or a pipeline step (`record: true`) hold each request as the model got
it and the answer served, with its cost and latency. `replay` asks the candidate the same
requests, within a budget, and compares: how often the candidate agrees with the served answer
(`agreement`: exact for closed-set and JSON answers, token F1 for free text, or a judge model's
yes/no), accuracy against gold answers where a file of recordings carries them, cost and
latency. Each pair is written to an outcome table as it completes, so a run cut short (or out of
money) resumes where it stopped, and `shoal route calibrate` can fit a route on the table.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.engine import Engine
from shoal.errors import BudgetExceededError, ConfigError, ShoalError
from shoal.ledger import Account
from shoal.messages import ChatRequest
from shoal.money import to_usd
from shoal.routing.outcomes import OutcomeRow, RowWriter, read_rows
from shoal.traces.recordings import Recording

Progress = Callable[[int, int], None]


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
class ReplayReport:
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


def read_recordings(path: Path) -> list[tuple[Recording, str | None]]:
    """Recordings from a JSON Lines file (`shoal recordings export`, or written by hand: each
    line needs `messages` or `input`, and `answer`; `gold` is optional)."""
    rows: list[tuple[Recording, str | None]] = []
    with path.open(encoding="utf-8") as handle:
        for n, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                messages = data.get("messages") or [{"role": "user", "content": data["input"]}]
                recording = Recording(
                    target=data.get("target", path.stem),
                    model=data.get("model", "served"),
                    messages=messages,
                    answer=str(data["answer"]),
                    schema=data.get("schema"),
                    parsed=data.get("parsed"),
                    params=data.get("params") or {},
                    cost_usd=float(data.get("cost_usd", 0.0)),
                    latency_s=float(data.get("latency_s", 0.0)),
                    created_at=float(data.get("created_at", 0.0)),
                    id=data.get("id", n),
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"{path}:{n}: not a recording ({exc})") from None
            gold = data.get("gold")
            rows.append((recording, None if gold is None else str(gold)))
    return rows


def _query_id(recording: Recording) -> str:
    return f"rec-{recording.id}"


def _rows(pair: Pair, candidate: str) -> list[OutcomeRow]:
    rec = pair.recording
    qid, group = _query_id(rec), rec.target
    served_score = (
        1.0 if pair.gold is None else float(normalise(rec.answer) == normalise(pair.gold))
    )
    score = (
        pair.agreement
        if pair.gold is None
        else float(normalise(pair.answer) == normalise(pair.gold))
    )
    return [
        OutcomeRow(qid, rec.input, rec.model, served_score, rec.cost_usd, rec.latency_s,
                   group=group, answer=rec.answer),
        OutcomeRow(qid, rec.input, candidate, score, pair.cost_usd, pair.latency_s,
                   group=group, answer=pair.answer),
    ]  # fmt: skip


async def replay(
    engine: Engine,
    recordings: Sequence[tuple[Recording, str | None]],
    candidate: str,
    *,
    agreement: Agreement,
    budget_usd: float | None = None,
    table: Path | None = None,
    progress: Progress | None = None,
) -> ReplayReport:
    """Ask `candidate` each recorded request, one at a time (replay is never on a request path,
    and the machine's cores are the served traffic's), until the recordings or the budget run
    out. Pairs already in `table` are read back instead of asked again."""
    if not recordings:
        raise ConfigError("nothing to replay: no recordings match")
    target = recordings[0][0].target
    report = ReplayReport(target, candidate)
    done = _done(table, candidate) if table is not None else {}
    account = Account.usd("replay", budget_usd)
    writer = RowWriter(table) if table is not None else None
    try:
        for n, (rec, gold) in enumerate(recordings, start=1):
            if progress is not None:
                progress(n - 1, len(recordings))
            earlier = done.get(_query_id(rec))
            if earlier is not None:
                report.resumed += 1
                score = _score(earlier, gold)
                again = Pair(rec, earlier.answer, earlier.cost_usd, earlier.latency_s, score, gold)
                report.pairs.append(again)
                continue
            try:
                pair = await _ask(engine, rec, gold, candidate, agreement, account, report)
            except BudgetExceededError:
                report.stopped = (
                    f"budget: ${account.left_usd:.6f} of ${budget_usd:g} left, too little for "
                    f"recording {n} of {len(recordings)}"
                )
                break
            if pair is None:
                continue
            report.pairs.append(pair)
            if writer is not None:
                for row in _rows(pair, candidate):
                    writer.write(row)
    finally:
        if writer is not None:
            writer.close()
    if progress is not None:
        progress(len(recordings), len(recordings))
    return report


def _score(row: OutcomeRow, gold: str | None) -> float:
    return row.score if gold is None else float(normalise(row.answer) == normalise(gold))


def _done(table: Path, candidate: str) -> dict[str, OutcomeRow]:
    if not table.exists():
        return {}
    return {row.query_id: row for row in read_rows(table) if row.model == candidate}


async def _ask(
    engine: Engine,
    rec: Recording,
    gold: str | None,
    candidate: str,
    agreement: Agreement,
    account: Account,
    report: ReplayReport,
) -> Pair | None:
    plan = await engine.plan(candidate, rec.request())
    hold = account.reserve(plan.worst_usd)
    try:
        response = await engine.execute(plan, hold=hold)
    except BudgetExceededError:
        raise
    except ShoalError as exc:
        if exc.bad_input:
            raise
        report.failed += 1
        return None
    finally:
        if not hold.settled:
            hold.release()
    score = agreement.local(rec, response.text)
    if score is None:
        assert agreement.judge is not None
        judge_plan = await engine.plan(agreement.judge, agreement.judge_request(rec, response.text))
        judge_hold = account.reserve(judge_plan.worst_usd)
        try:
            verdict = await engine.execute(judge_plan, hold=judge_hold)
        finally:
            if not judge_hold.settled:
                judge_hold.release()
        report.judge_usd += to_usd(judge_hold.charged_pusd or 0)
        score = float(normalise(verdict.text).startswith("yes"))
    return Pair(rec, response.text, response.total_cost_usd, response.latency_s, score, gold)


def plot(report: ReplayReport, path: Path) -> Path:
    """Cost against quality, served and candidate, as a PNG (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report.summary()
    served, cand = summary["served"], summary["candidate_side"]
    quality = "gold_accuracy" if "gold_accuracy" in served else None
    fig, ax = plt.subplots(figsize=(5, 4))
    points = [
        (report.target + " (served)", served["cost_usd_per_call"], served.get(quality, 1.0)),
        (report.candidate, cand["cost_usd_per_call"], cand.get(quality, summary["agreement"])),
    ]
    for label, cost, q in points:
        ax.scatter([cost or 0.0], [q or 0.0], s=60)
        ax.annotate(label, (cost or 0.0, q or 0.0), textcoords="offset points", xytext=(6, 6))
    ax.set_xlabel("cost per call (USD)")
    ax.set_ylabel("gold accuracy" if quality else "agreement with the served answer")
    ax.set_ylim(0, 1.05)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
