"""Second derivatives: every method against brute force, where theory says it should agree."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_mlp
from helpers.curvature import (
    autodiff_entries,
    gradients,
    mean_loss,
    second_derivatives,
    tracing_counts,
)
from helpers.losses import output_boundary
from helpers.network import UnsupportedModelError, as_chain
from helpers.runtime import keras, set_determinism, tf


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute difference relative to the largest magnitude of the reference."""
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def per_layer_errors(d: dict, ref: dict) -> list[float]:
    return [rel_error(d[path], ref[path]) for path in ref]


# ---------------------------------------------------------------------------------------------
# autodiff against a Hessian computed by hand
# ---------------------------------------------------------------------------------------------


def test_autodiff_matches_hand_computed_hessian() -> None:
    """x -> tanh(w1 x) -> w2 z, loss (o - t)^2, one sample: the Hessian diagonal by hand."""
    x, t, w1, w2 = 1.5, 0.3, 0.7, -1.2
    model = keras.Sequential(
        [
            keras.Input((1,), dtype="float64"),
            keras.layers.Dense(1, activation="tanh", use_bias=False, dtype="float64"),
            keras.layers.Dense(1, use_bias=False, dtype="float64"),
        ]
    )
    model.layers[0].kernel.assign([[w1]])
    model.layers[1].kernel.assign([[w2]])

    z = np.tanh(w1 * x)
    o = w2 * z
    d2_w2 = 2 * z**2
    d2_w1 = 2 * w2**2 * (1 - z**2) ** 2 * x**2 + 2 * (o - t) * w2 * x**2 * (-2 * z * (1 - z**2))

    h = second_derivatives(model, np.array([[x]]), np.array([[t]]), method="autodiff", loss="mse")
    k1, k2 = (layer.kernel.path for layer in model.layers)
    np.testing.assert_allclose(h[k1], [[d2_w1]], rtol=1e-12)
    np.testing.assert_allclose(h[k2], [[d2_w2]], rtol=1e-12)

    # and a central finite difference of the loss itself agrees with the hand formula
    def loss(a: float, b: float) -> float:
        return (b * np.tanh(a * x) - t) ** 2

    eps = 1e-4
    fd = (loss(w1 + eps, w2) - 2 * loss(w1, w2) + loss(w1 - eps, w2)) / eps**2
    assert fd == pytest.approx(d2_w1, rel=1e-6)


def test_autodiff_matches_closed_form_for_softmax_regression() -> None:
    """No hidden layer: d2L/dW_ij^2 = mean_n x_ni^2 p_nj (1 - p_nj) exactly."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(20, 3)), rng.integers(0, 4, size=20)
    model = make_mlp(n_in=3, hidden=(), n_out=4)
    w, b = (v.numpy() for v in model.layers[0].weights)
    logits = x @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = (x**2).T @ (p * (1 - p)) / len(x)
    for method in ("autodiff", "exact", "lecun", "lecun-full"):
        h = second_derivatives(model, x, y, method=method)
        np.testing.assert_allclose(h[model.layers[0].kernel.path], expected, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# exact vs autodiff
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("hidden", [(6,), (6, 5), (8, 6, 5, 4)])
def test_exact_equals_autodiff_relu_softmax(
    hidden: tuple[int, ...], dtype: str, classification_data
) -> None:
    x, y = classification_data
    model = make_mlp(hidden=hidden, dtype=dtype)
    ref = second_derivatives(model, x, y, method="autodiff", batch_size=16)
    exact = second_derivatives(model, x, y, method="exact", batch_size=16)
    assert max(per_layer_errors(exact, ref)) < (1e-12 if dtype == "float64" else 1e-4)


@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
def test_exact_equals_autodiff_smooth_activations(activation: str, classification_data) -> None:
    x, y = classification_data
    model = make_mlp(hidden=(6, 5), activation=activation)
    ref = second_derivatives(model, x, y, method="autodiff")
    exact = second_derivatives(model, x, y, method="exact")
    assert max(per_layer_errors(exact, ref)) < 1e-12


def test_exact_equals_autodiff_mse() -> None:
    rng = np.random.default_rng(4)
    x, t = rng.normal(size=(25, 7)), rng.normal(size=(25, 3))
    for activation in ("relu", "tanh"):
        model = make_mlp(hidden=(6, 5), n_out=3, activation=activation, loss="mse")
        ref = second_derivatives(model, x, t, method="autodiff")
        exact = second_derivatives(model, x, t, method="exact")
        assert max(per_layer_errors(exact, ref)) < 1e-12


# ---------------------------------------------------------------------------------------------
# LeCun's recursion: exact where theory says so, an approximation elsewhere
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
def test_lecun_exact_at_output_layer(activation: str, classification_data) -> None:
    x, y = classification_data
    model = make_mlp(hidden=(6, 5), activation=activation)
    ref = second_derivatives(model, x, y, method="autodiff")
    out = model.layers[-1].kernel.path
    for method in ("lecun", "lecun-full"):
        assert rel_error(second_derivatives(model, x, y, method=method)[out], ref[out]) < 1e-12


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
def test_one_hidden_layer_single_output_mse(activation: str) -> None:
    """One output unit: no cross terms between output units, so the diagonal recursion is exact;
    dropping f'' (Gauss-Newton) is exact only when f'' = 0 (ReLU)."""
    rng = np.random.default_rng(5)
    x, t = rng.normal(size=(30, 7)), rng.normal(size=(30, 1))
    model = make_mlp(hidden=(5,), n_out=1, activation=activation, loss="mse")
    ref = second_derivatives(model, x, t, method="autodiff")
    full = second_derivatives(model, x, t, method="lecun-full")
    gauss_newton = second_derivatives(model, x, t, method="lecun")
    assert max(per_layer_errors(full, ref)) < 1e-12
    hidden = model.layers[0].kernel.path
    if activation == "relu":
        assert rel_error(gauss_newton[hidden], ref[hidden]) < 1e-12
    else:
        assert rel_error(gauss_newton[hidden], ref[hidden]) > 1e-2


def test_lecun_differs_from_exact_on_deeper_network() -> None:
    """The diagonal approximation, not a bug: on a 20-16-16-16-10 ReLU network with random data
    the hidden layers' LeCun values are off by up to about half of the largest exact value
    (measured max-relative errors 0.48, 0.47, 0.39 for the first three kernels; the output layer
    is exact), while their ranking, which is what pruning uses, stays correlated (Spearman rank
    correlation 0.73, 0.89, 0.99), the agreement improving towards the output."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(200, 20)), rng.integers(0, 10, size=200)
    model = make_mlp(n_in=20, hidden=(16, 16, 16), n_out=10)
    exact = second_derivatives(model, x, y, method="exact")
    lecun = second_derivatives(model, x, y, method="lecun")
    assert lecun.keys() == exact.keys()
    errors = per_layer_errors(lecun, exact)
    rho = [spearmanr(lecun[p].ravel(), exact[p].ravel()).statistic for p in exact]
    np.testing.assert_allclose(errors[:3], [0.48, 0.47, 0.39], atol=0.01)
    assert errors[3] < 1e-12
    np.testing.assert_allclose(rho[:3], [0.73, 0.89, 0.99], atol=0.01)
    # Gauss-Newton keeps every h_kk >= 0
    assert all((v >= 0).all() for v in lecun.values())


def test_relu_lecun_full_equals_lecun(classification_data) -> None:
    x, y = classification_data
    model = make_mlp(hidden=(6, 5))
    a = second_derivatives(model, x, y, method="lecun")
    b = second_derivatives(model, x, y, method="lecun-full")
    for path in a:
        np.testing.assert_array_equal(a[path], b[path])


# ---------------------------------------------------------------------------------------------
# Data handling: batches, datasets, dropout, functional models, compiled once
# ---------------------------------------------------------------------------------------------


def test_batch_size_and_dataset_do_not_change_the_result(classification_data) -> None:
    x, y = classification_data
    model = make_mlp(hidden=(6, 5))
    whole = second_derivatives(model, x, y, method="exact", batch_size=1000)
    ragged = second_derivatives(model, x, y, method="exact", batch_size=5)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    from_dataset = second_derivatives(model, dataset, method="exact")
    for path in whole:
        np.testing.assert_allclose(ragged[path], whole[path], rtol=1e-12)
        np.testing.assert_allclose(from_dataset[path], whole[path], rtol=1e-12)


def test_traced_once_per_model_and_method(classification_data) -> None:
    x, y = classification_data
    model = make_mlp(hidden=(6, 5), dtype="float32")
    for n, batch in ((37, 10), (20, 7), (37, 37)):
        for method in ("lecun", "exact"):
            second_derivatives(model, x[:n], y[:n], method=method, batch_size=batch)
        gradients(model, x[:n], y[:n], batch_size=batch)
    counts = tracing_counts(model)
    assert set(counts) == {
        "lecun/softmax_cross_entropy",
        "exact/softmax_cross_entropy",
        "gradient/softmax_cross_entropy",
    }
    assert all(count == 1 for count in counts.values()), counts


def test_dropout_is_identity_at_inference(classification_data) -> None:
    x, y = classification_data
    plain = make_mlp(hidden=(6, 5))
    with_dropout = make_mlp(hidden=(6, 5), dropout=0.2)
    with_dropout.set_weights(plain.get_weights())
    a = second_derivatives(plain, x, y, method="exact")
    b = second_derivatives(with_dropout, x, y, method="exact")
    assert [v.shape for v in a.values()] == [v.shape for v in b.values()]
    for va, vb in zip(a.values(), b.values(), strict=True):
        np.testing.assert_array_equal(va, vb)


def test_functional_model_and_flatten() -> None:
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(12, 3, 4)), rng.integers(0, 3, size=12)
    inputs = keras.Input((3, 4), dtype="float64")
    h = keras.layers.Flatten(dtype="float64")(inputs)
    h = keras.layers.Dense(5, activation="relu", dtype="float64", bias_initializer="random_normal")(
        h
    )
    outputs = keras.layers.Dense(3, activation="softmax", dtype="float64")(h)
    model = keras.Model(inputs, outputs)
    model.compile(loss="sparse_categorical_crossentropy")
    ref = second_derivatives(model, x, y, method="autodiff")
    for method in ("exact", "lecun"):
        d = second_derivatives(model, x, y, method=method)
        assert rel_error(d[model.layers[-1].kernel.path], ref[model.layers[-1].kernel.path]) < 1e-12
    assert max(per_layer_errors(second_derivatives(model, x, y, method="exact"), ref)) < 1e-12


def test_mean_loss_and_gradients_agree_with_keras(classification_data) -> None:
    x, y = classification_data
    model = make_mlp(hidden=(6, 5))
    keras_loss = float(model.compute_loss(x=x, y=y, y_pred=model(x)))  # Keras reports float32
    assert mean_loss(model, x, y) == pytest.approx(keras_loss, rel=1e-6)
    logits = model(x).numpy()
    shifted = logits - logits.max(axis=1, keepdims=True)
    by_hand = np.mean(np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(len(y)), y])
    assert mean_loss(model, x, y) == pytest.approx(by_hand, rel=1e-12)
    g = gradients(model, x, y)
    kernels = [layer.kernel for layer in model.layers]
    with tf.GradientTape() as tape:
        # the functional form: the Loss class would cast to float32
        value = tf.reduce_mean(
            keras.losses.sparse_categorical_crossentropy(y, model(x), from_logits=True)
        )
    for kernel, grad in zip(kernels, tape.gradient(value, kernels), strict=True):
        np.testing.assert_allclose(g[kernel.path], grad.numpy(), rtol=1e-10, atol=1e-14)


def test_autodiff_entries_subset_matches_full(classification_data) -> None:
    x, y = classification_data
    model = make_mlp(hidden=(6, 5))
    path = model.layers[0].kernel.path
    full = second_derivatives(model, x, y, method="exact")[path].ravel()
    idx = np.array([0, 5, 17, 41])
    sub = autodiff_entries(model, x, y, path=path, indices=idx, chunk_size=3)
    np.testing.assert_allclose(sub, full[idx], rtol=1e-12)


def test_determinism_same_seed_same_second_derivatives() -> None:
    results = []
    for _ in range(2):
        set_determinism(11)
        x = np.random.default_rng(11).normal(size=(300, 20)).astype("float32")
        y = np.random.default_rng(12).integers(0, 10, size=300)
        model = make_mlp(n_in=20, hidden=(16, 16), n_out=10, dtype="float32", seed=11)
        results.append(
            {
                m: second_derivatives(model, x, y, method=m, batch_size=64)
                for m in ("lecun", "exact")
            }
        )
    for method in ("lecun", "exact"):
        for a, b in zip(results[0][method].values(), results[1][method].values(), strict=True):
            np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Bad inputs: each raises a clear error naming the problem
# ---------------------------------------------------------------------------------------------


def test_unsupported_layers_are_named() -> None:
    conv = keras.Sequential(  # Conv2D is supported (tests/test_conv_curvature.py); Conv1D not
        [
            keras.Input((8, 1)),
            keras.layers.Conv1D(2, 3, name="my_conv"),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )
    with pytest.raises(
        UnsupportedModelError, match=r"'my_conv' of type Conv1D.*supported layers: Dense"
    ):
        second_derivatives(
            conv,
            np.zeros((2, 8, 1)),
            np.zeros(2, int),
            method="lecun",
            loss="softmax_cross_entropy",
        )
    bn = keras.Sequential(
        [keras.Input((4,)), keras.layers.BatchNormalization(name="bn"), keras.layers.Dense(3)]
    )
    with pytest.raises(UnsupportedModelError, match="'bn' of type BatchNormalization"):
        second_derivatives(
            bn, np.zeros((2, 4)), np.zeros(2, int), method="exact", loss="softmax_cross_entropy"
        )
    elu = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3, activation="elu", name="d"),
            keras.layers.Dense(2),
        ]
    )
    with pytest.raises(UnsupportedModelError, match="'d' has activation 'elu'"):
        second_derivatives(
            elu, np.zeros((2, 4)), np.zeros(2, int), method="exact", loss="softmax_cross_entropy"
        )
    no_flatten = keras.Sequential([keras.Input((3, 4)), keras.layers.Dense(2, name="d3")])
    with pytest.raises(UnsupportedModelError, match="'d3' receives a rank-3 input; add a Flatten"):
        second_derivatives(
            no_flatten,
            np.zeros((2, 3, 4)),
            np.zeros(2, int),
            method="exact",
            loss="softmax_cross_entropy",
        )


def test_branching_functional_model_is_rejected() -> None:
    inputs = keras.Input((4,))
    a = keras.layers.Dense(3, name="left")(inputs)
    b = keras.layers.Dense(3, name="right")(inputs)
    outputs = keras.layers.Dense(2)(keras.layers.Add(name="join")([a, b]))
    model = keras.Model(inputs, outputs)
    with pytest.raises(UnsupportedModelError, match="'join' takes 2 inputs"):
        second_derivatives(
            model, np.zeros((2, 4)), np.zeros(2, int), method="exact", loss="softmax_cross_entropy"
        )


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.zeros((37, 4), int), r"labels y have shape \(37, 4\).*one-hot"),
        (np.zeros(36, int), r"labels y have shape \(36,\)"),
        (np.full(37, 4), r"labels must be in \[0, 3\]"),
        (np.full(37, -1), r"labels must be in \[0, 3\]"),
        (np.zeros(37), "labels y must be integers"),
    ],
)
def test_bad_labels(labels: np.ndarray, message: str, classification_data) -> None:
    x, _ = classification_data
    with pytest.raises(ValueError, match=message):
        second_derivatives(make_mlp(), x, labels, method="lecun")


def test_bad_inputs(classification_data) -> None:
    x, y = classification_data
    model = make_mlp()
    with pytest.raises(ValueError, match=r"x has shape \(37, 8\); model 'tiny' expects \(N, 7\)"):
        second_derivatives(model, np.zeros((37, 8)), y, method="exact")
    with pytest.raises(ValueError, match="x is empty"):
        second_derivatives(model, np.zeros((0, 7)), np.zeros(0, int), method="exact")
    with pytest.raises(ValueError, match="NaN or infinite"):
        second_derivatives(model, np.full((37, 7), np.nan), y, method="exact")
    with pytest.raises(ValueError, match="method must be one of"):
        second_derivatives(model, x, y, method="hessian")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        second_derivatives(model, x, y, method="exact", batch_size=0)
    with pytest.raises(ValueError, match="y is required"):
        second_derivatives(model, x, method="exact")


def test_empty_and_unbatched_datasets(classification_data) -> None:
    x, y = classification_data
    model = make_mlp()
    empty = tf.data.Dataset.from_tensor_slices((x[:0], y[:0])).batch(4)
    with pytest.raises(ValueError, match="the data is empty"):
        second_derivatives(model, empty, method="exact")
    unbatched = tf.data.Dataset.from_tensor_slices((x, y))
    with pytest.raises(ValueError, match="is the dataset batched"):
        second_derivatives(model, unbatched, method="exact")
    out_of_range = tf.data.Dataset.from_tensor_slices((x, np.full(37, 9))).batch(8)
    with pytest.raises(tf.errors.InvalidArgumentError, match="labels must be < 4"):
        second_derivatives(model, out_of_range, method="exact")


def test_non_finite_weights_are_named(classification_data) -> None:
    x, y = classification_data
    model = make_mlp()
    kernel = model.layers[1].kernel
    values = kernel.numpy()
    values[0, 0] = np.inf
    kernel.assign(values)
    with pytest.raises(ValueError, match=rf"weight '{kernel.path}' has 1 non-finite"):
        second_derivatives(model, x, y, method="lecun")


def test_loss_is_read_from_the_model_or_required() -> None:
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="not compiled with a loss"):
        second_derivatives(model, np.zeros((2, 4)), np.zeros(2, int), method="exact")
    model.compile(loss="categorical_hinge")
    with pytest.raises(ValueError, match="compiled with loss 'categorical_hinge'"):
        second_derivatives(model, np.zeros((2, 4)), np.zeros(2, int), method="exact")
    model.compile(loss="sparse_categorical_crossentropy")  # from_logits=False, but no softmax layer
    with pytest.raises(ValueError, match="from_logits=False does not match"):
        second_derivatives(model, np.zeros((2, 4)), np.zeros(2, int), method="exact")


def test_hessian_block_matches_diagonal_and_is_symmetric(classification_data) -> None:
    from helpers.curvature import hessian_block

    x, y = classification_data
    model = make_mlp(hidden=(6, 5))
    paths = [layer.kernel.path for layer in model.layers[1:]]
    block = hessian_block(model, x, y, paths=paths, batch_size=16, chunk_size=7)
    assert block.shape == (30 + 20, 30 + 20)
    np.testing.assert_allclose(block, block.T, atol=1e-14)
    exact = second_derivatives(model, x, y, method="exact")
    np.testing.assert_allclose(
        np.diag(block), np.concatenate([exact[p].ravel() for p in paths]), rtol=1e-12
    )
    # ReLU: the cross-layer block is not the Gauss-Newton one, so it has non-zero entries
    assert np.abs(block[:30, 30:]).max() > 1e-3
    # a single entry by hand: central difference of the gradient
    path = paths[0]
    kernel = model.layers[1].kernel
    w = kernel.numpy()
    eps = 1e-6
    grads = []
    for sign in (1, -1):
        shifted = w.copy()
        shifted[0, 0] += sign * eps
        kernel.assign(shifted)
        grads.append(gradients(model, x, y)[paths[1]].ravel()[3])
    kernel.assign(w)
    assert block[0, 30 + 3] == pytest.approx((grads[0] - grads[1]) / (2 * eps), rel=1e-6)
    with pytest.raises(ValueError, match="paths must be distinct prunable kernels"):
        hessian_block(model, x, y, paths=[path, path])


def test_softmax_curvature_boundary_keeps_its_digits_for_confident_outputs() -> None:
    """p_i (1 - p_i) in float32 for a confident network: 1 - p_i must not be computed by
    cancellation (at p_i = 1 - 1e-6 that would leave about one correct digit)."""
    logits = np.array([[14.0, 0.0, -1.0, 2.0], [0.5, 0.1, -0.3, 0.2], [-3.0, 9.0, 0.0, 1.0]])
    p64 = np.exp(logits - logits.max(axis=1, keepdims=True))
    p64 /= p64.sum(axis=1, keepdims=True)
    expected = p64 * (1 - p64)  # float64 reference
    _, _, s_diag, _ = output_boundary(
        tf.constant(logits, tf.float32), tf.constant([0, 1, 1]), "softmax_cross_entropy", 4
    )
    np.testing.assert_allclose(s_diag.numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize(
    ("activation", "loss", "hidden", "dropout"),
    [
        ("relu", "softmax_cross_entropy", (6, 5), 0.0),
        ("relu", "softmax_cross_entropy", (6, 5, 3), 0.3),
        ("tanh", "mse", (6, 5), 0.0),
        ("sigmoid", "softmax_cross_entropy", (5,), 0.0),
    ],
)
def test_hessian_block_closed_form_for_the_last_two_layers_equals_autodiff(
    activation: str, loss: str, hidden: tuple, dropout: float, classification_data
) -> None:
    """The closed-form block of the last two kernels (with the bilinear V-W term and, for
    tanh/sigmoid, the f'' term) is the double-differentiation Hessian, entry for entry."""
    from helpers.curvature import hessian_block

    x, labels = classification_data
    y = labels if loss == "softmax_cross_entropy" else np.eye(4)[labels] + 0.1 * x[:, :4]
    model = make_mlp(hidden=hidden, activation=activation, loss=loss, dropout=dropout)
    paths = [step.path for step in as_chain(model).steps[-2:]]
    closed = hessian_block(model, x, y, paths=paths, batch_size=10)
    brute = hessian_block(model, x, y, paths=paths, batch_size=10, method="autodiff")
    assert np.abs(closed).max() > 1e-3
    np.testing.assert_allclose(closed, brute, rtol=1e-10, atol=1e-13 * np.abs(brute).max())
    # another block (here the reversed order) goes through autodiff whatever the method
    reversed_ = hessian_block(model, x, y, paths=paths[::-1])
    n_last = as_chain(model).steps[-1].kernel.shape.num_elements()
    np.testing.assert_allclose(reversed_[:n_last, :n_last], brute[-n_last:, -n_last:], rtol=1e-10)
    with pytest.raises(ValueError, match="method must be 'auto' or 'autodiff'"):
        hessian_block(model, x, y, paths=paths, method="exact")
