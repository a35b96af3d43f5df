r"""Cheaper or noisier estimates of the Hessian diagonal, to compare with the exact one.

Each estimator returns what :func:`helpers.curvature.second_derivatives` returns -- a
``{kernel path: array shaped like the kernel}`` dictionary for the mean loss over the data, in
the same normalisation -- so it can be put side by side with ``method="exact"`` and scored by
:func:`fidelity`. Notation as in :mod:`helpers.curvature`: layer :math:`l` computes
:math:`a_l = z_{l-1} W_l + b_l`, :math:`z_l = f_l(a_l)`; :math:`o = z_L` is the output (logits)
and :math:`g = \partial\ell/\partial o` the loss gradient at the output. The per-sample gradient
of a kernel weight is :math:`z_{l-1,i}\,\delta_{l,j}` with the backpropagated
:math:`\delta_L = f_L' \odot g`, :math:`\delta_{l-1} = f_{l-1}' \odot (\delta_l W_l^\top)`, so
for a ``Dense`` layer the sum over samples of squared per-sample gradients is one matmul,
:math:`(z_{l-1}^{\odot 2})^\top \delta_l^{\odot 2}`, with no per-sample loop.

Chains with ``Conv2D``, pooling and ``Flatten`` layers (:mod:`helpers.network`) are supported
too. A convolution kernel weight is shared by every output position :math:`p`, so its
per-sample gradient is a **sum over positions**, :math:`\sum_p z_{in,p}\,\delta_p` (input patch
times output delta), and it is squared *after* that sum: the square is not the sum of the
per-position squares (that would drop the cross terms between positions, as LeCun's diagonal
recursion does). The per-sample filter gradients are formed for the whole batch at once, an
einsum of the input patches (``tf.image.extract_patches``, (B, P, kh*kw*c_in)) with the
backpropagated deltas (B, P, c_out), then squared and summed over samples; the deltas come from
the same batched backward passes (transposed convolutions, pooling gradients) that
:func:`helpers.curvature.second_derivatives` uses for ``method="exact"``
(:func:`helpers.curvature._squared_gradient_sums_ops`). Memory per batch grows with
``samples * batch_size * kh*kw*c_in * c_out`` for each convolution (and ``batch_size * P *
kh*kw*c_in`` for its patches): lower ``batch_size`` for large draws.

``empirical_fisher``
    :math:`\frac1N\sum_n (\nabla_w \ell_n)^2` at the **true** labels: the output curvature
    :math:`S` is replaced by the outer product of the residual :math:`g = p - e_y`. Not an
    estimate of the Hessian: near a minimum the residuals of well-fitted samples are small, so
    it comes out far smaller than the Gauss-Newton diagonal (its ranking can still be close).
``monte_carlo_fisher``
    The same with :math:`g` replaced by :math:`\tilde g = p - e_{\tilde y}`, labels
    :math:`\tilde y \sim \mathrm{softmax}(o)` drawn from the model itself (``samples`` draws per
    input). Since :math:`E[\tilde g \tilde g^\top] = \mathrm{diag}(p) - pp^\top = S`, the loss
    Hessian at the output, :math:`E[(J^\top \tilde g)^2] = \mathrm{diag}(J^\top S J)`: unbiased
    for the Gauss-Newton (Fisher) diagonal, which for ReLU/linear networks with softmax
    cross-entropy is the exact Hessian diagonal. For ``"mse"`` the model distribution is
    :math:`t \sim \mathcal N(o, \tfrac m2 I)` (whose negative log-likelihood is the loss), i.e.
    :math:`\tilde g = \sqrt{2/m}\,\varepsilon`, :math:`\varepsilon \sim \mathcal N(0, I)`.
``hutchinson``
    :math:`\mathrm{diag}(H) = E_v[v \odot Hv]` for Rademacher :math:`v` (entries :math:`\pm1`),
    :math:`H` the Hessian of the mean loss with respect to all kernels together (cross-layer
    blocks included, biases held fixed). Hessian-vector products by double backward
    differentiation through the Keras model, summed over batches; unbiased for the exact diagonal
    for any activation, with a variance that grows with the off-diagonal mass of :math:`H`.
    Refused (:class:`~helpers.network.UnsupportedModelError`, the check of
    :func:`helpers.curvature.second_derivatives`' ``method="autodiff"``) when a kernel comes
    before a ``MaxPooling2D`` that keeps its input shape, where TensorFlow's CPU second
    derivative of max pooling returns zeros inside ``tf.function``; the Fisher estimators only
    differentiate once and accept those chains.

Randomness is seeded: ``monte_carlo_fisher`` draws with TensorFlow's stateless ops keyed by
``(seed, batch index)``, ``hutchinson`` with NumPy generators keyed by ``(seed, probe index)``
(:func:`rademacher_probes`), so the same ``seed`` (and, for the Monte Carlo Fisher, the same
batching) gives the same numbers. Every per-batch computation is compiled with ``tf.function``
once per model (see :func:`tracing_counts`) and runs in the model's dtype (float32 for the MNIST
network).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

# the curvature module's chain checks, forward and backward passes (same package, shared on
# purpose)
from helpers.curvature import (
    DEFAULT_BATCH_SIZE,
    _check_autodiff,
    _forward_ops,
    _prepare,
    _squared_gradient_sums_ops,
)
from helpers.curvature import _forward as _dense_forward
from helpers.distribute import sum_over_batches
from helpers.inputs import Data, batches, label_spec, progress_bar
from helpers.losses import LossName, output_boundary, per_sample_loss
from helpers.network import Chain, as_chain
from helpers.runtime import keras, tf

MAX_SEED = 2**31 - 1
_EMPTY = "the data is empty: curvature of a mean over zero samples is undefined"


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _seed(value: object) -> int:
    if (
        not isinstance(value, int | np.integer)
        or isinstance(value, bool)
        or not 0 <= value <= MAX_SEED
    ):
        raise ValueError(f"seed must be an int in [0, {MAX_SEED}], got {value!r}")
    return int(value)


# --------------------------------------------------------------------------------------------
# Squared per-sample kernel gradients (forward and conv backward passes: helpers.curvature's)
# --------------------------------------------------------------------------------------------

SquaredSums = Callable[[tf.Tensor], list[tf.Tensor]]


def _forward(chain: Chain, x: tf.Tensor) -> tuple[tf.Tensor, SquaredSums]:
    """The output o (logits; a final softmax is part of the loss and treated as the identity)
    and a function mapping output gradients (S, B, m) to the sums over samples and draws of the
    squared per-sample gradient of every kernel.

    Dense chains use this module's matmul recursion (:func:`_squared_gradient_sums`); chains
    with Conv2D and pooling layers the folded backward pass of :mod:`helpers.curvature`, which
    squares each sample's filter gradient after summing it over positions.
    """
    if chain.dense_only:
        inputs, slopes, _, out = _dense_forward(chain, x)
        return out, lambda grads: _squared_gradient_sums(chain, inputs, slopes, grads)
    op_inputs, derivatives, out = _forward_ops(chain, x)

    def conv_sums(grads: tf.Tensor) -> list[tf.Tensor]:
        draws = grads.shape[0]  # static: 1, or the number of samples
        folded = tf.reshape(grads, [-1, chain.num_outputs])  # (S*B, m), row s * B + b
        return _squared_gradient_sums_ops(chain, op_inputs, derivatives, folded, draws)

    return out, conv_sums


def _squared_gradient_sums(
    chain: Chain, inputs: list[tf.Tensor], slopes: list[tf.Tensor], output_grads: tf.Tensor
) -> list[tf.Tensor]:
    """Sum over samples and draws of squared per-sample kernel gradients.

    ``output_grads`` has shape (S, B, m): S output gradients per sample (S draws, or S = 1),
    all backpropagated together as one batch of S * B rows.
    """
    draws = tf.shape(output_grads)[0]
    rows = tf.shape(output_grads)[1]
    last = len(chain.steps) - 1
    delta = output_grads * slopes[last][None]  # (S, B, m)
    result: list[tf.Tensor] = [None] * len(chain.steps)  # type: ignore[list-item]
    for k in range(last, -1, -1):
        squared = tf.reduce_sum(tf.square(delta), axis=0)  # (B, n_k): sum over draws
        result[k] = tf.matmul(tf.square(inputs[k]), squared, transpose_a=True)
        if k == 0:
            break
        flat = tf.reshape(delta, [draws * rows, -1])
        back = tf.matmul(flat, tf.convert_to_tensor(chain.steps[k].kernel), transpose_b=True)
        delta = tf.reshape(back, [draws, rows, -1]) * slopes[k - 1][None]
    return result


def _empirical_batch(chain: Chain, x: tf.Tensor, y: tf.Tensor, loss: LossName) -> list[tf.Tensor]:
    out, squared_sums = _forward(chain, x)
    _, g, _, _ = output_boundary(out, y, loss, chain.num_outputs)
    return squared_sums(g[None])


def _sampled_output_gradients(
    out: tf.Tensor, loss: LossName, samples: int, seed: tf.Tensor, num_outputs: int
) -> tf.Tensor:
    """(S, B, m) loss gradients at the output for targets drawn from the model's distribution."""
    if loss == "softmax_cross_entropy":
        labels = tf.random.stateless_categorical(out, samples, seed=seed)  # (B, S)
        onehot = tf.one_hot(tf.transpose(labels), num_outputs, dtype=out.dtype)  # (S, B, m)
        return tf.nn.softmax(out)[None] - onehot
    noise = tf.random.stateless_normal(
        tf.concat([[samples], tf.shape(out)], axis=0), seed=seed, dtype=out.dtype
    )
    return tf.sqrt(tf.constant(2 / num_outputs, out.dtype)) * noise


def _monte_carlo_batch(
    chain: Chain, x: tf.Tensor, y: tf.Tensor, seed: tf.Tensor, loss: LossName, samples: int
) -> list[tf.Tensor]:
    del y  # validated (label range) but unused: the targets are drawn from the model
    out, squared_sums = _forward(chain, x)
    return squared_sums(_sampled_output_gradients(out, loss, samples, seed, chain.num_outputs))


# --------------------------------------------------------------------------------------------
# Hutchinson: Rademacher probes and Hessian-vector products through the Keras model
# --------------------------------------------------------------------------------------------


def _hutchinson_batch(
    chain: Chain, x: tf.Tensor, y: tf.Tensor, probes: list[tf.Tensor], loss: LossName
) -> list[tf.Tensor]:
    """sum_p v_p * (H_batch v_p) per kernel, H_batch the Hessian of the batch's summed loss."""
    kernels = [step.kernel.value for step in chain.steps]
    final_softmax = chain.steps[-1].activation == "softmax"
    with tf.GradientTape(persistent=True) as outer:
        outer.watch(kernels)
        with tf.GradientTape() as inner:
            inner.watch(kernels)
            output = chain.model(x, training=False)
            total = tf.reduce_sum(per_sample_loss(output, y, loss, from_logits=not final_softmax))
        grads = inner.gradient(total, kernels)

    def hessian_vector_product(vs: tuple[tf.Tensor, ...]) -> list[tf.Tensor]:
        return outer.gradient(grads, kernels, output_gradients=list(vs))

    # all probes at once: the double-backward graph vectorised over the probe axis
    products = tf.vectorized_map(hessian_vector_product, tuple(probes))
    return [tf.reduce_sum(v * hv, axis=0) for v, hv in zip(probes, products, strict=True)]


def rademacher_probes(model: keras.Model, probes: int, seed: int) -> dict[str, np.ndarray]:
    """The probe vectors :func:`hutchinson` uses: ``{path: array (probes, *kernel.shape)}`` of
    ±1 in the model's dtype.

    Probe ``p`` covers all kernels as one vector drawn by NumPy's generator seeded with
    ``[seed, p]`` (reproducible across platforms and NumPy versions that keep ``default_rng``'s
    stream), so the first ``k`` probes are the same whatever ``probes`` is.
    """
    probes = _positive_int("probes", probes)
    seed = _seed(seed)
    chain = as_chain(model)
    sizes = [math.prod(step.kernel.shape) for step in chain.steps]
    signs = np.empty((probes, sum(sizes)), dtype=chain.dtype)
    for p in range(probes):
        bits = np.random.default_rng([seed, p]).integers(0, 2, size=sum(sizes), dtype=np.int8)
        signs[p] = 2 * bits - 1
    out: dict[str, np.ndarray] = {}
    start = 0
    for step, size in zip(chain.steps, sizes, strict=True):
        out[step.path] = signs[:, start : start + size].reshape(probes, *step.kernel.shape)
        start += size
    return out


# --------------------------------------------------------------------------------------------
# Compiled functions, cached on the model (traced once per model, estimator and loss)
# --------------------------------------------------------------------------------------------

_CACHE_ATTRIBUTE = "_helpers_approximation_functions"


def _compiled(chain: Chain, key: str, build: Callable[[], Callable]) -> Callable:
    cache = chain.model.__dict__.get(_CACHE_ATTRIBUTE)
    if cache is None:
        cache = {}
        object.__setattr__(chain.model, _CACHE_ATTRIBUTE, cache)
    if key not in cache:
        cache[key] = build()
    return cache[key]


def tracing_counts(model: keras.Model) -> dict[str, int]:
    """How many times each compiled estimator of ``model`` has been traced (1: no retracing)."""
    cache = model.__dict__.get(_CACHE_ATTRIBUTE, {})
    return {key: fn.experimental_get_tracing_count() for key, fn in cache.items()}


def _checked_labels(chain: Chain, y: tf.Tensor, loss: LossName) -> list:
    """Graph-side label range checks (array inputs are checked up front; datasets are not)."""
    if loss != "softmax_cross_entropy":
        return []
    return [
        tf.debugging.assert_non_negative(y, message="labels must be >= 0"),
        tf.debugging.assert_less(
            y, chain.num_outputs, message=f"labels must be < {chain.num_outputs}"
        ),
    ]


def _function(chain: Chain, kind: str, loss: LossName, samples: int = 1) -> Callable:
    x_spec = tf.TensorSpec((None, *chain.input_shape), chain.dtype)
    y_spec = label_spec(chain, loss)

    def build() -> Callable:
        if kind == "empirical":

            def body(x: tf.Tensor, y: tf.Tensor) -> list[tf.Tensor]:
                with tf.control_dependencies(_checked_labels(chain, y, loss)):
                    x = tf.identity(x)
                return _empirical_batch(chain, x, y, loss)

            return tf.function(body, input_signature=[x_spec, y_spec])
        if kind == "monte-carlo":

            def body_mc(x: tf.Tensor, y: tf.Tensor, seed: tf.Tensor) -> list[tf.Tensor]:
                with tf.control_dependencies(_checked_labels(chain, y, loss)):
                    x = tf.identity(x)
                return _monte_carlo_batch(chain, x, y, seed, loss, samples)

            seed_spec = tf.TensorSpec([2], tf.int64)
            return tf.function(body_mc, input_signature=[x_spec, y_spec, seed_spec])

        probe_specs = [
            tf.TensorSpec((None, *step.kernel.shape), chain.dtype) for step in chain.steps
        ]

        def body_h(x: tf.Tensor, y: tf.Tensor, *probes: tf.Tensor) -> list[tf.Tensor]:
            with tf.control_dependencies(_checked_labels(chain, y, loss)):
                x = tf.identity(x)
            return _hutchinson_batch(chain, x, y, list(probes), loss)

        return tf.function(body_h, input_signature=[x_spec, y_spec, *probe_specs])

    key = f"{kind}[{samples}]/{loss}" if kind == "monte-carlo" else f"{kind}/{loss}"
    return _compiled(chain, key, build)


def _mean(chain: Chain, totals: list[tf.Tensor], divisor: int) -> dict[str, np.ndarray]:
    return {step.path: (t / divisor).numpy() for step, t in zip(chain.steps, totals, strict=True)}


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def empirical_fisher(
    model: keras.Model,
    x: Data,
    y: np.ndarray | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    loss: LossName | None = None,
    progress: bool = False,
    strategy: tf.distribute.Strategy | None = None,
) -> dict[str, np.ndarray]:
    """Mean over samples of the squared per-sample gradient of every kernel weight, at the true
    labels (the "empirical Fisher" diagonal).

    Arguments as for :func:`helpers.curvature.second_derivatives`; with a ``tf.distribute``
    ``strategy`` each batch is split across the replicas (the result does not depend on it).
    """
    chain, loss_name = _prepare(model, loss)
    data, count = batches(chain, x, y, loss_name, batch_size)
    fn = _function(chain, "empirical", loss_name)
    totals, n = sum_over_batches(
        progress_bar(data, count, progress, "empirical Fisher"), fn, strategy, _EMPTY
    )
    return _mean(chain, totals, n)


def monte_carlo_fisher(
    model: keras.Model,
    x: Data,
    y: np.ndarray | None = None,
    *,
    samples: int = 1,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    loss: LossName | None = None,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """The Fisher diagonal estimated with ``samples`` targets per input drawn from the model's
    own predictive distribution (module docstring): unbiased for the Gauss-Newton diagonal, which
    is the exact Hessian diagonal for ReLU/linear networks.

    ``y`` is only validated (the estimate does not use it). Batch ``i`` draws from the stateless
    seed ``(seed, i)``, so the result is a deterministic function of ``seed`` and the batching.
    No ``strategy`` argument: the draws are keyed by batch, and splitting a batch across replicas
    would need the random numbers split alongside it.
    """
    samples = _positive_int("samples", samples)
    seed = _seed(seed)
    chain, loss_name = _prepare(model, loss)
    data, count = batches(chain, x, y, loss_name, batch_size)
    fn = _function(chain, "monte-carlo", loss_name, samples)
    index = [0]

    def numbered(items: Iterator) -> Iterator:
        for i, item in enumerate(items):
            index[0] = i
            yield item

    def per_batch(xb: tf.Tensor, yb: tf.Tensor) -> list[tf.Tensor]:
        return fn(xb, yb, tf.constant([seed, index[0]], tf.int64))

    totals, n = sum_over_batches(
        numbered(progress_bar(data, count, progress, "Monte Carlo Fisher")), per_batch, None, _EMPTY
    )
    return _mean(chain, totals, n * samples)


def hutchinson(
    model: keras.Model,
    x: Data,
    y: np.ndarray | None = None,
    *,
    probes: int = 10,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    loss: LossName | None = None,
    progress: bool = False,
    strategy: tf.distribute.Strategy | None = None,
) -> dict[str, np.ndarray]:
    """Hutchinson's estimate of the Hessian diagonal, the mean over ``probes`` Rademacher vectors
    :math:`v` (:func:`rademacher_probes` with ``seed``) of :math:`v \\odot H v`.

    :math:`H v` is the Hessian of the mean loss over all of the data times :math:`v`, summed over
    batches, so the estimate does not depend on ``batch_size`` (nor on ``strategy``). Each batch
    costs one forward and backward pass plus one double-backward pass per probe. Raises
    :class:`~helpers.network.UnsupportedModelError` for a chain with a kernel before a
    ``MaxPooling2D`` that keeps its input shape (module docstring).
    """
    probe_values = rademacher_probes(model, probes, seed)
    chain, loss_name = _prepare(model, loss)
    _check_autodiff(chain, [step.path for step in chain.steps], "hutchinson")
    data, count = batches(chain, x, y, loss_name, batch_size)
    fn = _function(chain, "hutchinson", loss_name)
    probe_tensors = [tf.constant(probe_values[step.path]) for step in chain.steps]
    totals, n = sum_over_batches(
        progress_bar(data, count, progress, "Hutchinson"),
        lambda xb, yb: fn(xb, yb, *probe_tensors),
        strategy,
        _EMPTY,
    )
    return _mean(chain, totals, n * probe_values[chain.steps[0].path].shape[0])


# --------------------------------------------------------------------------------------------
# How close an estimate is to a reference
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fidelity:
    """How well an estimated diagonal matches a reference, over all kernels together."""

    relative_error: float
    """:math:`\\lVert e - r\\rVert_2 / \\lVert r\\rVert_2` over every kernel weight."""
    spearman: float
    """Spearman rank correlation of the estimate with the reference (what a ranking sees)."""


def fidelity(estimate: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> Fidelity:
    """Relative error and Spearman rank correlation of ``estimate`` against ``reference``, both
    ``{kernel path: array}`` dictionaries with the same keys and shapes, pooled over all kernels
    (in the reference's order)."""
    from scipy.stats import spearmanr

    if set(estimate) != set(reference):
        raise ValueError(
            f"estimate and reference have different kernels: only in the estimate "
            f"{sorted(set(estimate) - set(reference))}, only in the reference "
            f"{sorted(set(reference) - set(estimate))}"
        )
    if not reference:
        raise ValueError("the reference is empty")
    for path, ref in reference.items():
        if np.shape(estimate[path]) != np.shape(ref):
            raise ValueError(
                f"{path!r}: estimate has shape {np.shape(estimate[path])}, reference {np.shape(ref)}"
            )
    e = np.concatenate([np.asarray(estimate[p], np.float64).ravel() for p in reference])
    r = np.concatenate([np.asarray(reference[p], np.float64).ravel() for p in reference])
    if not (np.all(np.isfinite(e)) and np.all(np.isfinite(r))):
        raise ValueError("estimate or reference contains NaN or infinite values")
    norm = float(np.linalg.norm(r))
    if norm == 0:
        raise ValueError("the reference is zero everywhere: a relative error is undefined")
    return Fidelity(
        relative_error=float(np.linalg.norm(e - r)) / norm,
        spearman=float(spearmanr(e, r).statistic),
    )


__all__ = [
    "Fidelity",
    "empirical_fisher",
    "fidelity",
    "hutchinson",
    "monte_carlo_fisher",
    "rademacher_probes",
    "tracing_counts",
]
