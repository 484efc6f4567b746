"""Outcome tables: per-query quality, cost and latency of several models.

The format routers are trained and evaluated on (documented in docs/outcomes.md). On disk it is
a CSV file (optionally gzipped), one row per query and model:

    query_id, prompt, model, score, cost_usd, latency_s [, split, group, confidence, ...]

`score` is the quality in [0, 1] (1 = correct); `split` (train | test | any label) fixes which
queries may be used for fitting; `group` is a coarse label (dataset or subject); `confidence` is
the model's own confidence in its answer (e.g. the probability of its first token), and
`answer` the answer itself (text or extracted): what a cascade's scorer reads. A first line
`# shoal-outcomes v1` names the format version.

In memory an `OutcomeTable` is wide: one row per query, one column per model, so that routers
and metrics work on numpy arrays.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from shoal.errors import OutcomeTableError

FORMAT_VERSION = 1
HEADER_LINE = f"# shoal-outcomes v{FORMAT_VERSION}"
REQUIRED = ("query_id", "prompt", "model", "score", "cost_usd", "latency_s")
OPTIONAL = ("split", "group", "confidence", "input_tokens", "output_tokens", "answer")

Matrix = npt.NDArray[np.float64]


@dataclass(frozen=True)
class OutcomeRow:
    query_id: str
    prompt: str
    model: str
    score: float
    cost_usd: float
    latency_s: float
    split: str = ""
    group: str = ""
    confidence: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    answer: str = ""

    def as_csv(self) -> dict[str, str]:
        def num(v: float | int | None) -> str:
            return "" if v is None else repr(v)

        return {
            "query_id": self.query_id,
            "prompt": self.prompt,
            "model": self.model,
            "score": repr(self.score),
            "cost_usd": repr(self.cost_usd),
            "latency_s": repr(self.latency_s),
            "split": self.split,
            "group": self.group,
            "confidence": num(self.confidence),
            "input_tokens": num(self.input_tokens),
            "output_tokens": num(self.output_tokens),
            "answer": self.answer,
        }


@dataclass
class OutcomeTable:
    """Wide form: `scores[i, j]` is model `models[j]`'s quality on query `query_ids[i]`."""

    query_ids: list[str]
    prompts: list[str]
    models: list[str]
    scores: Matrix
    costs: Matrix
    latencies: Matrix
    splits: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    confidence: Matrix | None = None
    name: str = ""
    answers: list[list[str]] | None = None  # answers[i][j]: model j's answer to query i

    def __post_init__(self) -> None:
        n, m = len(self.query_ids), len(self.models)
        if not self.splits:
            self.splits = [""] * n
        if not self.groups:
            self.groups = [""] * n
        where = f" ({self.name})" if self.name else ""
        if n == 0:
            raise OutcomeTableError(f"the outcome table{where} has no queries")
        if m < 2:
            raise OutcomeTableError(
                f"the outcome table{where} has {m} model(s); routing needs at least two"
            )
        for label, arr in (("score", self.scores), ("cost_usd", self.costs)):
            if arr.shape != (n, m):
                raise OutcomeTableError(f"{label} matrix has shape {arr.shape}, want {(n, m)}")
            if not np.isfinite(arr).all():
                raise OutcomeTableError(f"the outcome table{where} has missing {label} values")
        if (self.scores < 0).any() or (self.scores > 1).any():
            raise OutcomeTableError(f"scores in the outcome table{where} must lie in [0, 1]")
        if (self.costs < 0).any():
            raise OutcomeTableError(f"costs in the outcome table{where} must not be negative")
        if self.answers is not None and (
            len(self.answers) != n or any(len(a) != m for a in self.answers)
        ):
            raise OutcomeTableError(f"the answers of the outcome table{where} are not {n} x {m}")

    # -- shape -----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.query_ids)

    def model_index(self, model: str) -> int:
        try:
            return self.models.index(model)
        except ValueError:
            raise OutcomeTableError(
                f"model {model!r} is not in the outcome table; it has: {', '.join(self.models)}"
            ) from None

    def subset(self, index: Sequence[int] | npt.NDArray[np.intp]) -> OutcomeTable:
        idx = np.asarray(index, dtype=np.intp)
        return OutcomeTable(
            query_ids=[self.query_ids[i] for i in idx],
            prompts=[self.prompts[i] for i in idx],
            models=list(self.models),
            scores=self.scores[idx],
            costs=self.costs[idx],
            latencies=self.latencies[idx],
            splits=[self.splits[i] for i in idx],
            groups=[self.groups[i] for i in idx],
            confidence=None if self.confidence is None else self.confidence[idx],
            name=self.name,
            answers=None if self.answers is None else [self.answers[i] for i in idx],
        )

    def select_models(self, models: Sequence[str]) -> OutcomeTable:
        cols = [self.model_index(m) for m in models]
        return OutcomeTable(
            query_ids=list(self.query_ids),
            prompts=list(self.prompts),
            models=list(models),
            scores=self.scores[:, cols],
            costs=self.costs[:, cols],
            latencies=self.latencies[:, cols],
            splits=list(self.splits),
            groups=list(self.groups),
            confidence=None if self.confidence is None else self.confidence[:, cols],
            name=self.name,
            answers=None if self.answers is None else [[a[j] for j in cols] for a in self.answers],
        )

    def split(self, name: str) -> OutcomeTable:
        index = [i for i, s in enumerate(self.splits) if s == name]
        if not index:
            have = sorted(set(self.splits) - {""})
            raise OutcomeTableError(
                f"no queries in split {name!r}; splits present: {', '.join(have) or 'none'}"
            )
        return self.subset(index)

    def random_split(
        self, test_fraction: float = 0.5, *, seed: int = 0, by_group: bool = False
    ) -> tuple[OutcomeTable, OutcomeTable]:
        """Disjoint (train, test) parts, by query or (with `by_group`) by whole groups."""
        rng = np.random.default_rng(seed)
        n = len(self)
        if by_group:
            groups = sorted(set(self.groups))
            if len(groups) < 2:
                raise OutcomeTableError("a split by group needs at least two groups")
            order = rng.permutation(len(groups))
            n_test = max(1, round(len(groups) * test_fraction))
            test_groups = {groups[i] for i in order[:n_test]}
            test = np.array([g in test_groups for g in self.groups])
        else:
            test = np.zeros(n, dtype=bool)
            test[rng.permutation(n)[: max(1, round(n * test_fraction))]] = True
        if test.all() or not test.any():
            raise OutcomeTableError(f"cannot split {n} queries into two non-empty parts")
        return self.subset(np.flatnonzero(~test)), self.subset(np.flatnonzero(test))

    # -- summaries -------------------------------------------------------------------------------

    def mean_scores(self) -> dict[str, float]:
        return dict(zip(self.models, map(float, self.scores.mean(axis=0)), strict=True))

    def mean_costs(self) -> dict[str, float]:
        return dict(zip(self.models, map(float, self.costs.mean(axis=0)), strict=True))

    def check_routable(self) -> None:
        """Raise when every model scores the same on every query: nothing to learn or route."""
        if np.all(self.scores == self.scores[:, :1]):
            raise OutcomeTableError(
                f"the outcome table{' (' + self.name + ')' if self.name else ''} is degenerate: "
                "every model has the same score on every query, so no route can differ"
            )

    # -- long form -------------------------------------------------------------------------------

    def rows(self) -> Iterable[OutcomeRow]:
        for i, qid in enumerate(self.query_ids):
            for j, model in enumerate(self.models):
                conf = None if self.confidence is None else float(self.confidence[i, j])
                yield OutcomeRow(
                    query_id=qid,
                    prompt=self.prompts[i],
                    model=model,
                    score=float(self.scores[i, j]),
                    cost_usd=float(self.costs[i, j]),
                    latency_s=float(self.latencies[i, j]),
                    split=self.splits[i],
                    group=self.groups[i],
                    confidence=None if conf is None or math.isnan(conf) else conf,
                    answer="" if self.answers is None else self.answers[i][j],
                )

    @classmethod
    def from_rows(
        cls, rows: Iterable[OutcomeRow], *, name: str = "", drop_incomplete: bool = True
    ) -> OutcomeTable:
        """Pivot long rows to the wide form; queries missing a model are dropped (or an error)."""
        by_query: dict[str, dict[str, OutcomeRow]] = {}
        models: list[str] = []
        for row in rows:
            if row.model not in models:
                models.append(row.model)
            by_query.setdefault(row.query_id, {})[row.model] = row
        complete = [q for q, got in by_query.items() if len(got) == len(models)]
        if len(complete) < len(by_query) and not drop_incomplete:
            raise OutcomeTableError(
                f"{len(by_query) - len(complete)} queries lack an outcome for some model"
            )
        n, m = len(complete), len(models)
        scores, costs, lats = np.zeros((n, m)), np.zeros((n, m)), np.zeros((n, m))
        conf = np.full((n, m), np.nan)
        prompts, splits, groups = [], [], []
        answers: list[list[str]] = []
        for i, qid in enumerate(complete):
            got = by_query[qid]
            first = got[models[0]]
            prompts.append(first.prompt)
            splits.append(first.split)
            groups.append(first.group)
            answers.append([got[model].answer for model in models])
            for j, model in enumerate(models):
                r = got[model]
                scores[i, j], costs[i, j], lats[i, j] = r.score, r.cost_usd, r.latency_s
                if r.confidence is not None:
                    conf[i, j] = r.confidence
        return cls(
            query_ids=complete,
            prompts=prompts,
            models=models,
            scores=scores,
            costs=costs,
            latencies=lats,
            splits=splits,
            groups=groups,
            confidence=None if np.isnan(conf).all() else conf,
            name=name,
            answers=answers if any(any(a) for a in answers) else None,
        )


# -- files ---------------------------------------------------------------------------------------


def _open(path: Path, mode: str) -> IO[str]:
    if path.suffix == ".gz":
        raw: IO[bytes] = gzip.open(path, mode.replace("t", "") + "b")  # type: ignore[assignment]  # noqa: SIM115
        return io.TextIOWrapper(raw, encoding="utf-8")
    return path.open(mode.replace("t", ""), encoding="utf-8", newline="")


def _float(value: str, column: str, where: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise OutcomeTableError(f"{where}: {column} {value!r} is not a number") from None


def read_rows(path: str | Path) -> list[OutcomeRow]:
    """The rows of an outcome table file (CSV, optionally .gz), checked column by column."""
    path = Path(path)
    if not path.is_file():
        raise OutcomeTableError(f"no outcome table at {path}")
    with _open(path, "rt") as handle:
        first = handle.readline()
        if first.startswith("# shoal-outcomes"):
            version = first.strip().rsplit("v", 1)[-1]
            if version != str(FORMAT_VERSION):
                raise OutcomeTableError(
                    f"{path}: outcome table format v{version}; this shoal reads v{FORMAT_VERSION}"
                )
            lines: Iterable[str] = handle
        else:
            lines = [first, *handle]
        reader = csv.DictReader(lines)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or ())]
        if missing:
            raise OutcomeTableError(f"{path}: missing column(s) {', '.join(missing)}")
        rows: list[OutcomeRow] = []
        for n, rec in enumerate(reader, start=2):
            where = f"{path}:{n}"
            conf = rec.get("confidence") or ""
            rows.append(
                OutcomeRow(
                    query_id=rec["query_id"],
                    prompt=rec["prompt"],
                    model=rec["model"],
                    score=_float(rec["score"], "score", where),
                    cost_usd=_float(rec["cost_usd"], "cost_usd", where),
                    latency_s=_float(rec["latency_s"] or "0", "latency_s", where),
                    split=rec.get("split") or "",
                    group=rec.get("group") or "",
                    confidence=_float(conf, "confidence", where) if conf else None,
                    input_tokens=int(rec["input_tokens"]) if rec.get("input_tokens") else None,
                    output_tokens=int(rec["output_tokens"]) if rec.get("output_tokens") else None,
                    answer=rec.get("answer") or "",
                )
            )
    return rows


def read_table(path: str | Path) -> OutcomeTable:
    rows = read_rows(path)
    if not rows:
        raise OutcomeTableError(f"the outcome table {path} has no rows")
    return OutcomeTable.from_rows(rows, name=Path(path).name)


class RowWriter:
    """Appends rows to an outcome table file, flushing each one (a killed build keeps them)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        self._handle = _open(self.path, "at")
        self._writer = csv.DictWriter(self._handle, fieldnames=[*REQUIRED, *OPTIONAL])
        if fresh:
            self._handle.write(HEADER_LINE + "\n")
            self._writer.writeheader()
            self._handle.flush()

    def write(self, row: OutcomeRow) -> None:
        self._writer.writerow(row.as_csv())
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def write_table(table: OutcomeTable, path: str | Path) -> None:
    path = Path(path)
    if path.exists():
        path.unlink()
    with RowWriter(path) as writer:
        for row in table.rows():
            writer.write(row)
