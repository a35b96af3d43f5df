r"""Pruning scores for every kernel weight: the lower the score, the sooner the weight goes.

- :func:`magnitude`: :math:`|w_k|`, the classic baseline. It is OBD's saliency with every
  :math:`h_{kk}` taken equal (up to a monotone transform, which leaves rankings unchanged).
- :func:`obd`: the Optimal Brain Damage saliency :math:`s_k = \tfrac12 h_{kk} w_k^2`, the
  predicted increase of the loss when :math:`w_k` alone is set to zero, under the extremal,
  diagonal and quadratic assumptions. :math:`h_{kk}` comes from
  :func:`helpers.curvature.second_derivatives`.

Scores are dictionaries ``{kernel.path: array of the kernel's shape}`` in the model's layer order,
the format :mod:`helpers.pruning` ranks.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from helpers.network import check_finite_weights, prunable_kernels
from helpers.runtime import keras

Scores = dict[str, np.ndarray]


def check_scores(
    model: keras.Model, scores: Mapping[str, np.ndarray], what: str = "scores"
) -> Scores:
    """Return ``scores`` as float64 arrays in the model's kernel order, or raise ``ValueError``
    saying how the dictionary fails to match the model (missing or unexpected paths, wrong
    shapes, NaN)."""
    if not isinstance(scores, Mapping):
        raise TypeError(
            f"{what} must be a dict {{kernel path: array}}, got {type(scores).__name__}"
        )
    kernels = prunable_kernels(model)
    missing = [p for p in kernels if p not in scores]
    unexpected = [p for p in scores if p not in kernels]
    if missing or unexpected:
        raise ValueError(
            f"{what} do not match model {model.name!r}: missing {missing}, unexpected {unexpected}"
        )
    checked: Scores = {}
    for path, kernel in kernels.items():
        values = np.asarray(scores[path], dtype=np.float64)
        if values.shape != tuple(kernel.shape):
            raise ValueError(
                f"{what}[{path!r}] has shape {values.shape}; the kernel has shape {tuple(kernel.shape)}"
            )
        if np.isnan(values).any():
            raise ValueError(f"{what}[{path!r}] contains NaN")
        checked[path] = values
    return checked


def magnitude(model: keras.Model) -> Scores:
    """``|w|`` for every kernel weight of ``model``."""
    check_finite_weights(model)
    return {
        path: np.abs(np.asarray(kernel.numpy(), dtype=np.float64))
        for path, kernel in prunable_kernels(model).items()
    }


def obd(model: keras.Model, second_derivatives: Mapping[str, np.ndarray]) -> Scores:
    r"""OBD saliency :math:`\tfrac12 h_{kk} w_k^2` for every kernel weight of ``model``.

    ``second_derivatives`` is the dictionary returned by
    :func:`helpers.curvature.second_derivatives` for the same model. With ``"lecun-full"`` or
    ``"exact"`` on smooth networks some :math:`h_{kk}` can be negative; the saliency is then
    negative too and the weight is ranked first, as the formula says.
    """
    check_finite_weights(model)
    h = check_scores(model, second_derivatives, what="second derivatives")
    return {
        path: 0.5 * h[path] * np.square(np.asarray(kernel.numpy(), dtype=np.float64))
        for path, kernel in prunable_kernels(model).items()
    }


__all__ = ["Scores", "check_scores", "magnitude", "obd"]
