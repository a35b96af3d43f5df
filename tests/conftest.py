"""Shared fixtures: tiny seeded Keras networks and data for the unit tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pytest

from helpers.runtime import keras, set_determinism


def make_mlp(
    n_in: int = 7,
    hidden: Sequence[int] = (6, 5),
    n_out: int = 4,
    *,
    activation: str = "relu",
    dtype: str = "float64",
    seed: int = 0,
    loss: str = "softmax_cross_entropy",
    dropout: float = 0.0,
) -> keras.Sequential:
    """A small dense chain with seeded random weights (biases non-zero so ReLU kinks are generic)."""
    set_determinism(seed)
    layers: list = [keras.Input((n_in,), dtype=dtype)]
    for width in hidden:
        layers.append(
            keras.layers.Dense(
                width, activation=activation, dtype=dtype, bias_initializer="random_normal"
            )
        )
        if dropout:
            layers.append(keras.layers.Dropout(dropout, dtype=dtype))
    layers.append(keras.layers.Dense(n_out, dtype=dtype, bias_initializer="random_normal"))
    model = keras.Sequential(layers, name="tiny")
    model.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        if loss == "softmax_cross_entropy"
        else keras.losses.MeanSquaredError()
    )
    return model


@pytest.fixture
def mlp_factory() -> Callable[..., keras.Sequential]:
    return make_mlp


@pytest.fixture
def classification_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.normal(size=(37, 7)), rng.integers(0, 4, size=37)
