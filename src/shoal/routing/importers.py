"""Importers: the per-query outcome data in `../shared/data` as shoal outcome tables.

- `routellm_mmlu`: RouteLLM's MMLU table (GPT-4-1106 vs Mixtral-8x7B, 14,042 queries). Cost per
  query from token prices including MMLU's 5-shot prefix of the query's subject (tokens counted
  as characters / 4; output one token). Query ids equal `mmlu-<row>` of `../mmlu/test.csv.gz`.
- `routerbench`: any RouterBench task file of RouterDC's layout (11 models, 0/1 correctness and
  USD cost per query). Sample ids listed twice (across RouterDC's splits) are dropped. The
  stored prompt is the final question: the few-shot examples before it are the same for all.
- `routerdc`: RouterDC's 7-model scores (train/test files where both exist). These ~7B models
  have no published prices: each query is charged by length at one price for every model, so
  routing there is about quality only.
"""

from __future__ import annotations

import ast
import csv
import gzip
import json
import re
from collections import Counter
from pathlib import Path

from shoal.errors import ConfigError, OutcomeTableError
from shoal.routing.datasets import shared_data_dir
from shoal.routing.outcomes import OutcomeRow, OutcomeTable

csv.field_size_limit(1 << 30)

ROUTELLM_PRICES = {  # USD per million tokens (input, output), as RouteLLM's paper prices them
    "gpt-4-1106-preview": (10.0, 30.0),
    "mistralai/Mixtral-8x7B-Instruct-v0.1": (0.6, 0.6),
}
ROUTERDC_PRICE_PER_MTOK = 0.2


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


def mmlu_prefix(subject: str, dev: list[dict[str, str]]) -> str:
    """MMLU's standard 5-shot prefix for one subject."""
    topic = subject.replace("_", " ")
    head = f"The following are multiple choice questions (with answers) about {topic}.\n\n"
    shots = [
        f"{r['question']}\n"
        + "".join(f"{c}. {r[c]}\n" for c in "ABCD")
        + f"Answer: {r['answer']}\n\n"
        for r in dev
        if r["subject"] == subject
    ]
    return head + "".join(shots[:5])


def routellm_mmlu(root: Path | None = None, *, limit: int | None = None) -> OutcomeTable:
    root = root or shared_data_dir()
    with (root / "mmlu" / "dev.csv").open(encoding="utf-8") as handle:
        dev = list(csv.DictReader(handle))
    prefixes: dict[str, int] = {}
    rows: list[OutcomeRow] = []
    path = root / "routellm" / "mmlu_responses.csv.gz"
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        models = [m for m in (reader.fieldnames or ()) if m in ROUTELLM_PRICES]
        if len(models) != 2:
            raise OutcomeTableError(f"{path}: expected the GPT-4 and Mixtral columns")
        for i, rec in enumerate(reader):
            if limit is not None and i >= limit:
                break
            subject = rec["subject"]
            if subject not in prefixes:
                prefixes[subject] = _tokens(mmlu_prefix(subject, dev))
            tokens_in = prefixes[subject] + _tokens(rec["prompt"])
            for model in models:
                price_in, price_out = ROUTELLM_PRICES[model]
                rows.append(
                    OutcomeRow(
                        query_id=f"mmlu-{i}",
                        prompt=rec["prompt"],
                        model=model,
                        score=1.0 if rec[model] == "True" else 0.0,
                        cost_usd=(tokens_in * price_in + price_out) / 1e6,
                        latency_s=0.0,
                        group=subject,
                    )
                )
    return OutcomeTable.from_rows(rows, name="routellm-mmlu")


_SHOT_END = re.compile(r"\nAnswer:\n[A-E]\n\n")


def final_question(prompt: str) -> str:
    """The last question of a few-shot prompt (RouterBench's layout)."""
    return _SHOT_END.split(prompt)[-1].strip()


def routerbench(task: str = "arc_challenge", root: Path | None = None) -> OutcomeTable:
    """One RouterBench task file (`arc_challenge`, `mbpp`, or another of the same layout)."""
    root = root or shared_data_dir()
    path = root / "routerbench_subset" / f"{task}.csv.gz"
    if not path.is_file():
        have = sorted(p.name.removesuffix(".csv.gz") for p in path.parent.glob("*.csv.gz"))
        raise ConfigError(f"no RouterBench task {task!r}; valid: {', '.join(have)}")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        records = list(csv.DictReader(handle))
    if not records:
        raise OutcomeTableError(f"{path} has no rows")
    models = [k.removesuffix("|total_cost") for k in records[0] if k.endswith("|total_cost")]
    counts = Counter(r["sample_id"] for r in records)
    rows: list[OutcomeRow] = []
    for rec in records:
        if counts[rec["sample_id"]] > 1:
            continue
        parts = ast.literal_eval(rec["prompt"])
        prompt = final_question(parts[-1] if isinstance(parts, list) else str(parts))
        for model in models:
            rows.append(
                OutcomeRow(
                    query_id=rec["sample_id"],
                    prompt=prompt,
                    model=model,
                    score=float(rec[model]),
                    cost_usd=float(rec[f"{model}|total_cost"]),
                    latency_s=0.0,
                    split=rec.get("routerdc_split", ""),
                    group=rec.get("eval_name", task),
                )
            )
    return OutcomeTable.from_rows(rows, name=f"routerbench-{task}")


def routerdc(task: str = "arc_challenge", root: Path | None = None) -> OutcomeTable:
    """RouterDC's scores for one task (`mmlu`, `gsm8k`, `arc_challenge`, ... or a single file)."""
    root = (root or shared_data_dir()) / "routerdc_7b_scores"
    files = {
        "train": [root / f"{task}_train.jsonl.gz", root / f"{task}-train.jsonl.gz"],
        "test": [root / f"{task}_test.jsonl.gz", root / f"{task}-test.jsonl.gz"],
        "": [root / f"{task}.jsonl.gz"],
    }
    found = [(split, p) for split, paths in files.items() for p in paths if p.is_file()]
    if not found:
        have = sorted(
            {
                re.sub(r"[_-](train|test)$", "", p.name.removesuffix(".jsonl.gz"))
                for p in root.glob("*.jsonl.gz")
            }
        )
        raise ConfigError(f"no RouterDC task {task!r}; valid: {', '.join(have)}")
    rows: list[OutcomeRow] = []
    for split, path in found:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            for i, line in enumerate(handle):
                rec = json.loads(line)
                cost = _tokens(rec["question"]) * ROUTERDC_PRICE_PER_MTOK / 1e6
                for model, score in rec["scores"].items():
                    rows.append(
                        OutcomeRow(
                            query_id=f"{task}-{split or 'all'}-{i}",
                            prompt=rec["question"],
                            model=model,
                            score=float(score),
                            cost_usd=cost,
                            latency_s=0.0,
                            split=split,
                            group=task,
                        )
                    )
    return OutcomeTable.from_rows(rows, name=f"routerdc-{task}")
