"""Predictive routing: P(good answer | query) per model, then the cheapest model worth its cost.

Query features are the MiniLM sentence embedding plus a few cheap text features (length, digits,
options, lines). Predictors, all plain numpy, fit on an outcome table:

- `KNNPredictor`: the mean score of each model on the k most similar training queries.
- `LogisticPredictor`: one logistic regression per model (soft labels allowed).
- `MLPPredictor`: one hidden layer shared by all models, a sigmoid output per model.
- `MFPredictor`: matrix factorisation as RouteLLM's MF router: a low-rank query projection
  dotted with a learned vector per model.
- `EnsemblePredictor`: the mean of several.
- `ClusterPredictor` (routing/cluster.py): k-means on the embeddings, each model's mean score
  per cluster (Avengers-Pro's training-free router).

`PredictiveRouter` scores each candidate as predicted quality - λ · (predicted cost / reference
cost) and picks the best; λ is the one knob, fit by `calibrate` to a stated target. λ = 0 picks
the model predicted best. Costs come either from the request itself (token prices x tokens, for
API models whose answer length is fixed) or from a ridge regression fit on the table.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from shoal.cards import ModelCard
from shoal.errors import ConfigError, UnknownModelError
from shoal.messages import ChatRequest, Estimate, RouteDecision
from shoal.models.embedder import Embedder
from shoal.routing.base import ModelStats, Router, RouteStats
from shoal.routing.cluster import ClusterPredictor
from shoal.routing.predictor import TEXT_FEATURES
from shoal.routing.predictor import Predictor as Predictor  # where it was first defined

Array = npt.NDArray[np.float64]
PredictorKind = Literal["knn", "logistic", "mlp", "mf", "ensemble", "cluster"]
PREDICTOR_KINDS: tuple[str, ...] = ("knn", "logistic", "mlp", "mf", "ensemble", "cluster")
CostMode = Literal["known", "learned"]


# -- features ------------------------------------------------------------------------------------

_OPTION = re.compile(r"(?m)^\(?[A-E][).:]\s")


def text_features(texts: Sequence[str]) -> Array:
    """Cheap features of a prompt: log length (chars, words, lines), digit share, options."""
    rows = []
    for t in texts:
        chars = len(t)
        rows.append(
            [
                math.log1p(chars) / 8.0,
                math.log1p(len(t.split())) / 6.0,
                math.log1p(t.count("\n")) / 3.0,
                sum(ch.isdigit() for ch in t) / max(chars, 1) * 5.0,
                min(len(_OPTION.findall(t)), 5) / 5.0,
                float("?" in t),
            ]
        )
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), TEXT_FEATURES)


def query_text(request: ChatRequest) -> str:
    """What a router reads of a request: its last user message."""
    for message in reversed(request.messages):
        if message.role == "user":
            return message.content
    return request.messages[-1].content


class Featurizer:
    """Embedding + cheap text features, one row per text."""

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder

    def __call__(self, texts: Sequence[str]) -> Array:
        vectors = self.embedder.embed(texts).astype(np.float64)
        return np.hstack([vectors, text_features(texts)])

    @property
    def dim(self) -> int:
        return self.embedder.dim + TEXT_FEATURES


# -- optimisation helpers ------------------------------------------------------------------------


def _sigmoid(z: Array) -> Array:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))


class _Adam:
    def __init__(self, params: list[Array], lr: float) -> None:
        self.params, self.lr = params, lr
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads: list[Array]) -> None:
        self.t += 1
        for p, g, m, v in zip(self.params, grads, self.m, self.v, strict=True):
            m *= 0.9
            m += 0.1 * g
            v *= 0.999
            v += 0.001 * g * g
            p -= self.lr * (m / (1 - 0.9**self.t)) / (np.sqrt(v / (1 - 0.999**self.t)) + 1e-8)


def fit_logistic(
    x: Array, y: Array, *, l2: float = 1.0, steps: int = 300, lr: float = 0.05
) -> tuple[Array, Array]:
    """Logistic regressions of each column of `y` (values in [0, 1]) on `x`: (weights, biases)."""
    n, d = x.shape
    w = np.zeros((d, y.shape[1]))
    prior = np.clip(y.mean(axis=0), 1e-3, 1 - 1e-3)
    b = np.log(prior / (1 - prior))
    opt = _Adam([w, b], lr)
    for _ in range(steps):
        err = _sigmoid(x @ w + b) - y
        opt.step([x.T @ err / n + l2 * w / n, err.mean(axis=0)])
    return w, b


# -- predictors ----------------------------------------------------------------------------------


class KNNPredictor(Predictor):
    kind = "knn"

    def __init__(self, k: int = 40, prior_weight: float = 4.0, embed_dim: int = 384) -> None:
        self.k, self.prior_weight, self.embed_dim = k, prior_weight, embed_dim

    def fit(self, x: Array, y: Array) -> KNNPredictor:
        self.x = x[:, : self.embed_dim].astype(np.float32)
        self.y = y
        self.prior = y.mean(axis=0)
        return self

    def predict(self, x: Array) -> Array:
        sims = x[:, : self.embed_dim].astype(np.float32) @ self.x.T
        k = min(self.k, self.x.shape[0])
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        got = self.y[top].sum(axis=1)
        return np.asarray((got + self.prior_weight * self.prior) / (k + self.prior_weight))

    def state(self) -> dict[str, Array]:
        return {"x": self.x.astype(np.float64), "y": self.y, "prior": self.prior}

    def load_state(self, state: dict[str, Array]) -> None:
        self.x = state["x"].astype(np.float32)
        self.y, self.prior = state["y"], state["prior"]


class LogisticPredictor(Predictor):
    kind = "logistic"

    def __init__(self, l2: float = 10.0) -> None:
        self.l2 = l2

    def fit(self, x: Array, y: Array) -> LogisticPredictor:
        self.w, self.b = fit_logistic(x, y, l2=self.l2)
        return self

    def predict(self, x: Array) -> Array:
        return _sigmoid(x @ self.w + self.b)

    def state(self) -> dict[str, Array]:
        return {"w": self.w, "b": self.b}

    def load_state(self, state: dict[str, Array]) -> None:
        self.w, self.b = state["w"], state["b"]


class MLPPredictor(Predictor):
    """One hidden ReLU layer shared across models; full-batch Adam with weight decay."""

    kind = "mlp"

    def __init__(self, hidden: int = 64, l2: float = 1e-3, steps: int = 200, seed: int = 0) -> None:
        self.hidden, self.l2, self.steps, self.seed = hidden, l2, steps, seed

    def fit(self, x: Array, y: Array) -> MLPPredictor:
        rng = np.random.default_rng(self.seed)
        n, d = x.shape
        self.w1 = rng.normal(0, 1 / math.sqrt(d), (d, self.hidden))
        self.b1 = np.zeros(self.hidden)
        self.w2 = rng.normal(0, 1 / math.sqrt(self.hidden), (self.hidden, y.shape[1]))
        prior = np.clip(y.mean(axis=0), 1e-3, 1 - 1e-3)
        self.b2 = np.log(prior / (1 - prior))
        opt = _Adam([self.w1, self.b1, self.w2, self.b2], 0.02)
        for _ in range(self.steps):
            h = np.maximum(x @ self.w1 + self.b1, 0.0)
            err = (_sigmoid(h @ self.w2 + self.b2) - y) / n
            dh = (err @ self.w2.T) * (h > 0)
            opt.step(
                [
                    x.T @ dh + self.l2 * self.w1,
                    dh.sum(axis=0),
                    h.T @ err + self.l2 * self.w2,
                    err.sum(axis=0),
                ]
            )
        return self

    def predict(self, x: Array) -> Array:
        return _sigmoid(np.maximum(x @ self.w1 + self.b1, 0.0) @ self.w2 + self.b2)

    def state(self) -> dict[str, Array]:
        return {"w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": self.b2}

    def load_state(self, state: dict[str, Array]) -> None:
        self.w1, self.b1, self.w2, self.b2 = state["w1"], state["b1"], state["w2"], state["b2"]


class MFPredictor(Predictor):
    """sigmoid(v_m · (P x) + b_m): a rank-r query projection shared by all models (RouteLLM MF)."""

    kind = "mf"

    def __init__(self, rank: int = 16, l2: float = 1e-3, steps: int = 400, seed: int = 0) -> None:
        self.rank, self.l2, self.steps, self.seed = rank, l2, steps, seed

    def fit(self, x: Array, y: Array) -> MFPredictor:
        rng = np.random.default_rng(self.seed)
        n, d = x.shape
        self.p = rng.normal(0, 1 / math.sqrt(d), (d, self.rank))
        self.v = rng.normal(0, 1 / math.sqrt(self.rank), (self.rank, y.shape[1]))
        prior = np.clip(y.mean(axis=0), 1e-3, 1 - 1e-3)
        self.b = np.log(prior / (1 - prior))
        opt = _Adam([self.p, self.v, self.b], 0.01)
        for _ in range(self.steps):
            z = x @ self.p
            err = (_sigmoid(z @ self.v + self.b) - y) / n
            opt.step(
                [
                    x.T @ (err @ self.v.T) + self.l2 * self.p,
                    z.T @ err + self.l2 * self.v,
                    err.sum(axis=0),
                ]
            )
        return self

    def predict(self, x: Array) -> Array:
        return _sigmoid((x @ self.p) @ self.v + self.b)

    def state(self) -> dict[str, Array]:
        return {"p": self.p, "v": self.v, "b": self.b}

    def load_state(self, state: dict[str, Array]) -> None:
        self.p, self.v, self.b = state["p"], state["v"], state["b"]


class EnsemblePredictor(Predictor):
    kind = "ensemble"

    def __init__(self, members: Sequence[Predictor] | None = None) -> None:
        self.members = list(members or [KNNPredictor(), LogisticPredictor(), MLPPredictor()])

    def fit(self, x: Array, y: Array) -> EnsemblePredictor:
        for m in self.members:
            m.fit(x, y)
        return self

    def predict(self, x: Array) -> Array:
        return np.asarray(np.mean([m.predict(x) for m in self.members], axis=0), np.float64)

    def state(self) -> dict[str, Array]:
        return {f"{i}.{k}": v for i, m in enumerate(self.members) for k, v in m.state().items()}

    def load_state(self, state: dict[str, Array]) -> None:
        for i, m in enumerate(self.members):
            prefix = f"{i}."
            m.load_state({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})


def make_predictor(kind: str) -> Predictor:
    makers: dict[str, type[Predictor]] = {
        "knn": KNNPredictor,
        "logistic": LogisticPredictor,
        "mlp": MLPPredictor,
        "mf": MFPredictor,
        "ensemble": EnsemblePredictor,
        "cluster": ClusterPredictor,
    }
    if kind not in makers:
        raise ConfigError(f"unknown predictor {kind!r}; valid: {', '.join(makers)}")
    return makers[kind]()


class CostRegressor:
    """Per-model ridge regression of log cost on query features (answer length varies)."""

    def __init__(self, alpha: float = 10.0) -> None:
        self.alpha = alpha

    def fit(self, x: Array, costs: Array) -> CostRegressor:
        xb = np.hstack([x, np.ones((x.shape[0], 1))])
        target = np.log(np.maximum(costs, 1e-12))
        reg = self.alpha * np.eye(xb.shape[1])
        reg[-1, -1] = 0.0
        self.w = np.linalg.solve(xb.T @ xb + reg, xb.T @ target)
        # Correct the log-normal bias so that predicted costs are unbiased on average.
        resid = target - xb @ self.w
        self.w[-1] += np.log(np.mean(np.exp(resid), axis=0))
        return self

    def predict(self, x: Array) -> Array:
        return np.asarray(np.exp(np.hstack([x, np.ones((x.shape[0], 1))]) @ self.w), np.float64)


# -- the router ----------------------------------------------------------------------------------


def choose_index(quality: Array, cost: Array, lam: float, ref_cost: float) -> npt.NDArray[np.intp]:
    """Per row, argmax of quality - λ·cost/ref_cost (ties go to the cheaper model)."""
    utility = quality - lam * cost / ref_cost - 1e-9 * cost / ref_cost
    return np.asarray(np.argmax(utility, axis=1), dtype=np.intp)


class PredictiveRouter(Router):
    """Predicts each candidate's quality and cost and picks max quality - λ·cost/ref_cost.

    `min_quality` (optional) is a per-request floor: when no candidate's predicted quality
    reaches it, the route picks the best predicted model and says the target is not met.
    `target_met` is false when calibration found the route's target out of reach; the route
    then sends every query to `fallback` (the best single model on the calibration data) and
    says so, rather than trusting per-query predictions that could not meet the target.
    """

    blocking = True  # choosing embeds the query

    def __init__(
        self,
        models: Sequence[str],
        featurizer: Featurizer,
        predictor: Predictor,
        *,
        lam: float = 0.0,
        ref_cost: float = 1.0,
        cost_mode: CostMode = "learned",
        cost_regressor: CostRegressor | None = None,
        min_quality: float | None = None,
        target: str = "",
        target_met: bool = True,
        fallback: str | None = None,
    ) -> None:
        self.models = list(models)
        self.featurizer = featurizer
        self.predictor = predictor
        self.lam = lam
        self.ref_cost = ref_cost
        self.cost_mode = cost_mode
        self.cost_regressor = cost_regressor
        if cost_mode == "learned" and cost_regressor is None:
            raise ConfigError("a learned cost mode needs a fitted cost regressor")
        self.min_quality = min_quality
        self.target = target
        self.target_met = target_met
        if fallback is not None and fallback not in self.models:
            raise UnknownModelError(fallback, self.models)
        self.fallback = fallback

    # -- the numbers behind a choice -------------------------------------------------------

    def predict(self, x: Array) -> tuple[Array, Array | None]:
        quality = self.predictor.predict(x)
        cost = self.cost_regressor.predict(x) if self.cost_regressor is not None else None
        return quality, cost

    def choose(
        self, request: ChatRequest, candidates: Sequence[ModelCard], stats: RouteStats
    ) -> RouteDecision:
        x = self.featurizer([query_text(request)])
        return self.choose_from_features(x, request, candidates, stats)

    def choose_from_features(
        self,
        x: Array,
        request: ChatRequest,
        candidates: Sequence[ModelCard],
        stats: RouteStats,
    ) -> RouteDecision:
        quality_all, cost_all = self.predict(x)
        cols, cards = [], []
        for card in candidates:
            if card.id not in self.models:
                raise UnknownModelError(card.id, self.models)
            cols.append(self.models.index(card.id))
            cards.append(card)
        quality = quality_all[0, cols]
        if self.cost_mode == "known":
            cost = np.array([c.expected_cost(request) for c in cards])
        else:
            assert cost_all is not None
            cost = cost_all[0, cols]
        utility = quality - self.lam * cost / self.ref_cost - 1e-9 * cost / self.ref_cost
        best = int(np.argmax(utility))
        target_met = self.target_met
        floor = ""
        ids = [c.id for c in cards]
        if self.fallback is not None and self.fallback in ids:
            best = ids.index(self.fallback)
            floor = (
                f"calibration could not meet the target ({self.target}) with any cost weight, "
                f"so every query goes to {self.fallback}, the best single model there."
            )
        elif self.min_quality is not None and float(quality.max()) < self.min_quality:
            best = int(np.argmax(quality))
            target_met = False
            floor = (
                f"no model is predicted to reach quality {self.min_quality:.2f} "
                f"(best: {float(quality.max()):.2f}); chose the best available"
            )
        estimates = tuple(
            Estimate(
                model=card.id,
                quality=round(float(quality[i]), 4),
                cost_usd=float(cost[i]),
                latency_s=stats.get(card.id, ModelStats()).latency_p95_s,
                note=f"score {float(utility[i]):+.3f}",
            )
            for i, card in enumerate(cards)
        )
        return RouteDecision(
            route=self.name,
            models=(cards[best].id,),
            reason=floor or self._reason(cards, quality, cost, best),
            estimates=estimates,
            target_met=target_met,
        )

    def _reason(self, cards: Sequence[ModelCard], quality: Array, cost: Array, best: int) -> str:
        chosen = cards[best].id
        best_q = int(np.argmax(quality))
        why = (
            f"{chosen} is predicted to answer well with probability {quality[best]:.2f}, "
            f"for about ${cost[best]:.2g}. "
        )
        if best_q != best:
            gain = float(quality[best_q] - quality[best])
            ratio = float(cost[best_q] / max(cost[best], 1e-15))
            why += (
                f"{cards[best_q].id} is predicted only {gain:.2f} better but costs {ratio:.1f}x "
                "as much: not worth it at this route's cost weight. "
            )
        elif len(cards) > 1:
            why += "No other model is predicted to do better. "
        why += (
            f"(Each model scores predicted quality minus {self.lam:.3g} x its cost relative to "
            f"${self.ref_cost:.2g}, the dearest model's typical call; the highest score wins."
        )
        if not self.target_met:
            why += f" NOTE: calibration could not meet the target, {self.target}.)"
        elif self.target:
            why += f" The weight was calibrated so that the route keeps {self.target}.)"
        else:
            why += ")"
        return why

    # -- persistence -------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta: dict[str, Any] = {
            "version": 1,
            "models": self.models,
            "predictor": self.predictor.kind,
            "lam": self.lam,
            "ref_cost": self.ref_cost,
            "cost_mode": self.cost_mode,
            "min_quality": self.min_quality,
            "target": self.target,
            "target_met": self.target_met,
            "fallback": self.fallback,
        }
        arrays = {f"p.{k}": v for k, v in self.predictor.state().items()}
        if self.cost_regressor is not None:
            arrays["cost.w"] = self.cost_regressor.w
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, meta=np.array(json.dumps(meta)), **arrays)  # type: ignore[arg-type]
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, featurizer: Featurizer) -> PredictiveRouter:
        path = Path(path)
        try:
            data = np.load(path, allow_pickle=False)
        except OSError as exc:
            raise ConfigError(
                f"no calibrated route at {path}; run `shoal route calibrate` first"
            ) from exc
        meta = json.loads(str(data["meta"]))
        predictor = make_predictor(meta["predictor"])
        predictor.load_state({k[2:]: data[k] for k in data.files if k.startswith("p.")})
        regressor = None
        if "cost.w" in data.files:
            regressor = CostRegressor()
            regressor.w = data["cost.w"]
        return cls(
            meta["models"],
            featurizer,
            predictor,
            lam=meta["lam"],
            ref_cost=meta["ref_cost"],
            cost_mode=meta["cost_mode"],
            cost_regressor=regressor,
            min_quality=meta["min_quality"],
            target=meta["target"],
            target_met=meta["target_met"],
            fallback=meta.get("fallback"),
        )


def minilm_featurizer(cache_dir: Path, *, backend: str = "auto", cached: bool = True) -> Featurizer:
    """MiniLM (GGUF when available) plus text features; with `cached`, behind an on-disk cache
    of vectors (for outcome tables; a live route embeds each query afresh)."""
    from shoal.models.embedder import EmbeddingCache, minilm

    inner = minilm(cache_dir, backend)  # type: ignore[arg-type]
    if not cached:
        return Featurizer(inner)
    return Featurizer(EmbeddingCache(inner, cache_dir / "embeddings.sqlite"))
