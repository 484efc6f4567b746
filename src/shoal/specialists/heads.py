"""Small heads over sentence vectors: logistic regression or a one-hidden-layer MLP.

Training uses scikit-learn (a few hundred vectors train in well under a second on two cores);
serving is a plain numpy forward pass over the weights kept in the specialist's file, so no
scikit-learn is imported to answer. `fit_temperature` scales a head's logits so that its
probabilities match how often it is right (temperature scaling, fit on out-of-fold logits).
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]
Layers = list[tuple[Array, Array]]  # (weights, biases) per layer; ReLU between layers
HeadKind = Literal["logistic", "mlp"]

HIDDEN = 64
STRENGTHS = (0.5, 2.0, 8.0)  # inverse L2 strengths a logistic head is chosen among


def logits(layers: Layers, x: Array) -> Array:
    """The head's class scores for each row of `x`."""
    out = x
    for i, (w, b) in enumerate(layers):
        out = out @ w + b
        if i < len(layers) - 1:
            out = np.maximum(out, 0.0)
    return out


def softmax(z: Array, temperature: float = 1.0) -> Array:
    z = z / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def _two_class(w: Array, b: Array) -> tuple[Array, Array]:
    """scikit-learn's one-column binary output as two class columns (same probabilities)."""
    return np.hstack([np.zeros_like(w), w]), np.concatenate([np.zeros_like(b), b])


def fit_head(
    x: Array,
    y: npt.NDArray[np.intp],
    classes: int,
    kind: HeadKind,
    *,
    c: float = 2.0,
    seed: int = 0,
) -> Layers:
    """A head fit on `x` to class indices `y` in [0, classes). Classes missing from `y` get no
    chance; a single class seen gives a constant head."""
    seen = np.unique(y)
    if len(seen) == 1:
        bias = np.full(classes, -30.0)
        bias[seen[0]] = 0.0
        return [(np.zeros((x.shape[1], classes)), bias)]
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if kind == "logistic":
            from sklearn.linear_model import LogisticRegression

            model = LogisticRegression(C=c, max_iter=2000)
            model.fit(x, y)
            layers = [(model.coef_.T.astype(np.float64), model.intercept_.astype(np.float64))]
        else:
            from sklearn.neural_network import MLPClassifier

            mlp = MLPClassifier(
                hidden_layer_sizes=(HIDDEN,), alpha=1e-3 / c, max_iter=300, random_state=seed
            )
            mlp.fit(x, y)
            layers = [
                (w.astype(np.float64), b.astype(np.float64))
                for w, b in zip(mlp.coefs_, mlp.intercepts_, strict=True)
            ]
    w, b = layers[-1]
    if len(seen) == 2:
        w, b = _two_class(w, b)
    if len(seen) != classes:
        full_w, full_b = np.zeros((w.shape[0], classes)), np.full(classes, -30.0)
        full_w[:, seen], full_b[seen] = w, b
        w, b = full_w, full_b
    layers[-1] = (w, b)
    return layers


def nll(z: Array, y: npt.NDArray[np.intp], temperature: float, smoothing: float = 0.0) -> float:
    """Mean negative log-likelihood of `y`, each target smoothed toward the uniform by
    `smoothing`."""
    logp = np.log(np.clip(softmax(z, temperature), 1e-12, 1.0))
    picked = logp[np.arange(len(y)), y]
    return float(-((1.0 - smoothing) * picked + smoothing * logp.mean(axis=1)).mean())


def fit_temperature(z: Array, y: npt.NDArray[np.intp]) -> float:
    """The temperature that best explains `y` under `z` (a grid on the log scale, then a finer
    one around the best). Targets are smoothed by one example's worth (1 / (n + 2)), so a head
    that was never wrong on n examples is not made surer than that record allows."""
    if z.shape[1] < 2 or len(y) == 0:
        return 1.0
    smoothing = 1.0 / (len(y) + 2)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 61))
    best = min(grid, key=lambda t: nll(z, y, float(t), smoothing))
    fine = best * np.exp(np.linspace(-0.06, 0.06, 25))
    return float(min(fine, key=lambda t: nll(z, y, float(t), smoothing)))
