r"""Diagonal second derivatives of the mean training loss with respect to every kernel weight.

Notation (one sample; the mean over the data set is taken at the end). Layer :math:`l` of the
chain computes :math:`a_l = z_{l-1} W_l + b_l` and :math:`z_l = f_l(a_l)`, with :math:`z_0` the
flattened input and :math:`z_L` the network output fed to the loss :math:`\ell`. Because
:math:`a_{l,j}` is linear in :math:`W_{l,ij}` with coefficient :math:`z_{l-1,i}`, and nothing else
depends on that weight,

.. math:: \frac{\partial^2 \ell}{\partial W_{l,ij}^2} = z_{l-1,i}^2 \,
          \frac{\partial^2 \ell}{\partial a_{l,j}^2}

exactly. The methods differ in how they obtain :math:`\partial^2\ell/\partial a_{l,j}^2`:

``"lecun"``
    LeCun, Denker & Solla (1989), Eq. 6-7 with the :math:`f''` term dropped (Gauss-Newton /
    Levenberg-Marquardt) and only the diagonal propagated:
    :math:`h_{l-1,i} = f'(a_{l-1,i})^2 \sum_j W_{l,ij}^2 h_{l,j}`. The output boundary is exact:
    :math:`p_i(1-p_i)` for softmax cross-entropy, :math:`2/m` for the mean squared error over
    :math:`m` outputs (times :math:`f'^2` of the output activation). Always :math:`\ge 0`.
``"lecun-full"``
    The same recursion keeping the second-order term of the chain rule,
    :math:`h_{l-1,i} = f'^2 \sum_j W_{l,ij}^2 h_{l,j} + f''(a_{l-1,i})\,\partial\ell/\partial z_{l-1,i}`
    (plus sign; the paper's Eq. 7 prints a minus). Identical to ``"lecun"`` for ReLU networks.
``"exact"``
    The exact Hessian diagonal. For piecewise-linear networks (ReLU/linear activations) the
    output is affine in any single weight, so the diagonal of the Hessian equals that of the
    Gauss-Newton matrix :math:`J^\top S J`, where :math:`S` is the loss Hessian at the output.
    Writing :math:`S = \sum_k u_k u_k^\top` (softmax cross-entropy: :math:`u_k = \sqrt{p_k}(e_k - p)`,
    i.e. a sum over classes of :math:`p_k` times squared per-sample gradients for label :math:`k`;
    MSE: :math:`u_k = \sqrt{2/m}\, e_k`) the diagonal is :math:`\sum_k (J^\top u_k)^2`: the
    :math:`m` vectors are backpropagated together as one batch and squared, then contracted with
    the squared layer inputs by one matmul per layer. For smooth activations (tanh, sigmoid) the
    full per-sample Hessian with respect to each layer's pre-activations is backpropagated
    instead (exact, :math:`O(n^3)` per sample for a layer of width :math:`n`).
``"autodiff"``
    TensorFlow's own double differentiation through the Keras model: the Jacobian of the
    gradient, taken in chunks of weights, whose diagonal is kept. A brute-force reference for
    tests and small models; its cost grows with the number of weights.

Every method is batched over the data (memory independent of its size), compiled with
``tf.function`` once per model (later calls and every batch reuse the trace; see
:func:`tracing_counts`), and returns NumPy arrays keyed by the kernel variables' ``path``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Literal

import numpy as np

from helpers.distribute import sum_over_batches
from helpers.inputs import Data, batches, label_spec, progress_bar
from helpers.losses import LossName, output_boundary, per_sample_loss, resolve_loss
from helpers.network import Chain, as_chain, check_finite_weights
from helpers.runtime import keras, tf

Method = Literal["lecun", "lecun-full", "exact", "autodiff"]
METHODS: tuple[str, ...] = ("lecun", "lecun-full", "exact", "autodiff")
DEFAULT_BATCH_SIZE = 2000
AUTODIFF_CHUNK = 64


# --------------------------------------------------------------------------------------------
# Forward pass and activation derivatives
# --------------------------------------------------------------------------------------------


def _derivatives(name: str, a: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """f(a), f'(a), f''(a) for a supported activation (ReLU'(0) = 0, as TensorFlow's gradient)."""
    if name == "relu":
        z = tf.nn.relu(a)
        return z, tf.cast(a > 0, a.dtype), tf.zeros_like(a)
    if name == "tanh":
        z = tf.tanh(a)
        d = 1 - z * z
        return z, d, -2 * z * d
    if name == "sigmoid":
        z = tf.sigmoid(a)
        d = z * (1 - z)
        return z, d, d * (1 - 2 * z)
    return a, tf.ones_like(a), tf.zeros_like(a)  # linear, and softmax folded into the loss


def _forward(
    chain: Chain, x: tf.Tensor
) -> tuple[list[tf.Tensor], list[tf.Tensor], list[tf.Tensor], tf.Tensor]:
    """Layer inputs z_{l-1}, f'(a_l), f''(a_l) for every Dense step, and the output z_L (logits)."""
    z = tf.reshape(x, [-1, math.prod(chain.input_shape)])
    inputs, first, second = [], [], []
    for step in chain.steps:
        inputs.append(z)
        a = tf.matmul(z, tf.convert_to_tensor(step.kernel))
        if step.bias is not None:
            a = a + tf.convert_to_tensor(step.bias)
        z, d1, d2 = _derivatives(step.activation, a)
        first.append(d1)
        second.append(d2)
    return inputs, first, second, z


# --------------------------------------------------------------------------------------------
# The per-batch computations (sums over the batch; divided by N at the end)
# --------------------------------------------------------------------------------------------


def _kernels(chain: Chain) -> list[tf.Tensor]:
    return [tf.convert_to_tensor(step.kernel) for step in chain.steps]


def _lecun_batch(
    chain: Chain, x: tf.Tensor, y: tf.Tensor, loss: LossName, full: bool
) -> list[tf.Tensor]:
    inputs, d1, d2, out = _forward(chain, x)
    _, g, s_diag, _ = output_boundary(out, y, loss, chain.num_outputs)
    kernels = _kernels(chain)
    last = len(chain.steps) - 1
    h = tf.square(d1[last]) * s_diag  # d2l/da_L^2 on the diagonal: exact at the output
    delta = d1[last] * g  # dl/da_L (only needed with the f'' term)
    if full:
        h = h + d2[last] * g
    result: list[tf.Tensor] = [None] * len(chain.steps)  # type: ignore[list-item]
    for k in range(last, -1, -1):
        result[k] = tf.matmul(tf.square(inputs[k]), h, transpose_a=True)
        if k == 0:
            break
        h_z = tf.matmul(h, tf.square(kernels[k]), transpose_b=True)  # diagonal approximation
        h = tf.square(d1[k - 1]) * h_z
        if full:
            g_z = tf.matmul(delta, kernels[k], transpose_b=True)
            h = h + d2[k - 1] * g_z
            delta = d1[k - 1] * g_z
    return result


def _exact_gauss_newton_batch(
    chain: Chain, x: tf.Tensor, y: tf.Tensor, loss: LossName
) -> list[tf.Tensor]:
    """Exact diagonal for piecewise-linear chains: sum_k (J^T u_k)^2, the K vectors batched."""
    inputs, d1, _, out = _forward(chain, x)
    _, _, _, factor = output_boundary(out, y, loss, chain.num_outputs)
    kernels = _kernels(chain)
    last = len(chain.steps) - 1
    vectors = factor() * d1[last][None]  # (K, B, m): backpropagated u_k at a_L
    result: list[tf.Tensor] = [None] * len(chain.steps)  # type: ignore[list-item]
    for k in range(last, -1, -1):
        result[k] = tf.matmul(
            tf.square(inputs[k]), tf.reduce_sum(tf.square(vectors), axis=0), transpose_a=True
        )
        if k == 0:
            break
        vectors = tf.matmul(vectors, kernels[k], transpose_b=True) * d1[k - 1][None]
    return result


def _exact_block_batch(chain: Chain, x: tf.Tensor, y: tf.Tensor, loss: LossName) -> list[tf.Tensor]:
    """Exact diagonal for any supported chain: the per-sample Hessian w.r.t. each layer's
    pre-activations, M_{l-1} = F' W M_l W^T F' + diag(f'' * dl/dz), backpropagated in full."""
    inputs, d1, d2, out = _forward(chain, x)
    _, g, _, factor = output_boundary(out, y, loss, chain.num_outputs)
    kernels = _kernels(chain)
    last = len(chain.steps) - 1
    u = factor()  # (K, B, m)
    s_full = tf.einsum("kbi,kbj->bij", u, u)  # loss Hessian w.r.t. the output, per sample
    m_block = d1[last][:, :, None] * s_full * d1[last][:, None, :] + tf.linalg.diag(d2[last] * g)
    delta = d1[last] * g
    result: list[tf.Tensor] = [None] * len(chain.steps)  # type: ignore[list-item]
    for k in range(last, -1, -1):
        result[k] = tf.matmul(tf.square(inputs[k]), tf.linalg.diag_part(m_block), transpose_a=True)
        if k == 0:
            break
        w = kernels[k]
        h_z = tf.einsum("ij,bjk,lk->bil", w, m_block, w)
        g_z = tf.matmul(delta, w, transpose_b=True)
        m_block = d1[k - 1][:, :, None] * h_z * d1[k - 1][:, None, :] + tf.linalg.diag(
            d2[k - 1] * g_z
        )
        delta = d1[k - 1] * g_z
    return result


def _model_loss_sum(chain: Chain, x: tf.Tensor, y: tf.Tensor, loss: LossName) -> tf.Tensor:
    """Sum over the batch of the per-sample loss, through the Keras model itself."""
    final_softmax = chain.steps[-1].activation == "softmax"
    output = chain.model(x, training=False)
    return tf.reduce_sum(per_sample_loss(output, y, loss, from_logits=not final_softmax))


# --------------------------------------------------------------------------------------------
# Compiled functions, cached on the model (traced once per model and method)
# --------------------------------------------------------------------------------------------

_CACHE_ATTRIBUTE = "_helpers_curvature_functions"


def _compiled(chain: Chain, key: str, build: Callable[[], Callable]) -> Callable:
    cache = chain.model.__dict__.get(_CACHE_ATTRIBUTE)
    if cache is None:
        cache = {}
        object.__setattr__(chain.model, _CACHE_ATTRIBUTE, cache)
    if key not in cache:
        cache[key] = build()
    return cache[key]


def tracing_counts(model: keras.Model) -> dict[str, int]:
    """How many times each compiled function of ``model`` has been traced (1 means no retracing)."""
    cache = model.__dict__.get(_CACHE_ATTRIBUTE, {})
    return {key: fn.experimental_get_tracing_count() for key, fn in cache.items()}


def _batch_function(chain: Chain, method: str, loss: LossName) -> Callable:
    x_spec = tf.TensorSpec((None, *chain.input_shape), chain.dtype)
    y_spec = label_spec(chain, loss)

    def build() -> Callable:
        if method in ("lecun", "lecun-full"):
            body = lambda x, y: _lecun_batch(chain, x, y, loss, full=method == "lecun-full")  # noqa: E731
        elif method == "exact" and chain.piecewise_linear:
            body = lambda x, y: _exact_gauss_newton_batch(chain, x, y, loss)  # noqa: E731
        elif method == "exact":
            body = lambda x, y: _exact_block_batch(chain, x, y, loss)  # noqa: E731
        else:  # "gradient": a plain gradient pass through the Keras model
            kernels = [step.kernel.value for step in chain.steps]

            def body(x: tf.Tensor, y: tf.Tensor) -> list[tf.Tensor]:
                with tf.GradientTape() as tape:
                    tape.watch(kernels)
                    total = _model_loss_sum(chain, x, y, loss)
                return tape.gradient(total, kernels)

        def checked(x: tf.Tensor, y: tf.Tensor) -> list[tf.Tensor]:
            if loss == "softmax_cross_entropy":
                with tf.control_dependencies(
                    [
                        tf.debugging.assert_non_negative(y, message="labels must be >= 0"),
                        tf.debugging.assert_less(
                            y, chain.num_outputs, message=f"labels must be < {chain.num_outputs}"
                        ),
                    ]
                ):
                    x = tf.identity(x)
            return body(x, y)

        return tf.function(checked, input_signature=[x_spec, y_spec], reduce_retracing=True)

    return _compiled(chain, f"{method}/{loss}", build)


def _autodiff_function(chain: Chain, layer_index: int, loss: LossName) -> Callable:
    x_spec = tf.TensorSpec((None, *chain.input_shape), chain.dtype)
    idx_spec = tf.TensorSpec([None], tf.int32)
    kernel = chain.steps[layer_index].kernel.value

    def build() -> Callable:
        def entries(x: tf.Tensor, y: tf.Tensor, idx: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as outer:
                outer.watch(kernel)
                with tf.GradientTape() as inner:
                    inner.watch(kernel)
                    total = _model_loss_sum(chain, x, y, loss)
                grad = tf.gather(tf.reshape(inner.gradient(total, kernel), [-1]), idx)
            rows = tf.reshape(outer.jacobian(grad, kernel), [tf.shape(idx)[0], -1])
            return tf.gather(rows, idx, axis=1, batch_dims=1)

        return tf.function(entries, input_signature=[x_spec, label_spec(chain, loss), idx_spec])

    return _compiled(chain, f"autodiff[{layer_index}]/{loss}", build)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def _accumulate(
    chain: Chain,
    batches: Iterator[tuple[tf.Tensor, tf.Tensor]],
    fn: Callable,
    strategy: tf.distribute.Strategy | None = None,
) -> tuple[list[tf.Tensor], int]:
    return sum_over_batches(
        batches,
        fn,
        strategy,
        empty_message="the data is empty: second derivatives of a mean over zero samples are undefined",
    )


def _prepare(model: keras.Model, loss: str | None) -> tuple[Chain, LossName]:
    chain = as_chain(model)
    resolved = resolve_loss(model, loss)
    check_finite_weights(model)
    return chain, resolved


def second_derivatives(
    model: keras.Model,
    x: Data,
    y: np.ndarray | None = None,
    *,
    method: Method,
    batch_size: int = DEFAULT_BATCH_SIZE,
    loss: LossName | None = None,
    progress: bool = False,
    strategy: tf.distribute.Strategy | None = None,
) -> dict[str, np.ndarray]:
    """Diagonal second derivatives of the mean loss over ``(x, y)`` for every kernel weight.

    Args:
        model: a supported Keras model (see :mod:`helpers.network`); dropout is in inference mode.
        x: inputs of shape ``(N, *input_shape)``, or a ``tf.data.Dataset`` of ``(x, y)`` batches.
        y: integer class labels ``(N,)`` for cross-entropy, targets ``(N, m)`` for MSE; ``None``
            with a dataset.
        method: ``"lecun"``, ``"lecun-full"``, ``"exact"`` or ``"autodiff"`` (module docstring).
        batch_size: samples per batch for array inputs (memory grows with it, not with ``N``).
        loss: ``"softmax_cross_entropy"`` or ``"mse"``; ``None`` reads it from the compiled model.
        progress: show a progress bar over batches.
        strategy: a ``tf.distribute`` strategy (e.g. ``MirroredStrategy``); each batch is split
            across its replicas and the per-replica sums are reduced (:mod:`helpers.distribute`).

    Returns:
        ``{kernel.path: array of the kernel's shape}`` with
        :math:`\\partial^2 \\bar\\ell / \\partial w^2` of the mean loss :math:`\\bar\\ell`.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    chain, loss_name = _prepare(model, loss)
    if method == "autodiff":
        return {
            step.path: autodiff_entries(
                model,
                x,
                y,
                path=step.path,
                batch_size=batch_size,
                loss=loss_name,
                progress=progress,
                strategy=strategy,
            ).reshape(tuple(step.kernel.shape))
            for step in chain.steps
        }
    data, count = batches(chain, x, y, loss_name, batch_size)
    fn = _batch_function(chain, method, loss_name)
    totals, n = _accumulate(chain, progress_bar(data, count, progress, method), fn, strategy)
    return {step.path: (t / n).numpy() for step, t in zip(chain.steps, totals, strict=True)}


def gradients(
    model: keras.Model,
    x: Data,
    y: np.ndarray | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    loss: LossName | None = None,
    progress: bool = False,
    strategy: tf.distribute.Strategy | None = None,
) -> dict[str, np.ndarray]:
    """Gradient of the mean loss with respect to every kernel: a plain, compiled gradient pass
    through the Keras model (``tf.GradientTape``), batched like :func:`second_derivatives`."""
    chain, loss_name = _prepare(model, loss)
    data, count = batches(chain, x, y, loss_name, batch_size)
    fn = _batch_function(chain, "gradient", loss_name)
    totals, n = _accumulate(chain, progress_bar(data, count, progress, "gradient"), fn, strategy)
    return {step.path: (t / n).numpy() for step, t in zip(chain.steps, totals, strict=True)}


def autodiff_entries(
    model: keras.Model,
    x: Data,
    y: np.ndarray | None = None,
    *,
    path: str,
    indices: np.ndarray | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    chunk_size: int = AUTODIFF_CHUNK,
    loss: LossName | None = None,
    progress: bool = False,
    strategy: tf.distribute.Strategy | None = None,
) -> np.ndarray:
    """Brute-force :math:`\\partial^2\\bar\\ell/\\partial w^2` by double differentiation, for the
    weights of kernel ``path`` at flat ``indices`` (all of them by default), ``chunk_size``
    Hessian rows at a time. Useful to spot-check a few weights of a large model."""
    chain, loss_name = _prepare(model, loss)
    by_path = {step.path: i for i, step in enumerate(chain.steps)}
    if path not in by_path:
        raise KeyError(
            f"{path!r} is not a prunable kernel of model {model.name!r}; known: {sorted(by_path)}"
        )
    layer_index = by_path[path]
    size = math.prod(chain.steps[layer_index].kernel.shape)
    idx = np.arange(size) if indices is None else np.asarray(indices).reshape(-1)
    if (
        idx.size == 0
        or not np.issubdtype(idx.dtype, np.integer)
        or idx.min() < 0
        or idx.max() >= size
    ):
        raise ValueError(f"indices must be non-empty integers in [0, {size}) for {path!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    fn = _autodiff_function(chain, layer_index, loss_name)
    chunks = [
        tf.constant(idx[i : i + chunk_size], tf.int32) for i in range(0, idx.size, chunk_size)
    ]
    data, count = batches(chain, x, y, loss_name, batch_size)
    totals, n = _accumulate(
        chain,
        progress_bar(data, count, progress, "autodiff"),
        lambda xb, yb: [fn(xb, yb, c) for c in chunks],
        strategy,
    )
    return (tf.concat(totals, axis=0) / n).numpy()


MAX_BLOCK_WEIGHTS = 12_000


def hessian_block(
    model: keras.Model,
    x: Data,
    y: np.ndarray | None = None,
    *,
    paths: Sequence[str],
    batch_size: int = 1000,
    chunk_size: int = 250,
    loss: LossName | None = None,
) -> np.ndarray:
    """The exact Hessian of the mean loss with respect to the kernels ``paths`` (cross terms
    included), by double differentiation through the Keras model.

    Rows and columns follow the kernels in the order given, each flattened row-major. The matrix
    has ``P x P`` entries for ``P`` weights in all, so this is for blocks of at most
    ``MAX_BLOCK_WEIGHTS`` weights (e.g. the last layers of the MNIST network), used to measure
    the cross terms that OBD neglects.
    """
    chain, loss_name = _prepare(model, loss)
    steps = {step.path: step for step in chain.steps}
    unknown = [p for p in paths if p not in steps]
    if not paths or unknown or len(set(paths)) != len(paths):
        raise ValueError(
            f"paths must be distinct prunable kernels of model {model.name!r}; unknown {unknown}, "
            f"known {sorted(steps)}"
        )
    variables = [steps[p].kernel.value for p in paths]
    size = sum(math.prod(v.shape) for v in variables)
    if size > MAX_BLOCK_WEIGHTS:
        raise ValueError(
            f"a Hessian block of {size} weights is too large (at most {MAX_BLOCK_WEIGHTS})"
        )
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")

    def build() -> Callable:
        def rows(xb: tf.Tensor, yb: tf.Tensor, idx: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as outer:
                outer.watch(variables)
                with tf.GradientTape() as inner:
                    inner.watch(variables)
                    total = _model_loss_sum(chain, xb, yb, loss_name)
                grads = inner.gradient(total, variables)
                selected = tf.gather(tf.concat([tf.reshape(g, [-1]) for g in grads], 0), idx)
            blocks = outer.jacobian(selected, variables)
            return tf.concat([tf.reshape(b, [tf.shape(idx)[0], -1]) for b in blocks], axis=1)

        specs = [
            tf.TensorSpec((None, *chain.input_shape), chain.dtype),
            label_spec(chain, loss_name),
            tf.TensorSpec([None], tf.int32),
        ]
        return tf.function(rows, input_signature=specs)

    fn = _compiled(chain, f"hessian[{','.join(paths)}]/{loss_name}", build)
    chunks = [
        tf.range(i, min(i + chunk_size, size), dtype=tf.int32) for i in range(0, size, chunk_size)
    ]
    data, _ = batches(chain, x, y, loss_name, batch_size)
    totals, n = _accumulate(chain, data, lambda xb, yb: [fn(xb, yb, c) for c in chunks])
    return (tf.concat(totals, axis=0) / n).numpy()


def mean_loss(
    model: keras.Model,
    x: Data,
    y: np.ndarray | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    loss: LossName | None = None,
) -> float:
    """The mean loss over the data, from the helpers' own forward pass (used to check it)."""
    chain, loss_name = _prepare(model, loss)
    data, _ = batches(chain, x, y, loss_name, batch_size)

    def build() -> Callable:
        def body(xb: tf.Tensor, yb: tf.Tensor) -> list[tf.Tensor]:
            *_, out = _forward(chain, xb)
            value, *_ = output_boundary(out, yb, loss_name, chain.num_outputs)
            return [tf.reduce_sum(value)]

        specs = [
            tf.TensorSpec((None, *chain.input_shape), chain.dtype),
            label_spec(chain, loss_name),
        ]
        return tf.function(body, input_signature=specs)

    fn = _compiled(chain, f"loss/{loss_name}", build)
    totals, n = _accumulate(chain, data, fn)
    return float(totals[0].numpy()) / n


def as_flat(values: Mapping[str, np.ndarray]) -> np.ndarray:
    """Concatenate a ``{path: array}`` dictionary into one vector, in its order."""
    return np.concatenate([np.asarray(v).reshape(-1) for v in values.values()])


__all__ = [
    "METHODS",
    "as_flat",
    "autodiff_entries",
    "gradients",
    "hessian_block",
    "mean_loss",
    "second_derivatives",
    "tracing_counts",
]
