"""Gold-answer data sets from `../shared/data`, as prompts with a grader each.

Each item carries its prompt, its gold answer and the kind of answer expected; `grade` extracts
the model's answer from its text and compares it with the gold one. Extraction is deliberately
forgiving of format (a letter in parentheses, "Answer: B", a capitalised "Yes") and strict about
content (two different letters, or both "yes" and "no", is no answer).
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shoal.errors import ConfigError
from shoal.messages import ChatRequest, Message

Kind = Literal["choice", "yesno", "sentiment", "number"]
DATASETS = ("mmlu", "arc", "boolq", "sst2", "gsm8k")

SYSTEM_CHOICE = "Answer the multiple-choice question with the letter of the correct option only."
SYSTEM_YESNO = "Answer the question about the passage with yes or no only."
SYSTEM_SENTIMENT = "Say whether the sentiment of the review is positive or negative: one word."
SYSTEM_MATH = "Solve the problem step by step, briefly. End with a line 'Answer: <number>'."
MAX_TOKENS: dict[Kind, int] = {"choice": 4, "yesno": 3, "sentiment": 3, "number": 256}
# One worked example per kind of answer, shown before the question: small models copy the format.
EXAMPLES: dict[Kind, tuple[str, str]] = {
    "choice": (
        "Which gas do plants take in for photosynthesis?\nA. Oxygen\nB. Carbon dioxide\n"
        "C. Nitrogen\nD. Helium\nAnswer:",
        "B",
    ),
    "yesno": (
        "Passage: The Nile flows north through eleven countries into the Mediterranean Sea.\n"
        "Question: does the nile flow into the mediterranean sea?\nAnswer yes or no:",
        "yes",
    ),
    "sentiment": ("Review: a tedious , joyless mess .\nSentiment:", "negative"),
    "number": (
        "A box holds 6 eggs. How many eggs are in 4 boxes and 3 loose eggs?",
        "4 boxes hold 4 * 6 = 24 eggs; with 3 loose eggs that is 24 + 3 = 27.\nAnswer: 27",
    ),
}


@dataclass(frozen=True)
class GoldItem:
    query_id: str
    dataset: str
    kind: Kind
    prompt: str
    gold: str
    system: str
    group: str = ""
    letters: str = "ABCD"

    def request(self) -> ChatRequest:
        """The prompt after one worked example of the expected answer format."""
        example, answer = EXAMPLES[self.kind]
        return ChatRequest(
            messages=(
                Message(role="system", content=self.system),
                Message(role="user", content=example),
                Message(role="assistant", content=answer),
                Message(role="user", content=self.prompt),
            ),
            max_tokens=MAX_TOKENS[self.kind],
            logprobs=True,
            top_logprobs=5,
        )


def shared_data_dir() -> Path:
    """`$SHOAL_DATA_DIR`, else the first `shared/data` found above the working directory."""
    if explicit := os.environ.get("SHOAL_DATA_DIR"):
        return Path(explicit).expanduser()
    for base in (Path.cwd(), *Path.cwd().parents, *Path(__file__).resolve().parents):
        candidate = base / "shared" / "data"
        if candidate.is_dir():
            return candidate
    raise ConfigError("cannot find the shared data folder; set SHOAL_DATA_DIR")


# -- loaders -------------------------------------------------------------------------------------


def _choice_prompt(question: str, options: list[tuple[str, str]]) -> str:
    lines = [question.strip(), *(f"{label}. {text}" for label, text in options), "Answer:"]
    return "\n".join(lines)


def load_mmlu(root: Path) -> list[GoldItem]:
    with gzip.open(root / "mmlu" / "test.csv.gz", "rt", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [
        GoldItem(
            query_id=f"mmlu-{i}",
            dataset="mmlu",
            kind="choice",
            prompt=_choice_prompt(r["question"], [(c, r[c]) for c in "ABCD"]),
            gold=r["answer"],
            system=SYSTEM_CHOICE,
            group=f"mmlu/{r['subject']}",
        )
        for i, r in enumerate(rows)
    ]


def load_arc(root: Path) -> list[GoldItem]:
    items = []
    with (root / "arc_challenge" / "test.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            r = json.loads(line)
            options = [(c["label"], c["text"]) for c in r["question"]["choices"]]
            items.append(
                GoldItem(
                    query_id=f"arc-{r['id']}",
                    dataset="arc",
                    kind="choice",
                    prompt=_choice_prompt(r["question"]["stem"], options),
                    gold=r["answerKey"],
                    system=SYSTEM_CHOICE,
                    group="arc",
                    letters="".join(label for label, _ in options),
                )
            )
    return items


def load_boolq(root: Path) -> list[GoldItem]:
    items = []
    with (root / "boolq" / "validation.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            r = json.loads(line)
            prompt = f"Passage: {r['passage']}\nQuestion: {r['question']}?\nAnswer yes or no:"
            items.append(
                GoldItem(
                    query_id=f"boolq-{r['idx']}",
                    dataset="boolq",
                    kind="yesno",
                    prompt=prompt,
                    gold="yes" if r["answer"] else "no",
                    system=SYSTEM_YESNO,
                    group="boolq",
                )
            )
    return items


def load_sst2(root: Path) -> list[GoldItem]:
    items = []
    with (root / "sst2" / "dev.tsv").open(encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        for i, r in enumerate(reader):
            items.append(
                GoldItem(
                    query_id=f"sst2-{i}",
                    dataset="sst2",
                    kind="sentiment",
                    prompt=f"Review: {r['text'].strip()}\nSentiment:",
                    gold="positive" if r["label"].strip() == "1" else "negative",
                    system=SYSTEM_SENTIMENT,
                    group="sst2",
                )
            )
    return items


def load_gsm8k(root: Path) -> list[GoldItem]:
    items = []
    with (root / "gsm8k" / "test.jsonl").open(encoding="utf-8") as handle:
        for i, line in enumerate(handle):
            r = json.loads(line)
            gold = r["answer"].rsplit("####", 1)[-1].strip().replace(",", "")
            items.append(
                GoldItem(
                    query_id=f"gsm8k-{i}",
                    dataset="gsm8k",
                    kind="number",
                    prompt=r["question"].strip(),
                    gold=gold,
                    system=SYSTEM_MATH,
                    group="gsm8k",
                )
            )
    return items


LOADERS: dict[str, Callable[[Path], list[GoldItem]]] = {
    "mmlu": load_mmlu,
    "arc": load_arc,
    "boolq": load_boolq,
    "sst2": load_sst2,
    "gsm8k": load_gsm8k,
}


def load(
    dataset: str, n: int | None = None, *, seed: int = 0, root: Path | None = None
) -> list[GoldItem]:
    """`n` items of `dataset`, a seeded random sample (the same items for the same seed)."""
    if dataset not in LOADERS:
        raise ConfigError(f"unknown dataset {dataset!r}; valid data sets: {', '.join(DATASETS)}")
    items = LOADERS[dataset](root or shared_data_dir())
    if n is not None and n < len(items):
        items = random.Random(f"{dataset}-{seed}").sample(items, n)
    return items


# -- extraction and grading ----------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_choice(text: str, letters: str = "ABCD") -> str | None:
    """The option letter a model answered, or None when it named none or several."""
    body = text.strip()
    marked = re.search(r"answer\s*(?:is)?\s*[:\-]?\s*\(?([A-Z])\b", body, re.IGNORECASE)
    if marked and marked.group(1).upper() in letters:
        return marked.group(1).upper()
    found = set(re.findall(rf"\b([{letters}])\b", body))
    lead = re.match(r"^\(?([A-Za-z])(?:[).:\s]|$)", body)
    if lead and lead.group(1).upper() in letters and (lead.group(1).isupper() or len(body) <= 3):
        letter = lead.group(1).upper()
        return letter if found <= {letter} else None  # "A or B" names no single answer
    return found.pop() if len(found) == 1 else None


def extract_word(text: str, options: tuple[str, str]) -> str | None:
    """Which of two words (e.g. yes/no) the answer says; None when it says both or neither."""
    words = re.findall(r"[a-z]+", text.lower())
    hits = [w for w in words if w in options]
    if not hits:
        return None
    first = hits[0]
    return first if all(h == first for h in hits[:3]) else None


def extract_number(text: str) -> str | None:
    """The final numeric answer: after the last 'Answer:' (or '####'), else the last number."""
    tail = re.split(r"answer\s*(?:is)?\s*[:=]?|####", text, flags=re.IGNORECASE)
    for part in ([tail[-1]] if len(tail) > 1 else []) + [text]:
        numbers = _NUMBER.findall(part)
        if numbers:
            value = numbers[0] if part is not text else numbers[-1]
            return _normalise_number(value)
    return None


def _normalise_number(value: str) -> str:
    value = value.replace(",", "")
    try:
        number = float(value)
    except ValueError:
        return value
    return str(int(number)) if number.is_integer() else repr(number)


def extract(item: GoldItem, text: str) -> str | None:
    if item.kind == "choice":
        return extract_choice(text, item.letters)
    if item.kind == "yesno":
        return extract_word(text, ("yes", "no"))
    if item.kind == "sentiment":
        return extract_word(text, ("positive", "negative"))
    return extract_number(text)


def grade(item: GoldItem, text: str) -> tuple[float, str]:
    """(score, extracted answer): 1.0 when the extracted answer equals the gold one."""
    answer = extract(item, text)
    if answer is None:
        return 0.0, ""
    gold = _normalise_number(item.gold) if item.kind == "number" else item.gold
    return (1.0 if answer == gold else 0.0), answer
