"""The main job, for now: the same questions answered by each local tier of the fleet.

It shows what the rest of shoal is for: the tiny model answers some questions as well as the large
one at a fraction of the time and cost, and fails others.
"""

from __future__ import annotations

import re
import time
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from shoal.fleet import Fleet
from shoal.messages import ChatRequest

_FLAGS = re.IGNORECASE | re.DOTALL
SYSTEM = "Answer briefly and directly."

# (question, a pattern a correct answer contains)
QUESTIONS: tuple[tuple[str, str], ...] = (
    ("What is the capital of Australia?", r"canberra"),
    (
        "Is this review positive or negative? 'The room was dirty and the street was noisy.'",
        r"^(?!.*positive).*negative",
    ),
    ("A listing costs $120 per night. How much do 3 nights cost? Give the number.", r"\b360\b"),
    ("Which is larger, 0.9 or 0.11?", r"0\.9\b(?!\d)"),
    ("Write a Python expression that reverses the string s.", r"s\[::-1\]|reversed\(s\)"),
)


async def run_demo(
    fleet: Fleet, *, max_tokens: int, console: Console | None = None
) -> dict[str, Any]:
    ids = [
        c.id
        for c in fleet.cards()
        if c.runs == "local" and not c.single_task and fleet.installed(c.id)
    ]
    rows: list[dict[str, Any]] = []
    loads: dict[str, float] = {}
    started = time.perf_counter()
    try:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("answering", total=len(ids) * len(QUESTIONS))
            for model_id in ids:
                model = fleet.model(model_id)
                progress.update(task, description=f"{model_id}: loading")
                loading = time.perf_counter()
                await model.load()
                loads[model_id] = round(time.perf_counter() - loading, 2)
                for question, pattern in QUESTIONS:
                    progress.update(task, description=f"{model_id}")
                    request = ChatRequest.of(question, system=SYSTEM, max_tokens=max_tokens)
                    response = await model.generate(request)
                    rows.append(
                        {
                            "question": question,
                            "model": model_id,
                            "tier": fleet.card(model_id).tier,
                            "answer": response.text.strip(),
                            "correct": bool(re.search(pattern, response.text, _FLAGS)),
                            "input_tokens": response.usage.input_tokens,
                            "output_tokens": response.usage.output_tokens,
                            "latency_s": round(response.latency_s, 3),
                            "cost_usd": response.cost_usd,
                        }
                    )
                    progress.advance(task)
    finally:
        await fleet.aclose()
    totals = []
    for model_id in ids:
        mine = [r for r in rows if r["model"] == model_id]
        totals.append(
            {
                "model": model_id,
                "tier": fleet.card(model_id).tier,
                "correct": sum(r["correct"] for r in mine),
                "questions": len(mine),
                "load_s": loads[model_id],
                "latency_s": round(sum(r["latency_s"] for r in mine), 2),
                "cost_usd": sum(r["cost_usd"] for r in mine),
            }
        )
    return {"rows": rows, "totals": totals, "wall_s": round(time.perf_counter() - started, 2)}


def render(report: dict[str, Any], console: Console) -> None:
    answers = Table(
        "question", "tier", "answer", "ok", "tokens", "latency", "cost", show_lines=True
    )
    for r in report["rows"]:
        answer = r["answer"].replace("\n", " ")
        answers.add_row(
            r["question"],
            r["tier"] or r["model"],
            answer if len(answer) <= 90 else answer[:87] + "...",
            "[green]✓[/]" if r["correct"] else "[red]✗[/]",
            f"{r['input_tokens']}+{r['output_tokens']}",
            f"{r['latency_s'] * 1000:.0f} ms",
            f"${r['cost_usd']:.7f}",
        )
    console.print(answers)
    totals = Table(
        "model", "tier", "load", "correct", "total latency", "total cost", "cost vs largest"
    )
    largest = max((t["cost_usd"] for t in report["totals"]), default=0.0) or 1.0
    for t in report["totals"]:
        totals.add_row(
            t["model"],
            t["tier"] or "-",
            f"{t['load_s']:.2f} s",
            f"{t['correct']}/{t['questions']}",
            f"{t['latency_s']:.2f} s",
            f"${t['cost_usd']:.6f}",
            f"{t['cost_usd'] / largest:.0%}",
        )
    console.print(totals)
