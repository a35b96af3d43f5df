"""Evaluate a pruning sweep by updating the first layer with the weights that changed.

A sweep evaluates the same images again and again while kernel entries are zeroed. In a
network of ``Dense`` layers on flattened images, the first layer's product
:math:`Z = X W_1` (for the MNIST network, 784 x 50 multiply-adds per image, 39,200 of the
47,200 weights) is nearly all of each evaluation's arithmetic. Between two sweep points only
the entries removed (or restored) in between change :math:`W_1`, so

.. math:: Z' = Z + X_{:,I}\\,\\Delta W_1[I, :]

costs one multiply-add per image and per changed entry: a step of 1% of the weights costs
about 1% of the product. :class:`IncrementalEvaluator` keeps :math:`Z` in float64, so updates
add no drift (after any sequence of them, :math:`Z` equals the product of the current kernel to
about 1e-13 relative); each evaluation rounds it to float32 and runs the rest of the network
(the first layer's bias and activation, then the later layers) as the model computes them. Its
results are those of :class:`helpers.evaluate.Evaluator` up to float32 rounding of the first
product: the same accuracy unless two logits of an image tie to about 1e-7, the same loss to
about 1e-7 relative.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse

from helpers.evaluate import Evaluation, classification_totals, classifier_loss
from helpers.inputs import check_arrays
from helpers.network import as_chain, from_first_product, split_at_first_dense
from helpers.runtime import keras, tf

#: Above this share of changed first-layer entries, the product is recomputed from scratch.
RECOMPUTE_SHARE = 0.25


class IncrementalEvaluator:
    """Loss and accuracy of ``model`` on fixed ``(x, y)``, with the weights it has at each call,
    the first ``Dense`` layer's product updated by the entries that changed since the last call.

    A drop-in for :class:`helpers.evaluate.Evaluator` in sweeps (same call, same result type)
    for networks whose first weighted layer is ``Dense``; ``ValueError`` otherwise. It keeps a
    float64 copy of the inputs, transposed (8 bytes per input value).
    """

    def __init__(self, model: keras.Model, x: np.ndarray, y: np.ndarray):
        chain = as_chain(model)
        loss = classifier_loss(model)
        split = split_at_first_dense(model, chain)
        if split is None:
            raise ValueError(
                f"model {model.name!r} does not start with a Dense layer: "
                "use helpers.evaluate.Evaluator"
            )
        first, rest = split
        xa, ya = check_arrays(chain, x, y, loss)
        self.model = model
        self._first = first
        self._n = int(xa.shape[0])
        self._xt = np.ascontiguousarray(xa.reshape(self._n, -1).T, dtype=np.float64)
        self._y = tf.constant(ya, dtype=tf.int32)
        self._kernel = np.zeros(first.kernel.shape)
        self._z = np.zeros((self._kernel.shape[1], self._n))  # (units, n)
        self.recomputed = 0
        """How often the first product was computed from scratch (once at construction)."""
        self._update()  # from zero: every entry changed, so computed from scratch
        from_logits = chain.steps[-1].activation != "softmax"
        dtype = chain.dtype

        def totals(z: tf.Tensor, yb: tf.Tensor) -> list[tf.Tensor]:
            output = from_first_product(z, first, rest, training=False)
            return classification_totals(output, yb, loss, from_logits)

        units = int(self._kernel.shape[1])
        specs = [tf.TensorSpec((None, units), dtype), tf.TensorSpec([None], tf.int32)]
        self._fn: Callable = tf.function(totals, input_signature=specs)
        self._dtype = dtype

    def _update(self) -> None:
        """Bring the first product up to date with the first kernel as it is now."""
        kernel = np.asarray(self._first.kernel.numpy(), dtype=np.float64)
        if not np.isfinite(kernel).all():  # NaN != NaN: it would poison every later update
            raise ValueError(f"{self._first.kernel.path} has non-finite weights")
        rows, cols = np.nonzero(kernel != self._kernel)
        if rows.size > RECOMPUTE_SHARE * kernel.size:
            self._z = kernel.T @ self._xt
            self.recomputed += 1
        elif rows.size:
            delta = scipy.sparse.csr_matrix(
                (kernel[rows, cols] - self._kernel[rows, cols], (cols, rows)),
                shape=kernel.T.shape,
            )
            self._z += delta @ self._xt  # one multiply-add per image and changed entry
        self._kernel = kernel

    def __call__(self) -> Evaluation:
        self._update()
        z = tf.constant(self._z.T, dtype=self._dtype)
        loss_sum, correct = self._fn(z, self._y)
        return Evaluation(loss=float(loss_sum) / self._n, accuracy=int(correct) / self._n)

    @property
    def tracing_count(self) -> int:
        """Times the evaluation function was traced (1 after any number of calls)."""
        return self._fn.experimental_get_tracing_count()


__all__ = ["RECOMPUTE_SHARE", "IncrementalEvaluator"]
