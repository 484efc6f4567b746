"""Distillation: a specialist trained on a teacher's answers, calibrated, checked on held-out data.

    examples -> parse the teacher's answers (count those that do not parse, leave them out)
             -> embed the inputs -> split train / held-out (stratified by answer)
             -> out-of-fold predictions on train: pick the head's strength, fit temperatures,
                choose the threshold that keeps the target (`calibrate.choose_threshold`)
             -> fit on all of train -> on held-out: coverage, agreement, accuracy, cost per call

A specialist whose calibrated route misses the target on held-out data is not returned: the
error says what coverage held-out data would have allowed. Nothing here writes a file.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from shoal.errors import DistillationError, TargetNotReachedError
from shoal.models.embedder import BulkMiniLM, Embedder
from shoal.specialists.calibrate import Outcomes, Target, choose_threshold, live_floor
from shoal.specialists.forms import Form, label_key
from shoal.specialists.heads import (
    STRENGTHS,
    HeadKind,
    Layers,
    fit_head,
    fit_temperature,
    logits,
    nll,
    softmax,
)
from shoal.specialists.kinds import ClassifierHeads, Kind, NearestAnswer

log = logging.getLogger(__name__)

Array = npt.NDArray[np.float64]
KindName = Literal["classifier", "reuse"]

MIN_PER_CLASS = 10  # examples of each class a classifier needs, held-out share included
MIN_REUSE = 20  # examples a reuse specialist needs
HOLDOUT = 0.3
FOLDS = 5
TIMED_CALLS = 20  # held-out inputs embedded one at a time to measure the cost of a call
MIN_TEMPLATE = 10  # inputs from which their shared start and end are taken for a template
BULK_FROM = 1000  # examples from which a batch embedder (torch) is worth loading
UNFAMILIAR_PERCENTILE = 1.0  # inputs less like the training inputs than this share are unknown


@dataclass(frozen=True)
class Example:
    """One teacher answer to learn from: the `input` (the request's last user message), the
    teacher's `answer` text and, for a JSON answer, its `parsed` value; `gold` is the right
    answer when known; `teacher_cost_usd` what the teacher's call cost, when known."""

    input: str
    answer: str
    parsed: Any | None = None
    gold: Any | None = None
    teacher_cost_usd: float | None = None


@dataclass(frozen=True)
class Template:
    """The text every training input shares at its start and at its end (a step's prompt
    template around the fields that change): a specialist reads what lies between. An input
    without them is read whole."""

    prefix: str = ""
    suffix: str = ""

    @classmethod
    def of(cls, texts: Sequence[str]) -> Template:
        if len(texts) < MIN_TEMPLATE or len(set(texts)) < 2:
            return cls()
        prefix = _boundary(_shared_start(texts))
        rest = [t[len(prefix) :] for t in texts]
        suffix = _boundary(_shared_start([t[::-1] for t in rest]))[::-1]
        return cls(prefix, suffix)

    def strip(self, text: str) -> str:
        inner = text.removeprefix(self.prefix)
        if self.suffix and inner.endswith(self.suffix):
            inner = inner[: -len(self.suffix)]
        return inner if inner.strip() else text


def _shared_start(texts: Sequence[str]) -> str:
    first, last = min(texts), max(texts)  # the two that differ soonest bound every other
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    return first[:n]


def _boundary(shared: str) -> str:
    """`shared` cut back to its last whitespace: no word is cut in two."""
    cut = max(shared.rfind(" "), shared.rfind("\n"), shared.rfind("\t"))
    return shared[: cut + 1] if cut >= 0 else ""


@dataclass
class Distilled:
    """A trained, calibrated specialist, the template it reads its inputs within, and its report
    (plain data, printed and stored)."""

    kind: Kind
    threshold: float
    target: Target
    report: dict[str, Any] = field(default_factory=dict)
    template: Template = field(default_factory=Template)


def distil(
    examples: Sequence[Example],
    form: Form,
    embedder: Embedder,
    *,
    kind: KindName = "classifier",
    target: Target | None = None,
    head: HeadKind = "logistic",
    labels: Sequence[str] | None = None,
    holdout: float = HOLDOUT,
    seed: int = 0,
    teacher_cost_usd: float | None = None,
    host_price_per_hour: float = 0.09,
) -> Distilled:
    """Train, calibrate and check a specialist on `examples` (see the module's docstring)."""
    target = target or Target(agreement=0.95)
    if not 0.05 <= holdout <= 0.8:
        raise DistillationError(f"the held-out share must lie in [0.05, 0.8], not {holdout}")
    started = time.perf_counter()
    keys, kept, unparsed = _parse(examples, form, labels)
    gold = [form.gold_keys(examples[i].gold) for i in kept]
    rows = [examples[i] for i in kept]
    if kind == "classifier":
        form = _check_classes(form, keys, [r.answer for r in rows])
    elif len(rows) < MIN_REUSE:
        raise DistillationError(
            f"too few examples: {len(rows)} answers parse; a reuse specialist needs at least "
            f"{MIN_REUSE}"
        )
    if target.needs_gold and not any(g is not None for g in gold):
        raise DistillationError(
            f"the target ({target.describe()}) is about gold answers, and no example has one: "
            "give gold answers, or a target of agreement with the teacher (agreement=0.95)"
        )
    embed_started = time.perf_counter()
    template = Template.of([r.input for r in rows])
    inputs = [template.strip(r.input) for r in rows]
    x = embed(embedder, inputs)
    embed_s = time.perf_counter() - embed_started
    rng = np.random.default_rng(seed)
    # A classifier's held-out share is taken from each answer alike; reuse answers are mostly
    # distinct, so a plain random share.
    joint = ["\0".join(k) if kind == "classifier" else "" for k in keys]
    train, test = _split(joint, holdout, rng)
    fit_started = time.perf_counter()
    specialist: Kind
    if kind == "classifier":
        specialist, oof = _classifier(form, x, keys, gold, train, head, rng, seed)
    else:
        specialist, oof = _reuse(form, x, keys, gold, train, rows)
    threshold, met = choose_threshold(oof, target)
    fit_s = time.perf_counter() - fit_started
    _, got, confidence = specialist.predict(x[test])
    heldout = outcomes([keys[i] for i in test], [gold[i] for i in test], got, confidence)
    seconds = _seconds_per_call(specialist, embedder, [inputs[i] for i in test])
    report = _report(
        rows,
        kept,
        unparsed,
        train,
        test,
        form,
        target,
        threshold,
        oof,
        heldout,
        seconds,
        host_price_per_hour,
        teacher_cost_usd,
    )
    report["seconds"] = {
        "embedding": embed_s,
        "fitting": fit_s,
        "total": time.perf_counter() - started,
    }
    # The most held-out data itself would have allowed (a threshold chosen on it: a bound, not
    # a figure to expect).
    possible, _ = choose_threshold(heldout, target, z=0.0)
    coverage = heldout.summary(possible)["coverage"] if math.isfinite(possible) else 0.0
    report["heldout"]["coverage_possible"] = coverage
    if report["heldout"]["coverage"] > 0 and report["heldout"]["met"]:
        report["live_floor"] = live_floor(report["heldout"], target)
        return Distilled(specialist, threshold, target, report, template)
    why = (
        "on the training data's own held-out folds no threshold kept it"
        if not met
        else f"the calibrated threshold {threshold:.3f} gave "
        f"{report['heldout']['coverage']:.0%} coverage at a quality of "
        f"{report['heldout']['quality']:.3f} (needed {report['heldout']['goal']:.3f})"
    )
    raise TargetNotReachedError(
        f"the specialist cannot keep the target ({target.describe()}) on held-out data: {why}; "
        f"the most held-out data allowed was {coverage:.0%} coverage"
        + ("" if coverage else " (the teacher alone)")
        + "; nothing is installed. More examples, another head (--head mlp) or a lower target "
        "may reach it",
        coverage=coverage,
        report=report,
    )


# -- data ------------------------------------------------------------------------------------


def embed(embedder: Embedder, texts: Sequence[str]) -> Array:
    """Vectors of `texts`: a few hundred go one by one through llama.cpp, which beats the
    seconds a batch embedder (torch) takes to load; the vectors are the same."""
    if isinstance(embedder, BulkMiniLM) and len(texts) < BULK_FROM:
        embedder = embedder.single
    return embedder.embed(texts).astype(np.float64)


def input_tokens(text: str) -> int:
    """An input's tokens as every plan estimates them: about four bytes a token."""
    return -(-len(text.encode("utf-8")) // 4)


def _parse(
    examples: Sequence[Example], form: Form, labels: Sequence[str] | None
) -> tuple[list[tuple[str, ...]], list[int], int]:
    """The keys of the answers that parse, their indices, and how many did not parse."""
    allowed = {label_key(label) for label in labels} if labels else None
    keys, kept = [], []
    for i, example in enumerate(examples):
        k = form.keys(example.answer, example.parsed)
        if k is None or (allowed is not None and k[0] not in allowed):
            continue
        keys.append(k)
        kept.append(i)
    unparsed = len(examples) - len(kept)
    if not kept:
        raise DistillationError(
            f"none of the {len(examples)} teacher answers parse as {form.describe()}"
            + (f" among the labels {', '.join(labels)}" if labels else "")
        )
    if unparsed:
        log.info("%d of %d teacher answers do not parse: left out", unparsed, len(examples))
    return keys, kept, unparsed


def _check_classes(form: Form, keys: list[tuple[str, ...]], answers: list[str]) -> Form:
    trained = form.trained(keys, answers)
    counts = [Counter(k[f] for k in keys) for f in range(len(form.fields))]
    if all(len(c) == 1 for c in counts):
        only = ", ".join(
            f"{_name(f)}{next(iter(c))}" for f, c in zip(form.fields, counts, strict=True)
        )
        raise DistillationError(
            f"a single class: every one of the {len(keys)} answers is {only}; a classifier "
            "needs at least two classes (a step that always answers the same needs no model)"
        )
    few = [
        f"{_name(f)}{value!r}: {n}"
        for f, c in zip(form.fields, counts, strict=True)
        for value, n in sorted(c.items())
        if n < MIN_PER_CLASS
    ]
    if few:
        raise DistillationError(
            f"too few examples: a classifier needs at least {MIN_PER_CLASS} examples of each "
            f"class ({HOLDOUT:.0%} of them held out to check it); these have fewer: "
            + ", ".join(few)
        )
    return trained


def _name(field_name: str) -> str:
    return f"{field_name} = " if field_name else ""


def _split(
    groups: list[str], holdout: float, rng: np.random.Generator
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """(train, held-out) indices, each group (answer) split in the same proportion."""
    test: list[int] = []
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    for members in by_group.values():
        order = rng.permutation(members)
        test += [int(i) for i in order[: round(len(order) * holdout)]]
    chosen = np.zeros(len(groups), dtype=bool)
    chosen[test] = True
    if chosen.all() or not chosen.any():
        raise DistillationError(f"cannot split {len(groups)} examples into train and held-out")
    return np.flatnonzero(~chosen), np.flatnonzero(chosen)


def _folds(groups: list[str], k: int, rng: np.random.Generator) -> npt.NDArray[np.intp]:
    """A fold number per example, each group spread over the folds."""
    fold = np.zeros(len(groups), dtype=np.intp)
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    offset = 0
    for members in by_group.values():
        for j, i in enumerate(rng.permutation(members)):
            fold[int(i)] = (j + offset) % k
        offset += len(members)
    return fold


def outcomes(
    teacher: list[tuple[str, ...]],
    gold: list[tuple[str, ...] | None],
    got: list[tuple[str, ...]],
    confidence: Array,
) -> Outcomes:
    known = np.array([g is not None for g in gold], dtype=bool)
    return Outcomes(
        confidence=np.asarray(confidence, dtype=np.float64),
        agree=np.array([a == b for a, b in zip(got, teacher, strict=True)], dtype=bool),
        correct=np.array([g is not None and a == g for a, g in zip(got, gold, strict=True)]),
        teacher_correct=np.array(
            [g is not None and t == g for t, g in zip(teacher, gold, strict=True)]
        ),
        known=known,
    )


# -- the two kinds ---------------------------------------------------------------------------


def _classifier(
    form: Form,
    x: Array,
    keys: list[tuple[str, ...]],
    gold: list[tuple[str, ...] | None],
    train: npt.NDArray[np.intp],
    head: HeadKind,
    rng: np.random.Generator,
    seed: int,
) -> tuple[ClassifierHeads, Outcomes]:
    xt = x[train]
    folds = _folds(["\0".join(keys[i]) for i in train], FOLDS, rng)
    strengths = STRENGTHS if head == "logistic" else (2.0,)
    heads: list[Layers] = []
    temperatures: list[float] = []
    field_oof: list[Array] = []
    for f, classes in enumerate(form.classes):
        y = np.array([classes.index(keys[i][f]) for i in train], dtype=np.intp)
        best: tuple[float, float, Array] | None = None
        for c in strengths:
            z = np.zeros((len(train), len(classes)))
            for k in range(FOLDS):
                inside = folds != k
                layers = fit_head(xt[inside], y[inside], len(classes), head, c=c, seed=seed)
                z[~inside] = logits(layers, xt[~inside])
            loss = nll(z, y, fit_temperature(z, y))
            if best is None or loss < best[0]:
                best = (loss, c, z)
        assert best is not None
        _, c, z = best
        temperatures.append(fit_temperature(z, y))
        field_oof.append(z)
        heads.append(fit_head(xt, y, len(classes), head, c=c, seed=seed))
    familiar = xt.astype(np.float32)
    _, similarity = _nearest_other(familiar)
    typical = float(np.percentile(similarity, UNFAMILIAR_PERCENTILE)) if len(familiar) > 1 else -1.0
    specialist = ClassifierHeads(form, heads, temperatures, familiar, typical)
    # Out-of-fold answers and confidences, from the per-field out-of-fold logits.
    probs = [softmax(z, t) for z, t in zip(field_oof, temperatures, strict=True)]
    picks = [p.argmax(axis=1) for p in probs]
    confidence = np.prod([p.max(axis=1) for p in probs], axis=0)
    confidence = np.where(similarity < typical, 0.0, confidence)  # as `predict` answers them
    got = [
        tuple(form.classes[f][int(picks[f][i])] for f in range(len(probs)))
        for i in range(len(train))
    ]
    oof = outcomes([keys[i] for i in train], [gold[i] for i in train], got, confidence)
    return specialist, oof


def _nearest_other(vectors: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.intp], Array]:
    """Each vector's most similar other vector, and that similarity."""
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    nearest = sims.argmax(axis=1)
    return nearest, sims[np.arange(len(vectors)), nearest].astype(np.float64)


def _reuse(
    form: Form,
    x: Array,
    keys: list[tuple[str, ...]],
    gold: list[tuple[str, ...] | None],
    train: npt.NDArray[np.intp],
    rows: list[Example],
) -> tuple[NearestAnswer, Outcomes]:
    vectors = x[train].astype(np.float32)
    nearest, similarity = _nearest_other(vectors)
    got = [keys[train[j]] for j in nearest]
    agree = np.array([g == keys[i] for g, i in zip(got, train, strict=True)], dtype=np.float64)
    slope, intercept = _fit_similarity(similarity, agree)
    specialist = NearestAnswer(
        form, vectors, [rows[i].answer.strip() for i in train], slope, intercept
    )
    oof = outcomes(
        [keys[i] for i in train], [gold[i] for i in train], got, specialist.confidence(similarity)
    )
    return specialist, oof


def _fit_similarity(similarity: Array, agree: Array) -> tuple[float, float]:
    """P(the nearest answer agrees | similarity), logistic, never falling as similarity rises."""
    share = float(np.clip(agree.mean(), 1e-3, 1 - 1e-3))
    if agree.min() == agree.max():
        return 0.0, math.log(share / (1 - share))
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=100.0, max_iter=1000)
    model.fit(similarity[:, None], agree.astype(np.intp))
    slope, intercept = float(model.coef_[0, 0]), float(model.intercept_[0])
    if slope <= 0:
        return 0.0, math.log(share / (1 - share))
    return slope, intercept


# -- measuring ---------------------------------------------------------------------------------


def _seconds_per_call(specialist: Kind, embedder: Embedder, inputs: list[str]) -> float:
    """Median seconds of one call as served: one input embedded alone, then the head."""
    times = []
    for text in inputs[:TIMED_CALLS]:
        started = time.perf_counter()
        specialist.predict(embedder.embed([text]).astype(np.float64))
        times.append(time.perf_counter() - started)
    return float(np.median(times)) if times else 0.0


def _report(
    rows: list[Example],
    kept: list[int],
    unparsed: int,
    train: npt.NDArray[np.intp],
    test: npt.NDArray[np.intp],
    form: Form,
    target: Target,
    threshold: float,
    oof: Outcomes,
    heldout: Outcomes,
    seconds: float,
    host_price_per_hour: float,
    teacher_cost_usd: float | None,
) -> dict[str, Any]:
    known = [r.teacher_cost_usd for r in rows if r.teacher_cost_usd is not None]
    teacher = float(np.mean(known)) if known else teacher_cost_usd
    own = host_price_per_hour * seconds / 3600.0
    finite = math.isfinite(threshold)
    calib: dict[str, Any] = oof.summary(threshold) if finite else {"coverage": 0.0}
    held: dict[str, Any] = heldout.summary(threshold) if finite else {"coverage": 0.0}
    quality = heldout.quality(threshold, target) if finite else None
    goal = heldout.goal(target)
    held |= {"quality": quality, "goal": goal}
    held["met"] = quality is not None and quality >= goal - 1e-12
    tokens = [input_tokens(rows[i].input) for i in test[:TIMED_CALLS]]
    costs: dict[str, Any] = {
        "seconds_per_call": seconds,
        "tokens_per_call": float(np.mean(tokens)) if tokens else 0.0,
        "specialist_usd_per_call": own,
        "teacher_usd_per_call": teacher,
        "teacher_cost_known": bool(known),
    }
    if teacher:
        costs["cost_ratio"] = own / teacher
        costs["route_cost_ratio"] = (own + (1.0 - float(held["coverage"])) * teacher) / teacher
    return {
        "examples": len(kept) + unparsed,
        "unparsed": unparsed,
        "train": len(train),
        "heldout_examples": len(test),
        "form": form.describe(),
        "target": target.describe(),
        "threshold": threshold if finite else None,
        "calibration": calib,
        "heldout": held,
        "costs": costs,
    }
