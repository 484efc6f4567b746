"""The predictor contract: predicted quality of each model for each query, from query features.

`Featurizer` rows (routing/predictive.py) are a sentence embedding followed by `TEXT_FEATURES`
cheap text features; `embedding_part` takes the embedding back out of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]

TEXT_FEATURES = 6  # columns `text_features` appends after the embedding


def embedding_part(x: Array) -> Array:
    """The embedding columns of a `Featurizer`'s rows (all columns of narrower inputs)."""
    return x[:, :-TEXT_FEATURES] if x.shape[1] > 2 * TEXT_FEATURES else x


class Predictor(ABC):
    """Predicted quality of each model (columns) for each query (rows)."""

    kind: str

    @abstractmethod
    def fit(self, x: Array, y: Array) -> Predictor: ...

    @abstractmethod
    def predict(self, x: Array) -> Array: ...

    @abstractmethod
    def state(self) -> dict[str, Array]: ...

    @abstractmethod
    def load_state(self, state: dict[str, Array]) -> None: ...
