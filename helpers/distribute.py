"""Summing a per-batch computation over a data set, on one device or under a tf.distribute strategy.

Every pass in the helpers (second derivatives, gradients, losses, accuracies) has the same shape:
a compiled function maps one batch to a list of tensors that are **sums over the batch**, and the
pass adds them up over all batches. :func:`sum_over_batches` does that addition. With a
``tf.distribute.Strategy`` each global batch is split across the replicas, every replica runs
the function on its share, and the partial sums are reduced with ``ReduceOp.SUM``; since the
function returns sums, the result is the same as on one device (up to the order of the
floating-point additions). Nothing is copied back to the host inside the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from helpers.runtime import tf

Batch = tuple[tf.Tensor, tf.Tensor]


def _split(strategy: tf.distribute.Strategy, xb: tf.Tensor, yb: tf.Tensor) -> tuple:
    """Distribute one global batch: replica ``i`` gets rows ``i, i + R, i + 2R, ...``."""
    replicas = strategy.num_replicas_in_sync

    def rows_of(tensor: tf.Tensor) -> Callable:
        return lambda context: tensor[context.replica_id_in_sync_group :: replicas]

    distribute = strategy.experimental_distribute_values_from_function
    return distribute(rows_of(xb)), distribute(rows_of(yb))


def sum_over_batches(
    batches: Iterable[Batch],
    fn: Callable[..., list[tf.Tensor]],
    strategy: tf.distribute.Strategy | None = None,
    empty_message: str = "the data is empty",
) -> tuple[list[tf.Tensor], int]:
    """Add up ``fn(x_batch, y_batch)`` over all batches; also return the number of samples.

    ``fn`` must return a list of tensors, each a sum over the samples of its batch.
    """
    totals: list[tf.Tensor] | None = None
    n = 0
    for xb, yb in batches:
        size = int(xb.shape[0])
        if size == 0:
            continue
        if strategy is None:
            parts = list(fn(xb, yb))
        else:
            # a plain Python callable: strategy.run traces a tf.function itself with
            # per-replica values, which an input_signature would reject
            per_replica = strategy.run(lambda a, b: fn(a, b), args=_split(strategy, xb, yb))
            parts = [strategy.reduce(tf.distribute.ReduceOp.SUM, p, axis=None) for p in per_replica]
        totals = parts if totals is None else [t + p for t, p in zip(totals, parts, strict=True)]
        n += size
    if totals is None:
        raise ValueError(empty_message)
    return totals, n


__all__ = ["sum_over_batches"]
