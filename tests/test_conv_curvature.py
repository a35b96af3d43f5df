"""Second derivatives of chains with Conv2D and pooling layers, against brute force.

Every net here is tiny and float64 (TensorFlow's float64 convolutions on the CPU), so "equal"
means to 1e-12 relative: the methods compute the same sums in a different order. References:
``method="autodiff"`` (TensorFlow's own double differentiation through the Keras model), and,
for the kernels before a max pooling that keeps its input shape (stride 1, "same" padding),
where TensorFlow's ``MaxPoolGradGrad`` CPU kernel returns zeros inside ``tf.function`` and the
autodiff helpers therefore refuse them, central finite differences of the gradient.

Where LeCun's diagonal recursion must be exact (each kernel weight's second derivative is the sum
over the connections it controls, LeCun et al. 1989, Eq. 5, and the cross terms between those
connections vanish):

- the last ``Dense`` kernel of any chain (it feeds the loss directly, one connection per weight);
- a single ``Conv2D`` feeding the mean squared error, directly or through max pooling: the loss
  Hessian at the output is :math:`\\frac2m I`, max pooling's Jacobian :math:`J` selects one input
  per window so :math:`J^\\top J` stays diagonal, and ReLU/linear have :math:`f'' = 0`;
- a ``Conv2D`` whose output is a single position (kernel as large as the input): a Dense layer.

Where it must differ (cross terms exist): a shared conv weight feeding softmax cross-entropy
(the off-diagonal :math:`-p_i p_j` couple its positions), a conv through average pooling (one
window's inputs are coupled by :math:`1/k^2`), and any layer below a hidden layer.
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers.curvature import (
    autodiff_entries,
    gradients,
    hessian_block,
    mean_loss,
    second_derivatives,
    tracing_counts,
)
from helpers.evaluate import Evaluator
from helpers.network import UnsupportedModelError, as_chain, prunable_kernels
from helpers.obs import LayerwiseOBS, unit_curvature
from helpers.pruning import masks_from_scores, pruned, sweep
from helpers.retrain import masked_fit
from helpers.runtime import keras, set_determinism, tf
from helpers.saliency import obd

F64 = "float64"


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute difference relative to the largest magnitude of the reference."""
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def autodiff_diagonal(model: keras.Model, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """The diagonal of the full kernel Hessian by double differentiation (``hessian_block``:
    one compiled function for all kernels, cheaper to trace than ``method="autodiff"``)."""
    kernels = prunable_kernels(model)
    diagonal = np.diag(hessian_block(model, x, y, paths=list(kernels)))
    out, start = {}, 0
    for path, kernel in kernels.items():
        size = int(np.prod(kernel.shape))
        out[path] = diagonal[start : start + size].reshape(kernel.shape)
        start += size
    return out


def conv(filters: int, size: int, **kwargs) -> keras.layers.Conv2D:
    kwargs.setdefault("activation", "relu")
    return keras.layers.Conv2D(
        filters, size, dtype=kwargs.pop("dtype", F64), bias_initializer="random_normal", **kwargs
    )


def build(
    input_shape: tuple[int, ...],
    layers: list,
    *,
    outputs: int | None = 4,
    loss: str = "softmax_cross_entropy",
    dtype: str = F64,
    seed: int = 0,
) -> keras.Sequential:
    """``layers`` then Flatten (and a Dense with ``outputs`` units unless None), seeded."""
    set_determinism(seed)
    tail: list = [keras.layers.Flatten(dtype=dtype)]
    if outputs is not None:
        tail.append(keras.layers.Dense(outputs, dtype=dtype, bias_initializer="random_normal"))
    model = keras.Sequential([keras.Input(input_shape, dtype=dtype), *layers, *tail], name="cnn")
    model.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        if loss == "softmax_cross_entropy"
        else keras.losses.MeanSquaredError()
    )
    return model


def data(shape: tuple[int, ...], n: int = 9, classes: int = 4, seed: int = 1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *shape)), rng.integers(0, classes, size=n)


NETS = {
    # valid conv, non-overlapping max pool, a second (same) conv: ReLU
    "valid-max-same": lambda: [
        conv(3, 3),
        keras.layers.MaxPooling2D(2, dtype=F64),
        conv(2, 2, padding="same"),
    ],
    # stride-2 same conv, overlapping same average pool, linear second conv
    "stride2-avg": lambda: [
        conv(3, 3, strides=2, padding="same"),
        keras.layers.AveragePooling2D(2, strides=1, padding="same", dtype=F64),
        conv(2, 2, activation="linear"),
    ],
    # even kernel, stride 2 valid conv, 3x3 max pool with stride 2 and "same" padding
    "even-kernel-max3": lambda: [
        conv(2, 2, strides=2, use_bias=False),
        keras.layers.MaxPooling2D(3, strides=2, padding="same", dtype=F64),
        keras.layers.Dropout(0.5, dtype=F64),
    ],
}


@pytest.mark.parametrize("name", sorted(NETS))
def test_exact_equals_autodiff_piecewise_linear(name: str) -> None:
    """ReLU/linear nets with softmax cross-entropy: the Gauss-Newton diagonal is the Hessian's;
    LeCun's recursion is exact on the last (Dense) kernel and only there."""
    x, y = data((7, 7, 2))
    model = build((7, 7, 2), NETS[name]())
    ref = autodiff_diagonal(model, x, y)
    exact = second_derivatives(model, x, y, method="exact")
    lecun = second_derivatives(model, x, y, method="lecun")
    assert list(exact) == list(ref) == list(prunable_kernels(model))
    last = list(ref)[-1]
    for path in ref:
        assert exact[path].shape == ref[path].shape
        assert rel_error(exact[path], ref[path]) < 1e-12, path
        if path != last:  # cross terms between positions and units: the diagonal recursion errs
            assert rel_error(lecun[path], ref[path]) > 1e-2, path
    assert rel_error(lecun[last], ref[last]) < 1e-12


def test_final_softmax_layer() -> None:
    """A last Dense layer that applies softmax itself (loss without logits): the softmax is part
    of the cross-entropy, so the net is still piecewise linear and "exact" its Gauss-Newton."""
    x, y = data((6, 6, 1))
    set_determinism(0)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 1), dtype=F64),
            conv(2, 3),
            keras.layers.MaxPooling2D(2, dtype=F64),
            keras.layers.Flatten(dtype=F64),
            keras.layers.Dense(4, activation="softmax", dtype=F64),
        ]
    )
    model.compile(loss="sparse_categorical_crossentropy")
    assert as_chain(model).piecewise_linear
    ref = autodiff_diagonal(model, x, y)
    exact = second_derivatives(model, x, y, method="exact")
    assert max(rel_error(exact[p], ref[p]) for p in ref) < 1e-12


def test_exact_equals_autodiff_smooth() -> None:
    """tanh and sigmoid convs (f'' != 0): the exact block recursion against autodiff; LeCun's
    "lecun-full" keeps the f'' term but still drops the cross terms."""
    x, y = data((6, 6, 1))
    layers = [
        conv(2, 3, activation="tanh"),
        keras.layers.AveragePooling2D(2, dtype=F64),
        conv(2, 2, activation="sigmoid", padding="same"),
    ]
    model = build((6, 6, 1), layers)
    ref = autodiff_diagonal(model, x, y)
    exact = second_derivatives(model, x, y, method="exact")
    full = second_derivatives(model, x, y, method="lecun-full")
    first = next(iter(ref))
    assert max(rel_error(exact[p], ref[p]) for p in ref) < 1e-12
    assert rel_error(full[first], ref[first]) > 1e-2


def test_exact_through_overlapping_max_pool_matches_finite_differences() -> None:
    """Stride-1 "same" max pooling after a stride-2 conv. TensorFlow's double differentiation
    returns zeros for the conv kernel here (the autodiff helpers refuse it, see the next tests),
    so the reference is the central difference of the gradient (its error, O(eps^2) times the
    third derivative, is far below the 1e-6 tolerance with eps = 1e-5)."""
    x, y = data((7, 7, 2))
    layers = [
        conv(3, 3, strides=2, padding="same"),
        keras.layers.MaxPooling2D(2, strides=1, padding="same", dtype=F64),
        conv(2, 2, padding="same"),
    ]
    model = build((7, 7, 2), layers)
    exact = second_derivatives(model, x, y, method="exact")
    kernel = model.layers[0].kernel
    path = kernel.path
    w0, eps = kernel.numpy().copy(), 1e-5
    flat = [0, 7, 23, 40, 53]  # a few weights spread over the (3, 3, 2, 3) kernel
    fd = []
    for i in flat:
        idx = np.unravel_index(i, w0.shape)
        sides = []
        for sign in (1.0, -1.0):
            w = w0.copy()
            w[idx] += sign * eps
            kernel.assign(w)
            sides.append(gradients(model, x, y)[path][idx])
        fd.append((sides[0] - sides[1]) / (2 * eps))
    kernel.assign(w0)
    np.testing.assert_allclose(exact[path].reshape(-1)[flat], fd, rtol=1e-6)
    assert np.min(np.abs(fd)) > 0


def test_tensorflow_max_pool_grad_grad_zeros_when_shape_is_kept() -> None:
    """Why the autodiff helpers refuse some max poolings: inside ``tf.function`` a Hessian-vector
    product through ``max_pool2d`` with strides 1 and "same" padding (output shape = input
    shape) is all zeros on the CPU, although the same code run eagerly, or with "valid" padding,
    is right. TensorFlow's ``MaxPoolGradGrad`` CPU kernel takes over the buffer of its incoming
    gradient for its output and zeroes it before reading it. If this test fails, TensorFlow has
    fixed the kernel and ``curvature._check_autodiff`` can be relaxed."""
    rng = np.random.default_rng(0)
    x, w, v = (tf.constant(rng.normal(size=(2, 4, 4, 3))) for _ in range(3))

    def hvp(w: tf.Tensor, padding: str) -> tf.Tensor:
        with tf.GradientTape() as outer:
            outer.watch(w)
            with tf.GradientTape() as inner:
                inner.watch(w)
                loss = tf.reduce_sum(tf.square(tf.nn.max_pool2d(x * w, 2, 1, padding)))
            directional = tf.reduce_sum(inner.gradient(loss, w) * v)
        return outer.gradient(directional, w)

    with tf.device("/CPU:0"):
        for padding in ("SAME", "VALID"):
            eager = hvp(w, padding).numpy()
            compiled = tf.function(hvp)(w, padding).numpy()
            assert np.max(np.abs(eager)) > 1
            if padding == "SAME":
                assert np.all(compiled == 0)
            else:
                np.testing.assert_allclose(compiled, eager, rtol=1e-12)


SHAPE_KEEPING_POOLS = {
    "2x2-stride1-same": lambda: keras.layers.MaxPooling2D(
        2, strides=1, padding="same", dtype=F64, name="keep"
    ),
    "3x3-stride1-same": lambda: keras.layers.MaxPooling2D(
        3, strides=1, padding="same", dtype=F64, name="keep"
    ),
    "1x1": lambda: keras.layers.MaxPooling2D(1, dtype=F64, name="keep"),
}


@pytest.mark.parametrize("name", sorted(SHAPE_KEEPING_POOLS))
def test_autodiff_refuses_kernels_before_a_shape_keeping_max_pool(name: str) -> None:
    """The autodiff helpers used to return zeros for the first conv kernel here; now they name
    the pooling layer and point to "exact". The kernels after the pooling are unaffected."""
    x, y = data((7, 7, 2))
    layers = [conv(3, 3, strides=2, padding="same"), SHAPE_KEEPING_POOLS[name](), conv(2, 2)]
    model = build((7, 7, 2), layers)
    first, second, _ = prunable_kernels(model)
    message = r"MaxPooling2D layer 'keep'.*keeps its input shape \(4, 4, 3\).*method='exact'"
    with pytest.raises(UnsupportedModelError, match=message):
        second_derivatives(model, x, y, method="autodiff")
    with pytest.raises(UnsupportedModelError, match=rf"autodiff_entries.*'{first}'.*{message}"):
        autodiff_entries(model, x, y, path=first, indices=np.array([0, 7]))
    with pytest.raises(UnsupportedModelError, match=rf"hessian_block.*'{first}'.*{message}"):
        hessian_block(model, x, y, paths=[second, first])

    exact = second_derivatives(model, x, y, method="exact")
    assert np.min(np.abs(exact[first])) > 0  # what autodiff returned as zeros
    entries = autodiff_entries(model, x, y, path=second, indices=np.array([0, 5, 17]))
    np.testing.assert_allclose(entries, exact[second].reshape(-1)[[0, 5, 17]], rtol=1e-12)


@pytest.mark.parametrize(
    ("name", "layers", "exact_lecun"),
    [
        ("same-stride2", lambda: [conv(3, 3, strides=2, padding="same")], True),
        ("max-pool", lambda: [conv(3, 2), keras.layers.MaxPooling2D(2, dtype=F64)], True),
        ("avg-pool", lambda: [conv(3, 2), keras.layers.AveragePooling2D(2, dtype=F64)], False),
        # one input channel through a strided 1x1 conv keeps the Hessian at conv 1 diagonal
        (
            "through-1x1",
            lambda: [conv(1, 3, padding="same"), conv(3, 1, strides=2, activation="linear")],
            True,
        ),
    ],
)
def test_single_conv_into_mse(name: str, layers, exact_lecun: bool) -> None:
    """One conv feeding the MSE (through max or average pooling): LeCun's recursion is exact
    unless average pooling couples the positions of a window (module docstring)."""
    x = data((6, 6, 1))[0]
    model = build((6, 6, 1), layers(), outputs=None, loss="mse")
    m = model.output_shape[-1]
    t = np.random.default_rng(2).normal(size=(len(x), m))
    ref = second_derivatives(model, x, t, method="autodiff")
    for method in ("exact", "lecun", "lecun-full"):
        h = second_derivatives(model, x, t, method=method)
        for path in ref:
            error = rel_error(h[path], ref[path])
            if method == "exact" or exact_lecun:
                assert error < 1e-12, (method, path)
            else:
                assert error > 1e-2, (method, path)


def test_lecun_through_average_pooling_by_hand() -> None:
    """Linear 2x2 conv (6x6 -> 5x5), 2x2 average pooling (5x5 -> 2x2, last row and column
    unused), MSE over m = 8 outputs: d2l/dy^2 = 2/m at the pooled outputs, times (1/4)^2 per
    covered conv output, 0 elsewhere; LeCun's kernel entry sums x^2 times that over positions."""
    x = data((6, 6, 1))[0]
    model = build(
        (6, 6, 1),
        [conv(2, 2, activation="linear"), keras.layers.AveragePooling2D(2, dtype=F64)],
        outputs=None,
        loss="mse",
    )
    t = np.zeros((len(x), 8))
    h = second_derivatives(model, x, t, method="lecun")[model.layers[0].kernel.path]
    per_position = 2 / 8 / 16
    expected = np.empty((2, 2, 1, 2))
    for i in range(2):
        for j in range(2):
            covered = x[:, i : i + 4, j : j + 4, 0]  # inputs at the 4x4 covered conv outputs
            expected[i, j, 0, :] = np.mean(np.sum(covered**2, axis=(1, 2))) * per_position
    np.testing.assert_allclose(h, expected, rtol=1e-12)


def test_single_conv_into_softmax() -> None:
    """A conv straight into softmax cross-entropy: when its output is a single position each
    weight controls one connection (a Dense layer in disguise) and LeCun is exact; with several
    positions a shared weight's connections are coupled by -p_i p_j and LeCun is not."""
    x, y = data((3, 3, 2))
    one_position = build((3, 3, 2), [conv(4, 3, activation="linear")], outputs=None)
    path = one_position.layers[0].kernel.path
    ref = second_derivatives(one_position, x, y, method="autodiff")[path]
    for method in ("exact", "lecun"):
        h = second_derivatives(one_position, x, y, method=method)[path]
        assert rel_error(h, ref) < 1e-12, method

    x, y = data((3, 3, 2), classes=8)
    shared = build((3, 3, 2), [conv(2, 2, activation="linear")], outputs=None)  # 2x2x2 = 8
    path = shared.layers[0].kernel.path
    ref = second_derivatives(shared, x, y, method="autodiff")[path]
    assert rel_error(second_derivatives(shared, x, y, method="exact")[path], ref) < 1e-12
    assert rel_error(second_derivatives(shared, x, y, method="lecun")[path], ref) > 1e-2


def test_float32_matches_float64() -> None:
    """The device path: float32 against the float64 result (float32 keeps about 7 digits; sums
    over a few hundred terms lose one or two)."""
    x, y = data((7, 7, 2))
    results, weights = {}, None
    for dtype in ("float64", "float32"):
        layers = [
            conv(3, 3, dtype=dtype),
            keras.layers.MaxPooling2D(2, dtype=dtype),
            conv(2, 2, padding="same", dtype=dtype),
        ]
        model = build((7, 7, 2), layers, dtype=dtype)
        if weights is None:
            weights = model.get_weights()
        model.set_weights([w.astype(dtype) for w in weights])
        results[dtype] = [
            second_derivatives(model, x, y, method=m) for m in ("exact", "lecun", "lecun-full")
        ]
    for h64, h32 in zip(results["float64"], results["float32"], strict=True):
        for p64, p32 in zip(h64, h32, strict=True):
            assert h32[p32].dtype == np.float32
            assert rel_error(h32[p32], h64[p64]) < 1e-4


def test_gradients_loss_autodiff_entries_and_hessian_block() -> None:
    x, y = data((6, 6, 1))
    model = build(
        (6, 6, 1), [conv(2, 3, padding="same"), keras.layers.AveragePooling2D(2, dtype=F64)]
    )
    kernels = prunable_kernels(model)
    assert [v.shape for v in kernels.values()] == [(3, 3, 1, 2), (18, 4)]
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(
            keras.losses.sparse_categorical_crossentropy(y, model(x), from_logits=True)
        )
    expected = tape.gradient(loss, [v.value for v in kernels.values()])
    got = gradients(model, x, y, batch_size=4)
    for path, g in zip(kernels, expected, strict=True):
        np.testing.assert_allclose(got[path], g.numpy(), rtol=1e-12, atol=1e-15)
    assert mean_loss(model, x, y, batch_size=4) == pytest.approx(float(loss), rel=1e-12)

    exact = second_derivatives(model, x, y, method="exact", batch_size=4)
    conv_path = next(iter(kernels))
    entries = autodiff_entries(model, x, y, path=conv_path, indices=np.array([0, 5, 17]))
    np.testing.assert_allclose(entries, exact[conv_path].reshape(-1)[[0, 5, 17]], rtol=1e-12)
    block = hessian_block(model, x, y, paths=[conv_path])
    np.testing.assert_allclose(np.diag(block), exact[conv_path].reshape(-1), rtol=1e-12)
    assert not np.allclose(block, np.diag(np.diag(block)))  # shared weights: cross terms

    second_derivatives(model, x, y, method="exact", batch_size=4)
    assert tracing_counts(model)["exact/softmax_cross_entropy"] == 1


def test_pruning_sweep_evaluator_and_retraining() -> None:
    """Conv kernels are scored, masked, swept and kept at zero by masked retraining; the OBS
    helpers say clearly that they handle Dense chains only."""
    x, y = data((6, 6, 1), n=20)
    model = build((6, 6, 1), [conv(2, 3), keras.layers.MaxPooling2D(2, dtype=F64)])
    scores = obd(model, second_derivatives(model, x, y, method="lecun"))
    masks = masks_from_scores(scores, 0.5)
    conv_path = model.layers[0].kernel.path
    assert conv_path in masks and 0 < masks[conv_path].sum() < masks[conv_path].size
    evaluator = Evaluator(model, x, y)
    before = evaluator()
    with pruned(model, masks):
        assert np.all(model.layers[0].kernel.numpy()[~masks[conv_path]] == 0)
    assert evaluator() == before
    result = sweep(model, scores, x, y, fractions=[0.0, 0.5, 1.0], evaluator=evaluator)
    assert result.accuracy[0] == before.accuracy and evaluator.tracing_count == 1

    masked_fit(model, masks, x, y, epochs=1, batch_size=10, learning_rate=1e-2)
    assert np.all(model.layers[0].kernel.numpy()[~masks[conv_path]] == 0)

    with pytest.raises(UnsupportedModelError, match=r"Dense layers only.*'conv2d"):
        unit_curvature(model, x)
    with pytest.raises(UnsupportedModelError, match="Dense layers only"):
        LayerwiseOBS(model, x)


def test_chain_description() -> None:
    model = build(
        (7, 7, 2),
        [conv(3, 3, strides=2, padding="same"), keras.layers.AveragePooling2D(2, strides=1)],
    )
    chain = as_chain(model)
    assert [type(op).__name__ for op in chain.ops] == [
        "ConvStep",
        "PoolStep",
        "FlattenStep",
        "DenseStep",
    ]
    assert chain.shapes == ((7, 7, 2), (4, 4, 3), (3, 3, 3), (27,))
    assert chain.output_shape == (4,) and chain.num_outputs == 4 and not chain.dense_only
    assert chain.ops[0].strides == (2, 2) and chain.ops[0].padding == "SAME"
    assert chain.ops[1].pool_size == (2, 2) and chain.ops[1].strides == (1, 1)


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        (
            lambda: [keras.layers.Conv2D(2, 3, dilation_rate=2, name="dil")],
            "'dil' has dilation_rate=.*only 1",
        ),
        (lambda: [keras.layers.Conv2D(2, 3, groups=2, name="grp")], "'grp' has groups=2"),
        (
            lambda: [keras.layers.Conv2D(2, 3, activation="elu", name="c_elu")],
            "'c_elu' has activation 'elu'",
        ),
        (
            lambda: [keras.layers.Conv2D(2, 3, activation="softmax", name="c_soft")],
            "'c_soft' has activation 'softmax'",
        ),
        (
            lambda: [keras.layers.MaxPooling2D(2, data_format="channels_first", name="cf")],
            "'cf' has data_format='channels_first'",
        ),
        (lambda: [keras.layers.BatchNormalization(name="bn")], "'bn' of type BatchNormalization"),
        (lambda: [keras.layers.Conv3D(2, 1, name="c3")], "'c3' of type Conv3D"),
        (lambda: [keras.layers.GlobalAveragePooling2D(name="gap")], "'gap' of type Global"),
    ],
)
def test_unsupported_settings_are_named(layers, message: str) -> None:
    shape = (6, 6, 4, 2) if "c3" in message else (6, 6, 2)
    model = keras.Sequential([keras.Input(shape), *layers(), keras.layers.Flatten()])
    if "gap" not in message:
        model.add(keras.layers.Dense(3))
    with pytest.raises(UnsupportedModelError, match=message):
        second_derivatives(
            model,
            np.zeros((2, *shape)),
            np.zeros(2, int),
            method="lecun",
            loss="softmax_cross_entropy",
        )


def test_conv1d_and_channels_first_conv_are_named() -> None:
    conv1d = keras.Sequential(
        [keras.Input((8, 2)), keras.layers.Conv1D(2, 3, name="c1"), keras.layers.Flatten()]
    )
    with pytest.raises(UnsupportedModelError, match="'c1' of type Conv1D"):
        prunable_kernels(conv1d)
    first = keras.Sequential(
        [
            keras.Input((2, 6, 6)),
            keras.layers.Conv2D(2, 3, data_format="channels_first", name="cf2"),
            keras.layers.Flatten(),
        ]
    )
    with pytest.raises(UnsupportedModelError, match="'cf2' has data_format='channels_first'"):
        prunable_kernels(first)
    no_flatten = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(2, 3)])
    with pytest.raises(UnsupportedModelError, match="end it with Flatten or Dense"):
        prunable_kernels(no_flatten)
