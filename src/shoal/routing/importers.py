"""Importers: the per-query outcome data in `../shared/data` as shoal outcome tables.

- `routellm_mmlu`: RouteLLM's MMLU table (GPT-4-1106 vs Mixtral-8x7B, 14,042 queries). Cost per
  query from token prices including MMLU's 5-shot prefix of the query's subject (tokens counted
  as characters / 4; output one token). Query ids equal `mmlu-<row>` of `../mmlu/test.csv.gz`.
- `routellm_mt_bench`: RouteLLM's MT-Bench judgements (80 questions x 2 turns, GPT-4-1106 vs
  Mixtral-8x7B): the GPT-4 judge's 1-10 grade as a score in [0, 1], each model's answer kept,
  cost from token prices of the conversation and the answer (characters / 4).
- `routerbench`: any RouterBench task file of RouterDC's layout (11 models, 0/1 correctness,
  response and USD cost per query). Sample ids listed twice (across RouterDC's splits) are
  dropped. Each model's response is kept as its answer.
- `routerdc`: RouterDC's 7-model scores (train/test files where both exist). These ~7B models
  have no published prices: each query is charged by length at one price for every model, so
  routing there is about quality only.

Every importer strips what a task's prompts share (`strip_shared`): few-shot examples before the
question and an instruction after it. Left in, they dominate the embedding (a long shared prefix
fills MiniLM's window), every query looks alike, and a router learns nothing.
"""

from __future__ import annotations

import ast
import csv
import gzip
import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shoal.errors import ConfigError, OutcomeTableError
from shoal.routing.datasets import shared_data_dir
from shoal.routing.outcomes import OutcomeRow, OutcomeTable, read_table

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


_TURN1_ANSWER = re.compile(
    r"\[The Start of Assistant's Answer\]\n(.*?)\n\[The End of Assistant's Answer\]", re.S
)
_TURN2_ANSWER = re.compile(
    r"### Assistant A:\n((?:(?!### User:).)*?)\s*<\|The End of Assistant A's Conversation", re.S
)


def routellm_mt_bench(root: Path | None = None) -> OutcomeTable:
    """RouteLLM's MT-Bench table: one query per question and turn, scored by the GPT-4 judge.

    The prompt of a second turn is both user turns (the second alone, "Rewrite your previous
    response...", says little). A grade g in 1..10 scores (g - 1) / 9. Cost: token prices of the
    conversation so far (earlier answers included) and of the answer, characters / 4.
    """
    root = (root or shared_data_dir()) / "routellm"
    with (root / "mt_bench_questions.jsonl").open(encoding="utf-8") as handle:
        questions = {q["question_id"]: q for q in map(json.loads, handle)}
    with gzip.open(root / "mt_bench_judgements.jsonl.gz", "rt", encoding="utf-8") as handle:
        judged = [json.loads(line) for line in handle]
    answers: dict[tuple[int, str, int], str] = {}
    for rec in judged:
        pattern = _TURN1_ANSWER if rec["turn"] == 1 else _TURN2_ANSWER
        found = pattern.search(rec["user_prompt"])
        if found is None:
            raise OutcomeTableError(f"MT-Bench question {rec['question_id']}: no answer found")
        answers[rec["question_id"], rec["model"], rec["turn"]] = found.group(1).strip()
    rows: list[OutcomeRow] = []
    for rec in judged:
        qid, model, turn = rec["question_id"], rec["model"], rec["turn"]
        if model not in ROUTELLM_PRICES:
            raise OutcomeTableError(f"MT-Bench: no price for model {model!r}")
        q = questions[qid]
        prompt = "\n\n".join(q["turns"][:turn])
        context = prompt + (answers[qid, model, 1] if turn == 2 else "")
        answer = answers[qid, model, turn]
        price_in, price_out = ROUTELLM_PRICES[model]
        rows.append(
            OutcomeRow(
                query_id=f"mt-bench-{qid}-{turn}",
                prompt=prompt,
                model=model,
                score=(float(rec["score"]) - 1.0) / 9.0,
                cost_usd=(_tokens(context) * price_in + _tokens(answer) * price_out) / 1e6,
                latency_s=0.0,
                group=q["category"],
                answer=answer,
            )
        )
    return OutcomeTable.from_rows(rows, name="routellm-mt-bench")


# -- shared parts of a task's prompts -------------------------------------------------------------

_BLANK_LINE = re.compile(r"\n[ \t]*\n")  # where one few-shot example ends and the next begins
_LINE = re.compile(r"\n")


def shared_prefix(texts: Sequence[str], share: float = 0.5) -> str:
    """The longest prefix ending at a blank line (an example boundary) that at least `share` of
    `texts` start with and go on after: a task's few-shot examples, whatever their layout."""
    counts: Counter[str] = Counter()
    for text in texts:
        for m in _BLANK_LINE.finditer(text):
            if text[m.end() :].strip():
                counts[text[: m.end()]] += 1
    need = max(2, math.ceil(share * len(texts)))
    return max((p for p, c in counts.items() if c >= need), key=len, default="")


def shared_suffix(texts: Sequence[str], share: float = 0.5) -> str:
    """The longest suffix starting at a line break that at least `share` of `texts` end with
    after some text of their own: an instruction repeated after every question."""
    counts: Counter[str] = Counter()
    for text in texts:
        for m in _LINE.finditer(text):
            if text[: m.start()].strip():
                counts[text[m.start() :]] += 1
    need = max(2, math.ceil(share * len(texts)))
    return max((p for p, c in counts.items() if c >= need), key=len, default="")


def strip_shared(texts: Sequence[str], share: float = 0.5) -> list[str]:
    """`texts` without the prefix (cut at an example boundary) and the suffix (cut at a line
    break) that most of them share; texts without them are kept whole."""
    prefix = shared_prefix(texts, share)
    body = [t[len(prefix) :] if prefix and t.startswith(prefix) else t for t in texts]
    suffix = shared_suffix(body, share)
    body = [t[: -len(suffix)] if suffix and t.endswith(suffix) else t for t in body]
    return [t.strip() for t in body]


def _strip_by_group(prompts: list[str], groups: Sequence[str]) -> list[str]:
    out = list(prompts)
    for group in dict.fromkeys(groups):
        index = [i for i, g in enumerate(groups) if g == group]
        for i, text in zip(index, strip_shared([prompts[i] for i in index]), strict=True):
            out[i] = text
    return out


def _last(value: str) -> str:
    """The last element of a Python-list string (RouterBench's prompts and responses)."""
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value
    if isinstance(parsed, list | tuple):
        return str(parsed[-1]) if parsed else ""
    return str(parsed)


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
    records = [r for r in records if counts[r["sample_id"]] == 1]
    groups = [r.get("eval_name") or task for r in records]
    prompts = _strip_by_group([_last(r["prompt"]) for r in records], groups)
    rows: list[OutcomeRow] = []
    for rec, prompt, group in zip(records, prompts, groups, strict=True):
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
                    group=group,
                    answer=_last(rec.get(f"{model}|model_response") or ""),
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
    records: list[tuple[str, int, dict[str, Any]]] = []
    for split, path in found:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            records.extend((split, i, json.loads(line)) for i, line in enumerate(handle))
    prompts = strip_shared([rec["question"] for _, _, rec in records])
    rows: list[OutcomeRow] = []
    for (split, i, rec), prompt in zip(records, prompts, strict=True):
        cost = _tokens(rec["question"]) * ROUTERDC_PRICE_PER_MTOK / 1e6
        for model, score in rec["scores"].items():
            rows.append(
                OutcomeRow(
                    query_id=f"{task}-{split or 'all'}-{i}",
                    prompt=prompt,
                    model=model,
                    score=float(score),
                    cost_usd=cost,
                    latency_s=0.0,
                    split=split,
                    group=task,
                )
            )
    return OutcomeTable.from_rows(rows, name=f"routerdc-{task}")


SOURCES = ("routellm:mmlu", "routellm:mt-bench", "routerbench:TASK", "routerdc:TASK")


def load(source: str | Path) -> OutcomeTable:
    """An outcome table by importer name (`routellm:mmlu`, `routellm:mt-bench`,
    `routerbench:TASK`, `routerdc:TASK`) or from a CSV file."""
    kind, _, task = str(source).partition(":")
    if kind == "routellm" and task in ("", "mmlu"):
        return routellm_mmlu()
    if kind == "routellm" and task == "mt-bench":
        return routellm_mt_bench()
    if kind == "routerbench" and task:
        return routerbench(task)
    if kind == "routerdc" and task:
        return routerdc(task)
    if kind in ("routellm", "routerbench", "routerdc"):
        raise ConfigError(f"unknown importer {str(source)!r}; valid: {', '.join(SOURCES)}")
    return read_table(Path(source))
