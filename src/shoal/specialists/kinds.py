"""The two kinds of specialist, as what they compute from sentence vectors.

- `ClassifierHeads` (`classifier`): one head per field of the answer's form; a field's
  probability is its head's softmax at the calibrated temperature, and the answer's confidence
  is the product over fields, so the specialist answers only when every field is confident.
  An input unlike any it was trained on (its nearest training input less similar than all but
  the least typical 1% of training inputs are to theirs) gets confidence 0: a calibration
  holds only on inputs like those it was made on.
- `NearestAnswer` (`reuse`): the teacher's recorded answer to the most similar input seen;
  the confidence is the calibrated probability that it agrees with the teacher's answer to this
  input, a logistic function of the similarity.

Both give, for each row of vectors, the answer's text, its keys (`Form.keys`) and its confidence.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from shoal.specialists.forms import Form
from shoal.specialists.heads import Layers, logits, softmax

Array = npt.NDArray[np.float64]
Keys = tuple[str, ...]


class Kind(ABC):
    name: ClassVar[str]
    form: Form

    @abstractmethod
    def predict(self, x: Array) -> tuple[list[str], list[Keys], Array]:
        """(answer texts, their keys, confidences) for each row of `x`."""

    @abstractmethod
    def arrays(self) -> dict[str, npt.NDArray[Any]]: ...

    @abstractmethod
    def meta(self) -> dict[str, Any]: ...

    @property
    def size(self) -> int:
        """Numbers it keeps (the card's `params`)."""
        return sum(int(a.size) for a in self.arrays().values())


@dataclass
class ClassifierHeads(Kind):
    name: ClassVar[str] = "classifier"
    form: Form
    heads: list[Layers]
    temperatures: list[float]
    familiar: npt.NDArray[np.float32] | None = None  # the training inputs' vectors
    min_similarity: float = -1.0

    def unfamiliar(self, x: Array) -> npt.NDArray[np.bool_]:
        """Rows of `x` unlike every training input."""
        if self.familiar is None or not len(self.familiar):
            return np.zeros(x.shape[0], dtype=bool)
        nearest = (x.astype(np.float32) @ self.familiar.T).max(axis=1)
        return np.asarray(nearest < self.min_similarity)

    def field_probabilities(self, x: Array) -> list[Array]:
        return [
            softmax(logits(head, x), t)
            for head, t in zip(self.heads, self.temperatures, strict=True)
        ]

    def predict(self, x: Array) -> tuple[list[str], list[Keys], Array]:
        probs = self.field_probabilities(x)
        picks = [p.argmax(axis=1) for p in probs]
        confidence = np.prod([p.max(axis=1) for p in probs], axis=0)
        confidence = np.where(self.unfamiliar(x), 0.0, confidence)
        keys = [
            tuple(self.form.classes[f][int(picks[f][i])] for f in range(len(probs)))
            for i in range(x.shape[0])
        ]
        return [self.form.text(k) for k in keys], keys, np.asarray(confidence, dtype=np.float64)

    def arrays(self) -> dict[str, npt.NDArray[Any]]:
        out: dict[str, npt.NDArray[Any]] = {}
        for f, head in enumerate(self.heads):
            for j, (w, b) in enumerate(head):
                out[f"f{f}.w{j}"], out[f"f{f}.b{j}"] = w.astype(np.float32), b.astype(np.float32)
        if self.familiar is not None:
            out["familiar"] = self.familiar
        return out

    def meta(self) -> dict[str, Any]:
        return {
            "temperatures": self.temperatures,
            "layers": [len(h) for h in self.heads],
            "min_similarity": self.min_similarity,
        }

    @classmethod
    def restore(
        cls, form: Form, meta: dict[str, Any], arrays: dict[str, npt.NDArray[Any]]
    ) -> ClassifierHeads:
        heads = [
            [
                (arrays[f"f{f}.w{j}"].astype(np.float64), arrays[f"f{f}.b{j}"].astype(np.float64))
                for j in range(n)
            ]
            for f, n in enumerate(meta["layers"])
        ]
        familiar = arrays.get("familiar")
        return cls(
            form,
            heads,
            [float(t) for t in meta["temperatures"]],
            None if familiar is None else familiar.astype(np.float32),
            float(meta.get("min_similarity", -1.0)),
        )


@dataclass
class NearestAnswer(Kind):
    name: ClassVar[str] = "reuse"
    form: Form
    vectors: npt.NDArray[np.float32]
    answers: list[str]
    slope: float
    intercept: float

    def similarity(self, x: Array) -> tuple[npt.NDArray[np.intp], Array]:
        sims = x.astype(np.float32) @ self.vectors.T
        best = sims.argmax(axis=1)
        return best, sims[np.arange(len(best)), best].astype(np.float64)

    def confidence(self, similarity: Array) -> Array:
        z = np.clip(self.slope * similarity + self.intercept, -30, 30)
        return np.asarray(1.0 / (1.0 + np.exp(-z)))

    def predict(self, x: Array) -> tuple[list[str], list[Keys], Array]:
        best, sims = self.similarity(x)
        texts = [self.answers[int(j)] for j in best]
        keys = [self.form.keys(t) or ("",) for t in texts]
        return texts, keys, self.confidence(sims)

    def arrays(self) -> dict[str, npt.NDArray[Any]]:
        return {"vectors": self.vectors, "answers": np.array(self.answers, dtype=np.str_)}

    def meta(self) -> dict[str, Any]:
        return {"slope": self.slope, "intercept": self.intercept}

    @classmethod
    def restore(
        cls, form: Form, meta: dict[str, Any], arrays: dict[str, npt.NDArray[Any]]
    ) -> NearestAnswer:
        return cls(
            form,
            arrays["vectors"].astype(np.float32),
            [str(a) for a in arrays["answers"]],
            float(meta["slope"]),
            float(meta["intercept"]),
        )


KINDS: dict[str, type[ClassifierHeads] | type[NearestAnswer]] = {
    ClassifierHeads.name: ClassifierHeads,
    NearestAnswer.name: NearestAnswer,
}
