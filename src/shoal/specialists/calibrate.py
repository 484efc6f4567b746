"""The threshold a specialist answers above, calibrated to the quality target of its route.

A specialist route answers with the specialist when its confidence is at least the threshold and
asks the teacher otherwise, so its quality on a set of calls is the specialist's on the calls it
takes and the teacher's on the rest. The target is one of:
- `agreement`: the route's answers agree with the teacher's on at least this share of calls;
- `quality_ratio`: its accuracy on gold answers is at least this share of the teacher's;
- `min_accuracy`: its accuracy on gold answers is at least this.

`choose_threshold` picks, on out-of-fold predictions, the lowest threshold (the most calls taken)
above which every threshold keeps the target with a margin for sampling noise: a threshold that
met it by luck between two that do not is not taken.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shoal.errors import DistillationError

Array = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]

# Thresholds are chosen to keep the target by this many standard errors of the calls they were
# measured on (the lower end of a one-sided 90% interval): chosen exactly at the target, the
# route would miss it on new calls about half the time.
MARGIN_Z = 1.28


class Target(BaseModel):
    """What a specialist route keeps: exactly one of the three."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    agreement: float | None = Field(default=None, gt=0.0, le=1.0)
    quality_ratio: float | None = Field(default=None, gt=0.0, le=1.0)
    min_accuracy: float | None = Field(default=None, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _one(self) -> Target:
        given = [v for v in (self.agreement, self.quality_ratio, self.min_accuracy) if v]
        if len(given) != 1:
            raise ValueError("give exactly one of agreement, quality_ratio, min_accuracy")
        return self

    @classmethod
    def parse(cls, text: str) -> Target:
        """`agreement=0.95`, `quality_ratio=0.95` or `min_accuracy=0.8`."""
        name, _, value = text.partition("=")
        names = ("agreement", "quality_ratio", "min_accuracy")
        if name.strip() not in names:
            raise DistillationError(
                f"unknown target {text!r}; write one of {', '.join(n + '=0.95' for n in names)}"
            )
        try:
            return cls.model_validate({name.strip(): float(value)})
        except ValueError as exc:
            raise DistillationError(f"target {text!r}: {exc}") from None

    @property
    def needs_gold(self) -> bool:
        return self.agreement is None

    def describe(self) -> str:
        if self.agreement is not None:
            return f"agreement with the teacher ≥ {self.agreement:.0%}"
        if self.quality_ratio is not None:
            return f"accuracy on gold ≥ {self.quality_ratio:.0%} of the teacher's"
        return f"accuracy on gold ≥ {self.min_accuracy:.0%}"


@dataclass(frozen=True)
class Outcomes:
    """Per call of a set: the specialist's confidence, whether its answer agrees with the
    teacher's, and (where gold answers are known, `known`) whether it and the teacher are right."""

    confidence: Array
    agree: Mask
    correct: Mask
    teacher_correct: Mask
    known: Mask

    def __len__(self) -> int:
        return len(self.confidence)

    def quality(self, threshold: float, target: Target) -> float:
        """The route's quality at `threshold`, in the target's terms."""
        taken = self.confidence >= threshold
        if target.agreement is not None:
            return float(np.where(taken, self.agree, True).mean())
        k = self.known
        return float(np.where(taken[k], self.correct[k], self.teacher_correct[k]).mean())

    def goal(self, target: Target) -> float:
        if target.agreement is not None:
            return target.agreement
        if target.min_accuracy is not None:
            return target.min_accuracy
        assert target.quality_ratio is not None
        return target.quality_ratio * float(self.teacher_correct[self.known].mean())

    def margin(self, threshold: float, target: Target, z: float = 0.0) -> float:
        """How far the route is above the target at `threshold`, less `z` standard errors: per
        call, its quality less what the target asks of that call (the teacher's correctness
        times the ratio, for a quality ratio), averaged over the calls."""
        taken = self.confidence >= threshold
        if target.agreement is not None:
            d = np.where(taken, self.agree, True).astype(np.float64) - target.agreement
        else:
            k = self.known
            route = np.where(taken[k], self.correct[k], self.teacher_correct[k]).astype(float)
            if target.min_accuracy is not None:
                d = route - target.min_accuracy
            else:
                assert target.quality_ratio is not None
                d = route - target.quality_ratio * self.teacher_correct[k].astype(np.float64)
        if not len(d):
            return 0.0
        return float(d.mean() - z * d.std() / math.sqrt(len(d)))

    def summary(self, threshold: float) -> dict[str, Any]:
        """Coverage, agreement and (where gold is known) accuracy at `threshold`."""
        taken = self.confidence >= threshold
        n = max(len(self), 1)
        out: dict[str, Any] = {
            "calls": len(self),
            "coverage": float(taken.mean()) if len(self) else 0.0,
            "agreement_answered": _mean(self.agree[taken]),
            "agreement_all": float(self.agree.sum() / n),
            "route_agreement": float(np.where(taken, self.agree, True).mean()),
        }
        k = self.known
        if k.any():
            out |= {
                "gold_known": int(k.sum()),
                "accuracy_answered": _mean(self.correct[taken & k]),
                "accuracy_all": _mean(self.correct[k]),
                "teacher_accuracy": _mean(self.teacher_correct[k]),
                "route_accuracy": _mean(
                    np.where(taken[k], self.correct[k], self.teacher_correct[k])
                ),
            }
        return out


def _mean(values: Mask) -> float | None:
    return float(values.mean()) if len(values) else None


def choose_threshold(
    outcomes: Outcomes, target: Target, *, z: float = MARGIN_Z
) -> tuple[float, bool]:
    """(threshold, met): the lowest threshold above which the route keeps the target at every
    threshold, with a margin of `z` standard errors for the sampling noise of the calls it was
    measured on; (inf, False) when it keeps it at none but taking no call at all."""
    if target.needs_gold and not outcomes.known.any():
        raise DistillationError(
            f"the target ({target.describe()}) is about gold answers, and no example has one: "
            "give gold answers, or a target of agreement with the teacher (agreement=0.95)"
        )
    positive = outcomes.confidence[outcomes.confidence > 0]  # 0: an answer it never gives
    candidates = np.unique(positive)[::-1]  # highest first
    best = math.inf
    for threshold in candidates:
        if outcomes.margin(float(threshold), target, z) < -1e-12:
            break
        best = float(threshold)
    return best, math.isfinite(best)


def _wilson(agreed: float, total: int, z: float, sign: float) -> float:
    if total == 0:
        return 1.0 if sign > 0 else 0.0
    p = agreed / total
    centre = p + z * z / (2 * total)
    spread = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return min(1.0, max(0.0, (centre + sign * spread) / (1 + z * z / total)))


def wilson_upper(agreed: float, total: int, z: float = 1.96) -> float:
    """The upper end of a 95% interval of a share seen as `agreed` of `total`."""
    return _wilson(agreed, total, z, 1.0)


def wilson_lower(agreed: float, total: int, z: float = 1.96) -> float:
    """The lower end of a 95% interval of a share seen as `agreed` of `total`."""
    return _wilson(agreed, total, z, -1.0)


def live_floor(heldout: dict[str, Any], target: Target) -> float:
    """The agreement with the teacher that the specialist's own answers must keep live: for an
    agreement target, what keeps the route at the target at the held-out coverage; for a gold
    target, the low end of what its answers' agreement on held-out data allows (95%)."""
    coverage = float(heldout["coverage"])
    answered = heldout["agreement_answered"]
    if target.agreement is not None and coverage > 0:
        return max(0.0, 1.0 - (1.0 - target.agreement) / coverage)
    if answered is None:
        return 1.0
    n = round(float(heldout["calls"]) * coverage)
    return wilson_lower(float(answered) * n, n)
