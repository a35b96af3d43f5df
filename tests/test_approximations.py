"""Approximate Hessian diagonals: each estimator against a brute-force reference.

The stochastic estimators are checked with z-scores whose standard deviations are computed
exactly from the tiny network (labels enumerated for the Monte Carlo Fisher, the full Hessian for
Hutchinson), so a tolerance of a few standard deviations is a statement about the estimator, not
a number tuned until the test passed.

Each check runs on a tiny Dense chain and again on tiny Conv2D chains (8x8x1 inputs, pooling,
Flatten, Dense), where a kernel weight is shared by every output position: its per-sample
gradient is a sum over positions, squared after summing, which the references below get from
per-sample GradientTapes (squares of the whole per-sample gradient) or the full Hessian.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from conftest import make_mlp
from helpers.approximations import (
    Fidelity,
    empirical_fisher,
    fidelity,
    hutchinson,
    monte_carlo_fisher,
    rademacher_probes,
    tracing_counts,
)
from helpers.curvature import second_derivatives
from helpers.network import UnsupportedModelError, prunable_kernels
from helpers.runtime import keras, set_determinism, tf

Z_LIMIT = 5.0  # |estimate - expectation| <= 5 standard deviations: p ~ 6e-7 per weight if normal


@functools.cache
def tiny(activation: str = "relu", loss: str = "softmax_cross_entropy", dtype: str = "float64"):
    """A 6-5-4-3 network and a dozen samples; shared between tests (the estimators do not change
    the weights), so each compiled function is traced once for the whole file."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 6))
    y = rng.integers(0, 3, size=12) if loss == "softmax_cross_entropy" else rng.normal(size=(12, 3))
    model = make_mlp(n_in=6, hidden=(5, 4), n_out=3, activation=activation, loss=loss, dtype=dtype)
    return model, x.astype(dtype), y


CONV_NETS = ("valid-max", "two-convs", "keep-max", "pool-first")


@functools.cache
def tiny_conv(
    net: str,
    activation: str = "relu",
    loss: str = "softmax_cross_entropy",
    dtype: str = "float64",
):
    """A tiny Conv2D chain on 8x8x1 inputs ending in Flatten and Dense(3), and a dozen samples:

    - ``"valid-max"``: Conv2D(2, 3x3, valid), MaxPooling2D(2) (72 kernel weights);
    - ``"two-convs"``: Conv2D(2, 3x3, stride 2, same), AveragePooling2D(2, stride 1, same),
      Conv2D(3, 2x2, valid, ReLU) (123 weights);
    - ``"keep-max"``: Conv2D(2, 3x3, same), MaxPooling2D(2, stride 1, same) named "keep", whose
      output keeps its input's shape (TensorFlow's MaxPoolGradGrad bug, Hutchinson refuses it);
    - ``"pool-first"``: the same max pooling on the input, then Conv2D(2, 3x3, valid).

    ``activation`` is that of the first convolution; shared like :func:`tiny`."""
    set_determinism(0)

    def conv(filters: int, size: int, act: str = activation, **kwargs) -> keras.layers.Conv2D:
        return keras.layers.Conv2D(
            filters, size, activation=act, dtype=dtype, bias_initializer="random_normal", **kwargs
        )

    def keep() -> keras.layers.MaxPooling2D:
        return keras.layers.MaxPooling2D(2, strides=1, padding="same", dtype=dtype, name="keep")

    layers = {
        "valid-max": lambda: [conv(2, 3), keras.layers.MaxPooling2D(2, dtype=dtype)],
        "two-convs": lambda: [
            conv(2, 3, strides=2, padding="same"),
            keras.layers.AveragePooling2D(2, strides=1, padding="same", dtype=dtype),
            conv(3, 2, act="relu"),
        ],
        "keep-max": lambda: [conv(2, 3, padding="same"), keep()],
        "pool-first": lambda: [keep(), conv(2, 3)],
    }[net]()
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1), dtype=dtype),
            *layers,
            keras.layers.Flatten(dtype=dtype),
            keras.layers.Dense(3, dtype=dtype, bias_initializer="random_normal"),
        ],
        name="tiny_conv",
    )
    model.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        if loss == "softmax_cross_entropy"
        else keras.losses.MeanSquaredError()
    )
    rng = np.random.default_rng(3)
    x = rng.normal(size=(12, 8, 8, 1))
    y = rng.integers(0, 3, size=12) if loss == "softmax_cross_entropy" else rng.normal(size=(12, 3))
    return model, x.astype(dtype), y


def flat(d: dict) -> np.ndarray:
    return np.concatenate([np.asarray(v).ravel() for v in d.values()])


def full_hessian(model: keras.Model, x: np.ndarray, y: np.ndarray, loss: str) -> np.ndarray:
    """The Hessian of the mean loss w.r.t. all kernels (flattened, in layer order): a double
    GradientTape through the Keras model, independent of the library code."""
    kernels = list(prunable_kernels(model).values())

    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            out = model(x)
            if loss == "mse":
                value = tf.reduce_mean(keras.losses.mean_squared_error(y, out))
            else:
                value = tf.reduce_mean(
                    keras.losses.sparse_categorical_crossentropy(y, out, from_logits=True)
                )
        grad = tf.concat([tf.reshape(g, [-1]) for g in inner.gradient(value, kernels)], 0)
    blocks = outer.jacobian(grad, kernels)
    return np.concatenate([b.numpy().reshape(grad.shape[0], -1) for b in blocks], axis=1)


def per_sample_gradients(
    model: keras.Model, x: np.ndarray, y: np.ndarray, loss: str
) -> list[list[np.ndarray]]:
    """Every sample's loss gradient w.r.t. every kernel, one GradientTape per sample through the
    Keras model (a brute-force loop, for the tests only)."""
    kernels = list(prunable_kernels(model).values())
    out = []
    for n in range(len(x)):
        with tf.GradientTape() as tape:
            output = model(x[n : n + 1])
            if loss == "mse":
                value = keras.losses.mean_squared_error(y[n : n + 1], output)[0]
            else:
                value = keras.losses.sparse_categorical_crossentropy(
                    y[n : n + 1], output, from_logits=True
                )[0]
        out.append([g.numpy() for g in tape.gradient(value, kernels)])
    return out


def relative_error(estimate: np.ndarray, reference: np.ndarray) -> float:
    """||estimate - reference|| / ||reference||, as :func:`fidelity` reports it."""
    return float(np.linalg.norm(estimate - reference) / np.linalg.norm(reference))


def z_scores(estimate: np.ndarray, expected: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """|estimate - expected| / sigma, with zero-variance entries required to be exact."""
    deterministic = sigma == 0
    np.testing.assert_allclose(estimate[deterministic], expected[deterministic], atol=1e-12)
    return np.abs(estimate - expected)[~deterministic] / sigma[~deterministic]


# ---------------------------------------------------------------------------------------------
# Empirical Fisher: a matmul instead of a per-sample loop
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("activation", "loss"),
    [("relu", "softmax_cross_entropy"), ("tanh", "softmax_cross_entropy"), ("sigmoid", "mse")],
)
def test_empirical_fisher_equals_per_sample_gradient_loop(activation: str, loss: str) -> None:
    model, x, y = tiny(activation, loss)
    kernels = [layer.kernel for layer in model.layers]
    squares = [np.zeros(k.shape) for k in kernels]
    for grads in per_sample_gradients(model, x, y, loss):
        for total, g in zip(squares, grads, strict=True):
            total += g**2
    estimate = empirical_fisher(model, x, y, batch_size=5)  # ragged batches: 5, 5, 2
    assert list(estimate) == [k.path for k in kernels]
    for kernel, total in zip(kernels, squares, strict=True):
        np.testing.assert_allclose(estimate[kernel.path], total / len(x), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    ("net", "activation", "loss"),
    [
        ("valid-max", "relu", "softmax_cross_entropy"),
        ("two-convs", "tanh", "softmax_cross_entropy"),
        ("keep-max", "sigmoid", "mse"),
        ("pool-first", "relu", "softmax_cross_entropy"),
    ],
)
def test_empirical_fisher_on_conv_chains_equals_per_sample_gradient_loop(
    net: str, activation: str, loss: str
) -> None:
    """Conv2D kernels: the square of each sample's whole gradient (summed over the positions a
    weight is used at), averaged, through max/average pooling, strides and "same" padding."""
    model, x, y = tiny_conv(net, activation, loss)
    grads = per_sample_gradients(model, x, y, loss)
    estimate = empirical_fisher(model, x, y, batch_size=5)  # ragged batches: 5, 5, 2
    kernels = prunable_kernels(model)
    assert list(estimate) == list(kernels)
    for i, path in enumerate(kernels):
        expected = np.mean([g[i] ** 2 for g in grads], axis=0)
        assert estimate[path].shape == expected.shape
        np.testing.assert_allclose(estimate[path], expected, rtol=1e-11, atol=1e-15)


def test_empirical_fisher_is_not_the_hessian() -> None:
    """The empirical Fisher uses the true labels' residuals: on this net it is off by more than
    a third of the exact diagonal's norm (the reason chapter 11 compares it at all)."""
    model, x, y = tiny()
    exact = second_derivatives(model, x, y, method="exact")
    assert fidelity(empirical_fisher(model, x, y), exact).relative_error > 0.3


# ---------------------------------------------------------------------------------------------
# Monte Carlo Fisher: unbiased for the Gauss-Newton diagonal (= exact for ReLU)
# ---------------------------------------------------------------------------------------------


def check_monte_carlo_softmax(model, x: np.ndarray, y: np.ndarray, exact: np.ndarray) -> None:
    """With labels enumerated, the estimator's expectation is sum_k p_k EF(label k): it must
    equal ``exact`` to rounding; the same enumeration gives its variance, and 4000 draws must
    land within Z_LIMIT standard deviations of ``exact`` for every weight."""
    logits = model(x).numpy()
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    n, classes = p.shape
    # per-sample squared gradients for every possible label: f[i, k] over all weights
    f = np.stack(
        [
            np.stack(
                [flat(empirical_fisher(model, x[i : i + 1], np.array([k]))) for k in range(classes)]
            )
            for i in range(n)
        ]
    )
    mean_i = np.einsum("ik,ikw->iw", p, f)
    np.testing.assert_allclose(mean_i.mean(axis=0), exact, rtol=1e-10, atol=1e-14)
    samples = 4000
    var_i = np.einsum("ik,ikw->iw", p, f**2) - mean_i**2
    sigma = np.sqrt(np.clip(var_i, 0, None).sum(axis=0) / (n**2 * samples))
    estimate = flat(monte_carlo_fisher(model, x, y, samples=samples, seed=3, batch_size=5))
    assert z_scores(estimate, exact, sigma).max() < Z_LIMIT
    assert relative_error(estimate, exact) < 0.05


def check_monte_carlo_mse(model, x: np.ndarray, t: np.ndarray, per_sample: np.ndarray) -> None:
    """Gaussian targets: each draw's squared gradient is h_i * chi-square(1), variance 2 h_i^2,
    with h_i the per-sample exact diagonal (rows of ``per_sample``); 4000 draws must land within
    Z_LIMIT standard deviations of their mean for every weight."""
    exact = per_sample.mean(axis=0)
    samples = 4000
    n = len(per_sample)
    sigma = np.sqrt(2 * (per_sample**2).sum(axis=0) / (n**2 * samples))
    estimate = flat(monte_carlo_fisher(model, x, t, samples=samples, seed=4))
    assert z_scores(estimate, exact, sigma).max() < Z_LIMIT
    assert relative_error(estimate, exact) < 0.05


def test_monte_carlo_fisher_converges_to_exact_for_relu_softmax() -> None:
    """With labels enumerated, the expectation of the estimator is sum_k p_k EF(label k): it must
    equal the exact diagonal to rounding. The same enumeration gives the estimator's variance,
    so 4000 draws must land within Z_LIMIT standard deviations of it for every weight."""
    model, x, y = tiny()
    exact = flat(second_derivatives(model, x, y, method="exact"))
    check_monte_carlo_softmax(model, x, y, exact)


def test_monte_carlo_fisher_converges_to_exact_for_relu_mse() -> None:
    """Gaussian targets: each draw's squared gradient is h_i * chi-square(1), variance 2 h_i^2,
    with h_i the per-sample exact diagonal."""
    model, x, t = tiny(loss="mse")
    per_sample = np.stack(
        [
            flat(second_derivatives(model, x[i : i + 1], t[i : i + 1], method="exact"))
            for i in range(12)
        ]
    )
    check_monte_carlo_mse(model, x, t, per_sample)


def test_monte_carlo_fisher_is_seeded() -> None:
    model, x, y = tiny()
    a = monte_carlo_fisher(model, x, y, samples=3, seed=7)
    b = monte_carlo_fisher(model, x, y, samples=3, seed=7)
    c = monte_carlo_fisher(model, x, y, samples=3, seed=8)
    for path in a:
        np.testing.assert_array_equal(a[path], b[path])
    assert not np.array_equal(flat(a), flat(c))
    # the draws are keyed by batch: another batching is another (equally valid) sample
    assert not np.array_equal(
        flat(monte_carlo_fisher(model, x, y, samples=3, seed=7, batch_size=5)), flat(a)
    )


@pytest.mark.parametrize("net", ["valid-max", "two-convs"])
def test_monte_carlo_fisher_on_conv_chains_converges_to_exact_for_relu_softmax(net: str) -> None:
    """As for the Dense chain: the expectation over enumerated labels is the exact diagonal of
    the ReLU conv net (the full Hessian's, from the test's own double GradientTape; the library's
    "exact" agrees), and 4000 draws land within Z_LIMIT of it."""
    model, x, y = tiny_conv(net)
    exact = np.diag(full_hessian(model, x, y, "softmax_cross_entropy"))
    np.testing.assert_allclose(
        flat(second_derivatives(model, x, y, method="exact")), exact, rtol=1e-10, atol=1e-14
    )
    check_monte_carlo_softmax(model, x, y, exact)


def test_monte_carlo_fisher_on_a_conv_chain_converges_to_exact_for_relu_mse() -> None:
    """Gaussian targets on the ReLU conv net: each draw's squared gradient is h_i * chi-square(1)
    for any weight, shared or not (the per-sample gradient is linear in the noise)."""
    model, x, t = tiny_conv("two-convs", loss="mse")
    per_sample = np.stack(
        [
            flat(second_derivatives(model, x[i : i + 1], t[i : i + 1], method="exact"))
            for i in range(12)
        ]
    )
    exact = per_sample.mean(axis=0)
    np.testing.assert_allclose(
        exact, np.diag(full_hessian(model, x, t, "mse")), rtol=1e-10, atol=1e-14
    )
    check_monte_carlo_mse(model, x, t, per_sample)


def test_monte_carlo_fisher_on_a_conv_chain_equals_brute_force_with_its_labels() -> None:
    """Draw for draw: batch i samples its labels from the model's softmax with the stateless
    seed (seed, i) (module docstring); with those labels the estimate is the mean of the squared
    per-sample gradients from a GradientTape loop."""
    model, x, y = tiny_conv("valid-max")
    samples, seed, size = 3, 11, 5
    totals = [np.zeros(k.shape) for k in prunable_kernels(model).values()]
    for i, start in enumerate(range(0, len(x), size)):
        xb = x[start : start + size]
        labels = tf.random.stateless_categorical(
            model(xb), samples, seed=tf.constant([seed, i], tf.int64)
        ).numpy()  # (batch, samples)
        for s in range(samples):
            for grads in per_sample_gradients(model, xb, labels[:, s], "softmax_cross_entropy"):
                for total, g in zip(totals, grads, strict=True):
                    total += g**2
    estimate = monte_carlo_fisher(model, x, y, samples=samples, seed=seed, batch_size=size)
    for path, total in zip(prunable_kernels(model), totals, strict=True):
        np.testing.assert_allclose(
            estimate[path], total / (len(x) * samples), rtol=1e-11, atol=1e-15
        )


# ---------------------------------------------------------------------------------------------
# Hutchinson: v * (H v) from the full Hessian, and unbiased
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "mse"])
def test_hutchinson_probes_equal_v_times_hessian_times_v(loss: str) -> None:
    model, x, y = tiny("tanh", loss)
    h = full_hessian(model, x, y, loss)
    probes = rademacher_probes(model, 3, seed=5)
    vs = np.stack([np.concatenate([probes[p][j].ravel() for p in probes]) for j in range(3)])
    assert vs.shape == (3, 6 * 5 + 5 * 4 + 4 * 3) and set(np.unique(vs)) == {-1.0, 1.0}
    one = flat(hutchinson(model, x, y, probes=1, seed=5, batch_size=5))
    np.testing.assert_allclose(one, vs[0] * (h @ vs[0]), rtol=1e-10, atol=1e-14)
    three = flat(hutchinson(model, x, y, probes=3, seed=5))
    expected = np.mean([vj * (h @ vj) for vj in vs], axis=0)
    np.testing.assert_allclose(three, expected, rtol=1e-10, atol=1e-14)
    # the first probe does not depend on how many are drawn
    np.testing.assert_array_equal(flat(rademacher_probes(model, 1, seed=5)), vs[0])


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_hutchinson_is_unbiased(activation: str) -> None:
    """v_i (Hv)_i = H_ii + sum_{j != i} H_ij v_i v_j with pairwise uncorrelated signs, so one
    probe has variance sum_{j != i} H_ij^2, known exactly here."""
    model, x, y = tiny(activation)
    h = full_hessian(model, x, y, "softmax_cross_entropy")
    exact = flat(second_derivatives(model, x, y, method="exact"))
    np.testing.assert_allclose(np.diag(h), exact, rtol=1e-10, atol=1e-14)
    probes = 2000
    sigma = np.sqrt(((h**2).sum(axis=1) - np.diag(h) ** 2) / probes)
    estimate = flat(hutchinson(model, x, y, probes=probes, seed=6))
    assert z_scores(estimate, exact, sigma).max() < Z_LIMIT
    # and it is a noisy estimate: a handful of probes is far off
    assert relative_error(flat(hutchinson(model, x, y, probes=2, seed=6)), exact) > 0.2


@pytest.mark.parametrize(
    ("net", "activation", "loss"),
    [
        ("valid-max", "relu", "softmax_cross_entropy"),
        ("two-convs", "tanh", "mse"),
        ("pool-first", "relu", "softmax_cross_entropy"),  # kernels only after the "keep" pool
    ],
)
def test_hutchinson_on_conv_chains_probes_equal_v_times_hessian_times_v(
    net: str, activation: str, loss: str
) -> None:
    model, x, y = tiny_conv(net, activation, loss)
    h = full_hessian(model, x, y, loss)
    probes = rademacher_probes(model, 2, seed=5)
    assert {p: v.shape[1:] for p, v in probes.items()} == {
        p: tuple(k.shape) for p, k in prunable_kernels(model).items()
    }
    vs = np.stack([np.concatenate([probes[p][j].ravel() for p in probes]) for j in range(2)])
    two = flat(hutchinson(model, x, y, probes=2, seed=5, batch_size=5))
    expected = np.mean([vj * (h @ vj) for vj in vs], axis=0)
    np.testing.assert_allclose(two, expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(("net", "activation"), [("valid-max", "relu"), ("two-convs", "tanh")])
def test_hutchinson_on_conv_chains_is_unbiased(net: str, activation: str) -> None:
    """Against the exact diagonal of the conv chain (cross terms between the positions sharing a
    weight included), with the variance known from the full Hessian as for the Dense chain."""
    model, x, y = tiny_conv(net, activation)
    h = full_hessian(model, x, y, "softmax_cross_entropy")
    exact = flat(second_derivatives(model, x, y, method="exact"))
    np.testing.assert_allclose(np.diag(h), exact, rtol=1e-10, atol=1e-14)
    probes = 2000
    sigma = np.sqrt(((h**2).sum(axis=1) - np.diag(h) ** 2) / probes)
    estimate = flat(hutchinson(model, x, y, probes=probes, seed=6))
    assert z_scores(estimate, exact, sigma).max() < Z_LIMIT
    assert relative_error(flat(hutchinson(model, x, y, probes=2, seed=6)), exact) > 0.2


def test_hutchinson_is_seeded_and_independent_of_batching() -> None:
    model, x, y = tiny()
    a = hutchinson(model, x, y, probes=4, seed=1, batch_size=12)
    b = hutchinson(model, x, y, probes=4, seed=1, batch_size=5)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(7)
    c = hutchinson(model, dataset, probes=4, seed=1)
    d = hutchinson(model, x, y, probes=4, seed=2)
    np.testing.assert_allclose(flat(b), flat(a), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(flat(c), flat(a), rtol=1e-12, atol=1e-15)
    assert not np.allclose(flat(d), flat(a))


# ---------------------------------------------------------------------------------------------
# fidelity
# ---------------------------------------------------------------------------------------------


def test_fidelity_values() -> None:
    ref = {"a": np.array([[1.0, 2.0], [3.0, 4.0]]), "b": np.array([5.0])}
    same = fidelity(ref, ref)
    assert isinstance(same, Fidelity)
    assert same.relative_error == 0.0
    assert same.spearman == pytest.approx(1.0, abs=1e-12)
    doubled = fidelity({k: 2 * v for k, v in ref.items()}, ref)
    assert doubled.relative_error == pytest.approx(1.0)
    assert doubled.spearman == pytest.approx(1.0)
    reversed_ranks = {"a": np.array([[5.0, 4.0], [3.0, 2.0]]), "b": np.array([1.0])}
    assert fidelity(reversed_ranks, ref).spearman == pytest.approx(-1.0)
    # pooled over kernels, in the reference's order whatever the estimate's order
    swapped = {"b": ref["b"], "a": ref["a"]}
    assert fidelity(swapped, ref).relative_error == 0.0


def test_fidelity_errors() -> None:
    ref = {"a": np.ones((2, 2))}
    with pytest.raises(ValueError, match=r"only in the estimate \['b'\]"):
        fidelity({"a": np.ones((2, 2)), "b": np.ones(1)}, ref)
    with pytest.raises(ValueError, match=r"'a': estimate has shape \(4,\), reference \(2, 2\)"):
        fidelity({"a": np.ones(4)}, ref)
    with pytest.raises(ValueError, match="zero everywhere"):
        fidelity(ref, {"a": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="NaN or infinite"):
        fidelity({"a": np.full((2, 2), np.nan)}, ref)
    with pytest.raises(ValueError, match="reference is empty"):
        fidelity({}, {})


# ---------------------------------------------------------------------------------------------
# Compilation, dtype, bad arguments
# ---------------------------------------------------------------------------------------------


def test_traced_once_and_float32_throughout() -> None:
    model, x, y = tiny(dtype="float32")
    for n, batch in ((12, 5), (9, 4), (12, 12)):
        for result in (
            empirical_fisher(model, x[:n], y[:n], batch_size=batch),
            monte_carlo_fisher(model, x[:n], y[:n], samples=2, batch_size=batch),
            hutchinson(model, x[:n], y[:n], probes=3 if n == 12 else 2, batch_size=batch),
        ):
            assert all(v.dtype == np.float32 for v in result.values())
    counts = tracing_counts(model)
    assert set(counts) == {
        "empirical/softmax_cross_entropy",
        "monte-carlo[2]/softmax_cross_entropy",
        "hutchinson/softmax_cross_entropy",
    }
    assert all(count == 1 for count in counts.values()), counts


def test_conv_chain_traced_once_and_float32_throughout() -> None:
    model, x, y = tiny_conv("valid-max", dtype="float32")
    for n, batch in ((12, 5), (9, 4)):
        for result in (
            empirical_fisher(model, x[:n], y[:n], batch_size=batch),
            monte_carlo_fisher(model, x[:n], y[:n], samples=2, batch_size=batch),
            hutchinson(model, x[:n], y[:n], probes=3 if n == 12 else 2, batch_size=batch),
        ):
            assert all(v.dtype == np.float32 for v in result.values())
            assert all(np.all(np.isfinite(v)) for v in result.values())
    counts = tracing_counts(model)
    assert len(counts) == 3 and all(count == 1 for count in counts.values()), counts


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3", None])
def test_probes_and_samples_must_be_positive_ints(bad: object) -> None:
    model, x, y = tiny()
    with pytest.raises(ValueError, match="probes must be a positive int"):
        hutchinson(model, x, y, probes=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="samples must be a positive int"):
        monte_carlo_fisher(model, x, y, samples=bad)  # type: ignore[arg-type]


def test_bad_arguments_are_named() -> None:
    model, x, y = tiny()
    for bad_seed in (-1, 2**31, 0.5, False):
        with pytest.raises(ValueError, match="seed must be an int"):
            hutchinson(model, x, y, seed=bad_seed)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="seed must be an int"):
            monte_carlo_fisher(model, x, y, seed=bad_seed)  # type: ignore[arg-type]
    for estimator in (empirical_fisher, monte_carlo_fisher, hutchinson):
        with pytest.raises(ValueError, match=r"x has shape \(12, 5\); model 'tiny' expects"):
            estimator(model, x[:, :5], y)
        with pytest.raises(ValueError, match=r"labels y have shape \(11,\)"):
            estimator(model, x, y[:11])
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            estimator(model, x, y, batch_size=0)
        with pytest.raises(ValueError, match="the data is empty"):
            estimator(model, tf.data.Dataset.from_tensor_slices((x[:0], y[:0])).batch(4))
        out_of_range = tf.data.Dataset.from_tensor_slices((x, np.full(12, 3))).batch(5)
        with pytest.raises(tf.errors.InvalidArgumentError, match="labels must be < 3"):
            estimator(model, out_of_range)


def test_hutchinson_refuses_kernels_before_a_shape_keeping_max_pool() -> None:
    """Double differentiation through a MaxPooling2D whose output keeps its input shape returns
    zeros inside tf.function (TensorFlow's CPU MaxPoolGradGrad; helpers.curvature's check):
    Hutchinson names the kernels and the layer instead of returning them. The Fisher estimators
    differentiate once and accept the chain (checked against brute force above)."""
    model, x, y = tiny_conv("keep-max")
    first = next(iter(prunable_kernels(model)))
    with pytest.raises(
        UnsupportedModelError,
        match=rf"hutchinson cannot differentiate \['{first}'\] twice through MaxPooling2D "
        r"layer 'keep': its output keeps its input shape \(8, 8, 2\)",
    ):
        hutchinson(model, x, y, probes=1)
    for estimator in (empirical_fisher, monte_carlo_fisher):
        assert np.min(np.abs(estimator(model, x, y)[first])) > 0


def test_unsupported_layers_are_refused_by_name() -> None:
    """Layers and settings the chain description does not support are refused, not
    mis-computed (the chain check shared with helpers.curvature)."""
    x, y = np.zeros((4, 6, 6, 1), np.float32), np.zeros(4, np.int64)
    for middle, message in (
        (keras.layers.BatchNormalization(name="norm"), r"'norm' of type BatchNormalization"),
        (keras.layers.Conv2D(2, 3, dilation_rate=2, name="dilated"), r"'dilated'.*dilation_rate"),
        (keras.layers.DepthwiseConv2D(3, name="depthwise"), r"'depthwise' of type Depthwise"),
    ):
        model = keras.Sequential(
            [keras.Input((6, 6, 1)), middle, keras.layers.Flatten(), keras.layers.Dense(3)]
        )
        model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        for estimate in (empirical_fisher, monte_carlo_fisher, hutchinson):
            with pytest.raises(UnsupportedModelError, match=message):
                estimate(model, x, y)
