"""Optimal Brain Surgeon: the helpers against the brute-force (KKT) definition, OBD as its diagonal
special case, exact OBS of a tiny network, and layer-wise OBS."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_mlp
from helpers.curvature import mean_loss, second_derivatives
from helpers.network import prunable_kernels
from helpers.obs import (
    DEFAULT_EXACT_DAMPING,
    LayerwiseOBS,
    column_paths,
    counts_from_masks,
    damped,
    downdate_inverse,
    gauss_newton,
    layer_hessian,
    layerwise_obs,
    obs_prune_exact,
    obs_prune_model,
    obs_saliencies,
    obs_step,
    optimal_weights,
    reconstruction_error,
    unit_curvature,
)
from helpers.pruning import masks_from_scores, removal_count, snapshot
from helpers.runtime import keras, tf
from helpers.saliency import obd

# ---------------------------------------------------------------------------------------------
# Brute force: minimise 1/2 dw^T H dw subject to (w + dw)_S = 0, by the KKT system
# ---------------------------------------------------------------------------------------------


def kkt(w: np.ndarray, hessian: np.ndarray, removed: list[int]) -> tuple[np.ndarray, float]:
    """Solve [[H, E], [E^T, 0]] [dw; mu] = [0; -w_S] directly; return dw and the minimum."""
    n, k = w.size, len(removed)
    e = np.zeros((n, k))
    e[removed, np.arange(k)] = 1.0
    system = np.block([[hessian, e], [e.T, np.zeros((k, k))]])
    rhs = np.concatenate([np.zeros(n), -w[removed]])
    dw = np.linalg.solve(system, rhs)[:n]
    return dw, 0.5 * float(dw @ hessian @ dw)


def random_spd(n: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(n, n))
    return a @ a.T + 0.1 * np.eye(n)


def test_single_removal_is_the_constrained_minimiser() -> None:
    rng = np.random.default_rng(0)
    hessian, w = random_spd(6, 1), rng.normal(size=6)
    brute = [kkt(w, hessian, [q]) for q in range(6)]
    h_inv = np.linalg.inv(hessian)
    np.testing.assert_allclose(obs_saliencies(w, h_inv), [b[1] for b in brute], rtol=1e-10)
    step = obs_step(w, h_inv)
    assert step.q == int(np.argmin([b[1] for b in brute]))
    np.testing.assert_allclose(step.saliency, brute[step.q][1], rtol=1e-10)
    np.testing.assert_allclose(step.delta_w, brute[step.q][0], atol=1e-12)
    assert (w + step.delta_w)[step.q] == 0.0


def test_repeated_steps_downdate_the_inverse_and_are_greedy_brute_force() -> None:
    rng = np.random.default_rng(2)
    hessian, w0 = random_spd(6, 3), rng.normal(size=6)
    w, h_inv, removable, removed, total = (
        w0.copy(),
        np.linalg.inv(hessian),
        np.ones(6, bool),
        [],
        0.0,
    )
    for _ in range(4):
        step = obs_step(w, h_inv, removable)
        # brute force: the chosen weight gives the smallest joint constrained minimum
        joint = {q: kkt(w0, hessian, [*removed, q])[1] for q in np.flatnonzero(removable)}
        assert step.q == min(joint, key=joint.get)
        np.testing.assert_allclose(total + step.saliency, joint[step.q], rtol=1e-9)
        w, h_inv, total = w + step.delta_w, step.h_inv, total + step.saliency
        removable[step.q] = False
        removed.append(step.q)
        kept = np.flatnonzero(removable)
        np.testing.assert_allclose(
            h_inv[np.ix_(kept, kept)], np.linalg.inv(hessian[np.ix_(kept, kept)]), atol=1e-10
        )
        np.testing.assert_allclose(h_inv[removed], 0.0, atol=1e-12)
        np.testing.assert_allclose(w, w0 + kkt(w0, hessian, removed)[0], atol=1e-10)
        assert np.all(w[removed] == 0.0)
    np.testing.assert_allclose(downdate_inverse(np.linalg.inv(hessian), 2)[2], 0.0, atol=1e-12)


def test_obs_prune_exact_equals_repeated_steps() -> None:
    rng = np.random.default_rng(4)
    hessian, w0 = random_spd(30, 5), rng.normal(size=30)
    removable = rng.random(30) > 0.2
    path = obs_prune_exact(w0, hessian, 20, removable=removable)
    w, h_inv, allowed = w0.copy(), np.linalg.inv(hessian), removable.copy()
    for k in range(20):
        step = obs_step(w, h_inv, allowed)
        assert step.q == path.order[k]
        np.testing.assert_allclose(step.saliency, path.increase[k], rtol=1e-8)
        w, h_inv = w + step.delta_w, step.h_inv
        allowed[step.q] = False
    np.testing.assert_allclose(path.weights, w, atol=1e-9)
    assert np.all(path.weights[path.order] == 0.0) and removable[path.order].all()
    # damping adds damping * mean(diag H) to the diagonal
    np.testing.assert_array_equal(
        obs_prune_exact(w0, hessian, 5, damping=0.3).weights,
        obs_prune_exact(w0, damped(hessian, 0.3), 5).weights,
    )
    assert obs_prune_exact(w0, hessian, 0).order.size == 0


def test_obd_is_the_diagonal_special_case() -> None:
    rng = np.random.default_rng(6)
    h, w = rng.random(8) + 0.1, rng.normal(size=8)
    step = obs_step(w, np.diag(1 / h))
    np.testing.assert_allclose(obs_saliencies(w, np.diag(1 / h)), 0.5 * h * w**2, rtol=1e-14)
    assert step.q == int(np.argmin(0.5 * h * w**2))
    expected = np.zeros(8)
    expected[step.q] = -w[step.q]
    np.testing.assert_array_equal(step.delta_w, expected)


def test_exact_obs_validation() -> None:
    w, hessian = np.ones(3), random_spd(3, 0)
    with pytest.raises(ValueError, match="not positive definite"):
        obs_prune_exact(w, -hessian, 1)
    with pytest.raises(ValueError, match="damping must be finite and >= 0"):
        obs_prune_exact(w, hessian, 1, damping=-1.0)
    with pytest.raises(ValueError, match="n_remove must be in"):
        obs_prune_exact(w, hessian, 4)
    with pytest.raises(ValueError, match="hessian has shape"):
        obs_prune_exact(w, np.eye(4), 1)


# ---------------------------------------------------------------------------------------------
# Exact OBS of a tiny network
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_tiny() -> tuple:
    """The 7-6-5-4 network of conftest trained (full batch, to a training loss of 0.006) on a
    learnable synthetic task, so that the gradient is small and the quadratic model meaningful."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 7))
    y = np.argmax(x[:, :4] + 0.5 * x[:, 4:5], axis=1)
    model = make_mlp(seed=0)
    model.compile(
        optimizer=keras.optimizers.Adam(0.02),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    # 300 full-batch Adam steps, in 10 epochs of 30 repeated copies (less per-epoch overhead)
    model.fit(np.tile(x, (30, 1)), np.tile(y, 30), epochs=10, batch_size=300, verbose=0)
    return model, x, y


def test_gauss_newton_diagonal_is_the_exact_diagonal(trained_tiny) -> None:
    model, x, y = trained_tiny
    gn = gauss_newton(model, x)
    exact = second_derivatives(model, x, y, method="exact")
    np.testing.assert_allclose(
        np.diag(gn), np.concatenate([v.ravel() for v in exact.values()]), rtol=1e-9, atol=1e-14
    )
    np.testing.assert_allclose(gn, gn.T, atol=1e-14)
    assert np.linalg.eigvalsh(gn).min() > -1e-10


def test_unit_curvature_is_the_bias_second_derivative(trained_tiny) -> None:
    model, x, y = trained_tiny
    g = unit_curvature(model, x)
    layers = [layer for layer in model.layers if hasattr(layer, "bias")]
    for layer in layers:
        bias = layer.bias.value
        with tf.GradientTape(persistent=True) as outer:
            with tf.GradientTape() as inner:
                loss = tf.reduce_mean(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(y, model(x, training=False))
                )
            grad = inner.gradient(loss, bias)
        diag = tf.linalg.diag_part(outer.jacobian(grad, bias)).numpy()
        np.testing.assert_allclose(g[layer.kernel.path], diag, rtol=1e-8, atol=1e-14)


def test_obs_prune_model_against_brute_force_and_obd(trained_tiny) -> None:
    model, x, y = trained_tiny
    original = snapshot(model)
    w0 = np.concatenate([k.ravel() for k in original.kernels.values()])
    n = w0.size  # 42 + 30 + 20 = 92 kernel weights
    hessian = damped(gauss_newton(model, x), DEFAULT_EXACT_DAMPING)
    try:
        result = obs_prune_model(model, x, y, 0.3)
        removed = removal_count(0.3, n)
        assert sum(counts_from_masks(result.masks).values()) == removed == result.order.size
        new = np.concatenate([k.numpy().ravel() for k in prunable_kernels(model).values()])
        assert np.all(new[result.order] == 0.0)
        assert all(
            np.all(k.numpy()[~result.masks[p]] == 0) for p, k in prunable_kernels(model).items()
        )
        # the surviving weights moved, to the brute-force constrained minimiser
        np.testing.assert_allclose(new, w0 + kkt(w0, hessian, list(result.order))[0], atol=1e-9)
        np.testing.assert_allclose(
            result.increase.sum(), kkt(w0, hessian, list(result.order))[1], rtol=1e-7
        )
        obs_loss = mean_loss(model, x, y)
        original.restore()
        # OBD (exact diagonal) removing as many weights, without any update
        scores = obd(model, second_derivatives(model, x, y, method="exact"))
        masks = masks_from_scores(scores, 0.3)
        for path, kernel in prunable_kernels(model).items():
            kernel.assign(np.where(masks[path], original.kernels[path], 0.0))
        obd_loss = mean_loss(model, x, y)
        # holds on this seed: 30% of the weights removed, OBS's update keeps the loss lower
        assert obs_loss < obd_loss
        original.restore()
        exact = obs_prune_model(model, x, y, 0.1, hessian="exact", damping=0.1)
        assert exact.order.size == removal_count(0.1, n)
    finally:
        original.restore()
    with pytest.raises(ValueError, match="hessian must be"):
        obs_prune_model(model, x, y, 0.1, hessian="diagonal")


# ---------------------------------------------------------------------------------------------
# Layer-wise OBS
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def layer_data() -> tuple:
    rng = np.random.default_rng(3)
    x = np.maximum(rng.normal(size=(200, 9)), 0.0)
    x[:, 4] = 0.0  # an input that is always zero: singular X^T X, fixed by the damping
    return x, rng.normal(size=(9, 5))


def test_column_paths_and_optimal_weights_are_sequential_obs(layer_data) -> None:
    x, kernel = layer_data
    hessian = layer_hessian(x, 0.01)
    paths = column_paths(kernel, hessian)
    assert sorted(paths.order[2]) == list(range(9))
    keep = np.ones_like(kernel, bool)
    keep[paths.order[2, :4], 2] = False
    new = optimal_weights(kernel, hessian, keep)
    path = obs_prune_exact(kernel[:, 2], hessian, 4)
    np.testing.assert_array_equal(path.order, paths.order[2, :4])
    np.testing.assert_allclose(new[:, 2], path.weights, atol=1e-10)
    np.testing.assert_array_equal(new[:, [0, 1, 3, 4]], kernel[:, [0, 1, 3, 4]])
    # the step costs add up to the increase of the damped reconstruction error
    delta = new[:, 2] - kernel[:, 2]
    np.testing.assert_allclose(paths.cost[2, :4].sum(), 0.5 * delta @ hessian @ delta, rtol=1e-9)
    # OBS beats zeroing the same weights, and zeroing the weights of smallest magnitude
    zeroed = np.where(keep, kernel, 0.0)
    assert reconstruction_error(x, kernel, new)[2] <= reconstruction_error(x, kernel, zeroed)[2]
    order = np.argsort(np.abs(kernel[:, 2]))
    magnitude = kernel[:, 2].copy()
    magnitude[order[:4]] = 0.0
    assert (
        reconstruction_error(x, kernel[:, [2]], new[:, [2]])[0]
        < reconstruction_error(x, kernel[:, [2]], magnitude[:, None])[0]
    )


@pytest.mark.parametrize("allocation", ["loss", "relative", "uniform"])
def test_layerwise_obs_counts_zeros_and_error(trained_tiny, allocation) -> None:
    model, x, _ = trained_tiny
    original = snapshot(model)
    try:
        plan = LayerwiseOBS(model, x, allocation=allocation, inputs="dense")
        masks = plan.prune(0.6)
        counts = counts_from_masks(masks)
        if allocation == "uniform":
            assert counts == {p: removal_count(0.6, k.size) for p, k in original.kernels.items()}
        else:
            assert sum(counts.values()) == removal_count(0.6, 92)
        inputs = [x]
        for path, kernel in prunable_kernels(model).items():
            new = kernel.numpy()
            assert np.all(new[~masks[path]] == 0.0) and masks[path].dtype == bool
            dense = original.kernels[path]
            layer_x = inputs[-1]
            error = reconstruction_error(layer_x, dense, new)
            # never worse than zeroing the same weights (exact for dense inputs, per column)
            assert np.all(
                error
                <= reconstruction_error(layer_x, dense, np.where(masks[path], dense, 0)) + 1e-12
            )
            layer = next(la for la in model.layers if getattr(la, "kernel", None) is kernel)
            inputs.append(np.maximum(layer_x @ dense + layer.bias.numpy(), 0.0))
        # fraction 0 leaves the model as it was; the same fraction twice gives the same kernels
        assert all(m.all() for m in plan.prune(0.0).values())
        for path, kernel in prunable_kernels(model).items():
            np.testing.assert_array_equal(kernel.numpy(), original.kernels[path])
    finally:
        original.restore()


def test_layerwise_obs_sequential_and_explicit_allocation(trained_tiny) -> None:
    model, x, _ = trained_tiny
    original = snapshot(model)
    try:
        first = layerwise_obs(model, x, 0.5)
        kernels = {p: k.numpy().copy() for p, k in prunable_kernels(model).items()}
        original.restore()
        again = layerwise_obs(model, x, 0.5)
        for path, kernel in prunable_kernels(model).items():
            np.testing.assert_array_equal(first[path], again[path])
            np.testing.assert_array_equal(kernels[path], kernel.numpy())
        wanted = {p: 5 * i for i, p in enumerate(original.kernels)}
        masks = layerwise_obs(model, x, 0.0, allocation=wanted)
        assert counts_from_masks(masks) == wanted
        plan = LayerwiseOBS(model, x)
        assert counts_from_masks(plan.prune(0.9, counts=wanted)) == wanted
    finally:
        original.restore()


def test_layerwise_obs_validation(trained_tiny) -> None:
    model, x, _ = trained_tiny
    for fraction in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="fraction"):
            layerwise_obs(model, x, fraction)
    for damping in (-1.0, float("inf"), True, "1"):
        with pytest.raises(ValueError, match="damping"):
            LayerwiseOBS(model, x, damping=damping)
    with pytest.raises(ValueError, match="allocation must be one of"):
        LayerwiseOBS(model, x, allocation="layer")
    with pytest.raises(ValueError, match="allocation must give a count"):
        LayerwiseOBS(model, x, allocation={"a": 1})
    paths = list(prunable_kernels(model))
    with pytest.raises(ValueError, match=r"allocation\[.*must be an int"):
        LayerwiseOBS(model, x, allocation={p: 10_000 for p in paths})
    with pytest.raises(ValueError, match="inputs must be"):
        LayerwiseOBS(model, x, inputs="both")
    with pytest.raises(ValueError, match="x must have shape"):
        LayerwiseOBS(model, x[:, :5])
    zero_inputs = np.zeros_like(x)
    with pytest.raises(ValueError, match="not positive definite"):
        LayerwiseOBS(model, zero_inputs, damping=0.0)
