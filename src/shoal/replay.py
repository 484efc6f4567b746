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
from collections.abc import Callable, Sequence
from pathlib import Path

from shoal.compare import (
    Agreement,
    Comparison,
    Pair,
    agreement_of,
    normalise,
    outcome_rows,
    query_id,
)
from shoal.engine import Engine
from shoal.errors import BudgetExceededError, ConfigError, ShoalError
from shoal.ledger import Account
from shoal.messages import ChatRequest, ChatResponse
from shoal.routing.outcomes import OutcomeRow, RowWriter, read_rows
from shoal.traces.recordings import Recording

Progress = Callable[[int, int], None]


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


async def replay(
    engine: Engine,
    recordings: Sequence[tuple[Recording, str | None]],
    candidate: str,
    *,
    agreement: Agreement,
    budget_usd: float | None = None,
    table: Path | None = None,
    progress: Progress | None = None,
) -> Comparison:
    """Ask `candidate` each recorded request, one at a time (replay is never on a request path,
    and the machine's cores are the served traffic's), until the recordings or the budget run
    out. Pairs already in `table` are read back instead of asked again."""
    if not recordings:
        raise ConfigError("nothing to replay: no recordings match")
    target = recordings[0][0].target
    report = Comparison(target, candidate)
    done = _done(table, candidate) if table is not None else {}
    account = Account.usd("replay", budget_usd)
    writer = RowWriter(table) if table is not None else None
    try:
        for n, (rec, gold) in enumerate(recordings, start=1):
            if progress is not None:
                progress(n - 1, len(recordings))
            earlier = done.get(query_id(rec))
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
                for row in outcome_rows(pair, candidate):
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
    report: Comparison,
) -> Pair | None:
    try:
        response, _ = await engine.charged_call(candidate, rec.request(), account)
    except BudgetExceededError:
        raise
    except ShoalError as exc:
        if exc.bad_input:
            raise
        report.failed += 1
        return None

    async def judge(name: str, request: ChatRequest) -> tuple[ChatResponse, float]:
        return await engine.charged_call(name, request, account)

    score, paid = await agreement_of(agreement, rec, response.text, judge)
    report.judge_usd += paid
    return Pair(rec, response.text, response.total_cost_usd, response.latency_s, score, gold)


def plot(report: Comparison, path: Path) -> Path:
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
