"""The incremental sweep evaluator: the same numbers as a full evaluation, at each step."""

from __future__ import annotations

import numpy as np
import pytest

from helpers.data import load_mnist
from helpers.evaluate import Evaluator
from helpers.incremental import RECOMPUTE_SHARE, IncrementalEvaluator
from helpers.models import build_lenet5, build_mlp
from helpers.pruning import apply_masks, masks_from_scores, snapshot, sweep, sweep_evaluator
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


def near_ties(model, x: np.ndarray, tolerance: float = 1e-4) -> np.ndarray:
    """Images whose two largest logits, computed in float64 from the weights the model has now,
    are closer than ``tolerance`` times the largest logit: the only images whose prediction
    float32 rounding (which differs between CPUs and code paths) can change."""
    z = x.reshape(len(x), -1).astype(np.float64)
    dense = [layer for layer in model.layers if hasattr(layer, "kernel")]
    for i, layer in enumerate(dense):
        z = z @ layer.kernel.numpy().astype(np.float64) + layer.bias.numpy()
        if i < len(dense) - 1:
            z = np.maximum(z, 0.0)
    top2 = np.sort(z, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0] < tolerance * max(1.0, float(np.abs(z).max()))


def test_small_steps_update_without_recomputing(images) -> None:
    x, y = images
    model = build_mlp(hidden=(16, 16), seed=4)
    scores = magnitude(model)
    evaluator = IncrementalEvaluator(model, x, y)
    result = sweep(model, scores, x, y, evaluator=evaluator)
    assert evaluator.recomputed == 1  # 101 points, 1% of the weights per step
    expected = sweep(model, scores, x, y, evaluator=Evaluator(model, x, y))
    np.testing.assert_allclose(result.loss, expected.loss, rtol=1e-5)
    # Both round the first product to float32, in different orders, so an image can change
    # class only where its two largest logits are a near tie (an untrained network near 100%
    # removed has many). The number of near ties is computed in float64, the same on any CPU.
    original = snapshot(model)
    ties = []
    for fraction in result.fractions:
        apply_masks(model, masks_from_scores(scores, float(fraction)), base=original)
        ties.append(int(near_ties(model, x).sum()))
    original.restore()
    flips = np.rint(np.abs(result.accuracy - expected.accuracy) * len(y)).astype(int)
    assert np.all(flips <= np.asarray(ties)), list(zip(result.fractions, flips, ties, strict=True))
    # the bound is tight where it matters: up to 90% removed at most 1% of the images are near
    # ties at any point (at 98-99% every image is: the first kernel is gone, the logits constant)
    assert max(ties[:91]) <= 0.01 * len(y)


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
