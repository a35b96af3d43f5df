r"""Optimal Brain Surgeon: delete a weight *and* move the others to make up for it.

**The derivation.** Near a trained minimum (gradient zero) the second-order Taylor expansion of
the loss for a change :math:`\delta w` of all the weights is

.. math:: \delta E \approx \tfrac12\, \delta w^\top H\, \delta w .

Deleting weight :math:`q` is the constraint :math:`e_q^\top (w + \delta w) = 0`. OBD sets
:math:`\delta w = -w_q e_q` (nothing else moves) and keeps only the diagonal of :math:`H`.
OBS (Hassibi & Stork, 1993) instead minimises :math:`\tfrac12\delta w^\top H\delta w` under the
constraint; the Lagrangian :math:`\tfrac12\delta w^\top H\delta w + \mu(e_q^\top\delta w + w_q)`
gives :math:`H\delta w = -\mu e_q`, and the constraint fixes :math:`\mu`:

.. math:: \delta w = -\frac{w_q}{[H^{-1}]_{qq}}\, H^{-1} e_q, \qquad
          L_q = \frac{w_q^2}{2\,[H^{-1}]_{qq}} ,

the *saliency* :math:`L_q` being the minimum value (the predicted loss increase after the
update). The weight with the smallest :math:`L_q` goes first.

**OBD is the special case** where :math:`H` is taken diagonal: then
:math:`[H^{-1}]_{qq} = 1/h_{qq}`, so :math:`L_q = \tfrac12 h_{qq} w_q^2` (OBD's saliency) and
:math:`H^{-1}e_q = e_q/h_{qq}`, so :math:`\delta w = -w_q e_q`: no other weight is updated.

**Removing many weights.** Once :math:`q` is fixed at zero, the remaining weights :math:`R` see the
Hessian :math:`H_{RR}`, whose inverse is the Schur complement of :math:`[H^{-1}]_{qq}` in
:math:`H^{-1}`: the rank-one downdate

.. math:: H^{-1} \leftarrow H^{-1} - \frac{H^{-1} e_q e_q^\top H^{-1}}{[H^{-1}]_{qq}}

(row and column :math:`q` become zero, the rest is :math:`(H_{RR})^{-1}`). Repeating
saliency - update - downdate removes weights one at a time in :math:`O(P^2)` each. With
:math:`H` fixed, the weights after removing a set :math:`S` this way are exactly the minimiser of
:math:`\tfrac12\delta w^\top H\delta w` with all of :math:`S` at zero (the later steps keep the
earlier constraints, since :math:`H^{-1}` has zero rows there), and the saliencies of the steps
add up to that minimum. Damping: :math:`H + \lambda I` with
:math:`\lambda = \text{damping}\times\operatorname{mean}\operatorname{diag} H` keeps the inverse
finite when :math:`H` is singular (inputs that are always zero, fewer samples than weights).

Three levels are provided:

- primitives on a vector and an inverse Hessian: :func:`obs_saliencies`, :func:`obs_update`,
  :func:`downdate_inverse`, :func:`obs_step`;
- **exact OBS** of a whole network: :func:`obs_prune_exact` on any positive definite matrix,
  :func:`gauss_newton` (the :math:`P\times P` Gauss-Newton matrix of the mean loss for all
  kernels) and :func:`obs_prune_model`. Memory :math:`8P^2` bytes and time :math:`\approx P^3/3`
  for a full removal path, so this is for small networks (a few thousand weights, e.g.
  784-3-10 with 2,382 weights, or 196-10-10 on 14x14 images with 2,060);
- **layer-wise OBS** at full size (the "Optimal Brain Compression" formulation of Frantar &
  Alistarh, 2022): :class:`LayerwiseOBS` and :func:`layerwise_obs`, see below.

Every OBS routine here **updates the surviving weights**: the returned / written kernels differ
from the original ones everywhere, not only at the removed positions (which are exactly 0).

**Layer-wise OBS.** A ``Dense`` layer computes :math:`a = XW + b` for the layer inputs
:math:`X` (:math:`N\times n_{in}`, here from calibration images). Instead of the network's loss,
each output column :math:`j` is asked to reproduce its pre-activations,
:math:`E_j(\hat w_j) = \frac1N\lVert X w_j - X\hat w_j\rVert^2`, an exactly quadratic function
of :math:`\hat w_j` with Hessian :math:`H = 2X^\top X/N`, the same for every column and
independent of :math:`W`; damped, :math:`H + \lambda I` with :math:`\lambda` = ``damping`` (default
1%) of its mean diagonal. Each column runs greedy OBS on its own copy of :math:`H^{-1}` down to
zero weights (:func:`column_paths`), recording which input goes at each step and by how much
:math:`E_j` grows; because :math:`E_j` is quadratic these predictions are exact (for the damped
objective). Given which weights each column keeps, the updated weights are those of the
sequential OBS updates, computed directly as :math:`\hat w_R = (H_{RR})^{-1}(Hw)_R`
(:func:`optimal_weights`).

**Allocation.** How many weights each column, and each layer, loses. Within a column, the
step costs are made non-decreasing (running maximum) so that choosing the cheapest steps
across columns always takes a prefix of every column's removal order. Across layers the costs
must be put on one scale; ``allocation`` chooses it:

- ``"loss"`` (default): the reconstruction error of output unit :math:`j` is turned into a
  predicted **loss** increase :math:`\tfrac12 g_j\,\Delta E_j`, where :math:`g_j` is the mean over
  the calibration images of the Gauss-Newton curvature of the loss with respect to that unit's
  pre-activation, :math:`[J_a^\top S J_a]_{jj}` (:func:`unit_curvature`; no labels needed). This
  propagates the layer error through the rest of the network to second order, neglecting the
  correlations between units and between the error and the curvature across samples (OBD's
  diagonal assumption, one level up). All steps of all layers are then ranked together.
- ``"relative"``: :math:`\Delta E_j` divided by the layer's mean :math:`\lVert XW\rVert^2`,
  the relative error of its pre-activations, ranked together across layers.
- ``"uniform"``: the same fraction from every layer.
- a ``{kernel path: count}`` mapping: explicit numbers of weights to remove per layer, e.g. the
  per-layer counts of OBD's global ranking (:func:`counts_from_masks` of
  ``masks_from_scores(obd_scores, fraction, scope="global")``).

The per-layer counts are decided once, from the dense network; within a layer the columns are
chosen by the same (``"loss"``) or unscaled (otherwise) step costs.

**Sequential inputs.** With ``inputs="pruned"`` (default, as OBC and SparseGPT do) the layers
are pruned first to last, and the inputs of each layer are collected from the network whose
earlier layers are already pruned and updated, so that each layer also compensates for the
errors upstream (its columns' paths are recomputed from those inputs). With ``inputs="dense"``
every layer is pruned against the dense network's inputs.

**Scope.** The NumPy passes here (:func:`unit_curvature`, :func:`gauss_newton`,
:class:`LayerwiseOBS`, and :func:`obs_prune_model` with its default Gauss-Newton Hessian) handle
chains of ``Dense`` layers only; a model with ``Conv2D`` or pooling layers raises
:class:`helpers.network.UnsupportedModelError`. ``obs_prune_model(..., hessian="exact")`` goes
through :func:`helpers.curvature.hessian_block` and accepts them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.linalg

from helpers.curvature import MAX_BLOCK_WEIGHTS, hessian_block
from helpers.losses import LossName, resolve_loss
from helpers.network import (
    Chain,
    as_chain,
    check_finite_weights,
    prunable_kernels,
    require_dense,
)
from helpers.pruning import Masks, check_fraction, removal_count, snapshot
from helpers.runtime import keras

DEFAULT_DAMPING = 1e-2
DEFAULT_EXACT_DAMPING = 1e-2
Allocation = Literal["loss", "relative", "uniform"]
ALLOCATIONS: tuple[str, ...] = ("loss", "relative", "uniform")
Inputs = Literal["pruned", "dense"]
HessianKind = Literal["gauss-newton", "exact"]


# ---------------------------------------------------------------------------------------------
# Primitives: one OBS step on a weight vector and an inverse Hessian
# ---------------------------------------------------------------------------------------------


def obs_saliencies(w: np.ndarray, h_inv: np.ndarray) -> np.ndarray:
    r"""OBS saliency :math:`L_q = w_q^2 / (2[H^{-1}]_{qq})` of every weight: the smallest
    increase of :math:`\tfrac12\delta w^\top H\delta w` with which :math:`w_q` can be zeroed."""
    return np.square(w) / (2.0 * np.diagonal(h_inv))


def obs_update(w: np.ndarray, h_inv: np.ndarray, q: int) -> np.ndarray:
    r"""The optimal change of all weights when :math:`w_q` is deleted,
    :math:`\delta w = -\frac{w_q}{[H^{-1}]_{qq}} H^{-1} e_q` (so :math:`(w+\delta w)_q = 0`)."""
    return -(w[q] / h_inv[q, q]) * h_inv[:, q]


def downdate_inverse(h_inv: np.ndarray, q: int) -> np.ndarray:
    r""":math:`H^{-1} - H^{-1}e_q e_q^\top H^{-1} / [H^{-1}]_{qq}`: the inverse Hessian of the
    weights other than :math:`q` (row and column :math:`q` become zero). A new array."""
    column = h_inv[:, q]
    result = h_inv - np.outer(column, h_inv[q, :] / h_inv[q, q])
    result[q, :] = 0.0  # exactly, not up to rounding: later updates must leave w_q at 0
    result[:, q] = 0.0
    return result


@dataclass(frozen=True)
class ObsStep:
    """One OBS removal: the weight ``q``, its saliency (predicted increase), the update of all
    weights ``delta_w`` (``w + delta_w`` has ``q`` at 0) and the downdated inverse Hessian."""

    q: int
    saliency: float
    delta_w: np.ndarray
    h_inv: np.ndarray


def obs_step(w: np.ndarray, h_inv: np.ndarray, removable: np.ndarray | None = None) -> ObsStep:
    """Remove the ``removable`` weight (default: any) of least OBS saliency; pure (copies).

    After a step, mark ``q`` as not removable: its row of the downdated inverse is zero, so
    later updates leave it at zero.
    """
    w = np.asarray(w, dtype=np.float64)
    h_inv = np.asarray(h_inv, dtype=np.float64)
    allowed = np.ones(w.size, bool) if removable is None else np.asarray(removable, bool)
    if not allowed.any():
        raise ValueError("no weight is removable")
    saliency = np.where(
        allowed, obs_saliencies(np.where(allowed, w, 0.0), _safe(h_inv, allowed)), np.inf
    )
    q = int(np.argmin(saliency))
    delta = obs_update(w, h_inv, q)
    delta[q] = -w[q]  # exactly zero afterwards, whatever the rounding
    return ObsStep(q, float(saliency[q]), delta, downdate_inverse(h_inv, q))


def _safe(h_inv: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """``h_inv`` with a unit diagonal where weights are not removable (avoids 0/0)."""
    fixed = h_inv.copy()
    index = np.flatnonzero(~allowed)
    fixed[index, index] = 1.0
    return fixed


def check_damping(damping: float) -> float:
    """``damping`` as a float, or ``ValueError`` unless it is a finite number >= 0."""
    if isinstance(damping, bool) or not isinstance(damping, (int, float, np.floating)):
        raise ValueError(f"damping must be a number >= 0, got {damping!r}")
    if not math.isfinite(float(damping)) or damping < 0:
        raise ValueError(f"damping must be finite and >= 0, got {damping!r}")
    return float(damping)


def damped(hessian: np.ndarray, damping: float) -> np.ndarray:
    r""":math:`H + \lambda I` with :math:`\lambda` = ``damping`` times the mean of diag(H) (times
    1 if that mean is 0, e.g. a layer whose inputs are all zero)."""
    hessian = np.asarray(hessian, dtype=np.float64)
    mean = float(np.mean(np.diagonal(hessian)))
    scale = check_damping(damping) * (mean if mean > 0 else 1.0)
    return hessian + scale * np.eye(hessian.shape[0])


def inverse_spd(hessian: np.ndarray) -> np.ndarray:
    """The inverse of a symmetric positive definite matrix (by Cholesky), or ``ValueError``."""
    hessian = np.asarray(hessian, dtype=np.float64)
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"the Hessian must be a square matrix, got shape {hessian.shape}")
    try:
        factor = scipy.linalg.cho_factor(0.5 * (hessian + hessian.T))
    except np.linalg.LinAlgError:
        raise ValueError(
            "the (damped) Hessian is not positive definite: increase damping, or use the "
            "Gauss-Newton form"
        ) from None
    return scipy.linalg.cho_solve(factor, np.eye(hessian.shape[0]))


# ---------------------------------------------------------------------------------------------
# Exact OBS on a flat weight vector
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObsPath:
    """Result of iterative OBS: updated ``weights`` (removed ones exactly 0), the removal
    ``order`` (indices) and the predicted increase of the loss at each step (``increase``;
    their cumulative sum is the quadratic model's loss increase)."""

    weights: np.ndarray
    order: np.ndarray
    increase: np.ndarray


def _greedy_path(w: np.ndarray, h_inv: np.ndarray, n_remove: int, removable: np.ndarray) -> ObsPath:
    """Iterated :func:`obs_step`, fast: the removed weight is swapped to the end of the active
    block, which then shrinks, so step ``k`` costs :math:`(P-k)^2` instead of :math:`P^2`."""
    a = np.array(h_inv, dtype=np.float64, order="C")
    w = np.array(w, dtype=np.float64).reshape(-1)
    allowed = np.array(removable, dtype=bool).reshape(-1)
    perm = np.arange(w.size)
    order = np.empty(n_remove, dtype=np.int64)
    increase = np.empty(n_remove)
    m = w.size
    for k in range(n_remove):
        block = a[:m, :m]
        diag = np.diagonal(block)
        saliency = np.full(m, np.inf)
        np.divide(np.square(w[:m]), diag, out=saliency, where=allowed[:m])
        p = int(np.argmin(saliency))
        column = block[:, p].copy()
        order[k], increase[k] = perm[p], 0.5 * saliency[p]
        w[:m] -= (w[p] / column[p]) * column
        w[p] = 0.0
        block -= np.outer(column, column / column[p])
        last = m - 1
        if p != last:
            block[[p, last], :] = block[[last, p], :]
            block[:, [p, last]] = block[:, [last, p]]
            for array in (w, perm, allowed):
                array[[p, last]] = array[[last, p]]
        m = last
    weights = np.empty_like(w)
    weights[perm] = w
    return ObsPath(weights=weights, order=order, increase=increase)


def obs_prune_exact(
    w0: np.ndarray,
    hessian: np.ndarray,
    n_remove: int,
    *,
    damping: float = 0.0,
    removable: np.ndarray | None = None,
) -> ObsPath:
    r"""Remove ``n_remove`` weights of the flat vector ``w0`` one at a time by OBS.

    ``hessian`` is the full :math:`P\times P` Hessian (symmetric; positive definite after adding
    ``damping`` times its mean diagonal). Each step removes the weight of least saliency
    :math:`w_q^2/(2[H^{-1}]_{qq})` among ``removable`` ones, **updates all the others** by
    :math:`-\frac{w_q}{[H^{-1}]_{qq}}H^{-1}e_q` and downdates :math:`H^{-1}` (module docstring).
    Time :math:`O(P^3)` for a full path, memory :math:`8P^2` bytes.
    """
    w0 = np.asarray(w0, dtype=np.float64).reshape(-1)
    hessian = np.asarray(hessian, dtype=np.float64)
    if hessian.shape != (w0.size, w0.size):
        raise ValueError(f"hessian has shape {hessian.shape}; expected {(w0.size, w0.size)}")
    allowed = np.ones(w0.size, bool) if removable is None else np.asarray(removable, bool)
    if allowed.shape != w0.shape:
        raise ValueError(f"removable has shape {allowed.shape}; expected {w0.shape}")
    if isinstance(n_remove, bool) or not isinstance(n_remove, (int, np.integer)):
        raise ValueError(f"n_remove must be an int, got {n_remove!r}")
    if not 0 <= n_remove <= int(allowed.sum()):
        raise ValueError(f"n_remove must be in [0, {int(allowed.sum())}], got {n_remove}")
    return _greedy_path(w0, inverse_spd(damped(hessian, damping)), int(n_remove), allowed)


# ---------------------------------------------------------------------------------------------
# NumPy forward and backward passes of a supported chain (float64)
# ---------------------------------------------------------------------------------------------


def _activate(name: str, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """f(a) and f'(a); softmax on the last layer is folded into the loss (identity here)."""
    if name == "relu":
        return np.maximum(a, 0.0), (a > 0).astype(a.dtype)
    if name == "tanh":
        z = np.tanh(a)
        return z, 1.0 - z * z
    if name == "sigmoid":
        z = 0.5 * (1.0 + np.tanh(0.5 * a))
        return z, z * (1.0 - z)
    return a, np.ones_like(a)


def _weights(chain: Chain) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """(kernel, bias, activation) of every Dense step, as float64 arrays; chains with Conv2D or
    pooling layers raise :class:`helpers.network.UnsupportedModelError`."""
    require_dense(
        chain, "helpers.obs (unit_curvature, gauss_newton, LayerwiseOBS, Gauss-Newton OBS)"
    )
    out = []
    for step in chain.steps:
        kernel = np.asarray(step.kernel.numpy(), dtype=np.float64)
        bias = (
            np.zeros(kernel.shape[1])
            if step.bias is None
            else np.asarray(step.bias.numpy(), dtype=np.float64)
        )
        out.append((kernel, bias, step.activation))
    return out


def _flat_inputs(chain: Chain, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 1 or tuple(x.shape[1:]) != chain.input_shape or x.shape[0] == 0:
        raise ValueError(
            f"x must have shape (N, {', '.join(map(str, chain.input_shape))}) with N > 0, "
            f"got {x.shape}"
        )
    if not np.all(np.isfinite(x)):
        raise ValueError("x contains NaN or infinite values")
    return x.reshape(x.shape[0], -1)


def _forward(
    weights: list[tuple[np.ndarray, np.ndarray, str]], z: np.ndarray
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Layer inputs, activation derivatives f'(a) per layer, and the output (logits)."""
    inputs, slopes = [], []
    for kernel, bias, activation in weights:
        inputs.append(z)
        z, slope = _activate(activation, z @ kernel + bias)
        slopes.append(slope)
    return inputs, slopes, z


def _output_factor(output: np.ndarray, loss: LossName) -> np.ndarray:
    """U (B, K, m) with the loss Hessian at the output S = sum_k u_k u_k^T, per sample:
    softmax cross-entropy u_k = sqrt(p_k)(e_k - p) (labels not needed), MSE sqrt(2/m) e_k."""
    b, m = output.shape
    if loss == "softmax_cross_entropy":
        shifted = output - output.max(axis=1, keepdims=True)
        p = np.exp(shifted)
        p /= p.sum(axis=1, keepdims=True)
        return np.sqrt(p)[:, :, None] * (np.eye(m)[None] - p[:, None, :])
    return np.broadcast_to(math.sqrt(2.0 / m) * np.eye(m), (b, m, m)).copy()


def _backward_factors(
    weights: list[tuple[np.ndarray, np.ndarray, str]], z: np.ndarray, loss: LossName
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Layer inputs and V_l (B, K, n_out): the factor of the Gauss-Newton Hessian of the loss
    with respect to each layer's pre-activations, ``G_l = sum_k v_lk v_lk^T`` per sample."""
    inputs, slopes, output = _forward(weights, z)
    v = _output_factor(output, loss) * slopes[-1][:, None, :]
    factors = [v]
    for l in range(len(weights) - 1, 0, -1):  # noqa: E741
        v = (v @ weights[l][0].T) * slopes[l - 1][:, None, :]
        factors.append(v)
    factors.reverse()
    return inputs, factors


def _batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def unit_curvature(
    model: keras.Model, x: np.ndarray, *, loss: LossName | None = None, batch_size: int = 2000
) -> dict[str, np.ndarray]:
    r"""For every Dense layer, the mean over ``x`` of the Gauss-Newton curvature of the loss with
    respect to each output unit's pre-activation, :math:`g_j = \overline{[J_a^\top S J_a]_{jj}}`
    (equal to the exact :math:`\partial^2\bar\ell/\partial b_j^2` for ReLU networks). Keyed by
    kernel path; the loss is read from the compiled model unless given."""
    chain = as_chain(model)
    loss_name = resolve_loss(model, loss)
    weights = _weights(chain)
    z = _flat_inputs(chain, x)
    totals = [np.zeros(k.shape[1]) for k, _, _ in weights]
    for batch in _batches(z.shape[0], batch_size):
        _, factors = _backward_factors(weights, z[batch], loss_name)
        for total, v in zip(totals, factors, strict=True):
            total += np.square(v).sum(axis=(0, 1))
    return {step.path: t / z.shape[0] for step, t in zip(chain.steps, totals, strict=True)}


def gauss_newton(
    model: keras.Model, x: np.ndarray, *, loss: LossName | None = None, batch_size: int = 200
) -> np.ndarray:
    r"""The full :math:`P\times P` Gauss-Newton matrix :math:`\frac1N\sum_n J_n^\top S_n J_n` of the
    mean loss for all kernel weights (kernels in layer order, each row-major; biases excluded).

    Positive semi-definite; for ReLU networks its diagonal is the exact Hessian diagonal.
    Labels are not needed (for softmax cross-entropy, :math:`S = \mathrm{diag}(p) - pp^\top`).
    """
    chain = as_chain(model)
    check_finite_weights(model)
    loss_name = resolve_loss(model, loss)
    weights = _weights(chain)
    size = sum(k.size for k, _, _ in weights)
    if size > MAX_BLOCK_WEIGHTS:
        raise ValueError(
            f"a Gauss-Newton matrix of {size} weights is too large (at most {MAX_BLOCK_WEIGHTS})"
        )
    z = _flat_inputs(chain, x)
    total = np.zeros((size, size))
    for batch in _batches(z.shape[0], batch_size):
        inputs, factors = _backward_factors(weights, z[batch], loss_name)
        rows = np.concatenate(
            [
                (zi[:, None, :, None] * v[:, :, None, :]).reshape(v.shape[0] * v.shape[1], -1)
                for zi, v in zip(inputs, factors, strict=True)
            ],
            axis=1,
        )
        total += rows.T @ rows
    return total / z.shape[0]


# ---------------------------------------------------------------------------------------------
# Exact OBS of a whole (small) network
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelObsResult:
    """What :func:`obs_prune_model` did: keep-masks, the removal order (flat indices into the
    kernels concatenated in layer order, row-major) and each step's predicted loss increase."""

    masks: Masks
    order: np.ndarray
    increase: np.ndarray


def _write_kernels(model: keras.Model, flat: np.ndarray) -> dict[str, np.ndarray]:
    """Assign the flat vector to the kernels (layer order, row-major); return them by path."""
    out, start = {}, 0
    for path, kernel in prunable_kernels(model).items():
        shape = tuple(kernel.shape)
        values = flat[start : start + math.prod(shape)].reshape(shape)
        kernel.assign(values.astype(kernel.dtype))
        out[path] = values
        start += values.size
    return out


def obs_prune_model(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray | None,
    fraction: float,
    *,
    hessian: HessianKind = "gauss-newton",
    damping: float = DEFAULT_EXACT_DAMPING,
    batch_size: int = 200,
) -> ModelObsResult:
    r"""Exact OBS of all the kernels of a small network together, **updating the surviving
    weights** (biases untouched), written into ``model`` in place.

    The Hessian of the mean loss over ``(x, y)`` for all :math:`P` kernel weights is either its
    Gauss-Newton form (:func:`gauss_newton`, positive semi-definite, labels unused -- Hassibi &
    Stork's own choice) or the exact Hessian by double differentiation
    (:func:`helpers.curvature.hessian_block`, which can be indefinite away from a minimum);
    ``damping`` times its mean diagonal is added. Then :func:`obs_prune_exact` removes
    ``round(fraction * P)`` weights. At most 12,000 weights; the time grows as :math:`P^3`.
    Snapshot the model first (:func:`helpers.pruning.snapshot`) to undo.
    """
    fraction = check_fraction(fraction)
    kernels = prunable_kernels(model)
    check_finite_weights(model)
    if hessian == "gauss-newton":
        matrix = gauss_newton(model, x, batch_size=batch_size)
    elif hessian == "exact":
        matrix = hessian_block(model, x, y, paths=list(kernels), batch_size=batch_size)
    else:
        raise ValueError(f"hessian must be 'gauss-newton' or 'exact', got {hessian!r}")
    w0 = np.concatenate([np.asarray(k.numpy(), np.float64).reshape(-1) for k in kernels.values()])
    path = obs_prune_exact(w0, matrix, removal_count(fraction, w0.size), damping=damping)
    new = _write_kernels(model, path.weights)
    keep = np.ones(w0.size, bool)
    keep[path.order] = False
    masks, start = {}, 0
    for name, values in new.items():
        masks[name] = keep[start : start + values.size].reshape(values.shape)
        start += values.size
    return ModelObsResult(masks=masks, order=path.order, increase=path.increase)


# ---------------------------------------------------------------------------------------------
# Layer-wise OBS (Optimal Brain Compression)
# ---------------------------------------------------------------------------------------------


def layer_hessian(x: np.ndarray, damping: float = DEFAULT_DAMPING) -> np.ndarray:
    r"""Damped Hessian of a layer's reconstruction error, :math:`2X^\top X/N + \lambda I`, with
    :math:`\lambda` = ``damping`` times the mean of the diagonal of :math:`2X^\top X/N`."""
    x = np.asarray(x, dtype=np.float64)
    return damped(2.0 * (x.T @ x) / x.shape[0], damping)


def reconstruction_error(x: np.ndarray, kernel: np.ndarray, new_kernel: np.ndarray) -> np.ndarray:
    r"""Per output column, :math:`\frac1N\lVert Xw_j - X\hat w_j\rVert^2` (no damping term)."""
    diff = np.asarray(x, np.float64) @ (np.asarray(kernel, np.float64) - new_kernel)
    return np.mean(np.square(diff), axis=0)


@dataclass(frozen=True)
class ColumnPaths:
    """Greedy OBS removal paths of every output column of a kernel (``n_in x n_out``).

    ``order[j, k]``: the input whose weight column ``j`` loses at step ``k``; ``cost[j, k]``: the
    increase of that column's (damped) reconstruction error at that step. Both ``(n_out, n_in)``.
    """

    order: np.ndarray
    cost: np.ndarray


def column_paths(kernel: np.ndarray, hessian: np.ndarray) -> ColumnPaths:
    """Run OBS on every column of ``kernel`` down to zero weights, all from the same damped
    ``hessian`` (:func:`layer_hessian`). Time about ``n_out * n_in^3 / 3`` flops."""
    kernel = np.asarray(kernel, dtype=np.float64)
    h_inv = inverse_spd(hessian)
    n_in, n_out = kernel.shape
    everything = np.ones(n_in, bool)
    order = np.empty((n_out, n_in), dtype=np.int64)
    cost = np.empty((n_out, n_in))
    for j in range(n_out):
        path = _greedy_path(kernel[:, j], h_inv, n_in, everything)
        order[j], cost[j] = path.order, path.increase
    return ColumnPaths(order=order, cost=cost)


def optimal_weights(kernel: np.ndarray, hessian: np.ndarray, keep: np.ndarray) -> np.ndarray:
    r"""The kernel after OBS removes the weights where ``keep`` is False: removed weights are 0
    and each column's kept ones are :math:`\hat w_R = (H_{RR})^{-1}(Hw)_R`, the minimiser of the
    quadratic error with those weights at zero -- the same as the sequential OBS updates."""
    kernel = np.asarray(kernel, dtype=np.float64)
    keep = np.asarray(keep, dtype=bool)
    hw = hessian @ kernel
    out = np.where(keep, kernel, 0.0)
    for j in range(kernel.shape[1]):
        kept = np.flatnonzero(keep[:, j])
        if 0 < kept.size < kernel.shape[0]:
            sub = hessian[np.ix_(kept, kept)]
            out[kept, j] = scipy.linalg.solve(sub, hw[kept, j], assume_a="pos")
    return out


def _monotone(cost: np.ndarray) -> np.ndarray:
    """Step costs made non-decreasing along each column's path (running maximum)."""
    return np.maximum.accumulate(cost, axis=1)


def _cheapest(costs: list[np.ndarray], count: int) -> list[np.ndarray]:
    """Select the ``count`` cheapest steps over all the (n_out, n_in) cost arrays; return how
    many steps of each column are taken. Stable, so a column's steps go in order."""
    flat = np.concatenate([c.reshape(-1) for c in costs])
    chosen = np.zeros(flat.size, bool)
    chosen[np.argsort(flat, kind="stable")[:count]] = True
    out, start = [], 0
    for c in costs:
        out.append(chosen[start : start + c.size].reshape(c.shape).sum(axis=1))
        start += c.size
    return out


def _keep_from_paths(paths: ColumnPaths, per_column: np.ndarray) -> np.ndarray:
    """Keep-mask (n_in, n_out) removing the first ``per_column[j]`` inputs of column j's path."""
    n_out, n_in = paths.order.shape
    removed = np.arange(n_in)[None, :] < per_column[:, None]
    keep = np.ones((n_in, n_out), bool)
    columns = np.broadcast_to(np.arange(n_out)[:, None], removed.shape)
    keep[paths.order[removed], columns[removed]] = False
    return keep


def counts_from_masks(masks: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Number of removed weights per kernel of a keep-mask dictionary (an ``allocation``)."""
    return {path: int(np.size(m) - np.count_nonzero(m)) for path, m in masks.items()}


@dataclass
class _Layer:
    path: str
    kernel: np.ndarray
    bias: np.ndarray
    activation: str
    hessian: np.ndarray
    paths: ColumnPaths
    scale: np.ndarray  # per output column, turns reconstruction error into the allocation's unit


class LayerwiseOBS:
    """Layer-wise OBS of a model, prepared once and applied at any sparsity.

    The constructor records the dense kernels, collects every layer's inputs from the dense
    network on ``x_calib``, and computes each layer's Hessian and the full OBS paths of all its
    columns (the costly part: about 12 s for the 784x50 first layer on two CPU cores). Then
    :meth:`prune` sets the kernels for any ``fraction`` (about a second for the MNIST network):
    it restores the dense kernels, decides the per-layer counts, and prunes layer after layer.
    See the module docstring for ``damping``, ``allocation`` and ``inputs``.
    """

    def __init__(
        self,
        model: keras.Model,
        x_calib: np.ndarray,
        *,
        damping: float = DEFAULT_DAMPING,
        allocation: Allocation | Mapping[str, int] = "loss",
        inputs: Inputs = "pruned",
    ):
        self.chain = as_chain(model)
        check_finite_weights(model)
        self.model = model
        self.damping = check_damping(damping)
        self.allocation = _check_allocation(self.chain, allocation)
        if inputs not in ("pruned", "dense"):
            raise ValueError(f"inputs must be 'pruned' or 'dense', got {inputs!r}")
        self.inputs = inputs
        self.dense = snapshot(model)
        self._x = _flat_inputs(self.chain, x_calib)
        weights = _weights(self.chain)
        layer_inputs, _, _ = _forward(weights, self._x)
        scales = self._scales(weights, layer_inputs)
        self.layers = []
        for step, (kernel, bias, activation), x, scale in zip(
            self.chain.steps, weights, layer_inputs, scales, strict=True
        ):
            hessian = layer_hessian(x, self.damping)
            self.layers.append(
                _Layer(
                    step.path,
                    kernel,
                    bias,
                    activation,
                    hessian,
                    column_paths(kernel, hessian),
                    scale,
                )
            )

    def _scales(self, weights: list, layer_inputs: list[np.ndarray]) -> list[np.ndarray]:
        if self.allocation == "loss":
            g = unit_curvature(self.model, self._x.reshape(-1, *self.chain.input_shape))
            return [0.5 * g[step.path] for step in self.chain.steps]
        if self.allocation == "relative":
            return [
                np.full(
                    k.shape[1], 1.0 / max(float(np.mean(np.sum(np.square(x @ k), axis=1))), 1e-300)
                )
                for (k, _, _), x in zip(weights, layer_inputs, strict=True)
            ]
        return [np.ones(k.shape[1]) for k, _, _ in weights]

    def layer_counts(self, fraction: float) -> dict[str, int]:
        """How many weights each layer loses at ``fraction`` (decided on the dense network)."""
        fraction = check_fraction(fraction)
        if isinstance(self.allocation, Mapping):
            return dict(self.allocation)
        if self.allocation == "uniform":
            return {la.path: removal_count(fraction, la.kernel.size) for la in self.layers}
        total = removal_count(fraction, sum(la.kernel.size for la in self.layers))
        costs = [_monotone(la.paths.cost) * la.scale[:, None] for la in self.layers]
        taken = _cheapest(costs, total)
        return {la.path: int(t.sum()) for la, t in zip(self.layers, taken, strict=True)}

    def prune(self, fraction: float, *, counts: Mapping[str, int] | None = None) -> Masks:
        """Prune the dense model to ``fraction`` (of all kernel weights), **updating the surviving
        weights**; the kernels are written into the model and the keep-masks returned. Removed
        weights are exactly 0. ``counts`` (``{kernel path: number removed}``) overrides the
        allocation for this call, e.g. OBD's per-layer counts at the same fraction; with an
        explicit allocation or ``counts``, ``fraction`` is only validated."""
        fraction = check_fraction(fraction)
        counts = (
            self.layer_counts(fraction)
            if counts is None
            else _check_allocation(self.chain, dict(counts))
        )
        self.dense.restore()
        masks: Masks = {}
        z, upstream_changed = self._x, False
        for layer in self.layers:
            hessian, paths = layer.hessian, layer.paths
            if upstream_changed and self.inputs == "pruned":
                hessian = layer_hessian(z, self.damping)
                paths = column_paths(layer.kernel, hessian)
            scale = layer.scale if self.allocation == "loss" else np.ones_like(layer.scale)
            (per_column,) = _cheapest([_monotone(paths.cost) * scale[:, None]], counts[layer.path])
            keep = _keep_from_paths(paths, per_column)
            new = optimal_weights(layer.kernel, hessian, keep)
            new[~keep] = 0.0
            masks[layer.path] = keep
            upstream_changed = upstream_changed or not keep.all()
            z, _ = _activate(layer.activation, z @ new + layer.bias)
            kernel = prunable_kernels(self.model)[layer.path]
            kernel.assign(new.astype(kernel.dtype))
        return masks


def _check_allocation(
    chain: Chain, allocation: Allocation | Mapping[str, int]
) -> Allocation | dict[str, int]:
    if isinstance(allocation, Mapping):
        sizes = {step.path: math.prod(step.kernel.shape) for step in chain.steps}
        if set(allocation) != set(sizes):
            raise ValueError(
                f"allocation must give a count for each kernel {sorted(sizes)}, got {sorted(allocation)}"
            )
        counts = {}
        for path, size in sizes.items():
            count = allocation[path]
            if (
                isinstance(count, bool)
                or not isinstance(count, (int, np.integer))
                or not 0 <= count <= size
            ):
                raise ValueError(
                    f"allocation[{path!r}] must be an int in [0, {size}], got {count!r}"
                )
            counts[path] = int(count)
        return counts
    if allocation not in ALLOCATIONS:
        raise ValueError(
            f"allocation must be one of {ALLOCATIONS} or a dict of counts, got {allocation!r}"
        )
    return allocation


def layerwise_obs(
    model: keras.Model,
    x_calib: np.ndarray,
    fraction: float,
    *,
    damping: float = DEFAULT_DAMPING,
    allocation: Allocation | Mapping[str, int] = "loss",
    inputs: Inputs = "pruned",
) -> Masks:
    """Layer-wise OBS of ``model`` at ``fraction`` removed, in place: ``LayerwiseOBS(...).prune``.

    Prunes and **updates** the kernels (biases untouched) and returns the keep-masks
    ``{kernel path: bool array}``. For several fractions, build one :class:`LayerwiseOBS` and
    call its :meth:`~LayerwiseOBS.prune` for each: the expensive paths are computed once.
    """
    fraction = check_fraction(fraction)
    plan = LayerwiseOBS(model, x_calib, damping=damping, allocation=allocation, inputs=inputs)
    return plan.prune(fraction)


__all__ = [
    "ALLOCATIONS",
    "DEFAULT_DAMPING",
    "DEFAULT_EXACT_DAMPING",
    "ColumnPaths",
    "LayerwiseOBS",
    "ModelObsResult",
    "ObsPath",
    "ObsStep",
    "check_damping",
    "column_paths",
    "counts_from_masks",
    "damped",
    "downdate_inverse",
    "gauss_newton",
    "inverse_spd",
    "layer_hessian",
    "layerwise_obs",
    "obs_prune_exact",
    "obs_prune_model",
    "obs_saliencies",
    "obs_step",
    "obs_update",
    "reconstruction_error",
    "unit_curvature",
]
