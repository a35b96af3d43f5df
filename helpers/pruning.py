"""Masks from scores, applying them to a model, and accuracy-versus-sparsity sweeps.

Conventions:

- Only kernels are pruned. Biases (210 of the 47,410 parameters of the 784-50-50-50-50-10
  network) are always kept, as in the 2016 experiment; "fraction pruned" counts kernel weights.
- ``fraction`` is the fraction of weights **removed**. The number removed is exact:
  ``round(fraction * n)`` (halves rounded up) of the ``n`` weights ranked together.
- ``scope="global"`` ranks all kernels together (the post's "all-layer" ranking);
  ``scope="layer"`` removes the same fraction from each kernel ("layer-wise").
- The lowest scores go first. Ties are broken deterministically by position: in model layer
  order, then row-major index within a kernel (a stable sort), so the same scores always give
  the same mask.
- A mask is a boolean array of the kernel's shape, ``True`` where the weight is **kept**.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from helpers.evaluate import DEFAULT_EVAL_BATCH, Evaluator
from helpers.incremental import IncrementalEvaluator
from helpers.network import as_chain, prunable_kernels, split_at_first_dense
from helpers.runtime import keras, tf
from helpers.saliency import Scores, check_scores

Scope = Literal["global", "layer"]
SCOPES: tuple[str, ...] = ("global", "layer")
Masks = dict[str, np.ndarray]


def check_fraction(fraction: float) -> float:
    """``fraction`` as a float, or ``ValueError`` if it is not a number in [0, 1]."""
    if isinstance(fraction, bool):
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}") from None
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    return value


def removal_count(fraction: float, n: int) -> int:
    """How many of ``n`` weights a ``fraction`` removes: ``round(fraction * n)``, halves up."""
    return min(n, math.floor(check_fraction(fraction) * n + 0.5))


def check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")


def removal_ranks(
    scores: Mapping[str, np.ndarray], scope: Scope = "global"
) -> dict[str, np.ndarray]:
    """For every weight, its position in the removal order (0 = removed first), within all
    kernels (``"global"``) or within its own kernel (``"layer"``)."""
    check_scope(scope)
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError("scores must be a non-empty dict {kernel path: array}")
    arrays = {p: np.asarray(s, dtype=np.float64) for p, s in scores.items()}
    for path, values in arrays.items():
        if np.isnan(values).any():
            raise ValueError(f"scores[{path!r}] contains NaN")

    def ranks_of(flat: np.ndarray) -> np.ndarray:
        ranks = np.empty(flat.size, dtype=np.int64)
        ranks[np.argsort(flat, kind="stable")] = np.arange(flat.size)
        return ranks

    if scope == "layer":
        return {p: ranks_of(v.reshape(-1)).reshape(v.shape) for p, v in arrays.items()}
    flat = ranks_of(np.concatenate([v.reshape(-1) for v in arrays.values()]))
    out, start = {}, 0
    for path, values in arrays.items():
        out[path] = flat[start : start + values.size].reshape(values.shape)
        start += values.size
    return out


def _masks_from_ranks(ranks: Mapping[str, np.ndarray], fraction: float, scope: Scope) -> Masks:
    if scope == "layer":
        return {p: r >= removal_count(fraction, r.size) for p, r in ranks.items()}
    k = removal_count(fraction, sum(r.size for r in ranks.values()))
    return {p: r >= k for p, r in ranks.items()}


def masks_from_scores(
    scores: Mapping[str, np.ndarray], fraction: float, *, scope: Scope = "global"
) -> Masks:
    """Keep-masks that remove exactly ``round(fraction * n)`` lowest-scored weights (module doc)."""
    return _masks_from_ranks(removal_ranks(scores, scope), check_fraction(fraction), scope)


@dataclass
class WeightSnapshot:
    """A model's variables as they were when :func:`snapshot` was taken; :meth:`restore` puts
    them all back. ``kernels`` (by path) are what masks apply to; ``others`` holds every other
    variable (biases, dropout seed states), which retraining changes too."""

    model: keras.Model
    kernels: dict[str, np.ndarray]
    others: list[tuple[keras.Variable, np.ndarray]] = field(default_factory=list)

    def restore(self) -> None:
        for path, kernel in prunable_kernels(self.model).items():
            kernel.assign(self.kernels[path])
        for variable, value in self.others:
            variable.assign(value)


def snapshot(model: keras.Model) -> WeightSnapshot:
    """Copy the current kernels of ``model`` and all its other variables (biases included: a
    snapshot taken before retraining must undo the retraining, not only the pruning)."""
    kernels = prunable_kernels(model)
    kernel_ids = {id(k) for k in kernels.values()}
    return WeightSnapshot(
        model,
        {p: np.array(k.numpy()) for p, k in kernels.items()},
        [(v, np.array(v.numpy())) for v in model.variables if id(v) not in kernel_ids],
    )


def _check_masks(model: keras.Model, masks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    checked = check_scores(model, masks, what="masks")
    for path, values in checked.items():
        if not np.isin(values, (0.0, 1.0)).all():
            raise ValueError(f"masks[{path!r}] must be boolean (or 0/1)")
    return {p: v.astype(bool) for p, v in checked.items()}


def apply_masks(
    model: keras.Model, masks: Mapping[str, np.ndarray], base: WeightSnapshot | None = None
) -> WeightSnapshot:
    """Set the masked-out kernel weights of ``model`` to zero.

    The kept weights take their values from ``base`` (default: the model's current kernels).
    Returns the snapshot of the original kernels, whose :meth:`WeightSnapshot.restore` undoes
    the pruning; :func:`pruned` does this as a context manager.
    """
    checked = _check_masks(model, masks)
    base = base if base is not None else snapshot(model)
    for path, kernel in prunable_kernels(model).items():
        kernel.assign(
            np.where(checked[path], base.kernels[path], 0).astype(base.kernels[path].dtype)
        )
    return base


@contextlib.contextmanager
def pruned(model: keras.Model, masks: Mapping[str, np.ndarray]) -> Iterator[keras.Model]:
    """``with pruned(model, masks): ...`` -- the model is pruned inside the block and restored after."""
    original = apply_masks(model, masks)
    try:
        yield model
    finally:
        original.restore()


@dataclass(frozen=True)
class SweepResult:
    """Test loss and accuracy after removing each fraction of the weights (no retraining)."""

    fractions: np.ndarray
    removed: np.ndarray
    accuracy: np.ndarray
    loss: np.ndarray
    scope: str

    def as_dict(self) -> dict[str, list]:
        return {
            "fraction": self.fractions.tolist(),
            "removed": self.removed.tolist(),
            "accuracy": self.accuracy.tolist(),
            "loss": self.loss.tolist(),
        }


def default_fractions() -> np.ndarray:
    """0, 1, ..., 100 percent."""
    return np.arange(101) / 100


def sweep_evaluator(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = DEFAULT_EVAL_BATCH,
    strategy: tf.distribute.Strategy | None = None,
) -> Evaluator | IncrementalEvaluator:
    """The evaluator :func:`sweep` uses: incremental for a ``Dense``-first network without a
    ``strategy``, else :class:`helpers.evaluate.Evaluator`."""
    if strategy is None and split_at_first_dense(model, as_chain(model)) is not None:
        return IncrementalEvaluator(model, x, y)
    return Evaluator(model, x, y, batch_size=batch_size, strategy=strategy)


def sweep(
    model: keras.Model,
    scores: Mapping[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    *,
    fractions: Sequence[float] | np.ndarray | None = None,
    scope: Scope = "global",
    batch_size: int = DEFAULT_EVAL_BATCH,
    evaluator: Evaluator | IncrementalEvaluator | None = None,
    strategy: tf.distribute.Strategy | None = None,
) -> SweepResult:
    """Prune ``model`` by ``scores`` at each fraction, evaluate on ``(x, y)``, then restore it.

    The ranking is computed once and the evaluation function is traced once. A network that
    starts with a ``Dense`` layer is evaluated by
    :class:`helpers.incremental.IncrementalEvaluator` (the first product updated by the
    weights removed since the previous point; the same results up to float32 rounding), any
    other network, or any evaluation under a ``strategy``, by
    :class:`helpers.evaluate.Evaluator` (``batch_size`` images at a time, split across the
    strategy's replicas). Pass an ``evaluator`` built for the same model and data to reuse
    it across sweeps.
    """
    check_scope(scope)
    checked = check_scores(model, scores)
    fractions = (
        default_fractions()
        if fractions is None
        else np.asarray(fractions, dtype=np.float64).reshape(-1)
    )
    if fractions.size == 0:
        raise ValueError("fractions is empty")
    for f in fractions:
        check_fraction(f)
    if evaluator is None:
        evaluator = sweep_evaluator(model, x, y, batch_size=batch_size, strategy=strategy)
    elif evaluator.model is not model:
        raise ValueError("the evaluator was built for a different model")
    ranks = removal_ranks(checked, scope)
    original = snapshot(model)
    accuracy, loss, removed = [], [], []
    try:
        for fraction in fractions:
            masks = _masks_from_ranks(ranks, float(fraction), scope)
            apply_masks(model, masks, base=original)
            result = evaluator()
            accuracy.append(result.accuracy)
            loss.append(result.loss)
            removed.append(sum(int(m.size - np.count_nonzero(m)) for m in masks.values()))
    finally:
        original.restore()
    return SweepResult(
        fractions=fractions,
        removed=np.asarray(removed),
        accuracy=np.asarray(accuracy),
        loss=np.asarray(loss),
        scope=scope,
    )


__all__ = [
    "SCOPES",
    "Masks",
    "Scores",
    "SweepResult",
    "WeightSnapshot",
    "apply_masks",
    "check_fraction",
    "default_fractions",
    "masks_from_scores",
    "pruned",
    "removal_count",
    "removal_ranks",
    "snapshot",
    "sweep",
    "sweep_evaluator",
]
