"""Training data for `shoal distil`: a JSON Lines file, or what a target recorded.

A JSON Lines file has one example a line: `input` (what the model read: the request's last user
message) and `label` (the teacher's answer: a text, or a JSON value for a step with a schema),
and optionally `gold` (the right answer), `schema` (the request's JSON schema), `model` (who
answered) and `cost_usd` (what the answer cost). `shoal recordings export` writes this layout.
Recordings (`TraceStore.recordings`) give the same, from live traffic.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.errors import DistillationError
from shoal.specialists.forms import Form
from shoal.specialists.train import Example, KindName
from shoal.traces.recordings import Recording


@dataclass
class Data:
    """Examples with who answered each (None: not said), and the requests' JSON schema."""

    examples: list[Example]
    models: list[str | None]
    schema: dict[str, Any] | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def teacher(self, teacher: str | None) -> tuple[str | None, Data]:
        """The teacher (given, or the one model that answered) and its examples alone."""
        named = Counter(m for m in self.models if m is not None)
        if teacher is None:
            if len(named) > 1:
                listed = ", ".join(f"{m} ({n})" for m, n in named.most_common())
                raise DistillationError(
                    f"{self.source} holds the answers of several models: {listed}; say which is "
                    "the teacher with --teacher"
                )
            teacher = next(iter(named), None)
        if teacher is None:
            return None, self
        kept = [i for i, m in enumerate(self.models) if m in (None, teacher)]
        if not kept:
            raise DistillationError(
                f"{self.source} has no answer of {teacher!r}; it has: "
                + ", ".join(sorted(named) or ["none"])
            )
        examples = [self.examples[i] for i in kept]
        models = [self.models[i] for i in kept]
        return teacher, Data(examples, models, self.schema, self.source, self.notes)

    def form(self, kind: KindName) -> Form:
        if self.schema is None:
            return Form.label()
        return Form.for_schema(self.schema) if kind == "classifier" else Form.for_json(self.schema)


def _one_schema(schemas: Sequence[dict[str, Any] | None], source: str) -> dict[str, Any] | None:
    distinct = {json.dumps(s, sort_keys=True) for s in schemas if s is not None}
    if len(distinct) > 1:
        raise DistillationError(
            f"{source}: the answers were asked for {len(distinct)} different JSON schemas; a "
            "specialist learns one (distil each step on its own)"
        )
    if distinct and any(s is None for s in schemas):
        raise DistillationError(f"{source}: some answers have a JSON schema and some none")
    return json.loads(distinct.pop()) if distinct else None


def read_jsonl(path: Path, *, schema: dict[str, Any] | None = None) -> Data:
    """Examples from a JSON Lines file (see the module's docstring)."""
    try:
        lines = path.read_text("utf-8").splitlines()
    except OSError as exc:
        raise DistillationError(f"cannot read {path}: {exc.strerror}") from exc
    examples: list[Example] = []
    models: list[str | None] = []
    schemas: list[dict[str, Any] | None] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DistillationError(f"{path}:{n}: not JSON: {exc}") from None
        if not isinstance(row, dict) or "input" not in row or "label" not in row:
            raise DistillationError(
                f"{path}:{n}: each line needs `input` and `label` (optional: gold, schema, "
                "model, cost_usd)"
            )
        label, cost = row["label"], row.get("cost_usd")
        parsed = label if isinstance(label, dict | list) else None
        examples.append(
            Example(
                input=str(row["input"]),
                answer=json.dumps(label) if parsed is not None else str(label or ""),
                parsed=parsed,
                gold=row.get("gold"),
                teacher_cost_usd=float(cost) if isinstance(cost, int | float) else None,
            )
        )
        models.append(row.get("model"))
        schemas.append(row.get("schema") or schema)
    if not examples:
        raise DistillationError(f"{path} holds no examples")
    found = _one_schema(schemas, str(path))
    if found is None and any(e.parsed is not None for e in examples):
        raise DistillationError(
            f"{path}: its labels are JSON values; give their JSON schema (--schema FILE, or "
            "`schema` in each line)"
        )
    return Data(examples, models, found, source=str(path))


def from_recordings(target: str, recordings: Sequence[Recording]) -> Data:
    """Examples from what `target` recorded."""
    if not recordings:
        raise DistillationError(
            f"nothing recorded for {target!r} (in that time): set `record: true` on the route "
            "or the pipeline step, let it answer, then distil (see `shoal recordings list`)"
        )
    examples = [
        Example(
            input=r.input,
            answer=r.answer,
            parsed=r.parsed,
            teacher_cost_usd=r.cost_usd if r.cost_usd > 0 else None,
        )
        for r in recordings
    ]
    schema = _one_schema([r.schema for r in recordings], f"the recordings of {target}")
    return Data(examples, [r.model for r in recordings], schema, source=f"recordings of {target}")
