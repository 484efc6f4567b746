"""`shoal outcomes build`: run models on gold-answer data and record an outcome table.

Every query is asked to every model in turn and each answer is appended to the table file as
soon as it is graded, so a killed build resumes where it stopped (done pairs are skipped).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from shoal.models.base import Model
from shoal.routing.confidence import Mode, logprob_confidence
from shoal.routing.datasets import GoldItem, grade
from shoal.routing.outcomes import OutcomeRow, RowWriter, read_rows

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]


def default_split(query_id: str, test_fraction: float = 0.5) -> str:
    """A stable train/test label from the query id alone (the same on every machine)."""
    digest = hashlib.sha256(query_id.encode("utf-8")).digest()
    return "test" if digest[0] / 256.0 < test_fraction else "train"


async def build_outcomes(
    models: Sequence[Model],
    items: Sequence[GoldItem],
    path: str | Path,
    *,
    progress: Progress | None = None,
) -> int:
    """Answer `items` with each of `models`, appending graded rows to `path`; returns rows added."""
    path = Path(path)
    done: set[tuple[str, str]] = set()
    if path.exists() and path.stat().st_size > 0:
        done = {(r.query_id, r.model) for r in read_rows(path)}
    total = len(items) * len(models)
    count = sum(1 for it in items for m in models if (it.query_id, m.id) in done)
    added = 0
    with RowWriter(path) as writer:
        for item in items:
            for model in models:
                if (item.query_id, model.id) in done:
                    continue
                if progress is not None:
                    progress(count, total, f"{item.dataset} · {model.id}")
                response = await model.generate(item.request())
                score, answer = grade(item, response.text)
                mode: Mode = "mean" if item.kind == "number" else "first"
                writer.write(
                    OutcomeRow(
                        query_id=item.query_id,
                        prompt=item.prompt,
                        model=model.id,
                        score=score,
                        cost_usd=response.cost_usd,
                        latency_s=response.latency_s,
                        split=default_split(item.query_id),
                        group=item.group if item.dataset != "mmlu" else "mmlu",
                        confidence=round(logprob_confidence(response.logprobs, mode), 6),
                        input_tokens=response.usage.input_tokens,
                        output_tokens=response.usage.output_tokens,
                        answer=answer,
                    )
                )
                count += 1
                added += 1
    if progress is not None:
        progress(count, total, "done")
    return added
