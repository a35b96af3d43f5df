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
    tests and small models; its cost grows with the number of weights. It refuses
    (:class:`~helpers.network.UnsupportedModelError`) the kernels before a ``MaxPooling2D``
    whose output keeps its input shape (strides 1 with ``"same"`` padding, or a 1x1 pool):
    TensorFlow's CPU kernel for the second derivative of max pooling (``MaxPoolGradGrad``,
    TensorFlow 2.21) may then reuse the buffer of its incoming gradient for its output, which it
    zeroes before reading that gradient, so inside ``tf.function`` those Hessian rows come out as
    zeros (eagerly the buffer is shared and the result is right). Use ``"exact"`` for them; the
    tests check it there against finite differences of :func:`gradients`.

Chains with ``Conv2D`` and pooling layers (:mod:`helpers.network`) use the same recursions,
operation by operation. A convolution weight is shared by all output positions, and its second
derivative sums over the connections it controls (LeCun, Denker & Solla 1989, Eq. 5):
``"lecun"`` backpropagates :math:`h` with the squared kernel (a transposed convolution with
:math:`W^2`) and sums :math:`z_{in}^2 h` over positions (the convolution's filter gradient of
:math:`z_{in}^2` and :math:`h`), dropping the cross terms between positions; ``"exact"`` squares
each sample's per-class filter gradient :math:`(\sum_p z_{in,p}\,\delta_p)^2`, cross terms
included, at about K gradient passes for K classes (see :func:`_exact_gauss_newton_ops_batch`).
Max pooling routes to each window's argmax; average pooling's Jacobian has entries
:math:`1/k`, squared :math:`1/k^2`. At a tie (several inputs of a window equal to its maximum)
max pooling is not differentiable; TensorFlow's gradient and its second derivative both take the
first maximal input in row-major order, and so does every method here, so ``"exact"`` and
``"autodiff"`` agree there too. The usual ties, ReLU outputs of 0, contribute nothing whichever
input is taken (ReLU'(0) = 0).

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
from helpers.network import (
    Chain,
    ConvStep,
    DenseStep,
    FlattenStep,
    PoolStep,
    UnsupportedModelError,
    as_chain,
    check_finite_weights,
)
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


# --------------------------------------------------------------------------------------------
# Chains with Conv2D and pooling layers: the same recursions, operation by operation
# --------------------------------------------------------------------------------------------
#
# Tensors keep their spatial shape (batch, height, width, channels) until a Flatten. Backward
# passes run on a *folded* batch: R stacked copies of the data batch (R = 1 for "lecun", the K
# loss-Hessian factors for "exact", the n rows of a Hessian block for the smooth "exact"), row
# r * B + b belonging to sample b. Every backward step is one batched TensorFlow op over the
# folded batch (a transposed convolution, a pooling gradient, a matmul, a reshape): no loop over
# positions, samples or classes.


def _spatial(strides: tuple[int, int]) -> list[int]:
    return [1, strides[0], strides[1], 1]


def _pool(op: PoolStep, z: tf.Tensor) -> tf.Tensor:
    """The pooling layer's output, with the same TensorFlow op as Keras' TensorFlow backend."""
    pool = tf.nn.max_pool2d if op.kind == "max" else tf.nn.avg_pool2d
    return pool(z, list(op.pool_size), list(op.strides), op.padding)


def _window_counts(op: PoolStep, shape: tuple[int, ...], dtype: tf.DType) -> tf.Tensor:
    """How many input positions each pooling window covers, (1, H_out, W_out, 1): the window size,
    or fewer at the borders with "same" padding (where TensorFlow averages the valid ones)."""
    ones = tf.ones((1, shape[0], shape[1], 1), dtype)
    window = tf.ones((*op.pool_size, 1, 1), dtype)
    return tf.nn.conv2d(ones, window, _spatial(op.strides), op.padding)


def _forward_ops(
    chain: Chain, x: tf.Tensor
) -> tuple[list[tf.Tensor], list[tuple[tf.Tensor, tf.Tensor] | None], tf.Tensor]:
    """Every operation's input, (f'(a), f''(a)) for the weighted ones (None for the others),
    and the output (logits)."""
    z = x
    inputs: list[tf.Tensor] = []
    derivatives: list[tuple[tf.Tensor, tf.Tensor] | None] = []
    for op in chain.ops:
        inputs.append(z)
        if isinstance(op, PoolStep):
            z = _pool(op, z)
            derivatives.append(None)
            continue
        if isinstance(op, FlattenStep):
            z = tf.reshape(z, [-1, math.prod(z.shape[1:])])
            derivatives.append(None)
            continue
        kernel = tf.convert_to_tensor(op.kernel)
        if isinstance(op, ConvStep):
            a = tf.nn.conv2d(z, kernel, _spatial(op.strides), op.padding)
        else:
            a = tf.matmul(z, kernel)
        if op.bias is not None:
            a = a + tf.convert_to_tensor(op.bias)
        z, d1, d2 = _derivatives(op.activation, a)
        derivatives.append((d1, d2))
    return inputs, derivatives, z


def _op_backward(
    chain: Chain, i: int, z_in: tf.Tensor, v: tf.Tensor, repeats: int, squared: bool
) -> tf.Tensor:
    r"""Backpropagate the folded batch ``v`` (R*B, *output shape) through operation ``i`` to its
    input: :math:`J^\top v`, or with ``squared`` :math:`(J \odot J)^\top v` (the Jacobian's
    entries squared, as LeCun's diagonal recursion needs). ``z_in`` is the operation's input
    for the B samples (max pooling routes by it); ``repeats`` is R."""
    op = chain.ops[i]
    shape = chain.shapes[i]
    if isinstance(op, FlattenStep):
        return tf.reshape(v, [-1, *shape])
    if isinstance(op, DenseStep):
        kernel = tf.convert_to_tensor(op.kernel)
        return tf.matmul(v, tf.square(kernel) if squared else kernel, transpose_b=True)
    if isinstance(op, ConvStep):
        kernel = tf.convert_to_tensor(op.kernel)
        return tf.nn.conv2d_transpose(
            v,
            tf.square(kernel) if squared else kernel,
            tf.concat([tf.shape(v)[:1], tf.constant(shape, tf.int32)], 0),
            _spatial(op.strides),
            op.padding,
        )
    ksize = [1, op.pool_size[0], op.pool_size[1], 1]
    if op.kind == "max":  # a 0/1 selection of each window's argmax: J squared is J
        z = z_in if repeats == 1 else tf.tile(z_in, [repeats, 1, 1, 1])
        return tf.raw_ops.MaxPoolGrad(
            orig_input=z,
            orig_output=_pool(op, z),
            grad=v,
            ksize=ksize,
            strides=_spatial(op.strides),
            padding=op.padding,
        )
    if squared:  # J has entries 1 / (window count), so J squared has 1 / count^2
        v = v / _window_counts(op, shape, v.dtype)
    return tf.raw_ops.AvgPoolGrad(
        orig_input_shape=tf.concat([tf.shape(v)[:1], tf.constant(shape, tf.int32)], 0),
        grad=v,
        ksize=ksize,
        strides=_spatial(op.strides),
        padding=op.padding,
    )


def _patches(op: ConvStep, z: tf.Tensor) -> tf.Tensor:
    """The input window of every output position, (B, P, kh * kw * c_in) in the kernel's
    row-major order, so that conv2d(z, W) = patches @ W.reshape(-1, c_out)."""
    kh, kw, c_in, _ = op.kernel.shape
    patches = tf.image.extract_patches(
        z, [1, kh, kw, 1], _spatial(op.strides), [1, 1, 1, 1], op.padding
    )
    return tf.reshape(patches, [tf.shape(z)[0], -1, kh * kw * c_in])


def _first_weighted(chain: Chain) -> int:
    return next(i for i, op in enumerate(chain.ops) if isinstance(op, (DenseStep, ConvStep)))


def _unfold(v: tf.Tensor, repeats: int) -> tf.Tensor:
    """(R*B, ...) -> (R, B, ...)."""
    return tf.reshape(v, [repeats, -1, *v.shape[1:]])


def _lecun_ops_batch(
    chain: Chain, x: tf.Tensor, y: tf.Tensor, loss: LossName, full: bool
) -> list[tf.Tensor]:
    r"""LeCun's diagonal recursion through Dense, Conv2D, pooling and Flatten operations.

    A convolution backpropagates :math:`h` with the squared kernel (a transposed convolution
    with :math:`W^2`); a shared kernel weight's diagonal is the sum over the connections it
    controls (LeCun, Denker & Solla 1989, Eq. 5), :math:`\sum_{\text{positions}} z_{in}^2 h`,
    which is the filter gradient of the convolution applied to :math:`z_{in}^2` and :math:`h`.
    Max pooling routes to the argmax; average pooling has Jacobian entries :math:`1/k`, squared
    :math:`1/k^2`. Costs about two gradient passes.
    """
    inputs, derivatives, out = _forward_ops(chain, x)
    _, g, s_diag, _ = output_boundary(out, y, loss, chain.num_outputs)
    h, delta = s_diag, g  # d2l/dz^2 (diagonal) and dl/dz at the current operation's output
    result: list[tf.Tensor] = []
    first = _first_weighted(chain)
    for i in range(len(chain.ops) - 1, first - 1, -1):
        op = chain.ops[i]
        if derivatives[i] is not None:
            d1, d2 = derivatives[i]
            h = tf.square(d1) * h
            if full:
                h = h + d2 * delta
                delta = d1 * delta
            z2 = tf.square(inputs[i])
            if isinstance(op, ConvStep):
                result.append(
                    tf.raw_ops.Conv2DBackpropFilter(
                        input=z2,
                        filter_sizes=tf.constant([int(d) for d in op.kernel.shape], tf.int32),
                        out_backprop=h,
                        strides=_spatial(op.strides),
                        padding=op.padding,
                    )
                )
            else:
                result.append(tf.matmul(z2, h, transpose_a=True))
        if i == first:
            break
        h_next = _op_backward(chain, i, inputs[i], h, 1, squared=True)
        if full:
            delta = _op_backward(chain, i, inputs[i], delta, 1, squared=False)
        h = h_next
    return result[::-1]


def _squared_gradient_sums_ops(
    chain: Chain,
    inputs: list[tf.Tensor],
    derivatives: list[tuple[tf.Tensor, tf.Tensor] | None],
    vectors: tf.Tensor,
    repeats: int,
) -> list[tf.Tensor]:
    r"""Sum over samples and over R folded vectors of the squared per-sample kernel gradients
    :math:`(J^\top v)^2`, through Dense, Conv2D, pooling and Flatten operations.

    ``vectors`` (R*B, m) holds R vectors per sample at the output (row r * B + b belongs to
    sample b), ``inputs`` and ``derivatives`` come from :func:`_forward_ops`; all R are
    backpropagated together as one folded batch. A Dense weight controls one connection, so its
    per-sample gradient is a product and the sum over samples a matmul. A convolution weight is
    shared by every output position, so its squared gradient is
    :math:`(\sum_p z_{in,p} \delta_p)^2`, not a sum of squares: the filter gradient is formed per
    sample and per vector (an einsum of the input patches with the backpropagated vectors) and
    then squared. Cost: R backward passes over the data plus R * B * P * F * C_out multiply-adds
    and R * B * F * C_out memory per convolution (P output positions, F = kh * kw * C_in).
    """
    result: list[tf.Tensor] = []
    first = _first_weighted(chain)
    for i in range(len(chain.ops) - 1, first - 1, -1):
        op = chain.ops[i]
        if derivatives[i] is not None:
            d1, _ = derivatives[i]
            unfolded = _unfold(vectors, repeats) * d1[None]  # (R, B, *output shape)
            vectors = tf.reshape(unfolded, tf.shape(vectors))
            if isinstance(op, ConvStep):
                patches = _patches(op, inputs[i])  # (B, P, F)
                deltas = tf.reshape(
                    unfolded, [repeats, tf.shape(patches)[0], tf.shape(patches)[1], -1]
                )  # (R, B, P, C_out)
                per_sample = tf.einsum("bpf,rbpo->rbfo", patches, deltas)
                result.append(
                    tf.reshape(tf.reduce_sum(tf.square(per_sample), axis=[0, 1]), op.kernel.shape)
                )
            else:
                result.append(
                    tf.matmul(
                        tf.square(inputs[i]),
                        tf.reduce_sum(tf.square(unfolded), axis=0),
                        transpose_a=True,
                    )
                )
        if i == first:
            break
        vectors = _op_backward(chain, i, inputs[i], vectors, repeats, squared=False)
    return result[::-1]


def _exact_gauss_newton_ops_batch(
    chain: Chain, x: tf.Tensor, y: tf.Tensor, loss: LossName
) -> list[tf.Tensor]:
    r"""Exact diagonal for piecewise-linear chains with Conv2D and pooling: :math:`\sum_k (J^\top
    u_k)^2`, the K vectors :math:`u_k` folded into the batch and backpropagated together
    (:func:`_squared_gradient_sums_ops`, where a convolution weight's per-sample gradient is
    summed over positions before it is squared). Cost: about K gradient passes (K = number of
    outputs).
    """
    inputs, derivatives, out = _forward_ops(chain, x)
    _, _, _, factor = output_boundary(out, y, loss, chain.num_outputs)
    vectors = tf.reshape(factor(), [-1, chain.num_outputs])  # (K*B, m): u_k at the output
    return _squared_gradient_sums_ops(chain, inputs, derivatives, vectors, chain.num_outputs)


def _block_backward(chain: Chain, i: int, z_in: tf.Tensor, m_block: tf.Tensor) -> tf.Tensor:
    r"""Per-sample :math:`J^\top M J` for operation ``i`` (Jacobian J w.r.t. its input), M of
    shape (B, n_out, n_out) -> (B, n_in, n_in): the rows of M, then the rows of M J, folded into
    the batch and backpropagated."""
    op = chain.ops[i]
    if isinstance(op, FlattenStep):
        return m_block  # same entries in the same (row-major) order
    if isinstance(op, DenseStep):
        w = tf.convert_to_tensor(op.kernel)
        return tf.einsum("ij,bjk,lk->bil", w, m_block, w)
    out_shape = list(chain.shapes[i + 1]) if i + 1 < len(chain.ops) else list(chain.output_shape)
    n_out, n_in = math.prod(out_shape), math.prod(chain.shapes[i])
    rows = tf.reshape(tf.transpose(m_block, [1, 0, 2]), [-1, *out_shape])  # (n_out*B, out)
    mj = tf.reshape(_op_backward(chain, i, z_in, rows, n_out, False), [n_out, -1, n_in])
    cols = tf.reshape(tf.transpose(mj, [2, 1, 0]), [-1, *out_shape])  # (n_in*B, out)
    jmj = tf.reshape(_op_backward(chain, i, z_in, cols, n_in, False), [n_in, -1, n_in])
    return tf.transpose(jmj, [1, 0, 2])


def _exact_block_ops_batch(
    chain: Chain, x: tf.Tensor, y: tf.Tensor, loss: LossName
) -> list[tf.Tensor]:
    r"""Exact diagonal for chains with Conv2D and smooth activations: the per-sample Hessian with
    respect to every operation's output, :math:`M \leftarrow J^\top M J` through each operation
    and :math:`F' M F' + \mathrm{diag}(f'' \partial\ell/\partial z)` through each activation.
    A convolution weight's entry sums :math:`z_{in,p} z_{in,q} M_{(p,o),(q,o)}` over all pairs of
    output positions. Memory :math:`O(B n^2)` and time :math:`O(B n^2)` backward passes' worth
    for a layer of n units: for small networks only."""
    inputs, derivatives, out = _forward_ops(chain, x)
    _, g, _, factor = output_boundary(out, y, loss, chain.num_outputs)
    u = factor()  # (K, B, m)
    m_block = tf.einsum("kbi,kbj->bij", u, u)  # loss Hessian w.r.t. the output, per sample
    delta = g
    result: list[tf.Tensor] = []
    first = _first_weighted(chain)
    for i in range(len(chain.ops) - 1, first - 1, -1):
        op = chain.ops[i]
        if derivatives[i] is not None:
            d1, d2 = (tf.reshape(d, [tf.shape(d)[0], -1]) for d in derivatives[i])
            flat_delta = tf.reshape(delta, tf.shape(d1))
            m_block = d1[:, :, None] * m_block * d1[:, None, :] + tf.linalg.diag(d2 * flat_delta)
            delta = tf.reshape(d1 * flat_delta, tf.shape(delta))
            if isinstance(op, ConvStep):
                patches = _patches(op, inputs[i])  # (B, P, F)
                c_out = int(op.kernel.shape[-1])
                positions = tf.shape(patches)[1]
                blocks = tf.reshape(m_block, [-1, positions, c_out, positions, c_out])
                same_channel = tf.linalg.diag_part(tf.transpose(blocks, [0, 1, 3, 2, 4]))
                weighted = tf.einsum("bqf,bpqo->bpfo", patches, same_channel)
                result.append(
                    tf.reshape(tf.einsum("bpf,bpfo->fo", patches, weighted), op.kernel.shape)
                )
            else:
                result.append(
                    tf.matmul(tf.square(inputs[i]), tf.linalg.diag_part(m_block), transpose_a=True)
                )
        if i == first:
            break
        m_block = _block_backward(chain, i, inputs[i], m_block)
        delta = _op_backward(chain, i, inputs[i], delta, 1, squared=False)
    return result[::-1]


def _check_autodiff(chain: Chain, paths: Sequence[str], what: str) -> None:
    """Refuse double differentiation of the kernels ``paths`` where TensorFlow gets it wrong.

    A ``MaxPooling2D`` whose output has its input's shape (strides 1 and ``"same"`` padding, or
    a 1x1 pool) lets TensorFlow's CPU ``MaxPoolGradGrad`` kernel take over the buffer of its
    incoming gradient (``forward_input_or_allocate_output``) and zero it before reading it: the
    Hessian rows of every kernel before that layer come out as zeros inside ``tf.function``,
    while the kernels after it are unaffected (module docstring).
    """
    before: list[str] = []
    for i, op in enumerate(chain.ops):
        if isinstance(op, (DenseStep, ConvStep)):
            before.append(op.path)
            continue
        if not (isinstance(op, PoolStep) and op.kind == "max"):
            continue
        affected = [p for p in paths if p in before]
        if affected and chain.shapes[i] == chain.shapes[i + 1]:
            raise UnsupportedModelError(
                f"{what} cannot differentiate {affected} twice through MaxPooling2D layer "
                f"{op.layer.name!r}: its output keeps its input shape {chain.shapes[i]} "
                f"(pool_size={op.pool_size}, strides={op.strides}, padding={op.padding!r}), "
                "where TensorFlow's CPU kernel for the second derivative of max pooling "
                "(MaxPoolGradGrad) reuses its incoming gradient's buffer, zeroes it and silently "
                "returns zeros; use "
                "second_derivatives(..., method='exact') for these kernels"
            )


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
        dense = chain.dense_only
        if method in ("lecun", "lecun-full"):
            lecun = _lecun_batch if dense else _lecun_ops_batch
            body = lambda x, y: lecun(chain, x, y, loss, full=method == "lecun-full")  # noqa: E731
        elif method == "exact" and chain.piecewise_linear:
            exact = _exact_gauss_newton_batch if dense else _exact_gauss_newton_ops_batch
            body = lambda x, y: exact(chain, x, y, loss)  # noqa: E731
        elif method == "exact":
            block = _exact_block_batch if dense else _exact_block_ops_batch
            body = lambda x, y: block(chain, x, y, loss)  # noqa: E731
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
        _check_autodiff(chain, [step.path for step in chain.steps], 'method="autodiff"')
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
    Hessian rows at a time. Useful to spot-check a few weights of a large model. Raises
    :class:`~helpers.network.UnsupportedModelError` for a kernel before a ``MaxPooling2D`` that
    keeps its input shape (module docstring: TensorFlow returns zeros there)."""
    chain, loss_name = _prepare(model, loss)
    by_path = {step.path: i for i, step in enumerate(chain.steps)}
    if path not in by_path:
        raise KeyError(
            f"{path!r} is not a prunable kernel of model {model.name!r}; known: {sorted(by_path)}"
        )
    _check_autodiff(chain, [path], "autodiff_entries")
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


def _is_last_two_block(chain: Chain, paths: Sequence[str]) -> bool:
    """Whether ``paths`` are the last two kernels of a Dense chain ending in logits."""
    return (
        chain.dense_only
        and len(chain.steps) >= 2
        and list(paths) == [chain.steps[-2].path, chain.steps[-1].path]
        and chain.steps[-1].activation in ("linear", "softmax")
    )


def _last_two_block_batch(chain: Chain, x: tf.Tensor, y: tf.Tensor, loss: LossName) -> tf.Tensor:
    """The Hessian of the loss summed over the batch w.r.t. the last two kernels, in closed form.

    Notation per sample: u (J) the input of the next-to-last layer, a = u V + b its
    pre-activation (I), h = f(a), z = h W + c the logits (C), g = dl/dz, S = d2l/dz2 = sum_k
    s_k s_k^T (the loss factor of :func:`helpers.losses.output_boundary`), t_k = f'(a) * (W s_k).
    With every index pair written out (V[j,i], W[i,c]):

    - W-W: sum h_i h_i' S_cc'
    - V-V: sum u_j u_j' (sum_k t_ki t_ki' + delta_ii' f''(a_i) (W g)_i)
    - V-W: sum u_j h_i' sum_k t_ki s_kc + delta_ii' u_j f'(a_i) g_c

    The last term is the one Gauss-Newton leaves out: z is bilinear in (V, W), so
    d2z_c / dV[j,i] dW[i,c] = u_j f'(a_i) is not zero even for ReLU. Each sum over samples is one
    matrix product of per-sample outer products (u u^T with the I x I curvature, and so on): about
    N J^2 I^2 multiply-adds for the V-V block, instead of one Hessian-vector product per row.
    """
    inputs, d1, d2, out = _forward(chain, x)
    _, g, _, factor = output_boundary(out, y, loss, chain.num_outputs)
    u, h = inputs[-2], inputs[-1]  # (B, J), (B, I)
    w = tf.convert_to_tensor(chain.steps[-1].kernel)  # (I, C)
    f1, f2 = d1[-2], d2[-2]  # (B, I)
    s = factor()  # (K, B, C)
    t = tf.matmul(s, w, transpose_b=True) * f1[None]  # (K, B, I)
    n_j, n_i, n_c = u.shape[1], h.shape[1], w.shape[1]

    def outer(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:  # (B, p), (B, q) -> (B, p * q)
        return tf.reshape(a[:, :, None] * b[:, None, :], [tf.shape(a)[0], -1])

    curvature = tf.einsum("kbi,kbl->bil", t, t)  # (B, I, I)
    curvature += tf.linalg.diag(f2 * tf.matmul(g, w, transpose_b=True))
    s_out = tf.einsum("kbc,kbd->bcd", s, s)  # (B, C, C)
    # V-V: [(j, j'), (i, i')] -> [(j, i), (j', i')]
    vv = tf.matmul(outer(u, u), tf.reshape(curvature, [-1, n_i * n_i]), transpose_a=True)
    vv = tf.reshape(
        tf.transpose(tf.reshape(vv, [n_j, n_j, n_i, n_i]), [0, 2, 1, 3]), [n_j * n_i] * 2
    )
    # W-W: [(i, i'), (c, c')] -> [(i, c), (i', c')]
    ww = tf.matmul(outer(h, h), tf.reshape(s_out, [-1, n_c * n_c]), transpose_a=True)
    ww = tf.reshape(
        tf.transpose(tf.reshape(ww, [n_i, n_i, n_c, n_c]), [0, 2, 1, 3]), [n_i * n_c] * 2
    )
    # V-W: [(j, i'), (i, c)] -> [(j, i), (i', c)], plus the bilinear term on i = i'
    mixed = tf.einsum("kbi,kbc->bic", t, s)  # (B, I, C)
    vw = tf.matmul(outer(u, h), tf.reshape(mixed, [-1, n_i * n_c]), transpose_a=True)
    vw = tf.transpose(tf.reshape(vw, [n_j, n_i, n_i, n_c]), [0, 2, 1, 3])
    bilinear = tf.einsum("bj,bi,bc->jic", u, f1, g)  # (J, I, C)
    vw += bilinear[:, :, None, :] * tf.eye(n_i, dtype=u.dtype)[None, :, :, None]
    vw = tf.reshape(vw, [n_j * n_i, n_i * n_c])
    return tf.concat(
        [tf.concat([vv, vw], axis=1), tf.concat([tf.transpose(vw), ww], axis=1)], axis=0
    )


def hessian_block(
    model: keras.Model,
    x: Data,
    y: np.ndarray | None = None,
    *,
    paths: Sequence[str],
    batch_size: int = 1000,
    chunk_size: int = 250,
    loss: LossName | None = None,
    method: Literal["auto", "autodiff"] = "auto",
) -> np.ndarray:
    """The exact Hessian of the mean loss with respect to the kernels ``paths`` (cross terms
    included).

    Rows and columns follow the kernels in the order given, each flattened row-major. The matrix
    has ``P x P`` entries for ``P`` weights in all, so this is for blocks of at most
    ``MAX_BLOCK_WEIGHTS`` weights (e.g. the last layers of the MNIST network), used to measure
    the cross terms that OBD neglects.

    With ``method="autodiff"`` it is computed by double differentiation through the Keras model
    (one Hessian-vector product per row, ``chunk_size`` rows at a time). With ``"auto"`` (the
    default) the block of the **last two** ``Dense`` kernels, in that order, of a Dense chain
    whose last layer gives logits (or is softmax folded into cross-entropy) is instead assembled
    from its closed form (:func:`_last_two_block_batch`): the same matrix, about five times
    faster for the MNIST network's 3,000 x 3,000 block; any other block uses autodiff.
    Raises :class:`~helpers.network.UnsupportedModelError` if a kernel in ``paths`` comes before
    a ``MaxPooling2D`` that keeps its input shape (module docstring: TensorFlow returns zeros
    for its rows there).
    """
    if method not in ("auto", "autodiff"):
        raise ValueError(f"method must be 'auto' or 'autodiff', got {method!r}")
    chain, loss_name = _prepare(model, loss)
    steps = {step.path: step for step in chain.steps}
    unknown = [p for p in paths if p not in steps]
    if not paths or unknown or len(set(paths)) != len(paths):
        raise ValueError(
            f"paths must be distinct prunable kernels of model {model.name!r}; unknown {unknown}, "
            f"known {sorted(steps)}"
        )
    _check_autodiff(chain, paths, "hessian_block")
    variables = [steps[p].kernel.value for p in paths]
    size = sum(math.prod(v.shape) for v in variables)
    if size > MAX_BLOCK_WEIGHTS:
        raise ValueError(
            f"a Hessian block of {size} weights is too large (at most {MAX_BLOCK_WEIGHTS})"
        )
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if method == "auto" and _is_last_two_block(chain, paths):
        fn = _compiled(
            chain,
            f"hessian-last-two/{loss_name}",
            lambda: tf.function(
                lambda xb, yb: [_last_two_block_batch(chain, xb, yb, loss_name)],
                input_signature=[
                    tf.TensorSpec((None, *chain.input_shape), chain.dtype),
                    label_spec(chain, loss_name),
                ],
            ),
        )
        data, _ = batches(chain, x, y, loss_name, batch_size)
        (total,), n = _accumulate(chain, data, fn)
        return (total / n).numpy()

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
            *_, out = _forward(chain, xb) if chain.dense_only else _forward_ops(chain, xb)
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
