"""The incremental sweep evaluator: the same numbers as a full evaluation, at each step."""

from __future__ import annotations

import numpy as np
import pytest

from helpers.data import load_mnist
from helpers.evaluate import Evaluator
from helpers.incremental import RECOMPUTE_SHARE, IncrementalEvaluator
from helpers.models import build_lenet5, build_mlp
from helpers.pruning import apply_masks, snapshot, sweep, sweep_evaluator
from helpers.runtime import tf
from helpers.saliency import magnitude


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    (x, y), _ = load_mnist()
    return x[:2000], y[:2000]


def random_masks(model, rng, fraction):
    return {
        layer.kernel.path: rng.random(layer.kernel.shape) >= fraction
        for layer in model.layers
        if hasattr(layer, "kernel")
    }


@pytest.mark.parametrize("dropout_rate", [0.0, 0.2])
def test_every_step_equals_a_full_evaluation(images, dropout_rate) -> None:
    x, y = images
    model = build_mlp(hidden=(32, 32), dropout_rate=dropout_rate, seed=3)
    original = snapshot(model)
    incremental, full = IncrementalEvaluator(model, x, y), Evaluator(model, x, y)
    rng = np.random.default_rng(0)
    # small and large steps, up and down (pruned weights come back): a sweep in any order
    for fraction in (0.0, 0.02, 0.05, 0.03, 0.6, 0.61, 0.2, 0.95, 0.96, 0.0):
        apply_masks(model, random_masks(model, rng, fraction), base=original)
        got, expected = incremental(), full()
        assert got.accuracy == expected.accuracy
        assert got.loss == pytest.approx(expected.loss, rel=1e-6)
    # the jumps of more than RECOMPUTE_SHARE of the first kernel recomputed it; the rest did not
    assert RECOMPUTE_SHARE == 0.25 and 1 < incremental.recomputed < 8
    kernel = model.get_layer("dense_1").kernel.numpy().astype(np.float64)
    direct = kernel.T @ x.reshape(len(x), -1).T.astype(np.float64)
    np.testing.assert_allclose(incremental._z, direct, rtol=0, atol=1e-12)
    assert incremental.tracing_count == 1


def test_small_steps_update_without_recomputing(images) -> None:
    x, y = images
    model = build_mlp(hidden=(16, 16), seed=4)
    evaluator = IncrementalEvaluator(model, x, y)
    result = sweep(model, magnitude(model), x, y, evaluator=evaluator)
    assert evaluator.recomputed == 1  # 101 points, 1% of the weights per step
    expected = sweep(model, magnitude(model), x, y, evaluator=Evaluator(model, x, y))
    # Both round the first product to float32, in different orders. Near 100% removed an
    # untrained network's logits are nearly input-independent, so a rounding difference can
    # flip a near tie: a few images at a few points, never more.
    flips = np.rint(np.abs(result.accuracy - expected.accuracy) * len(y))
    assert flips.max() <= 3 and np.count_nonzero(flips) <= 5
    np.testing.assert_array_equal(result.accuracy[:90], expected.accuracy[:90])
    np.testing.assert_allclose(result.loss, expected.loss, rtol=1e-5)


def test_a_dense_first_network_gets_the_incremental_evaluator_others_the_full_one(images) -> None:
    x, y = images
    mlp, lenet = build_mlp(hidden=(8,), seed=0), build_lenet5(seed=0)
    assert isinstance(sweep_evaluator(mlp, x, y), IncrementalEvaluator)
    assert isinstance(sweep_evaluator(lenet, x[..., None], y), Evaluator)
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    assert isinstance(sweep_evaluator(mlp, x, y, strategy=strategy), Evaluator)
    with pytest.raises(ValueError, match="does not start with a Dense layer"):
        IncrementalEvaluator(lenet, x[..., None], y)
    with pytest.raises(ValueError, match="x is empty"):
        IncrementalEvaluator(mlp, x[:0], y[:0])


def test_non_finite_first_layer_weights_are_refused(images) -> None:
    x, y = images
    model = build_mlp(hidden=(8,), seed=0)
    evaluator = IncrementalEvaluator(model, x, y)
    kernel = model.get_layer("dense_1").kernel
    values = kernel.numpy()
    values[3, 2] = np.nan
    kernel.assign(values)
    with pytest.raises(ValueError, match="dense_1/kernel has non-finite weights"):
        evaluator()
    with pytest.raises(ValueError, match="non-finite"):
        IncrementalEvaluator(model, x, y)
