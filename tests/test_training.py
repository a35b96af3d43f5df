"""The compiled training step: the lean Adam update is Keras' update bit for bit, the compact
first kernel is written back, and compiled steps and data are reused."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from helpers import training
from helpers.data import load_mnist
from helpers.models import build_mlp, learning_rate_for
from helpers.pruning import masks_from_scores
from helpers.retrain import iterative_prune, magnitude_saliency, masked_fit
from helpers.runtime import keras
from helpers.saliency import magnitude
from helpers.training import fit_classifier

Arrays = tuple[np.ndarray, np.ndarray]


@pytest.fixture(scope="module")
def mnist_subset() -> Arrays:
    (x, y), _ = load_mnist()
    return x[:1200], y[:1200]


def tiny(seed: int = 0, dropout_rate: float = 0.0) -> keras.Sequential:
    return build_mlp(hidden=(16, 16), dropout_rate=dropout_rate, seed=seed)


def adam(weight_decay: float | None, schedule: str, steps: int = 40) -> keras.optimizers.Adam:
    optimizer = keras.optimizers.Adam(
        learning_rate=learning_rate_for(2e-3, schedule, steps), weight_decay=weight_decay
    )
    if weight_decay:
        optimizer.exclude_from_weight_decay(var_names=["bias"])
    return optimizer


def state(model: keras.Model, optimizer: keras.optimizers.Optimizer) -> list[np.ndarray]:
    """Every weight and every optimizer variable (step count, moments), as arrays."""
    return [v.numpy().copy() for v in [*model.variables, *optimizer.variables]]


def train(
    lean: bool,
    data: Arrays,
    *,
    weight_decay: float | None,
    schedule: str,
    dropout_rate: float = 0.0,
    masked: bool = False,
) -> list[np.ndarray]:
    model = tiny(seed=3, dropout_rate=dropout_rate)
    optimizer = adam(weight_decay, schedule)
    masks = masks_from_scores(magnitude(model), 0.6) if masked else None
    fit_classifier(
        model,
        optimizer,
        *data,
        epochs=2,
        batch_size=64,
        seed=1,
        masks=masks,
        compact_inputs=False,  # the compact step needs the lean update: compared elsewhere
        lean_adam=lean,  # False: Keras' own optimizer.apply
    )
    graphs = next(iter(model.__dict__[training._GRAPHS_ATTRIBUTE].values()))
    assert graphs.lean is lean
    return state(model, optimizer)


@pytest.mark.parametrize(
    ("weight_decay", "schedule", "dropout_rate", "masked"),
    [
        (None, "constant", 0.0, False),
        (0.05, "constant", 0.0, False),
        (0.05, "cosine", 0.2, False),
        (None, "cosine", 0.0, True),
    ],
)
def test_the_lean_adam_step_is_keras_apply_bit_for_bit(
    mnist_subset, weight_decay, schedule, dropout_rate, masked
) -> None:
    settings = dict(
        weight_decay=weight_decay, schedule=schedule, dropout_rate=dropout_rate, masked=masked
    )
    lean = train(True, mnist_subset, **settings)
    keras_apply = train(False, mnist_subset, **settings)
    assert len(lean) == len(keras_apply)
    for got, expected in zip(lean, keras_apply, strict=True):
        np.testing.assert_array_equal(got, expected)


def test_the_lean_step_is_used_for_a_plain_adam_only() -> None:
    variables = tiny().trainable_variables

    def built(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
        optimizer.build(variables)  # fit_classifier builds it before choosing the step
        return optimizer

    assert training._lean_adam_applies(built(keras.optimizers.Adam()), variables)
    for other in (
        keras.optimizers.SGD(),
        keras.optimizers.AdamW(),
        keras.optimizers.Adam(amsgrad=True),
        keras.optimizers.Adam(clipnorm=1.0),
        keras.optimizers.Adam(use_ema=True),
    ):
        assert not training._lean_adam_applies(built(other), variables), other


def test_another_optimizer_trains_through_keras_apply(mnist_subset) -> None:
    model = tiny()
    before = [v.numpy().copy() for v in model.trainable_variables]
    history = fit_classifier(
        model, keras.optimizers.SGD(0.1), *mnist_subset, epochs=2, batch_size=64, seed=0
    )
    assert next(iter(model.__dict__[training._GRAPHS_ATTRIBUTE].values())).lean is False
    assert history["loss"][1] < history["loss"][0]
    assert all(
        not np.array_equal(v.numpy(), b)
        for v, b in zip(model.trainable_variables, before, strict=True)
    )


def test_observing_each_step_sees_the_compact_rows_written_back(mnist_subset) -> None:
    """With ``on_step`` the compact first kernel is copied into the model after every step, so
    the callback sees it move; the updates are the same as without a callback, bit for bit, and
    every connected row written back matches the full product's."""
    x, y = mnist_subset
    lit = np.flatnonzero((x > 0).any(axis=0).reshape(-1))  # pixels some image lights up
    results, seen = {}, []
    for run in ("compact", "observed", "full"):
        model = tiny(seed=5)
        masks = masks_from_scores(magnitude(model), 0.6)
        first = model.get_layer("dense_1").kernel
        cut = np.setdiff1d(np.arange(784), lit[::2])  # only every other lit pixel stays
        masks[first.path][cut] = False

        def on_step(step: int, optimizer: keras.optimizers.Optimizer, first=first) -> None:
            seen.append(first.numpy().copy())

        masked_fit(
            model,
            masks,
            x,
            y,
            epochs=1,
            batch_size=100,
            on_step=on_step if run == "observed" else None,
            compact_inputs=run != "full",
        )
        graphs = next(iter(model.__dict__[training._GRAPHS_ATTRIBUTE].values()))
        assert (graphs.compact is None) == (run == "full")
        results[run] = [v.numpy().copy() for v in model.trainable_variables]
    assert len(seen) == 12
    assert all(not np.array_equal(a, b) for a, b in itertools.pairwise(seen))  # moved each step
    np.testing.assert_array_equal(seen[-1], results["observed"][0])
    for got, expected in zip(results["observed"], results["compact"], strict=True):
        np.testing.assert_array_equal(got, expected)
    for got, expected in zip(results["compact"], results["full"], strict=True):
        np.testing.assert_allclose(got, expected, atol=2e-5)
    assert np.abs(results["full"][0][lit[::2]]).sum() > 0


def test_moments_left_on_disconnected_inputs_turn_the_shortcut_off(mnist_subset) -> None:
    """If the optimizer carries non-zero moments on an input that the masks disconnect, the full
    step would still move those rows, so the step does not skip them."""
    x, y = mnist_subset
    model = tiny(seed=6)
    optimizer = adam(None, "constant")
    fit_classifier(model, optimizer, x, y, epochs=1, batch_size=100, seed=0)  # moments set
    masks = masks_from_scores(magnitude(model), 0.5)
    masks[model.get_layer("dense_1").kernel.path][:100] = False
    fit_classifier(model, optimizer, x, y, epochs=1, batch_size=100, seed=0, masks=masks)
    graphs = list(model.__dict__[training._GRAPHS_ATTRIBUTE].values())[-1]
    assert graphs.compact is None


def test_later_rounds_and_runs_reuse_steps_and_share_the_data(mnist_subset) -> None:
    """Rounds with other epoch counts trace their own step once; a second run of the same
    schedule on the same model traces nothing, and all the steps share one copy of the data."""
    x, y = mnist_subset
    model = tiny(seed=4)
    dense = [v.numpy().copy() for v in model.variables]
    settings = dict(
        schedule=[0.5, 0.7, 0.8],
        saliency=magnitude_saliency(),
        epochs_per_round=[1, 2, 1],
        lr_schedule="cosine",
        batch_size=100,
    )
    first = iterative_prune(model, x, y, **settings)
    traces = training.traces
    for variable, value in zip(model.variables, dense, strict=True):
        variable.assign(value)
    second = iterative_prune(model, x, y, **settings)
    assert training.traces == traces
    for a, b in zip(first, second, strict=True):
        assert a.history == b.history
    graphs = list(model.__dict__[training._GRAPHS_ATTRIBUTE].values())
    assert len(graphs) == 2  # one per epoch count (the cosine schedule's length differs)
    assert graphs[0].data[0] is graphs[1].data[0] and graphs[0].data[1] is graphs[1].data[1]
