"""Which Keras models the helpers support, described as a chain of layers.

The curvature code does its own forward and backward passes, so it needs to know exactly what
each layer computes. This module turns a Keras model into a list of :class:`DenseStep` objects
(one per ``Dense`` layer: kernel, bias, activation), after checking that the model is a single
chain made only of supported layers:

- ``Dense`` with activation ``relu``, ``tanh``, ``sigmoid`` or ``linear`` (and ``softmax`` on
  the last layer only, where it is treated as part of a cross-entropy loss);
- ``Dropout`` (the identity in inference mode, which is how pruning saliencies are measured);
- ``Flatten`` and ``InputLayer``.

Anything else raises :class:`UnsupportedModelError` naming the layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from helpers.runtime import keras

SUPPORTED_LAYERS = ("Dense", "Dropout", "Flatten", "InputLayer")
SUPPORTED_ACTIVATIONS = ("relu", "tanh", "sigmoid", "linear")
PIECEWISE_LINEAR = ("relu", "linear")


class UnsupportedModelError(ValueError):
    """The model has a layer, activation or topology the helpers cannot differentiate."""


@dataclass(frozen=True)
class DenseStep:
    """One ``Dense`` layer of a chain: ``z_out = activation(z_in @ kernel + bias)``."""

    layer: keras.layers.Dense
    activation: str

    @property
    def kernel(self) -> keras.Variable:
        return self.layer.kernel

    @property
    def bias(self) -> keras.Variable | None:
        return self.layer.bias if self.layer.use_bias else None

    @property
    def path(self) -> str:
        """The kernel variable's path, the key used in every score dictionary."""
        return self.layer.kernel.path


@dataclass(frozen=True)
class Chain:
    """A supported model as a sequence of ``Dense`` steps, with its input shape."""

    model: keras.Model
    steps: tuple[DenseStep, ...]
    input_shape: tuple[int, ...]

    @property
    def num_outputs(self) -> int:
        return int(self.steps[-1].kernel.shape[1])

    @property
    def dtype(self) -> str:
        return str(self.steps[0].kernel.dtype)

    @property
    def piecewise_linear(self) -> bool:
        """True when every activation is ReLU or linear (the Hessian diagonal is then Gauss-Newton's)."""
        return all(step.activation in PIECEWISE_LINEAR for step in self.steps)


def _layer_sequence(model: keras.Model) -> list[keras.layers.Layer]:
    """The model's layers in order, after checking that they form one chain."""
    if isinstance(model, keras.Sequential):
        return list(model.layers)
    if not isinstance(model, keras.Model) or not hasattr(model, "_nodes_by_depth"):
        raise UnsupportedModelError(
            f"model {getattr(model, 'name', model)!r} of type {type(model).__name__} is not supported: "
            "use a keras.Sequential or a single-chain functional keras.Model"
        )
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UnsupportedModelError(
            f"model {model.name!r} has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
            "only single-input, single-output chains are supported"
        )
    chain: list[keras.layers.Layer] = []
    tensor = model.outputs[0]
    while True:
        operation, node_index, _ = tensor._keras_history
        if isinstance(operation, keras.layers.InputLayer):
            break
        node = operation._inbound_nodes[node_index]
        inputs = list(keras.tree.flatten(node.input_tensors))
        if len(inputs) != 1:
            raise UnsupportedModelError(
                f"layer {operation.name!r} takes {len(inputs)} inputs; only single-chain models are supported"
            )
        chain.append(operation)
        tensor = inputs[0]
    chain.reverse()
    on_path = {id(layer) for layer in chain}
    off_path = [
        layer.name
        for layer in model.layers
        if id(layer) not in on_path and not isinstance(layer, keras.layers.InputLayer)
    ]
    if off_path:
        raise UnsupportedModelError(
            f"model {model.name!r} is not a single chain: layers {off_path} are off the input-output path"
        )
    return chain


def _activation_name(layer: keras.layers.Dense) -> str:
    return getattr(layer.activation, "__name__", type(layer.activation).__name__)


def as_chain(model: keras.Model) -> Chain:
    """Describe ``model`` as a :class:`Chain`, or raise :class:`UnsupportedModelError` saying why."""
    if not getattr(model, "built", False) or not model.inputs:
        raise UnsupportedModelError(
            f"model {getattr(model, 'name', model)!r} is not built: give it a keras.Input first"
        )
    input_shape = tuple(model.inputs[0].shape[1:])
    if any(dim is None for dim in input_shape):
        raise UnsupportedModelError(
            f"model {model.name!r} has an input shape with unknown dimensions {input_shape}"
        )
    steps: list[DenseStep] = []
    rank = len(input_shape)
    seen: set[int] = set()
    for layer in _layer_sequence(model):
        kind = type(layer).__name__
        if id(layer) in seen:
            raise UnsupportedModelError(f"layer {layer.name!r} is used twice (shared weights)")
        seen.add(id(layer))
        if kind in ("InputLayer", "Dropout"):
            continue
        if kind == "Flatten":
            rank = 1
            continue
        if kind != "Dense":
            raise UnsupportedModelError(
                f"layer {layer.name!r} of type {kind} is not supported; supported layers: "
                f"{', '.join(SUPPORTED_LAYERS)} (Dense activations: {', '.join(SUPPORTED_ACTIVATIONS)})"
            )
        if rank != 1:
            raise UnsupportedModelError(
                f"Dense layer {layer.name!r} receives a rank-{rank + 1} input; add a Flatten before it"
            )
        steps.append(DenseStep(layer=layer, activation=_activation_name(layer)))
    if not steps:
        raise UnsupportedModelError(f"model {model.name!r} has no Dense layer to prune")
    for i, step in enumerate(steps):
        last = i == len(steps) - 1
        allowed = SUPPORTED_ACTIVATIONS + (("softmax",) if last else ())
        if step.activation not in allowed:
            raise UnsupportedModelError(
                f"Dense layer {step.layer.name!r} has activation {step.activation!r}; supported: "
                f"{', '.join(SUPPORTED_ACTIVATIONS)} (softmax only on the last layer)"
            )
    dtypes = {str(step.kernel.dtype) for step in steps}
    if len(dtypes) != 1 or not dtypes <= {"float32", "float64"}:
        raise UnsupportedModelError(
            f"model {model.name!r} has kernel dtypes {sorted(dtypes)}; use one of float32 or float64"
        )
    return Chain(model=model, steps=tuple(steps), input_shape=input_shape)


def prunable_kernels(model: keras.Model) -> dict[str, keras.Variable]:
    """The prunable weights of ``model`` -- the ``Dense`` kernels, biases excluded -- by path."""
    return {step.path: step.kernel for step in as_chain(model).steps}


def check_finite_weights(model: keras.Model) -> None:
    """Raise ``ValueError`` naming the first variable of ``model`` with a NaN or infinite entry."""
    for variable in model.weights:
        values = np.asarray(variable.numpy())
        if not np.all(np.isfinite(values)):
            bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
            raise ValueError(f"weight {variable.path!r} has {bad} non-finite (NaN or inf) entries")


__all__ = [
    "PIECEWISE_LINEAR",
    "SUPPORTED_ACTIVATIONS",
    "SUPPORTED_LAYERS",
    "Chain",
    "DenseStep",
    "UnsupportedModelError",
    "as_chain",
    "check_finite_weights",
    "prunable_kernels",
]
