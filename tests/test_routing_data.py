"""Gold-answer data sets, answer extraction and grading, and importers of the shared data."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.models.fake import FunctionModel
from shoal.routing import datasets, importers
from shoal.routing.build import build_outcomes, default_split
from shoal.routing.datasets import GoldItem, extract_choice, extract_number, extract_word, grade
from shoal.routing.outcomes import read_rows, read_table


@pytest.mark.parametrize(
    ("text", "letters", "want"),
    [
        ("B", "ABCD", "B"),
        ("(C)", "ABCD", "C"),
        ("C. Expansionary policy", "ABCD", "C"),
        ("The answer is D.", "ABCD", "D"),
        ("Answer: a", "ABCD", "A"),
        ("a", "ABCD", "A"),
        ("E", "ABCDE", "E"),
        ("E", "ABCD", None),
        ("A or B", "ABCD", None),
        ("To determine the answer", "ABCD", None),
        ("", "ABCD", None),
    ],
)
def test_choice_extraction(text: str, letters: str, want: str | None) -> None:
    assert extract_choice(text, letters) == want


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("yes", "yes"),
        ("Yes.", "yes"),
        ("No, it does not.", "no"),
        ("yes or no", None),
        ("maybe", None),
    ],
)
def test_yes_no_extraction(text: str, want: str | None) -> None:
    assert extract_word(text, ("yes", "no")) == want


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("4 * 6 = 24; 24 + 3 = 27.\nAnswer: 27", "27"),
        ("so she makes $1,234.00 a day. Answer: $1,234", "1234"),
        ("The answer is 3.5 hours", "3.5"),
        ("first 12, then 7, total 19", "19"),
        ("#### -4", "-4"),
        ("no numbers here", None),
    ],
)
def test_number_extraction(text: str, want: str | None) -> None:
    assert extract_number(text) == want


def test_each_dataset_loads_and_grades_its_gold_answer() -> None:
    for name in datasets.DATASETS:
        items = datasets.load(name, 3, seed=1)
        assert len(items) == 3
        assert items == datasets.load(name, 3, seed=1)  # the same sample for the same seed
        for item in items:
            assert grade(item, item.gold) == (
                1.0,
                item.gold if item.kind != "number" else datasets._normalise_number(item.gold),
            )
            request = item.request()
            assert request.logprobs
            assert request.messages[-1].content == item.prompt
    sentiment = datasets.load("sst2", 1)[0]
    wrong = "negative" if sentiment.gold == "positive" else "positive"
    assert grade(sentiment, wrong.capitalize())[0] == 0.0
    assert grade(sentiment, sentiment.gold.capitalize())[0] == 1.0
    with pytest.raises(Exception, match="valid data sets: mmlu, arc, boolq, sst2, gsm8k"):
        datasets.load("squad")


def test_gsm8k_gold_is_the_number_after_the_marks() -> None:
    item = datasets.load("gsm8k")[0]
    assert item.gold == "18"  # Janet's ducks
    assert grade(item, "She sells 9 eggs for $2 each.\nAnswer: $18")[0] == 1.0


async def test_outcomes_build_is_resumable(tmp_path: Path) -> None:
    items: list[GoldItem] = datasets.load("arc", 3) + datasets.load("boolq", 2)

    def oracle(request: object) -> str:
        prompt = request.messages[-1].content  # type: ignore[attr-defined]
        return next(i.gold for i in items if i.prompt == prompt)

    right = FunctionModel(oracle, model_id="right")
    wrong = FunctionModel(lambda r: "I am not sure", model_id="wrong")
    path = tmp_path / "out.csv"
    seen: list[tuple[int, int]] = []
    added = await build_outcomes(
        [right, wrong], items[:3], path, progress=lambda d, t, w: seen.append((d, t))
    )
    assert added == 6
    assert seen[-1] == (6, 6)
    added = await build_outcomes([right, wrong], items, path)
    assert added == 4  # only the two new questions
    assert len(right.calls) == 5
    table = read_table(path)
    assert len(table) == 5
    assert table.mean_scores() == {"right": 1.0, "wrong": 0.0}
    rows = read_rows(path)
    assert {r.split for r in rows} <= {"train", "test"}
    assert rows[0].split == default_split(rows[0].query_id)
    assert all(r.input_tokens for r in rows)


def test_routellm_mmlu_importer_prices_the_five_shot_prefix() -> None:
    table = importers.routellm_mmlu(limit=50)
    assert table.models == ["mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview"]
    assert len(table) == 50
    assert table.query_ids[0] == "mmlu-0"
    assert table.groups[0] == "abstract_algebra"
    ratio = table.costs[:, 1] / table.costs[:, 0]
    assert 15 < ratio.mean() < 19  # GPT-4 is ~17x Mixtral per query
    assert table.costs[0, 1] > 10 * 200 / 1e6  # the 5-shot prefix is hundreds of tokens
    gold = datasets.load("mmlu")[0]
    assert gold.query_id == table.query_ids[0]  # joins by row


def test_routerbench_importer_drops_duplicates_and_strips_the_shared_examples() -> None:
    table = importers.routerbench("arc_challenge")
    assert len(table) == 1484 - 28
    assert len(table.models) == 11
    assert set(table.splits) == {"train", "test"}
    assert table.prompts[0].startswith("Research is being conducted on using energy from the Sun")
    assert table.prompts[0].endswith("D) The availability of clean resources will increase.")
    assert not any("Answer:" in p or "Print only" in p for p in table.prompts)
    assert len(set(table.prompts)) == len(table)
    assert table.answers is not None
    gpt4 = table.model_index("gpt-4-1106-preview")
    assert table.answers[0][gpt4] == "D"
    scores = table.mean_scores()
    assert scores["gpt-4-1106-preview"] == pytest.approx(0.954, abs=0.002)
    assert table.mean_costs()["gpt-4-1106-preview"] == pytest.approx(0.00507, rel=0.02)
    with pytest.raises(Exception, match="valid: arc_challenge, mbpp"):
        importers.routerbench("hellaswag")


def test_shared_examples_are_stripped_whatever_their_layout() -> None:
    """Few-shot examples laid out unlike ARC's (Q:/A: pairs, worked answers), an instruction
    after each question, and a few prompts without the examples: only the questions remain."""
    shots = "".join(
        f"Q: What is {a} plus {b}?\nA: {a} plus {b} makes {a + b}.\nThe answer is {a + b}.\n\n"
        for a, b in [(2, 3), (10, 7), (4, 4)]
    )
    questions = [
        f"Q: A farmer has {i} cows and buys {i + 3} more. How many now?" for i in range(40)
    ]
    tail = "\nThink step by step, then give the number."
    prompts = [shots + q + tail for q in questions[:36]] + [q + tail for q in questions[36:]]
    assert importers.strip_shared(prompts) == questions
    plain = ["Name a river.", "Name a mountain.\n\nIn Europe.", "Add 2 and 2."]
    assert importers.strip_shared(plain) == plain  # nothing shared: nothing cut


def _task_names(folder: Path, suffix: str) -> list[str]:
    import re

    names = {
        re.sub(r"[_-](train|test)$", "", p.name.removesuffix(suffix)) for p in folder.iterdir()
    }
    return sorted(n for n in names if not n.endswith(".md"))


def test_no_imported_task_keeps_a_shared_prefix_or_collapses() -> None:
    """Every task file in the shared routing data: prompts distinct, nothing shared left."""
    root = datasets.shared_data_dir()
    tables = [importers.routerbench(t) for t in _task_names(root / "routerbench_subset", ".csv.gz")]
    tables += [importers.routerdc(t) for t in _task_names(root / "routerdc_7b_scores", ".jsonl.gz")]
    tables.append(importers.routellm_mt_bench())
    assert len(tables) >= 2 + 10 + 1
    for table in tables:
        assert len(set(table.prompts)) >= 0.99 * len(table), table.name
        assert importers.shared_prefix(table.prompts) == "", table.name
        assert not any(p.strip() == "" for p in table.prompts), table.name


def test_a_left_in_prefix_collapses_the_embeddings_and_is_flagged() -> None:
    """The failure the stripping prevents, with the real MiniLM: ARC prompts with their five
    shared examples embed alike and the check says so; stripped, they do not."""
    from shoal.models.embedder import GGUF_NAME, minilm
    from shoal.routing.diagnose import embedding_warnings
    from shoal.settings import default_cache_dir

    cache = default_cache_dir()
    if not (cache / "embedders" / GGUF_NAME).is_file():
        pytest.skip("the MiniLM GGUF is not converted yet: run `shoal route setup`")
    import csv
    import gzip
    from itertools import islice

    path = datasets.shared_data_dir() / "routerbench_subset" / "arc_challenge.csv.gz"
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        raw = [importers._last(r["prompt"]) for r in islice(csv.DictReader(handle), 40)]
    embedder = minilm(cache, "gguf", threads=1)
    collapsed = embedding_warnings(embedder.embed(raw).astype(float))
    assert any("nearly parallel" in w for w in collapsed)
    assert embedding_warnings(embedder.embed(importers.strip_shared(raw)).astype(float)) == []
    embedder.close()


def test_mt_bench_importer_keeps_both_turns_and_answers() -> None:
    table = importers.routellm_mt_bench()
    assert len(table) == 160
    assert table.models == ["gpt-4-1106-preview", "mistralai/Mixtral-8x7B-Instruct-v0.1"]
    scores = table.mean_scores()
    assert scores["gpt-4-1106-preview"] == pytest.approx((9.23 - 1) / 9, abs=0.01)
    assert table.answers is not None
    assert all(all(a) for a in table.answers)
    turn2 = table.query_ids.index("mt-bench-81-2")
    assert table.prompts[turn2].startswith("Compose an engaging travel blog post")
    assert table.prompts[turn2].endswith("Start every sentence with the letter A.")
    ratio = table.costs[:, 0].mean() / table.costs[:, 1].mean()
    assert 20 < ratio < 80  # GPT-4 writes longer answers at 50x the output price
    with pytest.raises(Exception, match="valid: routellm:mmlu, routellm:mt-bench"):
        importers.load("routellm:gsm8k")


def test_routerdc_importer_reads_both_splits() -> None:
    table = importers.routerdc("arc_challenge")
    assert len(table.models) == 7
    assert len(table) == 352 + 820
    assert set(table.splits) == {"train", "test"}
    assert table.scores.max() <= 1.0
    with pytest.raises(Exception, match=r"valid: .*gsm8k"):
        importers.routerdc("nope")
