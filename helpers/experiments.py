"""Multi-seed pruning experiments: the accuracy-versus-sparsity curves behind the notebooks.

One call of :func:`pruning_curves` trains (or loads from the cache) the network for each seed,
computes the saliency on the **training** set, and sweeps the pruned fraction measuring
accuracy on the **test** set, without retraining. Results are :class:`Curves` (one row per seed),
which save to JSON next to the figures they are drawn in.

Second derivatives are memoised in the process per (seed, dropout rate, method), so notebooks
that compare several rankings of the same models compute them once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from helpers.curvature import second_derivatives
from helpers.data import load_mnist
from helpers.evaluate import Evaluator
from helpers.incremental import IncrementalEvaluator
from helpers.models import train_mlp
from helpers.pruning import Scope, default_fractions, sweep, sweep_evaluator
from helpers.runtime import keras
from helpers.saliency import Scores, magnitude, obd

Saliency = Literal["magnitude", "obd", "obd-lecun"]
SALIENCIES: tuple[str, ...] = ("magnitude", "obd", "obd-lecun")
DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2)

_models: dict[tuple[int, float], keras.Model] = {}
_second: dict[tuple[int, float, str], dict[str, np.ndarray]] = {}
_evaluators: dict[int, Evaluator | IncrementalEvaluator] = {}


@dataclass(frozen=True)
class Curves:
    """Test accuracy after pruning, one row per seed, at each fraction of kernel weights removed."""

    label: str
    fractions: np.ndarray
    accuracy: np.ndarray
    seeds: tuple[int, ...]

    @property
    def mean(self) -> np.ndarray:
        return self.accuracy.mean(axis=0)

    @property
    def low(self) -> np.ndarray:
        return self.accuracy.min(axis=0)

    @property
    def high(self) -> np.ndarray:
        return self.accuracy.max(axis=0)

    def at(self, fraction: float) -> np.ndarray:
        """Accuracy of every seed at ``fraction`` (which must be one of the swept fractions)."""
        hits = np.flatnonzero(np.isclose(self.fractions, fraction))
        if hits.size == 0:
            raise ValueError(f"{fraction} is not among the swept fractions of {self.label!r}")
        return self.accuracy[:, hits[0]]

    def first_below(self, level: float) -> float | None:
        """The smallest swept fraction at which the mean accuracy is below ``level`` (None if never)."""
        below = np.flatnonzero(self.mean < level)
        return float(self.fractions[below[0]]) if below.size else None

    def as_dict(self) -> dict:
        return {
            "label": self.label,
            "seeds": list(self.seeds),
            "fraction": self.fractions.tolist(),
            "accuracy": self.accuracy.tolist(),
        }


def trained_model(seed: int, dropout_rate: float = 0.0) -> keras.Model:
    """The trained 784-50-50-50-50-10 network for ``seed`` (cached on disk and in the process)."""
    key = (seed, float(dropout_rate))
    if key not in _models:
        _models[key] = train_mlp(seed=seed, dropout_rate=dropout_rate).model
    return _models[key]


def training_second_derivatives(
    seed: int, dropout_rate: float = 0.0, method: str = "exact"
) -> dict[str, np.ndarray]:
    """Diagonal second derivatives of the mean training loss of :func:`trained_model`, memoised."""
    key = (seed, float(dropout_rate), method)
    if key not in _second:
        (x_train, y_train), _ = load_mnist()
        _second[key] = second_derivatives(
            trained_model(seed, dropout_rate), x_train, y_train, method=method
        )
    return _second[key]


def saliency_scores(seed: int, saliency: Saliency, dropout_rate: float = 0.0) -> Scores:
    """``"magnitude"`` (|w|), ``"obd"`` (½ h w², exact diagonal) or ``"obd-lecun"`` (LeCun's h)."""
    if saliency not in SALIENCIES:
        raise ValueError(f"saliency must be one of {SALIENCIES}, got {saliency!r}")
    model = trained_model(seed, dropout_rate)
    if saliency == "magnitude":
        return magnitude(model)
    method = "exact" if saliency == "obd" else "lecun"
    return obd(model, training_second_derivatives(seed, dropout_rate, method))


def pruning_curves(
    saliency: Saliency | Callable[[int, float], Scores],
    scope: Scope = "global",
    *,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    dropout_rate: float = 0.0,
    fractions: Sequence[float] | np.ndarray | None = None,
    label: str | None = None,
) -> Curves:
    """Prune each seed's trained network by ``saliency`` at every fraction; test accuracy.

    ``saliency`` names one of :data:`SALIENCIES`, or is a function ``(seed, dropout_rate) ->
    scores`` for any other ranking (then give a ``label``).
    """
    if callable(saliency) and label is None:
        raise ValueError("give a label for a custom saliency function")
    _, (x_test, y_test) = load_mnist()
    fractions = (
        default_fractions() if fractions is None else np.asarray(fractions, dtype=np.float64)
    )
    rows = []
    for seed in seeds:
        model = trained_model(seed, dropout_rate)
        if id(model) not in _evaluators:
            _evaluators[id(model)] = sweep_evaluator(model, x_test, y_test)
        result = sweep(
            model,
            saliency(seed, dropout_rate)
            if callable(saliency)
            else saliency_scores(seed, saliency, dropout_rate),
            x_test,
            y_test,
            fractions=fractions,
            scope=scope,
            evaluator=_evaluators[id(model)],
        )
        rows.append(result.accuracy)
    default_label = f"{saliency}, {'all-layer' if scope == 'global' else 'layer-wise'}"
    if dropout_rate:
        default_label += f", dropout {dropout_rate:g}"
    return Curves(
        label=label or default_label,
        fractions=fractions,
        accuracy=np.vstack(rows),
        seeds=tuple(seeds),
    )


def save_curves(curves: Sequence[Curves], path: str | os.PathLike[str]) -> None:
    """Write the curves to a JSON file (the numbers behind a figure). The file is written beside
    its destination and renamed over it, so a process reading it meanwhile (another notebook run
    in parallel) sees the old or the new file, never half of one."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temp, "w", encoding="utf-8") as f:
        json.dump([c.as_dict() for c in curves], f, indent=1)
        f.write("\n")
    os.replace(temp, path)


def load_curves(path: str | os.PathLike[str]) -> list[Curves]:
    """Read curves written by :func:`save_curves`."""
    with open(path, encoding="utf-8") as f:
        items = json.load(f)
    return [
        Curves(
            label=item["label"],
            fractions=np.asarray(item["fraction"]),
            accuracy=np.asarray(item["accuracy"]),
            seeds=tuple(item["seeds"]),
        )
        for item in items
    ]


__all__ = [
    "DEFAULT_SEEDS",
    "SALIENCIES",
    "Curves",
    "load_curves",
    "pruning_curves",
    "saliency_scores",
    "save_curves",
    "trained_model",
    "training_second_derivatives",
]
