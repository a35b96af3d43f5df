"""A compiled training loop for the classifiers the helpers support: one graph per epoch.

Keras' ``model.fit`` returns to Python (and to its data pipeline and callbacks) around every
mini-batch. For the small MNIST network that overhead is larger than the arithmetic: on two CPU
cores ``fit`` takes about 3 s per epoch at batch 128, the loop below about 0.9 s. Here the data
live in two tensors, an epoch is a permutation of the sample indices drawn in NumPy from
``np.random.default_rng(seed)``, and a ``tf.function`` runs every step of the epoch (gather the
mini-batch, forward and backward pass, optimizer update) without leaving the graph.

:func:`fit_classifier` is used by :func:`helpers.models.train_mlp` (dense training, Adam with
weight decay) and :func:`helpers.retrain.masked_fit` (retraining with pruned weights held at
zero: each kernel gradient is multiplied by its 0/1 mask before the update, and the mask is
multiplied into the kernel after it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from helpers.evaluate import Evaluator
from helpers.inputs import check_arrays, label_spec
from helpers.losses import per_sample_loss, resolve_loss
from helpers.network import Chain, as_chain
from helpers.runtime import keras, set_determinism, tf

#: ``on_step(step, optimizer)``: called after every optimizer step (``step`` counts from 0 over
#: all epochs), with the optimizer so that its moment variables can be inspected.
StepCallback = Callable[[int, keras.optimizers.Optimizer], None]
#: A compiled training step: ``(order, start) -> (loss sum, correct count)`` of one mini-batch.
StepFn = Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]
#: One epoch: ``order -> (loss sum, correct count)`` over all samples, visited in ``order``.
EpochFn = Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]


def check_classifier(model: keras.Model) -> Chain:
    """The model's chain, if it is a supported network trainable with cross-entropy."""
    chain = as_chain(model)
    resolve_loss(model, "softmax_cross_entropy")  # checks the last layer is logits or softmax
    return chain


def _mask_tensors(
    variables: Sequence[keras.Variable], masks: Mapping[str, np.ndarray]
) -> list[tf.Tensor | None]:
    """For each trainable variable, its mask as a 0/1 tensor of its dtype (``None``: not masked)."""
    return [
        tf.constant(masks[v.path], dtype=v.dtype) if v.path in masks else None for v in variables
    ]


def _train_step(
    model: keras.Model,
    chain: Chain,
    optimizer: keras.optimizers.Optimizer,
    x: tf.Tensor,
    y: tf.Tensor,
    batch_size: int,
    masks: Mapping[str, np.ndarray],
) -> StepFn:
    """A compiled step ``(order, start) -> (loss sum, correct count)`` on the batch
    ``order[start : start + batch_size]`` of ``(x, y)``, traced once."""
    variables = list(model.trainable_variables)
    mask_tensors = _mask_tensors(variables, masks)
    from_logits = chain.steps[-1].activation != "softmax"

    def step(order: tf.Tensor, start: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        indices = order[start : start + batch_size]
        xb, yb = tf.gather(x, indices), tf.gather(y, indices)
        with tf.GradientTape() as tape:
            output = model(xb, training=True)
            per_sample = per_sample_loss(output, yb, "softmax_cross_entropy", from_logits)
            loss = tf.reduce_mean(per_sample)
            if model.losses:  # regularisers, if the model has any
                loss = loss + tf.add_n(model.losses)
        grads = tape.gradient(loss, variables)
        grads = [g if m is None else g * m for g, m in zip(grads, mask_tensors, strict=True)]
        optimizer.apply(grads, variables)
        for variable, mask in zip(variables, mask_tensors, strict=True):
            if mask is not None:
                variable.assign(variable * mask)
        correct = tf.equal(tf.argmax(output, axis=-1, output_type=yb.dtype), yb)
        return tf.reduce_sum(per_sample), tf.reduce_sum(tf.cast(correct, tf.int32))

    signature = [tf.TensorSpec([None], tf.int32), tf.TensorSpec([], tf.int32)]
    return tf.function(step, input_signature=signature)


def _compiled_epoch(step: StepFn, n: int, batch_size: int, dtype: str) -> EpochFn:
    """One pass over the data in a given order as a single graph (a loop over the steps, without
    a return to Python between them), traced once."""

    def epoch(order: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        loss_sum, correct = tf.zeros([], dtype=dtype), tf.zeros([], dtype=tf.int32)
        for start in tf.range(0, n, batch_size):
            batch_loss, batch_correct = step(order, start)
            loss_sum, correct = loss_sum + batch_loss, correct + batch_correct
        return loss_sum, correct

    return tf.function(epoch, input_signature=[tf.TensorSpec([n], tf.int32)])


def _observed_epoch(
    step: StepFn,
    n: int,
    batch_size: int,
    dtype: str,
    optimizer: keras.optimizers.Optimizer,
    on_step: StepCallback,
) -> EpochFn:
    """The same pass, calling ``step`` from Python and ``on_step`` after each step."""
    count = 0

    def epoch(order: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        nonlocal count
        loss_sum, correct = tf.zeros([], dtype=dtype), tf.zeros([], dtype=tf.int32)
        for start in range(0, n, batch_size):
            batch_loss, batch_correct = step(order, tf.constant(start, dtype=tf.int32))
            loss_sum, correct = loss_sum + batch_loss, correct + batch_correct
            on_step(count, optimizer)
            count += 1
        return loss_sum, correct

    return epoch


def fit_classifier(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    masks: Mapping[str, np.ndarray] | None = None,
    validation_data: tuple[np.ndarray, np.ndarray] | None = None,
    verbose: int = 0,
    on_step: StepCallback | None = None,
) -> dict[str, list[float]]:
    """Train ``model`` in place on the mean softmax cross-entropy of each mini-batch.

    :func:`~helpers.runtime.set_determinism` is called with ``seed`` and each epoch visits the
    ``N`` samples once in an order drawn from ``np.random.default_rng(seed)`` (the last batch
    may be smaller), so the same call on the same model gives the same weights. Dropout layers
    are active during training. The caller validates the arguments (positive ``batch_size``,
    ``epochs >= 0``, masks with the kernels' paths and shapes) and builds ``optimizer``.

    Args:
        model: a classifier :func:`check_classifier` accepts.
        optimizer: a Keras optimizer; it is built for the model's trainable variables here.
        x, y: training images ``(N, *input_shape)`` and integer labels ``(N,)``.
        epochs, batch_size, seed: the schedule.
        masks: ``{kernel path: bool array}``: gradients of ``False`` entries are zeroed before
            every update and the mask is multiplied into the kernel after it.
        validation_data: ``(x_val, y_val)`` evaluated in inference mode after every epoch.
        verbose: 1 prints one line per epoch (0 is silent).
        on_step: called as ``on_step(step, optimizer)`` after every optimizer step. Without it
            each epoch runs as one compiled loop; with it the same compiled step is called from
            Python (slower, same updates).

    Returns:
        Per-epoch lists ``loss`` and ``accuracy`` (over the epoch's mini-batches, in training
        mode, as Keras reports them) and, with ``validation_data``, ``val_loss`` and
        ``val_accuracy``.
    """
    chain = check_classifier(model)
    xa, ya = check_arrays(chain, x, y, "softmax_cross_entropy")
    evaluator = None if validation_data is None else Evaluator(model, *validation_data)
    set_determinism(seed)
    rng = np.random.default_rng(seed)
    n = int(xa.shape[0])
    optimizer.build(model.trainable_variables)
    x_all = tf.constant(xa, dtype=chain.dtype)
    y_all = tf.constant(ya, dtype=label_spec(chain, "softmax_cross_entropy").dtype)
    step = _train_step(model, chain, optimizer, x_all, y_all, batch_size, masks or {})
    history: dict[str, list[float]] = {"loss": [], "accuracy": []}
    if evaluator is not None:
        history.update(val_loss=[], val_accuracy=[])
    run_epoch = (
        _compiled_epoch(step, n, batch_size, chain.dtype)
        if on_step is None
        else _observed_epoch(step, n, batch_size, chain.dtype, optimizer, on_step)
    )
    for epoch in range(epochs):
        loss_sum, correct = run_epoch(tf.constant(rng.permutation(n), dtype=tf.int32))
        history["loss"].append(float(loss_sum) / n)
        history["accuracy"].append(int(correct) / n)
        if evaluator is not None:
            result = evaluator()
            history["val_loss"].append(result.loss)
            history["val_accuracy"].append(result.accuracy)
        if verbose:
            summary = ", ".join(f"{k} {v[-1]:.4f}" for k, v in history.items())
            print(f"epoch {epoch + 1}/{epochs}: {summary}")
    return history


__all__ = ["EpochFn", "StepCallback", "StepFn", "check_classifier", "fit_classifier"]
