"""The cluster router (Avengers-Pro's): embed, k-means, each model's mean score per cluster.

No training beyond k-means on the queries' embeddings: a query's predicted quality for a model
is that model's mean score on the training queries of the query's nearest clusters, shrunk
towards its overall mean when a cluster is small. As a `Predictor` it plugs into the
predictive route, its cost weight and its calibration like any other (kind `cluster`); with a
per-query cost it picks, per cluster, the model with the best weighted quality and cost.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from shoal.routing.predictor import Predictor, embedding_part

Array = npt.NDArray[np.float64]


def _unit(x: Array) -> Array:
    return np.asarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))


def kmeans(x: Array, k: int, *, iters: int = 30, seed: int = 0) -> Array:
    """k centres of the rows of `x` (unit vectors; spherical k-means, k-means++ start)."""
    rng = np.random.default_rng(seed)
    n = len(x)
    k = max(1, min(k, n))
    centres = [x[rng.integers(n)]]
    dist = 1.0 - x @ centres[0]
    for _ in range(1, k):
        weight = np.maximum(dist, 0.0)
        total = weight.sum()
        pick = rng.choice(n, p=weight / total) if total > 0 else rng.integers(n)
        centres.append(x[pick])
        dist = np.minimum(dist, 1.0 - x @ x[pick])
    c = np.stack(centres)
    for _ in range(iters):
        label = np.argmax(x @ c.T, axis=1)
        moved = c.copy()
        for j in range(k):
            members = x[label == j]
            if len(members):
                moved[j] = members.sum(axis=0)
        moved = _unit(moved)
        if np.allclose(moved, c):
            break
        c = moved
    return c


class ClusterPredictor(Predictor):
    """Mean score of each model over the training queries of a query's `nearest` clusters."""

    kind = "cluster"

    def __init__(
        self,
        k: int = 60,
        nearest: int = 1,
        prior_weight: float = 4.0,
        min_per_cluster: int = 8,
        seed: int = 0,
    ) -> None:
        self.k, self.nearest, self.prior_weight = k, nearest, prior_weight
        self.min_per_cluster, self.seed = min_per_cluster, seed

    def fit(self, x: Array, y: Array) -> ClusterPredictor:
        e = _unit(embedding_part(x))
        k = max(1, min(self.k, len(e) // self.min_per_cluster))
        self.centres = kmeans(e, k, seed=self.seed)
        label = np.argmax(e @ self.centres.T, axis=1)
        self.prior = y.mean(axis=0)
        sums = np.zeros((len(self.centres), y.shape[1]))
        np.add.at(sums, label, y)
        counts = np.bincount(label, minlength=len(self.centres)).astype(np.float64)
        self.means = (sums + self.prior_weight * self.prior) / (counts[:, None] + self.prior_weight)
        self.counts = counts
        return self

    def predict(self, x: Array) -> Array:
        sims = _unit(embedding_part(x)) @ self.centres.T
        near = min(self.nearest, len(self.centres))
        top = np.argpartition(-sims, near - 1, axis=1)[:, :near]
        w = self.counts[top] + self.prior_weight
        return np.asarray((self.means[top] * w[..., None]).sum(axis=1) / w.sum(axis=1)[:, None])

    def state(self) -> dict[str, Array]:
        return {
            "centres": self.centres,
            "means": self.means,
            "counts": self.counts,
            "prior": self.prior,
        }

    def load_state(self, state: dict[str, Array]) -> None:
        self.centres, self.means = state["centres"], state["means"]
        self.counts, self.prior = state["counts"], state["prior"]
