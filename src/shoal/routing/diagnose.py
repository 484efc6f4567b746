"""Loud warnings when a router's input cannot carry a signal.

A router that sees the same vector for every query, or predicts the same quality for every
query, still fits and still calibrates: it just sends everything to one model, and its figures
look like a route's. These checks say so, in plain words, wherever a route is fit or evaluated
(`shoal route calibrate`, `shoal route eval`, the benchmarks).

- `embedding_warnings`: many queries share one embedding, or all embeddings point the same way
  (a shared few-shot prefix left in the prompts fills the embedder's window).
- `prediction_warnings`: the predicted quality hardly varies between queries, so the route's
  settings give only a few distinct routes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from shoal.routing.predictor import embedding_part

Array = npt.NDArray[np.float64]

MAX_SHARED_VECTOR = 0.10  # share of queries allowed to have one and the same embedding
MAX_MEAN_COSINE = 0.90  # MiniLM on ordinary questions: 0.1-0.3
MIN_SPREAD = 0.02  # standard deviation of a model's predicted quality across queries
MIN_DISTINCT_ROUTES = 4


def embedding_warnings(x: Array, *, sample: int = 400, seed: int = 0) -> list[str]:
    """Warnings about the query features `x` (embedding columns first, as `Featurizer` makes)."""
    e = embedding_part(np.asarray(x, dtype=np.float64))
    n = len(e)
    if n < 2:
        return []
    out: list[str] = []
    keys = Counter(row.tobytes() for row in np.round(e, 4))
    largest = max(keys.values())
    if largest >= 2 and largest / n > MAX_SHARED_VECTOR:
        out.append(
            f"{largest} of {n} queries ({largest / n:.0%}) have the same embedding: the router "
            "cannot tell them apart (do the prompts share a long few-shot prefix?)"
        )
    rng = np.random.default_rng(seed)
    pick = rng.choice(n, size=min(n, sample), replace=False)
    norms = np.linalg.norm(e[pick], axis=1, keepdims=True)
    unit = e[pick] / np.maximum(norms, 1e-12)
    sims = unit @ unit.T
    mean = float((sims.sum() - np.trace(sims)) / max(len(pick) * (len(pick) - 1), 1))
    if mean > MAX_MEAN_COSINE:
        out.append(
            f"the queries' embeddings are nearly parallel (mean pairwise cosine {mean:.4f}): "
            "the prompts look alike to the embedder (a shared prefix or template?)"
        )
    return out


def prediction_warnings(
    predicted: Array, models: Sequence[str], *, distinct_routes: int | None = None
) -> list[str]:
    """Warnings about predicted quality (queries x models) and the routes it gives."""
    out: list[str] = []
    spread = np.asarray(predicted, dtype=np.float64).std(axis=0)
    if float(spread.max()) < MIN_SPREAD:
        each = ", ".join(f"{m} {s:.3f}" for m, s in zip(models, spread, strict=True))
        out.append(
            f"predicted quality hardly varies between queries (standard deviation {each}): "
            "the router routes by the mean, like a fixed mix of models"
        )
    if distinct_routes is not None and distinct_routes < MIN_DISTINCT_ROUTES:
        out.append(
            f"the route's cost weights give only {distinct_routes} distinct route(s): "
            "its cost-quality curve is a few points, not a curve"
        )
    return out
