"""P(answer correct | query, answer): what a cascade that reads the answer trusts.

The query alone rarely says which questions a cheap model will miss; its answer often does
(FrugalGPT). `answer_features` describes one answer of one model:

- the query's features and the answer's embedding, and their cosine (is the answer on topic?);
- the answer's length (characters, words, lines);
- the model's token confidence, where the source has it (local models do);
- agreement with the answers already given by earlier stages of the cascade: the cosine of the
  answer embeddings (works for prose and code) and exact agreement of the answers' keys (an
  option letter, a final number, the normalised text);
- format checks: a lone option letter, a final number, a code block, a refusal, an empty answer.

`AnswerScorer` is a logistic regression on them, one per cascade stage (model and the stages
before it); `scored_tables` fits them on train rows only and writes their estimates where a
cascade reads confidence (out-of-fold on the train rows, so that thresholds calibrate on honest
figures). The same features, computed from a live request and response, drive `AnswerSignal`,
the confidence signal of a `CascadeRouter`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from copy import copy
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from shoal.errors import ConfigError
from shoal.messages import ChatRequest, ChatResponse
from shoal.routing.cascade import ConfidenceSignal
from shoal.routing.confidence import logprob_confidence
from shoal.routing.outcomes import OutcomeTable
from shoal.routing.predictive import Featurizer, fit_logistic, query_text
from shoal.routing.predictor import embedding_part

Array = npt.NDArray[np.float64]

_LETTER = re.compile(r"^\s*\(?([A-Ea-e])(?:\)|[.:]|\s*$)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_REFUSAL = re.compile(r"\b(?:i can(?:no|')t|i am unable|i'm unable|i'm sorry|as an ai)\b", re.I)
SCALARS = 14  # the columns after the query features and the answer embedding


def answer_key(text: str) -> str:
    """What must agree between two answers: an option letter, else the final number, else the
    normalised text (its first 300 characters)."""
    if m := _LETTER.match(text):
        rest = text[m.end() :].strip()
        if len(rest) < 80:  # "B", "(B)", "B) wet palms"; not a long explanation after it
            return m.group(1).upper()
    numbers = _NUMBER.findall(text)
    if numbers and len(text) < 2000:
        return str(numbers[-1]).replace(",", "")
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))[:300]


def _unit(v: Array) -> Array:
    return np.asarray(v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12))


def answer_features(
    query: Array,
    answer_vecs: Array,
    answers: Sequence[str],
    confidence: Array | None = None,
    earlier_answers: Sequence[Sequence[str]] = (),
    earlier_vecs: Sequence[Array] = (),
) -> Array:
    """One row per answer: [query features, answer embedding, SCALARS scalar features].

    `earlier_answers[k][i]` / `earlier_vecs[k][i]`: stage k's answer to query i (stages before
    this one in the cascade)."""
    n = len(answers)
    a = _unit(np.asarray(answer_vecs, dtype=np.float64))
    q = _unit(embedding_part(np.asarray(query, dtype=np.float64)))
    on_topic = (q * a).sum(axis=1) if q.shape[1] == a.shape[1] else np.zeros(n)
    conf = np.zeros(n) if confidence is None else np.nan_to_num(confidence, nan=0.0)
    has_conf = 0.0 if confidence is None else 1.0
    keys = [answer_key(t) for t in answers]
    agree_cos = np.zeros(n)
    agree_key = np.zeros(n)
    if earlier_vecs:
        cos = np.stack([(a * _unit(np.asarray(v, np.float64))).sum(axis=1) for v in earlier_vecs])
        agree_cos = cos.max(axis=0)
        same = [[answer_key(e[i]) == keys[i] for e in earlier_answers] for i in range(n)]
        agree_key = np.array([float(any(row)) for row in same])
    rows = []
    for i, text in enumerate(answers):
        rows.append(
            [
                math.log1p(len(text)) / 8.0,
                math.log1p(len(text.split())) / 6.0,
                math.log1p(text.count("\n")) / 3.0,
                on_topic[i],
                conf[i],
                conf[i] ** 2,
                has_conf,
                agree_cos[i],
                agree_key[i],
                float(bool(earlier_vecs)),
                float(bool(_LETTER.match(text)) and len(text.strip()) <= 3),
                float(bool(_NUMBER.search(text))),
                float("```" in text or "def " in text),
                float(bool(_REFUSAL.search(text)) or not text.strip()),
            ]
        )
    scalars = np.asarray(rows, dtype=np.float64).reshape(n, SCALARS)
    return np.hstack([np.asarray(query, np.float64), a, scalars])


@dataclass
class AnswerScorer:
    """Logistic P(correct) of one model's answer (soft labels allowed: partial scores)."""

    l2: float = 10.0

    def fit(self, features: Array, scores: Array) -> AnswerScorer:
        w, b = fit_logistic(features, np.asarray(scores, np.float64)[:, None], l2=self.l2)
        self.w, self.b = w[:, 0], float(b[0])
        return self

    def predict(self, features: Array) -> Array:
        z = np.clip(features @ self.w + self.b, -30, 30)
        return np.asarray(1.0 / (1.0 + np.exp(-z)), dtype=np.float64)


def _stage_features(
    table: OutcomeTable, x: Array, vecs: dict[int, Array], j: int, earlier: Sequence[int]
) -> Array:
    assert table.answers is not None
    conf = None if table.confidence is None else table.confidence[:, j]
    if conf is not None and np.isnan(conf).all():
        conf = None
    return answer_features(
        x,
        vecs[j],
        [row[j] for row in table.answers],
        conf,
        [[row[k] for row in table.answers] for k in earlier],
        [vecs[k] for k in earlier],
    )


def scored_tables(
    train: OutcomeTable,
    test: OutcomeTable,
    x_train: Array,
    x_test: Array,
    vec_train: dict[int, Array],
    vec_test: dict[int, Array],
    stages: Sequence[tuple[int, Sequence[int]]],
    *,
    folds: int = 5,
    seed: int = 0,
) -> tuple[OutcomeTable, OutcomeTable]:
    """Copies of the tables whose `confidence[:, j]` is the scorer's P(correct) of model j's
    answer, for each stage (j, the stages before it). Fit on `train` only: out-of-fold there,
    a fit on all of `train` for `test`. `vec_*[j]`: embeddings of model j's answers."""
    if train.answers is None or test.answers is None:
        raise ConfigError(
            f"the outcome table {train.name!r} has no answers: a cascade that reads the answer "
            "needs them (an `answer` column)"
        )
    order = np.random.default_rng(seed).permutation(len(train))
    fold = np.empty(len(train), dtype=np.intp)
    fold[order] = np.arange(len(train)) % folds
    p_train = np.full(train.scores.shape, np.nan)
    p_test = np.full(test.scores.shape, np.nan)
    for j, earlier in stages:
        f_train = _stage_features(train, x_train, vec_train, j, earlier)
        y = train.scores[:, j]
        for k in range(folds):
            hold = fold == k
            p_train[hold, j] = AnswerScorer().fit(f_train[~hold], y[~hold]).predict(f_train[hold])
        f_test = _stage_features(test, x_test, vec_test, j, earlier)
        p_test[:, j] = AnswerScorer().fit(f_train, y).predict(f_test)
    scored_train, scored_test = copy(train), copy(test)
    scored_train.confidence, scored_test.confidence = p_train, p_test
    return scored_train, scored_test


class AnswerSignal(ConfidenceSignal):
    """A live cascade's trust in an answer: the answering model's fitted `AnswerScorer` on the
    same features, computed from the request, the response and the earlier stages' responses.

    `logprobs`: whether the scorers were fit with token confidence (a table's `confidence`
    column); the cascade then asks the model for log-probabilities.
    """

    def __init__(
        self, featurizer: Featurizer, scorers: dict[str, AnswerScorer], *, logprobs: bool = False
    ) -> None:
        self.featurizer = featurizer
        self.scorers = dict(scorers)
        self.needs_logprobs = logprobs

    def confidence(
        self, request: ChatRequest, response: ChatResponse, earlier: Sequence[ChatResponse]
    ) -> float:
        scorer = self.scorers.get(response.model)
        if scorer is None:
            raise ConfigError(
                f"no answer scorer for model {response.model!r}; fit for: "
                f"{', '.join(sorted(self.scorers))}"
            )
        texts = [response.text or " ", *(e.text or " " for e in earlier)]
        vecs = np.asarray(self.featurizer.embedder.embed(texts), dtype=np.float64)
        conf = (
            np.array([logprob_confidence(response.logprobs, "mean")])
            if self.needs_logprobs
            else None
        )
        features = answer_features(
            self.featurizer([query_text(request)]),
            vecs[:1],
            [response.text],
            conf,
            [[e.text] for e in earlier],
            [vecs[k + 1 : k + 2] for k in range(len(earlier))],
        )
        return float(scorer.predict(features)[0])
