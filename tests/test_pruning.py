"""Saliencies, masks, applying and restoring them, and accuracy sweeps."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_mlp
from helpers.curvature import second_derivatives
from helpers.evaluate import Evaluator, evaluate
from helpers.pruning import (
    apply_masks,
    masks_from_scores,
    pruned,
    removal_count,
    sweep,
)
from helpers.saliency import magnitude, obd


def kernels(model) -> dict[str, np.ndarray]:
    return {layer.kernel.path: layer.kernel.numpy().copy() for layer in model.layers}


def removed(masks: dict[str, np.ndarray]) -> int:
    return sum(int((~m).sum()) for m in masks.values())


# ---------------------------------------------------------------------------------------------
# Saliencies
# ---------------------------------------------------------------------------------------------


def test_magnitude_and_obd_definitions(classification_data) -> None:
    x, y = classification_data
    model = make_mlp()
    w = kernels(model)
    h = second_derivatives(model, x, y, method="exact")
    mag, sal = magnitude(model), obd(model, h)
    assert list(mag) == list(w) == list(sal)
    for path in w:
        np.testing.assert_array_equal(mag[path], np.abs(w[path]))
        np.testing.assert_allclose(sal[path], 0.5 * h[path] * w[path] ** 2, rtol=1e-15)


def test_obd_rejects_second_derivatives_of_another_model(classification_data) -> None:
    x, y = classification_data
    other = make_mlp(hidden=(6,))
    h = second_derivatives(other, x, y, method="lecun")
    with pytest.raises(ValueError, match="second derivatives do not match model 'tiny': missing"):
        obd(make_mlp(hidden=(6, 5)), h)
    model = make_mlp(hidden=(6, 5))
    good = second_derivatives(model, x, y, method="lecun")
    first = next(iter(good))
    with pytest.raises(
        ValueError,
        match=rf"second derivatives\['{first}'\] has shape \(6, 7\); the kernel has shape \(7, 6\)",
    ):
        obd(model, {**good, first: good[first].T})
    with pytest.raises(ValueError, match="contains NaN"):
        obd(model, {**good, first: np.full_like(good[first], np.nan)})


def test_non_finite_weights_rejected_by_saliency() -> None:
    model = make_mlp()
    kernel = model.layers[0].kernel
    kernel.assign(np.full(kernel.shape, np.nan))
    with pytest.raises(ValueError, match="non-finite"):
        magnitude(model)


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------


def test_exact_counts_global_and_per_layer() -> None:
    rng = np.random.default_rng(0)
    scores = {"a": rng.random((7, 6)), "b": rng.random((6, 5)), "c": rng.random((5, 4))}  # 42+30+20
    for fraction in (0.0, 0.01, 0.1, 0.25, 0.5, 0.77, 0.999, 1.0):
        g = masks_from_scores(scores, fraction, scope="global")
        assert (
            removed(g) == removal_count(fraction, 92) == min(92, int(np.floor(fraction * 92 + 0.5)))
        )
        per_layer = masks_from_scores(scores, fraction, scope="layer")
        for path, n in (("a", 42), ("b", 30), ("c", 20)):
            assert int((~per_layer[path]).sum()) == removal_count(fraction, n)
        # the global mask removes the lowest scores of all: every removed score <= every kept one
        flat_scores = np.concatenate([s.ravel() for s in scores.values()])
        flat_keep = np.concatenate([m.ravel() for m in g.values()])
        if flat_keep.any() and not flat_keep.all():
            assert flat_scores[~flat_keep].max() <= flat_scores[flat_keep].min()


def test_global_and_per_layer_differ() -> None:
    scores = {"a": np.arange(10.0).reshape(2, 5), "b": np.arange(10.0, 20.0).reshape(2, 5)}
    g = masks_from_scores(scores, 0.5, scope="global")
    per_layer = masks_from_scores(scores, 0.5, scope="layer")
    assert not g["a"].any() and g["b"].all()  # the 10 lowest scores are all in "a"
    assert int((~per_layer["a"]).sum()) == int((~per_layer["b"]).sum()) == 5


def test_fraction_zero_and_one() -> None:
    scores = {"a": np.ones((3, 4)), "b": np.zeros((4, 2))}
    for scope in ("global", "layer"):
        assert all(m.all() for m in masks_from_scores(scores, 0.0, scope=scope).values())
        assert not any(m.any() for m in masks_from_scores(scores, 1.0, scope=scope).values())


def test_ties_broken_by_position_deterministically() -> None:
    scores = {"a": np.zeros((2, 3)), "b": np.zeros((3, 1))}
    masks = masks_from_scores(scores, 4 / 9)
    # four removed: the first four positions in layer order, row-major
    np.testing.assert_array_equal(masks["a"], [[False, False, False], [False, True, True]])
    np.testing.assert_array_equal(masks["b"], [[True], [True], [True]])
    again = masks_from_scores({"a": np.zeros((2, 3)), "b": np.zeros((3, 1))}, 4 / 9)
    for path in masks:
        np.testing.assert_array_equal(again[path], masks[path])


@pytest.mark.parametrize("fraction", [-0.01, 1.01, float("nan"), float("inf"), "half", None, True])
def test_fraction_outside_unit_interval(fraction) -> None:
    with pytest.raises(ValueError, match="fraction must be"):
        masks_from_scores({"a": np.ones((2, 2))}, fraction)


def test_bad_scope_and_nan_scores() -> None:
    with pytest.raises(ValueError, match="scope must be one of"):
        masks_from_scores({"a": np.ones((2, 2))}, 0.5, scope="network")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"scores\['a'\] contains NaN"):
        masks_from_scores({"a": np.array([[np.nan, 1.0]])}, 0.5)


# ---------------------------------------------------------------------------------------------
# Applying masks, restoring the original weights
# ---------------------------------------------------------------------------------------------


def test_apply_and_restore(classification_data) -> None:
    model = make_mlp()
    original = kernels(model)
    masks = masks_from_scores(magnitude(model), 0.6)
    with pruned(model, masks):
        for path, kernel in kernels(model).items():
            np.testing.assert_array_equal(kernel, np.where(masks[path], original[path], 0.0))
    for path, kernel in kernels(model).items():
        np.testing.assert_array_equal(kernel, original[path])
    snapshot = apply_masks(model, masks)
    assert removed(masks) == sum(int((k == 0).sum()) for k in kernels(model).values())
    snapshot.restore()
    for path, kernel in kernels(model).items():
        np.testing.assert_array_equal(kernel, original[path])


def test_masks_that_do_not_match_the_model() -> None:
    model = make_mlp()
    masks = masks_from_scores(magnitude(model), 0.5)
    first = next(iter(masks))
    with pytest.raises(ValueError, match="masks do not match model 'tiny': missing"):
        apply_masks(model, {first: masks[first]})
    with pytest.raises(ValueError, match="unexpected \\['extra'\\]"):
        apply_masks(model, {**masks, "extra": np.ones(3, bool)})
    with pytest.raises(ValueError, match="must be boolean"):
        apply_masks(model, {**masks, first: masks[first] * 0.5})


# ---------------------------------------------------------------------------------------------
# Sweeps
# ---------------------------------------------------------------------------------------------


def test_sweep_matches_one_at_a_time_evaluation(classification_data) -> None:
    x, y = classification_data
    model = make_mlp(dtype="float32")
    original = kernels(model)
    scores = obd(model, second_derivatives(model, x, y, method="exact"))
    fractions = [0.0, 0.1, 0.35, 0.8, 1.0]
    for scope in ("global", "layer"):
        result = sweep(model, scores, x, y, fractions=fractions, scope=scope)
        for i, fraction in enumerate(fractions):
            masks = masks_from_scores(scores, fraction, scope=scope)
            with pruned(model, masks):
                expected = evaluate(model, x, y)
            assert result.accuracy[i] == expected.accuracy
            assert result.loss[i] == pytest.approx(expected.loss, rel=1e-6)
            assert result.removed[i] == removed(masks)
    for path, kernel in kernels(model).items():  # restored
        np.testing.assert_array_equal(kernel, original[path])


def test_sweep_default_is_0_to_100_percent_without_retracing(classification_data) -> None:
    x, y = classification_data
    model = make_mlp(dtype="float32")
    evaluator = Evaluator(model, x, y)
    result = sweep(model, magnitude(model), x, y, evaluator=evaluator)
    np.testing.assert_allclose(result.fractions, np.arange(101) / 100)
    assert result.removed[0] == 0 and result.removed[-1] == 7 * 6 + 6 * 5 + 5 * 4
    assert result.accuracy[0] == evaluate(model, x, y).accuracy
    assert evaluator.tracing_count == 1


def test_sweep_rejects_bad_inputs(classification_data) -> None:
    x, y = classification_data
    model = make_mlp()
    with pytest.raises(ValueError, match="fraction must be in"):
        sweep(model, magnitude(model), x, y, fractions=[0.1, 1.5])
    with pytest.raises(ValueError, match="scores do not match model"):
        sweep(model, {"nope": np.ones(3)}, x, y)
    with pytest.raises(ValueError, match=r"x has shape \(37, 3\)"):
        sweep(model, magnitude(model), x[:, :3], y)


def test_determinism_same_seed_same_masks(classification_data) -> None:
    x, y = classification_data
    masks = []
    for _ in range(2):
        model = make_mlp(seed=5, dtype="float32")
        scores = obd(model, second_derivatives(model, x, y, method="lecun"))
        masks.append(masks_from_scores(scores, 0.42, scope="global"))
    for a, b in zip(masks[0].values(), masks[1].values(), strict=True):
        np.testing.assert_array_equal(a, b)
