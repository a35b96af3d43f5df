"""Loss and accuracy of a classifier on arrays, compiled once per model.

:class:`Evaluator` converts the data to tensors once and keeps one traced ``tf.function`` that
reads the model's current weights, so it can be called again and again while the weights
change (pruning sweeps) without retracing or copying the data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from helpers.distribute import sum_over_batches
from helpers.inputs import batches, label_spec
from helpers.losses import LossName, per_sample_loss, resolve_loss
from helpers.network import as_chain
from helpers.runtime import keras, tf

DEFAULT_EVAL_BATCH = 10_000


@dataclass(frozen=True)
class Evaluation:
    """Mean loss and accuracy (fraction correct, in [0, 1]) over a data set."""

    loss: float
    accuracy: float


def classifier_loss(model: keras.Model) -> LossName:
    """The model's loss, which must be a cross-entropy for an accuracy to make sense."""
    loss = resolve_loss(model)
    if loss != "softmax_cross_entropy":
        raise ValueError(
            f"accuracy needs a classifier trained with cross-entropy; model uses {loss!r}"
        )
    return loss


def classification_totals(
    output: tf.Tensor, y: tf.Tensor, loss: LossName, from_logits: bool
) -> list[tf.Tensor]:
    """The summed loss and the number of correct predictions of a batch of model outputs."""
    correct = tf.equal(tf.argmax(output, axis=-1, output_type=y.dtype), y)
    loss_sum = tf.reduce_sum(per_sample_loss(output, y, loss, from_logits=from_logits))
    return [loss_sum, tf.reduce_sum(tf.cast(correct, tf.int32))]


class Evaluator:
    """Evaluate ``model`` on fixed ``(x, y)`` repeatedly, with the weights it has at each call."""

    def __init__(
        self,
        model: keras.Model,
        x: np.ndarray,
        y: np.ndarray,
        *,
        batch_size: int = DEFAULT_EVAL_BATCH,
        strategy: tf.distribute.Strategy | None = None,
    ):
        chain = as_chain(model)
        loss = classifier_loss(model)
        data, _ = batches(chain, x, y, loss, batch_size)
        self.model = model
        self.strategy = strategy
        self._batches = list(data)
        self._n = int(np.asarray(y).shape[0])
        from_logits = chain.steps[-1].activation != "softmax"
        specs = [tf.TensorSpec((None, *chain.input_shape), chain.dtype), label_spec(chain, loss)]

        def totals(xb: tf.Tensor, yb: tf.Tensor) -> list[tf.Tensor]:
            return classification_totals(model(xb, training=False), yb, loss, from_logits)

        self._fn: Callable = tf.function(totals, input_signature=specs)

    def __call__(self) -> Evaluation:
        (loss_sum, correct), _ = sum_over_batches(self._batches, self._fn, self.strategy)
        return Evaluation(loss=float(loss_sum) / self._n, accuracy=int(correct) / self._n)

    @property
    def tracing_count(self) -> int:
        """Times the evaluation function was traced (1 after any number of calls)."""
        return self._fn.experimental_get_tracing_count()


def evaluate(
    model: keras.Model, x: np.ndarray, y: np.ndarray, *, batch_size: int = DEFAULT_EVAL_BATCH
) -> Evaluation:
    """Mean cross-entropy and accuracy of ``model`` (inference mode) on ``(x, y)``."""
    return Evaluator(model, x, y, batch_size=batch_size)()


__all__ = ["Evaluation", "Evaluator", "classification_totals", "classifier_loss", "evaluate"]
