"""A model's confidence in its own answer, read from token log-probabilities (free locally)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from shoal.messages import TokenLogprob

Mode = Literal["first", "mean", "min"]


def logprob_confidence(logprobs: Sequence[TokenLogprob] | None, mode: Mode = "first") -> float:
    """Probability-like confidence in [0, 1] from per-token log-probabilities.

    `first`: probability of the first non-blank token (the answer of a one-word or one-letter
    reply); `mean`: geometric mean probability of all tokens (long answers); `min`: the weakest
    token. No log-probabilities (an API that gives none) means no confidence: 0.
    """
    if not logprobs:
        return 0.0
    tokens = [lp for lp in logprobs if lp.token.strip()] or list(logprobs)
    if mode == "first":
        value = tokens[0].logprob
    elif mode == "mean":
        value = sum(lp.logprob for lp in tokens) / len(tokens)
    else:
        value = min(lp.logprob for lp in tokens)
    return math.exp(min(0.0, value))
