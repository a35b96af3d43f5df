"""The losses the helpers differentiate: which one a model uses, and its derivatives at the output.

Two losses are supported, each a mean over samples of a per-sample loss :math:`\\ell`:

- ``"softmax_cross_entropy"``: :math:`\\ell = -\\log p_y`, :math:`p = \\mathrm{softmax}(o)` of the
  network output :math:`o` (logits), integer labels :math:`y`. Gradient :math:`p - e_y`, Hessian
  :math:`S = \\mathrm{diag}(p) - p p^\\top` with diagonal :math:`p_i(1 - p_i)`.
- ``"mse"``: :math:`\\ell = \\frac1m \\sum_i (o_i - t_i)^2` over :math:`m` outputs (Keras'
  ``MeanSquaredError``). Gradient :math:`2(o - t)/m`, Hessian :math:`S = \\frac2m I`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from helpers.network import as_chain
from helpers.runtime import keras, tf

LossName = Literal["softmax_cross_entropy", "mse"]
LOSSES: tuple[str, ...] = ("softmax_cross_entropy", "mse")


def resolve_loss(model: keras.Model, loss: str | None = None) -> LossName:
    """Which loss the second derivatives are taken of.

    ``loss`` may be ``"softmax_cross_entropy"`` (integer labels; the last layer outputs logits,
    or applies softmax itself) or ``"mse"`` (mean over outputs of the squared error, as
    ``keras.losses.MeanSquaredError``). With ``None`` it is read from the compiled model.
    """
    chain = as_chain(model)
    final_softmax = chain.steps[-1].activation == "softmax"
    if loss is None:
        loss = _loss_from_compiled(model, final_softmax)
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if final_softmax and loss != "softmax_cross_entropy":
        raise ValueError(
            f"the last layer {chain.steps[-1].layer.name!r} applies softmax; only "
            "softmax_cross_entropy is supported with it"
        )
    return loss  # type: ignore[return-value]


def _loss_from_compiled(model: keras.Model, final_softmax: bool) -> str:
    compiled = getattr(model, "loss", None)
    if compiled is None:
        raise ValueError(
            f"model {model.name!r} is not compiled with a loss; pass loss='softmax_cross_entropy' "
            "or loss='mse'"
        )
    if isinstance(compiled, str):
        name, from_logits = compiled, False
    else:
        config = compiled.get_config() if hasattr(compiled, "get_config") else {}
        name = type(compiled).__name__
        from_logits = bool(config.get("from_logits", False))
    key = name.replace("_", "").lower()
    if key in ("sparsecategoricalcrossentropy",):
        if from_logits != (not final_softmax):
            raise ValueError(
                f"model {model.name!r}: from_logits={from_logits} does not match its last layer "
                f"({'softmax' if final_softmax else 'no softmax'})"
            )
        return "softmax_cross_entropy"
    if key in ("mse", "meansquarederror"):
        return "mse"
    raise ValueError(
        f"model {model.name!r} is compiled with loss {name!r}; supported: sparse categorical "
        "cross-entropy and mean squared error (or pass loss= explicitly)"
    )


def per_sample_loss(
    output: tf.Tensor, y: tf.Tensor, loss: LossName, from_logits: bool
) -> tf.Tensor:
    """The per-sample loss of a model output, computed by Keras' own loss functions."""
    if loss == "softmax_cross_entropy":
        return keras.losses.sparse_categorical_crossentropy(y, output, from_logits=from_logits)
    return keras.losses.mean_squared_error(y, output)


def output_boundary(
    output: tf.Tensor, y: tf.Tensor, loss: LossName, num_outputs: int
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, Callable[[], tf.Tensor]]:
    """Per-sample loss, its gradient g, the diagonal of its Hessian S (both w.r.t. the output), and
    a function giving the factor U (K, B, m) with S = sum_k u_k u_k^T."""
    if loss == "softmax_cross_entropy":
        p = tf.nn.softmax(output)
        onehot = tf.one_hot(y, num_outputs, dtype=output.dtype)
        value = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=output)

        def factor() -> tf.Tensor:
            eye = tf.eye(num_outputs, dtype=output.dtype)[:, None, :]  # (K, 1, m)
            return tf.sqrt(tf.transpose(p))[:, :, None] * (eye - p[None])  # (K, B, m)

        # 1 - p_i as the sum of the other probabilities: no cancellation when p_i is close to 1
        # (a confident network), where float32 would keep only a few digits of 1 - p_i
        others = tf.matmul(p, 1 - tf.eye(num_outputs, dtype=output.dtype))
        return value, p - onehot, p * others, factor
    m = tf.cast(num_outputs, output.dtype)
    value = tf.reduce_mean(tf.square(output - y), axis=-1)

    def factor_mse() -> tf.Tensor:
        eye = tf.eye(num_outputs, dtype=output.dtype)[:, None, :]
        return tf.sqrt(2 / m) * eye * tf.ones_like(output)[None]

    return value, 2 * (output - y) / m, 2 / m * tf.ones_like(output), factor_mse


__all__ = ["LOSSES", "LossName", "output_boundary", "per_sample_loss", "resolve_loss"]
