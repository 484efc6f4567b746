"""Specialists: trained on teacher answers with the real MiniLM GGUF, served as fleet models,
routed as cascades through the engine (the real tiny model as teacher), guarded against drift,
written into and out of fleet files; and every kind of bad input with its own error."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from shoal.cli.main import app
from shoal.engine import Engine
from shoal.errors import (
    ConfigError,
    DistillationError,
    InvalidRequestError,
    SpecialistStaleError,
    TargetNotReachedError,
    WeightsCorruptedError,
)
from shoal.fleet import Fleet
from shoal.ledger import Account
from shoal.messages import ChatRequest, ChatResponse, Completed, Usage
from shoal.models.embedder import GGUF_NAME, Embedder, minilm
from shoal.routing.specialist import SpecialistRoute
from shoal.server.metrics import Metrics
from shoal.settings import default_cache_dir, parse_fleet
from shoal.specialists import files, fleetfile
from shoal.specialists.calibrate import Target
from shoal.specialists.data import read_jsonl
from shoal.specialists.forms import Form, closed_fields
from shoal.specialists.manage import remove
from shoal.specialists.model import Specialist, read, write
from shoal.specialists.train import Distilled, Example, distil
from shoal.traces.recordings import recording
from shoal.traces.store import TraceStore

ROOT = Path(__file__).resolve().parent.parent
TICKETS = ROOT / "examples" / "specialists" / "tickets.jsonl"
TEACHER = "smollm2-135m"
runner = CliRunner()

BILLING = "I was charged twice for my subscription this month."
SHIPPING = "The courier lost my parcel and tracking shows nothing."


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh cache folder that shares the real cache's joined weights and converted MiniLM."""
    real = default_cache_dir()
    if not (real / "embedders" / GGUF_NAME).is_file():
        pytest.skip("the MiniLM GGUF is not converted yet: run `shoal route setup`")
    cache = tmp_path_factory.mktemp("cache")
    for name in ("weights", "embedders"):
        if (real / name).is_dir():
            (cache / name).symlink_to(real / name)
    return cache


@pytest.fixture(scope="module")
def embedder(real_cache: Path) -> Embedder:
    return minilm(real_cache, "gguf", threads=1)


@pytest.fixture(scope="module")
def tickets() -> list[Example]:
    return read_jsonl(TICKETS).examples


@pytest.fixture(scope="module")
def trained(tickets: list[Example], embedder: Embedder) -> Distilled:
    return distil(tickets, Form.label(), embedder, teacher_cost_usd=2e-5)


# No drift checks unless a test asks for them: they sample at random.
NO_DRIFT = ", drift: {share: 0}"


def fleet_text(cache: Path, path: Path, *, drift: str = NO_DRIFT) -> str:
    return (
        f"cache_dir: {cache}\n"
        "models:\n"
        f"  - {{id: tickets-clf, kind: specialist, path: {path}, teacher: {TEACHER}}}\n"
        "routes:\n"
        f"  - {{name: tickets, kind: specialist, specialist: tickets-clf, teacher: {TEACHER}"
        f"{drift}}}\n"
    )


def installed(
    cache: Path,
    tmp_path: Path,
    distilled: Distilled,
    embedder: Embedder,
    *,
    drift: str = NO_DRIFT,
) -> Path:
    """A fleet file with the specialist and its route over the tiny teacher."""
    path = tmp_path / "tickets-clf.npz"
    write(path, distilled, target="tickets", teacher=TEACHER, embedder=embedder.identity)
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(fleet_text(cache, path, drift=drift), "utf-8")
    return fleet_file


# -- forms -------------------------------------------------------------------------------------


class Verdict(BaseModel):
    verdict: str
    fits: bool


def test_a_schema_with_only_closed_fields_is_covered_one_field_at_a_time() -> None:
    schema = {
        "type": "object",
        "properties": {
            "verdict": {"$ref": "#/$defs/V"},
            "fits": {"type": "boolean"},
            "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        },
        "$defs": {"V": {"enum": ["yes", "no", "maybe"]}},
    }
    assert closed_fields(schema) == {
        "verdict": ["yes", "no", "maybe"],
        "fits": [False, True],
        "stars": [1, 2, 3, 4, 5],
    }
    form = Form.for_schema(schema)
    assert form.keys('{"verdict": "yes", "fits": true, "stars": 4}') == ('"yes"', "true", "4")
    assert form.keys('{"verdict": "perhaps", "fits": true, "stars": 4}') is None  # breaks it
    assert form.keys("not json") is None


def test_a_free_text_field_makes_a_schema_not_coverable_by_a_classifier() -> None:
    with pytest.raises(DistillationError, match="field 'verdict' is free text") as caught:
        Form.for_schema(Verdict.model_json_schema())
    assert "--kind reuse" in str(caught.value)


# -- training ----------------------------------------------------------------------------------


def test_a_classifier_is_trained_calibrated_and_checked_on_held_out_data(
    trained: Distilled,
) -> None:
    report = trained.report
    assert report["examples"] == 72
    assert report["unparsed"] == 2  # two empty teacher answers: counted, left out
    assert report["train"] + report["heldout_examples"] == 70
    assert 0.0 < trained.threshold <= 1.0
    held = report["heldout"]
    assert held["met"]
    assert held["coverage"] > 0.5
    assert held["route_agreement"] >= 0.95
    assert held["gold_known"] == report["heldout_examples"]
    costs = report["costs"]
    assert 0 < costs["specialist_usd_per_call"] < costs["teacher_usd_per_call"]
    assert report["live_floor"] <= 1.0
    assert trained.kind.form.shown == {"billing": "billing", "shipping": "shipping"}


def test_an_input_unlike_any_it_learned_from_gets_no_confidence(
    trained: Distilled, embedder: Embedder
) -> None:
    vectors = embedder.embed([BILLING, "Can you tell me a joke about penguins?"])
    _, _, confidence = trained.kind.predict(vectors.astype(np.float64))
    assert confidence[0] >= trained.threshold  # a ticket like those it learned from
    assert confidence[1] == 0.0  # nothing like them: its route asks the teacher


def test_too_few_examples_say_how_many_each_class_needs(
    tickets: list[Example], embedder: Embedder
) -> None:
    few = [e for e in tickets if e.answer.lower() == "billing"][:6]
    few += [e for e in tickets if e.answer == "shipping"][:12]
    with pytest.raises(DistillationError, match="at least 10 examples of each class") as caught:
        distil(few, Form.label(), embedder)
    assert "'billing': 6" in str(caught.value)


def test_a_single_class_is_refused(tickets: list[Example], embedder: Embedder) -> None:
    same = [e for e in tickets if e.answer == "shipping"]
    with pytest.raises(DistillationError, match="a single class: every one of the 35"):
        distil(same, Form.label(), embedder)


def test_answers_that_never_parse_are_an_error(embedder: Embedder) -> None:
    schema = {"type": "object", "properties": {"fits": {"type": "boolean"}}}
    broken = [Example(f"listing {i}", "{not json") for i in range(30)]
    with pytest.raises(DistillationError, match="none of the 30 teacher answers parse"):
        distil(broken, Form.for_schema(schema), embedder)


def test_a_target_held_out_data_misses_installs_nothing_and_says_what_was_possible(
    tickets: list[Example], embedder: Embedder
) -> None:
    rng = random.Random(0)
    noisy = [  # a teacher that answers at random: nothing can agree with it
        Example(e.input, rng.choice(["billing", "shipping"])) for e in tickets if e.answer
    ]
    with pytest.raises(TargetNotReachedError, match="nothing is installed") as caught:
        distil(noisy, Form.label(), embedder, target=Target(agreement=0.99))
    assert 0.0 <= caught.value.coverage < 0.5
    assert "coverage" in str(caught.value)
    assert caught.value.report["heldout"]["met"] is False


def test_a_gold_target_needs_gold_answers(tickets: list[Example], embedder: Embedder) -> None:
    plain = [Example(e.input, e.answer) for e in tickets]
    with pytest.raises(DistillationError, match="no example has one"):
        distil(plain, Form.label(), embedder, target=Target(quality_ratio=0.95))


class Triage(BaseModel):
    topic: Literal["billing", "shipping"]
    refund: bool


async def test_a_json_step_gets_one_head_per_field_and_answers_in_its_schema(
    tickets: list[Example], embedder: Embedder, real_cache: Path, tmp_path: Path
) -> None:
    schema = Triage.model_json_schema()
    rows = [
        Example(
            e.input,
            json.dumps({"topic": e.answer.lower(), "refund": "refund" in e.input.lower()}),
        )
        for e in tickets
        if e.answer
    ]
    rows += [  # enough answers with a refund to learn the field
        Example(
            f"Please refund order {n}, it was charged twice.",
            '{"topic": "billing", "refund": true}',
        )
        for n in range(12)
    ]
    distilled = distil(rows, Form.for_schema(schema), embedder)
    assert distilled.kind.form.fields == ("topic", "refund")
    fleet = Fleet.from_file(installed(real_cache, tmp_path, distilled, embedder))
    specialist = fleet.model("tickets-clf")
    request = ChatRequest.of("Refund my order 77, I was charged twice.", json_schema=schema)
    answer = Triage.model_validate_json((await specialist.generate(request)).text)
    assert answer == Triage(topic="billing", refund=True)
    with pytest.raises(InvalidRequestError, match="not the one it was trained on"):
        await specialist.generate(ChatRequest.of("Refund me", json_schema={"type": "object"}))


def test_reuse_answers_near_duplicates_with_the_recorded_answer(embedder: Embedder) -> None:
    schema = {"type": "object", "properties": {"reply": {"type": "string"}}}
    answers = ["Sorry about the double charge.", "We are tracing your parcel."]
    examples = [
        Example(
            f"{'Charged twice' if i % 2 == 0 else 'Parcel lost'}, order {i}",
            json.dumps({"reply": answers[i % 2]}),
        )
        for i in range(40)
    ]
    distilled = distil(examples, Form.for_json(schema), embedder, kind="reuse")
    texts, _, confidence = distilled.kind.predict(
        embedder.embed(["Charged twice, order 77"]).astype(np.float64)
    )
    assert json.loads(texts[0]) == {"reply": answers[0]}
    assert confidence[0] >= distilled.threshold


# -- files ---------------------------------------------------------------------------------------


def test_a_saved_specialist_reads_back_and_a_damaged_one_never_does(
    trained: Distilled, embedder: Embedder, tmp_path: Path
) -> None:
    path = tmp_path / "s.npz"
    write(path, trained, target="tickets", teacher=TEACHER, embedder=embedder.identity)
    assert read(path).threshold == pytest.approx(trained.threshold)

    damaged = tmp_path / "damaged.npz"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    with pytest.raises(WeightsCorruptedError):
        read(damaged)

    loaded = files.load(path)
    changed = dict(loaded.arrays)
    changed["f0.b0"] = changed["f0.b0"] + 1.0  # an edited weight under the old header
    edited = tmp_path / "edited.npz"
    np.savez(edited, __meta__=np.array(json.dumps(loaded.meta)), **changed)
    with pytest.raises(WeightsCorruptedError, match="does not match its checksum"):
        read(edited)

    not_zip = tmp_path / "text.npz"
    not_zip.write_text("hello", "utf-8")
    with pytest.raises(WeightsCorruptedError, match="cannot be read"):
        read(not_zip)

    future = tmp_path / "future.npz"
    files.save(future, {**loaded.meta, "version": 99}, loaded.arrays)
    with pytest.raises(WeightsCorruptedError, match="format v99"):
        read(future)

    uncalibrated = tmp_path / "uncalibrated.npz"
    meta = {k: v for k, v in loaded.meta.items() if k not in ("checksum", "calibration")}
    files.save(uncalibrated, meta, loaded.arrays)
    with pytest.raises(WeightsCorruptedError, match="no calibration"):
        read(uncalibrated)

    with pytest.raises(WeightsCorruptedError, match="does not exist"):
        read(tmp_path / "missing.npz")


def test_an_embedder_change_since_training_refuses_to_serve_and_says_why(
    trained: Distilled, embedder: Embedder, real_cache: Path, tmp_path: Path
) -> None:
    path = tmp_path / "stale.npz"
    write(path, trained, target="tickets", teacher=TEACHER, embedder="another embedder")
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(fleet_text(real_cache, path), "utf-8")
    fleet = Fleet.from_file(fleet_file)
    specialist = fleet.model("tickets-clf")
    assert isinstance(specialist, Specialist)
    with pytest.raises(SpecialistStaleError, match="trained on the vectors of 'another embedder'"):
        specialist.trained()
    route = Engine(fleet, trace_path=":memory:").route("tickets")
    assert isinstance(route, SpecialistRoute)
    decision = route.decide(ChatRequest.of(BILLING))
    assert decision.models == (TEACHER,)
    assert "SpecialistStaleError" in decision.reason


# -- serving and routing -------------------------------------------------------------------------


async def test_the_specialist_is_a_fleet_model_with_a_card_a_cost_and_a_confidence(
    trained: Distilled, embedder: Embedder, real_cache: Path, tmp_path: Path
) -> None:
    fleet = Fleet.from_file(installed(real_cache, tmp_path, trained, embedder))
    card = fleet.card("tickets-clf")
    assert card.single_task
    assert card.runs == "local"
    assert card.prompt_tok_s is not None
    specialist = fleet.model("tickets-clf")
    response = await specialist.generate(ChatRequest.of(BILLING))
    assert response.text == "billing"
    assert response.cost_usd == card.cost(response.usage, response.compute_s) > 0
    assert response.logprobs is not None
    assert 0 < np.exp(response.logprobs[0].logprob) <= 1
    with pytest.raises(InvalidRequestError, match="answers with a label"):
        await specialist.generate(ChatRequest.of(BILLING, json_object=True))
    engine = Engine(fleet, trace_path=":memory:")
    stand_ins = engine.stand_ins(await engine.plan("qwen2.5-coder-1.5b", ChatRequest.of(BILLING)))
    assert stand_ins
    assert all(p.name != "tickets-clf" for p in stand_ins)  # a specialist stands in for none
    await engine.aclose()


async def test_a_specialist_route_answers_confidently_else_escalates_costed_and_traced(
    trained: Distilled, embedder: Embedder, real_cache: Path, tmp_path: Path
) -> None:
    engine = Engine(
        Fleet.from_file(installed(real_cache, tmp_path, trained, embedder)),
        trace_path=tmp_path / "traces.sqlite",
    )
    account = Account.usd("run", 1.0)
    request = ChatRequest.of(BILLING, max_tokens=4)
    plan = await engine.plan("tickets", request)
    assert plan.models == ("tickets-clf", TEACHER)
    assert "calibrated confidence is >=" in (plan.decision.reason if plan.decision else "")
    answer = await engine.execute(plan, hold=account.reserve(plan.worst_usd))
    assert (answer.model, answer.text, answer.attempts) == ("tickets-clf", "billing", ())
    streamed = [  # streamed, the same call: the plan's decision, run and charged alike
        e
        async for e in engine.stream(
            await engine.plan("tickets", request), hold=account.reserve(plan.worst_usd)
        )
    ]
    assert [type(e).__name__ for e in streamed] == ["TextDelta", "Completed"]
    assert isinstance(streamed[-1], Completed)
    again = streamed[-1].response
    assert (again.model, again.text) == ("tickets-clf", "billing")

    # A request in another form than it was trained on goes to the teacher, and says why.
    other = await engine.plan("tickets", request.model_copy(update={"json_object": True}))
    assert other.models == (TEACHER,)
    assert other.decision is not None
    assert "asks for JSON" in other.decision.reason
    await engine.aclose()

    # A specialist that trusts nothing of its own: every call escalates to the teacher.
    strict = Distilled(trained.kind, 1.0, trained.target, trained.report)
    strict_dir = tmp_path / "strict"
    strict_dir.mkdir()
    engine = Engine(
        Fleet.from_file(installed(real_cache, strict_dir, strict, embedder)),
        trace_path=tmp_path / "traces.sqlite",
    )
    request = ChatRequest.of("Hello there, how are you?", max_tokens=4)
    plan = await engine.plan("tickets", request)
    escalated = await engine.execute(plan, hold=account.reserve(plan.worst_usd))
    assert escalated.model == TEACHER
    assert [a.model for a in escalated.attempts] == ["tickets-clf"]
    rows = engine.traces.calls()
    assert [r.model for r in rows] == ["tickets-clf", "tickets-clf", "tickets-clf", TEACHER]
    assert all(r.route == "tickets" for r in rows)
    spent = answer.total_cost_usd + again.total_cost_usd + escalated.total_cost_usd
    assert account.spent_usd == pytest.approx(spent, abs=1e-12)
    assert sum(r.cost_usd for r in rows) == pytest.approx(spent, abs=1e-12)
    await engine.aclose()


async def test_the_drift_guard_switches_a_specialist_off_that_no_longer_agrees(
    trained: Distilled,
    embedder: Embedder,
    real_cache: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The tiny model as teacher writes sentences, never the label: no check agrees.
    drift = ", drift: {share: 1.0, min_checks: 3, min_agreement: 0.9, budget_usd_per_hour: 1}"
    fleet_file = installed(real_cache, tmp_path, trained, embedder, drift=drift)
    engine = Engine(Fleet.from_file(fleet_file), trace_path=tmp_path / "traces.sqlite")
    route = engine.route("tickets")
    assert isinstance(route, SpecialistRoute)
    metrics = Metrics()
    metrics.watch_routes(lambda: [engine.route(n) for n in engine.route_names])
    labels = {"route": "tickets", "specialist": "tickets-clf"}
    assert metrics.sample("shoal_specialist_serving", **labels) == 1.0
    caplog.set_level(logging.WARNING, logger="shoal.routing.drift")
    for text in (BILLING, SHIPPING, BILLING):
        request = ChatRequest.of(text, max_tokens=6)
        answer = await engine.execute(await engine.plan("tickets", request))
        assert answer.model == "tickets-clf"
        while engine._shadow_tasks:  # the teacher's checks run after the answer, off its path
            await asyncio.gather(*engine._shadow_tasks, return_exceptions=True)
    assert route.guard.counts.checks == 3
    assert route.guard.switched
    assert "switched off" in caplog.text
    assert metrics.sample("shoal_specialist_serving", **labels) == 0.0
    assert metrics.sample("shoal_specialist_switched_off_total", **labels) == 1.0
    rows = engine.traces.calls()
    assert any(r.status == "switched_off" and r.route == "tickets" for r in rows)
    checks = [r for r in rows if r.step == "shadow of tickets"]
    assert checks
    assert all(r.model == TEACHER and r.cost_usd > 0 for r in checks)
    plan = await engine.plan("tickets", ChatRequest.of(BILLING))
    assert plan.models == (TEACHER,)
    assert plan.decision is not None
    assert "drift guard" in plan.decision.reason
    await engine.aclose()

    again = Engine(Fleet.from_file(fleet_file), trace_path=":memory:")  # kept across restarts
    assert (await again.plan("tickets", ChatRequest.of(BILLING))).models == (TEACHER,)
    await again.aclose()


# -- fleet files and the command line ------------------------------------------------------------

USER_FLEET = """\
# the team's fleet: keep these notes
host_price_per_hour: 0.09   # our box

models:
  # a second tiny model
  - id: tiny-copy
    kind: gguf
    path: ~/models/tiny.gguf

routes:
  - name: answer          # everything goes here
    kind: fixed
    model: smollm2-135m
# the end
"""


def test_a_fleet_file_gains_and_loses_a_specialist_with_its_comments_kept(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(USER_FLEET, "utf-8")
    model = {"id": "x-clf", "kind": "specialist", "path": "/tmp/x.npz", "teacher": TEACHER}
    route = {"name": "x", "kind": "specialist", "specialist": "x-clf", "teacher": TEACHER}
    fleetfile.add(path, model, route)
    text = path.read_text("utf-8")
    assert "# the team's fleet: keep these notes" in text
    assert "# everything goes here" in text
    assert text.index("x-clf") < text.index("routes:")
    fleetfile.remove(path, "x-clf", ["x"])
    assert path.read_text("utf-8") == USER_FLEET

    used = tmp_path / "used.yaml"  # another route still calls it: it stays
    used.write_text(
        "models:\n  - {id: x-clf, kind: specialist, path: /tmp/x.npz}\n"
        "routes:\n  - {name: mine, kind: cascade, models: [x-clf, smollm2-135m]}\n",
        "utf-8",
    )
    with pytest.raises(ConfigError, match="route\\(s\\) mine use 'x-clf'"):
        remove(used, parse_fleet(used.read_text("utf-8"), source="used"), "x-clf")

    inline = tmp_path / "inline.yaml"
    inline.write_text("models: [{id: a, kind: gguf, path: /a.gguf}]\n", "utf-8")
    with pytest.raises(ConfigError, match="add this to it by hand") as caught:
        fleetfile.add(inline, model, route)
    assert "x-clf" in str(caught.value)
    assert inline.read_text("utf-8") == "models: [{id: a, kind: gguf, path: /a.gguf}]\n"


def test_distil_list_show_eval_and_remove_from_the_command_line(
    real_cache: Path, tmp_path: Path
) -> None:
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(f"cache_dir: {real_cache}\n" + USER_FLEET, "utf-8")
    before = fleet_file.read_text("utf-8")
    common = ["--fleet", str(fleet_file)]
    done = runner.invoke(
        app, ["distil", "tickets", "--data", str(TICKETS), "--teacher", TEACHER, *common]
    )
    assert done.exit_code == 0, done.output
    assert "2 did not parse: left out" in done.output
    assert "added to" in done.output
    listed = runner.invoke(app, ["specialists", "list", "--json", *common])
    (row,) = json.loads(listed.output)
    assert (row["id"], row["state"], row["routes"]) == ("tickets-clf", "ok", ["tickets-specialist"])
    shown = json.loads(runner.invoke(app, ["specialists", "show", "tickets-clf", *common]).output)
    assert shown["card"]["tier"] == "specialist"
    evaluated = runner.invoke(
        app, ["specialists", "eval", "tickets-clf", "--data", str(TICKETS), *common]
    )
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.output)["unparsed"] == 2
    removed = runner.invoke(app, ["specialists", "remove", "tickets-clf", *common])
    assert removed.exit_code == 0, removed.output
    assert fleet_file.read_text("utf-8") == before
    assert not (real_cache / "specialists" / "tickets-clf.npz").exists()


def test_distil_refuses_bad_input_with_clear_errors(real_cache: Path, tmp_path: Path) -> None:
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(f"cache_dir: {real_cache}\n", "utf-8")
    common = ["--teacher", TEACHER, "--fleet", str(fleet_file)]
    both = runner.invoke(app, ["distil", "t", *common])
    assert both.exit_code == 2
    assert "give one source" in both.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no input"}\n', "utf-8")
    missing = runner.invoke(app, ["distil", "t", "--data", str(bad), *common])
    assert missing.exit_code == 2
    assert "needs `input` and `label`" in missing.output
    noisy = tmp_path / "noisy.jsonl"
    rng = random.Random(1)
    rows = [json.loads(line) for line in TICKETS.read_text("utf-8").splitlines()]
    noisy.write_text(
        "".join(
            json.dumps({"input": r["input"], "label": rng.choice(["a", "b"])}) + "\n" for r in rows
        ),
        "utf-8",
    )
    missed = runner.invoke(
        app, ["distil", "t", "--data", str(noisy), "--target", "agreement=0.99", *common]
    )
    assert missed.exit_code == 2
    assert "TargetNotReachedError" in missed.output
    assert fleet_file.read_text("utf-8") == f"cache_dir: {real_cache}\n"  # nothing installed


def test_distil_learns_from_recordings_and_from_an_outcome_table(
    real_cache: Path, tmp_path: Path
) -> None:
    traces = tmp_path / "traces.sqlite"
    store = TraceStore(traces)
    rows = [json.loads(line) for line in TICKETS.read_text("utf-8").splitlines()]
    for row in rows:
        request = ChatRequest.of(row["input"])
        for model in (TEACHER, "other"):
            response = ChatResponse(
                model=model, text=row["label"], finish_reason="stop", usage=Usage(), latency_s=0.1
            )
            store.record_example(recording("support/triage", request, response, 1.0))
    store.close()
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(f"cache_dir: {real_cache}\n", "utf-8")
    base = ["distil", "support/triage", "--from-traces", "--traces", str(traces)]
    which = runner.invoke(app, [*base, "--fleet", str(fleet_file)])
    assert which.exit_code == 2
    assert "several models" in which.output
    done = runner.invoke(app, [*base, "--teacher", TEACHER, "--fleet", str(fleet_file)])
    assert done.exit_code == 0, done.output
    assert "support-triage-clf" in fleet_file.read_text("utf-8")

    from shoal.routing.outcomes import OutcomeRow, RowWriter

    table = tmp_path / "outcomes.csv"
    with RowWriter(table) as writer:
        for i, row in enumerate(r for r in rows if r["label"]):
            wrong = i % 9 == 0  # the teacher's mistakes, scored 0 against gold
            label = row["label"].lower()
            answer = ({"billing": "shipping", "shipping": "billing"}[label]) if wrong else label
            writer.write(
                OutcomeRow(
                    f"q{i}", row["input"], TEACHER, float(not wrong), 3e-5, 0.5, answer=answer
                )
            )
    scored = runner.invoke(
        app,
        [
            *("distil", "support", "--data", str(table), "--target", "quality_ratio=0.9"),
            *("--json", "--no-install", "--fleet", str(fleet_file)),
        ],
    )
    assert scored.exit_code == 0, scored.output
    report = json.loads(scored.output)["report"]
    assert report["costs"]["teacher_cost_known"]
    assert report["heldout"]["teacher_accuracy"] < 1.0  # gold told apart from the teacher
