"""Which Keras models the helpers support, described as a chain of layers.

The curvature code does its own forward and backward passes, so it needs to know exactly what
each layer computes. This module turns a Keras model into a :class:`Chain`: the sequence of
operations it computes (:class:`DenseStep`, :class:`ConvStep`, :class:`PoolStep`,
:class:`FlattenStep`), after checking that the model is a single chain made only of supported
layers:

- ``Dense`` with activation ``relu``, ``tanh``, ``sigmoid`` or ``linear`` (and ``softmax`` on
  the last layer only, where it is treated as part of a cross-entropy loss);
- ``Conv2D`` (``channels_last``, padding ``"valid"`` or ``"same"``, any strides and kernel size,
  with or without bias, the same activations as ``Dense`` but never softmax; dilation 1 and
  groups 1 only);
- ``MaxPooling2D`` and ``AveragePooling2D`` (``channels_last``, padding ``"valid"`` or
  ``"same"``, any strides);
- ``Dropout`` (the identity in inference mode, which is how pruning saliencies are measured);
- ``Flatten`` and ``InputLayer``.

The prunable weights are the kernels of the ``Dense`` and ``Conv2D`` layers
(:attr:`Chain.steps`). Anything else raises :class:`UnsupportedModelError` naming the layer
and, for a supported type, the unsupported setting.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from helpers.runtime import keras

SUPPORTED_LAYERS = (
    "Dense",
    "Conv2D",
    "MaxPooling2D",
    "AveragePooling2D",
    "Dropout",
    "Flatten",
    "InputLayer",
)
POOLING_LAYERS = {"MaxPooling2D": "max", "AveragePooling2D": "average"}
SUPPORTED_ACTIVATIONS = ("relu", "tanh", "sigmoid", "linear")
PIECEWISE_LINEAR = ("relu", "linear")


class UnsupportedModelError(ValueError):
    """The model has a layer, activation or topology the helpers cannot differentiate."""


@dataclass(frozen=True)
class WeightedStep:
    """A layer with a prunable kernel, an optional bias and an activation."""

    layer: keras.layers.Layer
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
class DenseStep(WeightedStep):
    """One ``Dense`` layer of a chain: ``z_out = activation(z_in @ kernel + bias)``."""


@dataclass(frozen=True)
class ConvStep(WeightedStep):
    """One ``Conv2D`` layer: ``z_out = activation(conv2d(z_in, kernel, strides, padding) + bias)``.

    ``padding`` is TensorFlow's spelling (``"VALID"`` or ``"SAME"``); the kernel has shape
    ``(kh, kw, c_in, c_out)`` and each of its weights is shared by every output position.
    """

    strides: tuple[int, int]
    padding: str


@dataclass(frozen=True)
class PoolStep:
    """A ``MaxPooling2D`` (``kind="max"``) or ``AveragePooling2D`` (``kind="average"``) layer."""

    layer: keras.layers.Layer
    kind: str
    pool_size: tuple[int, int]
    strides: tuple[int, int]
    padding: str


@dataclass(frozen=True)
class FlattenStep:
    """A ``Flatten`` layer after a rank-3 (height, width, channels) tensor."""

    layer: keras.layers.Layer


Step = DenseStep | ConvStep | PoolStep | FlattenStep


@dataclass(frozen=True)
class Chain:
    """A supported model as the sequence of operations it computes, with its input shape.

    ``ops`` holds every operation in order (``Dropout`` and ``InputLayer`` are identities and
    left out); ``steps`` only the weighted ones (``Dense`` and ``Conv2D``), whose kernels are
    the prunable weights; ``shapes[i]`` is the per-sample input shape of ``ops[i]`` and
    ``output_shape`` that of the model output.
    """

    model: keras.Model
    steps: tuple[WeightedStep, ...]
    input_shape: tuple[int, ...]
    ops: tuple[Step, ...]
    shapes: tuple[tuple[int, ...], ...]
    output_shape: tuple[int, ...]

    @property
    def num_outputs(self) -> int:
        return int(self.output_shape[-1])

    @property
    def dense_only(self) -> bool:
        """True when the chain has no ``Conv2D`` or pooling layer: ``Dense`` steps on the
        flattened input (a ``Flatten`` can only come first then)."""
        return all(isinstance(op, (DenseStep, FlattenStep)) for op in self.ops)

    @property
    def dtype(self) -> str:
        return str(self.steps[0].kernel.dtype)

    @property
    def piecewise_linear(self) -> bool:
        """True when every activation is ReLU or linear (the Hessian diagonal is then Gauss-Newton's);
        a softmax on the last layer counts as linear, being part of the cross-entropy loss."""
        last = self.steps[-1]
        return all(
            step.activation in PIECEWISE_LINEAR or (step is last and step.activation == "softmax")
            for step in self.steps
        )


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


def _activation_name(layer: keras.layers.Layer) -> str:
    return getattr(layer.activation, "__name__", type(layer.activation).__name__)


def _pair(value: object) -> tuple[int, int]:
    pair = tuple(int(v) for v in (value if isinstance(value, (tuple, list)) else (value, value)))
    return pair  # type: ignore[return-value]


def _check_spatial(layer: keras.layers.Layer, kind: str, shape: tuple[int, ...]) -> str:
    """Check the settings shared by Conv2D and pooling layers; return TF's padding name."""
    config = layer.get_config()
    if len(shape) != 3:
        raise UnsupportedModelError(
            f"{kind} layer {layer.name!r} receives a rank-{len(shape) + 1} input {shape}; "
            "it needs (batch, height, width, channels)"
        )
    if config.get("data_format", "channels_last") != "channels_last":
        raise UnsupportedModelError(
            f"{kind} layer {layer.name!r} has data_format={config['data_format']!r}; only "
            "'channels_last' is supported"
        )
    padding = str(config.get("padding", "valid")).lower()
    if padding not in ("valid", "same"):
        raise UnsupportedModelError(
            f"{kind} layer {layer.name!r} has padding={padding!r}; only 'valid' and 'same' are supported"
        )
    return padding.upper()


def _conv_step(layer: keras.layers.Layer, shape: tuple[int, ...]) -> ConvStep:
    padding = _check_spatial(layer, "Conv2D", shape)
    config = layer.get_config()
    if _pair(config["dilation_rate"]) != (1, 1):
        raise UnsupportedModelError(
            f"Conv2D layer {layer.name!r} has dilation_rate={config['dilation_rate']!r}; only 1 is supported"
        )
    if int(config.get("groups", 1)) != 1:
        raise UnsupportedModelError(
            f"Conv2D layer {layer.name!r} has groups={config['groups']!r}; only 1 is supported"
        )
    activation = _activation_name(layer)
    if activation not in SUPPORTED_ACTIVATIONS:
        raise UnsupportedModelError(
            f"Conv2D layer {layer.name!r} has activation {activation!r}; supported: "
            f"{', '.join(SUPPORTED_ACTIVATIONS)}"
        )
    return ConvStep(
        layer=layer, activation=activation, strides=_pair(config["strides"]), padding=padding
    )


def _pool_step(layer: keras.layers.Layer, kind: str, shape: tuple[int, ...]) -> PoolStep:
    padding = _check_spatial(layer, kind, shape)
    config = layer.get_config()
    pool_size = _pair(config["pool_size"])
    strides = pool_size if config.get("strides") is None else _pair(config["strides"])
    return PoolStep(
        layer=layer,
        kind=POOLING_LAYERS[kind],
        pool_size=pool_size,
        strides=strides,
        padding=padding,
    )


def _output_shape(layer: keras.layers.Layer, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(d) for d in layer.compute_output_shape((None, *shape))[1:])


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
    ops: list[Step] = []
    shapes: list[tuple[int, ...]] = []
    shape = input_shape
    seen: set[int] = set()
    for layer in _layer_sequence(model):
        kind = type(layer).__name__
        if id(layer) in seen:
            raise UnsupportedModelError(f"layer {layer.name!r} is used twice (shared weights)")
        seen.add(id(layer))
        if kind in ("InputLayer", "Dropout"):
            continue
        op: Step
        if kind == "Flatten":
            if len(shape) == 1:
                continue  # flattening a vector: the identity
            op = FlattenStep(layer=layer)
        elif kind == "Dense":
            if len(shape) != 1:
                raise UnsupportedModelError(
                    f"Dense layer {layer.name!r} receives a rank-{len(shape) + 1} input; add a Flatten before it"
                )
            op = DenseStep(layer=layer, activation=_activation_name(layer))
        elif kind == "Conv2D":
            op = _conv_step(layer, shape)
        elif kind in POOLING_LAYERS:
            op = _pool_step(layer, kind, shape)
        else:
            raise UnsupportedModelError(
                f"layer {layer.name!r} of type {kind} is not supported; supported layers: "
                f"{', '.join(SUPPORTED_LAYERS)} (activations: {', '.join(SUPPORTED_ACTIVATIONS)})"
            )
        ops.append(op)
        shapes.append(shape)
        shape = _output_shape(layer, shape)
    steps = [op for op in ops if isinstance(op, (DenseStep, ConvStep))]
    if not steps:
        raise UnsupportedModelError(f"model {model.name!r} has no Dense or Conv2D layer to prune")
    if len(shape) != 1:
        raise UnsupportedModelError(
            f"model {model.name!r} outputs per-sample shape {shape}; end it with Flatten or Dense"
        )
    for i, step in enumerate(steps):
        last = i == len(steps) - 1 and ops[-1] is step and isinstance(step, DenseStep)
        allowed = SUPPORTED_ACTIVATIONS + (("softmax",) if last else ())
        if step.activation not in allowed:
            raise UnsupportedModelError(
                f"{type(step.layer).__name__} layer {step.layer.name!r} has activation "
                f"{step.activation!r}; supported: {', '.join(SUPPORTED_ACTIVATIONS)} "
                "(softmax only on a final Dense layer)"
            )
    dtypes = {str(step.kernel.dtype) for step in steps}
    if len(dtypes) != 1 or not dtypes <= {"float32", "float64"}:
        raise UnsupportedModelError(
            f"model {model.name!r} has kernel dtypes {sorted(dtypes)}; use one of float32 or float64"
        )
    return Chain(
        model=model,
        steps=tuple(steps),
        input_shape=input_shape,
        ops=tuple(ops),
        shapes=tuple(shapes),
        output_shape=shape,
    )


def split_at_first_dense(
    model: keras.Model, chain: Chain
) -> tuple[keras.layers.Layer, list[keras.layers.Layer]] | None:
    """The first layer and the layers after it, if the chain starts with a ``Dense`` layer
    (after an optional ``Flatten``); ``None`` otherwise (a convolutional network)."""
    ops = [op for op in chain.ops if not isinstance(op, FlattenStep)]
    if not ops or not isinstance(ops[0], DenseStep) or ops[0] is not chain.steps[0]:
        return None
    layers = _layer_sequence(model)
    first = ops[0].layer
    return first, layers[layers.index(first) + 1 :]


def from_first_product(
    z: object, first: keras.layers.Layer, rest: list[keras.layers.Layer], training: bool
) -> object:
    """The model's output from its first ``Dense`` layer's product ``z = x @ kernel``: that
    layer's bias and activation, then the later layers, as the model computes them."""
    if first.use_bias:
        z = z + first.bias
    z = first.activation(z)
    for layer in rest:
        z = layer(z, training=training)
    return z


def require_dense(chain: Chain, what: str) -> None:
    """Raise :class:`UnsupportedModelError` unless ``chain`` is made of ``Dense`` layers only."""
    if not chain.dense_only:
        others = [op.layer.name for op in chain.ops if not isinstance(op, (DenseStep, FlattenStep))]
        raise UnsupportedModelError(
            f"{what} supports chains of Dense layers only; model {chain.model.name!r} has "
            f"layers {others}"
        )


def prunable_kernels(model: keras.Model) -> dict[str, keras.Variable]:
    """The prunable weights of ``model`` -- the ``Dense`` and ``Conv2D`` kernels, biases
    excluded -- by path, in layer order."""
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
    "ConvStep",
    "DenseStep",
    "FlattenStep",
    "PoolStep",
    "Step",
    "UnsupportedModelError",
    "WeightedStep",
    "as_chain",
    "check_finite_weights",
    "from_first_product",
    "prunable_kernels",
    "require_dense",
    "split_at_first_dense",
]
