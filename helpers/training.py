r"""A compiled training loop for the classifiers the helpers support: one graph per epoch.

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

**Disconnected inputs are skipped.** When a network of ``Dense`` layers is retrained with a mask on
its first kernel, inputs whose every outgoing weight is pruned (a row of the mask with no ``True``)
contribute exactly nothing, so the step multiplies only the columns of the mini-batch that still
have a connection with the matching rows of the first kernel,
:math:`z_1 = X_{:,C}\,W_{C,:} + b` for the connected inputs :math:`C`. The first layer holds most of
the weights of an MNIST network (39,200 of 47,200) and heavy pruning disconnects many pixels (at
90% removed by OBD, about 340 of 784 stay connected), so this cuts the arithmetic of a step
roughly in proportion. The result is the same sum without its zero terms: equal up to float32
rounding, not bit for bit, to the full product (``compact_inputs=False`` keeps the full one).
During a call the connected rows of the first kernel, of its mask and of its two Adam moments are
copied into variables of their own, the step updates those, and they are written back after every
epoch (after every step with ``on_step``): a pruned input's row costs nothing, not even its update.
This needs the lean Adam step below (it keeps those moments); with any other optimizer, or with
non-zero moments left on a disconnected input, every input is multiplied.

**A lean Adam step.** For a plain ``keras.optimizers.Adam`` (no AMSGrad, clipping, EMA, gradient
accumulation or loss scaling, outside a distribution strategy) the step applies Keras' update
itself, written as Keras writes it with fewer graph operations, so the values are bitwise the same
(tested against ``optimizer.apply``); any other optimizer goes through ``optimizer.apply``. On its
own this is not measurably faster (``benchmarks/train_speed.py``: 0.97x to 1.03x for dense
training); what it buys is the compact first kernel above, whose Adam moments it keeps with the
rows.

With ``soft_targets`` the loss of each sample is Hinton et al.'s (2015) distillation loss,
:math:`(1-\alpha)\,\mathrm{CE}(y, \sigma(z)) + \alpha\,T^2\,\mathrm{CE}(\sigma(t/T), \sigma(z/T))`
for the model's logits :math:`z`, a teacher's logits :math:`t`, temperature :math:`T` and weight
:math:`\alpha` (:math:`\sigma` is the softmax; :math:`T^2` keeps the soft term's gradient on the
scale of the hard one). :mod:`helpers.retrain` uses it to retrain a pruned network towards the
dense network it came from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from helpers.evaluate import Evaluator
from helpers.inputs import check_arrays, label_spec
from helpers.losses import per_sample_loss, resolve_loss
from helpers.network import Chain, as_chain, from_first_product, split_at_first_dense
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


@dataclass(frozen=True)
class SoftTargets:
    """A teacher's logits on every training sample ``(N, classes)``, the temperature ``T > 0``
    and the weight ``alpha`` in ``[0, 1]`` of the soft term (module docstring)."""

    logits: np.ndarray
    temperature: float
    weight: float


def _distillation_loss(
    output: tf.Tensor, hard: tf.Tensor, teacher: tf.Tensor, soft: SoftTargets, from_logits: bool
) -> tf.Tensor:
    """Per sample, ``(1 - alpha) * hard + alpha * T^2 * CE(softmax(t/T), softmax(z/T))``."""
    logits = output if from_logits else tf.math.log(output)  # softmax(log p / T) = p^(1/T) / sum
    t = tf.cast(soft.temperature, output.dtype)
    soft_ce = -tf.reduce_sum(tf.nn.softmax(teacher / t) * tf.nn.log_softmax(logits / t), axis=-1)
    return (1.0 - soft.weight) * hard + soft.weight * t * t * soft_ce


#: How many times a training step has been traced in this process (tests check the reuse below).
traces = 0
#: Compiled graphs kept per model (the most recently used); each keeps its optimizer alive.
#: Chapter 08 retrains each network with 8 settings (epoch counts, with and without a teacher).
_GRAPHS_PER_MODEL = 16
_GRAPHS_ATTRIBUTE = "_helpers_training_graphs"
_DATA_ATTRIBUTE = "_helpers_training_data"


@dataclass
class _Graphs:
    """What one compiled training step captures: the optimizer it applies (with the lean step or
    not), and variables that hold the data, the masks and the teacher's logits, so a later call
    with other values of the same shapes assigns them instead of tracing a new graph."""

    optimizer: keras.optimizers.Optimizer
    data: tuple[tf.Variable, tf.Variable]
    masks: list[tf.Variable | None]
    teacher: tf.Variable | None
    compact: _Compact | None
    lean: bool
    step: StepFn
    epochs: dict[int, EpochFn]


def _variable(value: np.ndarray, dtype: str | tf.DType, open_shape: bool = False) -> tf.Variable:
    """A non-trainable variable holding ``value``; with ``open_shape`` later assignments may
    change its shape (not its rank)."""
    shape = tf.TensorShape([None] * np.ndim(value)) if open_shape else None
    return tf.Variable(tf.constant(value, dtype=dtype), trainable=False, shape=shape)


def connected_inputs(mask: np.ndarray) -> np.ndarray:
    """Indices (int32) of the rows of a first-layer keep-mask ``(n_in, n_out)`` that keep at
    least one weight: the inputs that still reach the network."""
    return np.flatnonzero(np.asarray(mask, dtype=bool).any(axis=1)).astype(np.int32)


def _compact_layers(
    model: keras.Model, chain: Chain, masks: Mapping[str, np.ndarray]
) -> tuple[keras.layers.Layer, list[keras.layers.Layer]] | None:
    """The first ``Dense`` layer and the layers after it, when the step may skip disconnected
    inputs: a chain of ``Dense`` layers (``Flatten`` only first) whose first kernel is masked
    and has no regulariser or constraint (both would need the whole kernel)."""
    first = chain.steps[0]
    if not chain.dense_only or first.kernel.path not in masks:
        return None
    if first.layer.kernel_regularizer is not None or first.layer.kernel_constraint is not None:
        return None
    return split_at_first_dense(model, chain)


def _lean_adam_applies(optimizer: keras.optimizers.Optimizer, variables: Sequence) -> bool:
    """Whether :func:`_adam_update` gives ``optimizer.apply``'s update: a plain Keras Adam,
    float32 variables without constraints, no distribution strategy (module docstring)."""
    return (
        type(optimizer) is keras.optimizers.Adam
        and not optimizer.amsgrad
        and optimizer.clipnorm is None
        and optimizer.clipvalue is None
        and optimizer.global_clipnorm is None
        and not optimizer.use_ema
        and not optimizer.gradient_accumulation_steps
        and optimizer.loss_scale_factor is None
        and not tf.distribute.has_strategy()
        and all(v.dtype == "float32" and v.constraint is None for v in variables)
        and all(
            hasattr(optimizer, name)
            for name in ("_momentums", "_velocities", "_get_variable_index", "_use_weight_decay")
        )
    )


@dataclass(frozen=True)
class _Update:
    """One variable the lean Adam step updates: the variable, its two moments and whether the
    optimizer applies weight decay to it."""

    variable: tf.Variable
    momentum: tf.Variable
    velocity: tf.Variable
    decay: bool


def _tf_variable(variable: object) -> tf.Variable:
    """The ``tf.Variable`` behind a Keras variable (a ``tf.Variable`` as it is)."""
    return variable if isinstance(variable, tf.Variable) else variable.value


def _adam_updates(optimizer: keras.optimizers.Adam, variables: Sequence) -> list[_Update]:
    """The :class:`_Update` of each of the model's ``variables`` (the optimizer is built)."""
    updates = []
    for variable in variables:
        index = optimizer._get_variable_index(variable)
        updates.append(
            _Update(
                _tf_variable(variable),
                _tf_variable(optimizer._momentums[index]),
                _tf_variable(optimizer._velocities[index]),
                bool(optimizer._use_weight_decay(variable)),
            )
        )
    return updates


def _adam_update(
    optimizer: keras.optimizers.Adam, grads: Sequence[tf.Tensor], updates: Sequence[_Update]
) -> None:
    r"""Keras' Adam step (``optimizer.apply``) on ``updates`` with fewer graph operations: the
    same arithmetic in the same order, so bitwise the same values (module docstring).

    Decoupled weight decay first, :math:`w \leftarrow w - w\,\lambda\,\eta`; then
    :math:`m \mathrel{+}= (g - m)(1-\beta_1)`, :math:`v \mathrel{+}= (g^2 - v)(1-\beta_2)`,
    :math:`w \mathrel{-}= m\,\alpha / (\sqrt v + \epsilon)` with
    :math:`\alpha = \eta\sqrt{1-\beta_2^t}/(1-\beta_1^t)` at step :math:`t`; then the step
    count.
    """
    if optimizer.weight_decay is not None:
        for update in updates:
            if update.decay:
                # the learning rate is read for each variable, as Keras does: sharing one read
                # lets the graph optimiser regroup the products and round differently
                lr = tf.cast(optimizer.learning_rate, update.variable.dtype)
                decay = tf.cast(optimizer.weight_decay, update.variable.dtype)
                update.variable.assign_sub(update.variable * decay * lr)
    dtype = tf.float32
    lr = tf.cast(optimizer.learning_rate, dtype)
    local_step = tf.cast(optimizer.iterations + 1, dtype)
    beta_1_power = tf.pow(tf.cast(optimizer.beta_1, dtype), local_step)
    beta_2_power = tf.pow(tf.cast(optimizer.beta_2, dtype), local_step)
    alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
    one_minus_beta_1 = tf.constant(1 - optimizer.beta_1, dtype)
    one_minus_beta_2 = tf.constant(1 - optimizer.beta_2, dtype)
    epsilon = tf.constant(optimizer.epsilon, dtype)
    for grad, update in zip(grads, updates, strict=True):
        m, v = update.momentum, update.velocity
        m.assign_add((grad - m) * one_minus_beta_1)
        v.assign_add((tf.square(grad) - v) * one_minus_beta_2)
        update.variable.assign_sub((m * alpha) / (tf.sqrt(v) + epsilon))
    optimizer.iterations.assign_add(1)


@dataclass
class _Compact:
    """The first ``Dense`` layer's connected rows during a call (module docstring): the
    layer, the later layers, the rows, and variables holding those rows of the kernel, its mask
    and its two Adam moments, next to the full-size ones (``full``) they are copied from and
    back to."""

    first: keras.layers.Layer
    rest: list[keras.layers.Layer]
    rows: tf.Variable
    kernel: tf.Variable
    mask: tf.Variable
    momentum: tf.Variable
    velocity: tf.Variable
    full: _Update

    def load(self, rows: np.ndarray, mask: np.ndarray) -> None:
        """Copy the rows ``rows`` of the kernel, the mask and the moments in."""
        self.rows.assign(rows)
        self.mask.assign(tf.constant(mask[rows], dtype=self.mask.dtype))
        for compact, full in (
            (self.kernel, self.full.variable),
            (self.momentum, self.full.momentum),
            (self.velocity, self.full.velocity),
        ):
            compact.assign(tf.gather(full, self.rows))

    def store(self) -> None:
        """Write the rows back into the full kernel and moments."""
        indices = self.rows[:, None]
        for compact, full in (
            (self.kernel, self.full.variable),
            (self.momentum, self.full.momentum),
            (self.velocity, self.full.velocity),
        ):
            full.scatter_nd_update(indices, compact)

    def update(self) -> _Update:
        """The compact kernel as the lean Adam step updates it."""
        return _Update(self.kernel, self.momentum, self.velocity, self.full.decay)


def _compact_forward(xb: tf.Tensor, compact: _Compact) -> tf.Tensor:
    """The model's training-mode output from a mini-batch ``xb`` that holds only the connected
    inputs (flattened): ``activation(xb @ kernel[rows] + bias)``, then the later layers as the
    model calls them."""
    return from_first_product(
        tf.matmul(xb, compact.kernel), compact.first, compact.rest, training=True
    )


def _train_step(
    model: keras.Model,
    chain: Chain,
    optimizer: keras.optimizers.Optimizer,
    x: tf.Variable,
    y: tf.Variable,
    batch_size: int,
    masks: Sequence[tf.Variable | None],
    teacher: tf.Variable | None = None,
    soft: SoftTargets | None = None,
    compact: _Compact | None = None,
    lean: bool = False,
) -> StepFn:
    """A compiled step ``(order, start) -> (loss sum, correct count)`` on the batch
    ``order[start : start + batch_size]`` of ``(x, y)``, traced once. ``masks`` has one entry
    per trainable variable (``None``: not masked). The loss sum is always the hard
    cross-entropy (what is reported); with ``soft`` the gradient is the distillation loss's.
    With ``compact`` (only with ``lean``), ``x`` holds only the connected inputs of the
    flattened images and the step trains ``compact.kernel`` in place of the first kernel; with
    ``lean`` the update is :func:`_adam_update` (module docstring)."""
    variables = list(model.trainable_variables)
    step_masks = list(masks)
    trained: list = list(variables)
    updates = _adam_updates(optimizer, variables) if lean else []
    if compact is not None:
        index = next(i for i, v in enumerate(variables) if v is compact.first.kernel)
        trained[index] = compact.kernel
        step_masks[index] = compact.mask
        updates[index] = compact.update()
    from_logits = chain.steps[-1].activation != "softmax"

    def step(order: tf.Tensor, start: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        global traces
        traces += 1  # Python side effect: runs when the step is traced, not when it runs
        indices = order[start : start + batch_size]
        xb, yb = tf.gather(x, indices), tf.gather(y, indices)
        with tf.GradientTape() as tape:
            if compact is None:
                output = model(xb, training=True)
            else:
                output = _compact_forward(xb, compact)
            per_sample = per_sample_loss(output, yb, "softmax_cross_entropy", from_logits)
            if soft is None or teacher is None:
                loss = tf.reduce_mean(per_sample)
            else:
                tb = tf.gather(teacher, indices)
                loss = tf.reduce_mean(_distillation_loss(output, per_sample, tb, soft, from_logits))
            if model.losses:  # regularisers, if the model has any
                loss = loss + tf.add_n(model.losses)
        grads = tape.gradient(loss, trained)
        grads = [g if m is None else g * m for g, m in zip(grads, step_masks, strict=True)]
        if lean:
            _adam_update(optimizer, grads, updates)
        else:
            optimizer.apply(grads, variables)
        for variable, mask in zip(trained, step_masks, strict=True):
            if mask is not None:
                variable.assign(variable * mask)
        correct = tf.equal(tf.argmax(output, axis=-1, output_type=yb.dtype), yb)
        return tf.reduce_sum(per_sample), tf.reduce_sum(tf.cast(correct, tf.int32))

    signature = [tf.TensorSpec([None], tf.int32), tf.TensorSpec([], tf.int32)]
    return tf.function(step, input_signature=signature)


def _new_compact(
    full: _Update,
    layers: tuple[keras.layers.Layer, list[keras.layers.Layer]],
    rows: np.ndarray,
) -> _Compact:
    """Empty compact variables (shapes left open: any number of connected inputs)."""
    first, rest = layers
    kernel = first.kernel
    width = int(kernel.shape[1])

    def open_variable(trainable: bool = False) -> tf.Variable:
        return tf.Variable(
            tf.zeros([len(rows), width], kernel.dtype),
            trainable=trainable,
            shape=tf.TensorShape([None, width]),
        )

    return _Compact(
        first=first,
        rest=rest,
        rows=_variable(rows, tf.int32, open_shape=True),
        kernel=open_variable(trainable=True),
        mask=open_variable(),
        momentum=open_variable(),
        velocity=open_variable(),
        full=full,
    )


def _graphs(
    model: keras.Model,
    chain: Chain,
    optimizer: keras.optimizers.Optimizer,
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    masks: Mapping[str, np.ndarray],
    soft: SoftTargets | None,
    compact_inputs: bool = True,
    lean_adam: bool = True,
) -> _Graphs:
    """The compiled step for these arguments, with their values loaded: reused (no tracing) when
    this model was last trained with the same optimizer object and the same shapes, batch size,
    masked kernels and distillation settings, else traced and remembered on the model."""
    cache: dict[tuple, _Graphs] = model.__dict__.get(_GRAPHS_ATTRIBUTE, {})
    object.__setattr__(model, _GRAPHS_ATTRIBUTE, cache)  # not a Keras-tracked attribute
    variables = list(model.trainable_variables)
    lean = lean_adam and _lean_adam_applies(optimizer, variables)
    layers = _compact_layers(model, chain, masks) if compact_inputs and lean else None
    rows = None
    first_mask = None
    full = None
    if layers is not None:  # the data keep only the connected inputs, flattened
        first_mask = np.asarray(masks[chain.steps[0].kernel.path], dtype=bool)
        rows = connected_inputs(first_mask)
        (full,) = _adam_updates(optimizer, [layers[0].kernel])
        if not _disconnected_moments_are_zero(full, rows):
            layers, rows = None, None  # the full step would move them: no shortcut
        else:
            x = np.take(x.reshape(len(x), -1), rows, axis=1)  # 4x faster than x[:, rows]
    key = (
        id(optimizer),
        x.shape if rows is None else x.shape[:1],
        str(x.dtype),
        y.shape,
        str(y.dtype),
        batch_size,
        tuple(v.path in masks for v in variables),
        None if soft is None else (soft.temperature, soft.weight, soft.logits.shape),
        rows is not None,
        lean,
    )
    data = _shared_data(model, x, y, chain.dtype, open_shape=rows is not None)
    graphs = cache.pop(key, None)
    if graphs is not None and graphs.optimizer is optimizer:
        for variable, mask in zip(variables, graphs.masks, strict=True):
            if mask is not None:
                mask.assign(tf.constant(masks[variable.path], dtype=mask.dtype))
        if graphs.teacher is not None and soft is not None:
            graphs.teacher.assign(tf.constant(soft.logits, dtype=graphs.teacher.dtype))
    else:
        mask_variables = [
            _variable(masks[v.path], v.dtype) if v.path in masks else None for v in variables
        ]
        teacher = None if soft is None else _variable(soft.logits, chain.dtype)
        compact = None if layers is None or full is None else _new_compact(full, layers, rows)
        step = _train_step(
            model,
            chain,
            optimizer,
            *data,
            batch_size,
            mask_variables,
            teacher,
            soft,
            compact,
            lean,
        )
        graphs = _Graphs(optimizer, data, mask_variables, teacher, compact, lean, step, {})
    if graphs.compact is not None and rows is not None and first_mask is not None:
        graphs.compact.load(rows, first_mask)
    cache[key] = graphs  # most recently used last
    while len(cache) > _GRAPHS_PER_MODEL:
        del cache[next(iter(cache))]
    return graphs


def _shared_data(
    model: keras.Model, x: np.ndarray, y: np.ndarray, dtype: str, open_shape: bool
) -> tuple[tf.Variable, tf.Variable]:
    """Variables holding ``x`` and ``y``, one pair per model and shape (``open_shape``: any
    number of columns) shared by all its compiled steps, so that keeping many steps does not keep
    many copies of the training set; each call assigns its data before it runs."""
    store: dict[tuple, tf.Variable] = model.__dict__.get(_DATA_ATTRIBUTE, {})
    object.__setattr__(model, _DATA_ATTRIBUTE, store)  # not a Keras-tracked attribute
    keys = (
        ("x", np.ndim(x) if open_shape else x.shape, str(dtype), open_shape),
        ("y", y.shape, str(y.dtype), False),
    )
    for key, value, value_dtype in ((keys[0], x, dtype), (keys[1], y, y.dtype)):
        if key in store:
            store[key].assign(tf.constant(value, dtype=store[key].dtype))
        else:
            store[key] = _variable(value, value_dtype, open_shape=key[3])
    return store[keys[0]], store[keys[1]]


def _disconnected_moments_are_zero(full: _Update, rows: np.ndarray) -> bool:
    """Whether the first kernel's Adam moments are zero on every input outside ``rows``: then
    the full step leaves those rows alone (gradient 0, moments 0, update 0), as the compact
    step does. A fresh optimizer (as :func:`helpers.retrain.masked_fit` uses) passes."""
    outside = np.ones(int(full.variable.shape[0]), dtype=bool)
    outside[rows] = False
    return not any(np.any(m.numpy()[outside]) for m in (full.momentum, full.velocity))


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
    graphs: _Graphs,
    n: int,
    batch_size: int,
    dtype: str,
    optimizer: keras.optimizers.Optimizer,
    on_step: StepCallback,
) -> EpochFn:
    """The same pass, calling the step from Python and ``on_step`` after each step (with the
    compact rows written back first, so ``on_step`` sees the model and optimizer as they are)."""
    count = 0

    def epoch(order: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        nonlocal count
        loss_sum, correct = tf.zeros([], dtype=dtype), tf.zeros([], dtype=tf.int32)
        for start in range(0, n, batch_size):
            batch_loss, batch_correct = graphs.step(order, tf.constant(start, dtype=tf.int32))
            loss_sum, correct = loss_sum + batch_loss, correct + batch_correct
            if graphs.compact is not None:
                graphs.compact.store()
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
    soft_targets: SoftTargets | None = None,
    compact_inputs: bool = True,
    lean_adam: bool = True,
) -> dict[str, list[float]]:
    """Train ``model`` in place on the mean softmax cross-entropy of each mini-batch.

    :func:`~helpers.runtime.set_determinism` is called with ``seed`` and each epoch visits the
    ``N`` samples once in an order drawn from ``np.random.default_rng(seed)`` (the last batch
    may be smaller), so the same call on the same model gives the same weights. Dropout layers
    are active during training. The caller validates the arguments (positive ``batch_size``,
    ``epochs >= 0``, masks with the kernels' paths and shapes) and builds ``optimizer``.

    Args:
        model: a classifier :func:`check_classifier` accepts.
        optimizer: a Keras optimizer; built for the model's trainable variables here if it is
            not built yet. Passing the same optimizer object in a later call on the same model
            (with the same shapes) reuses the compiled step instead of tracing it again; the
            optimizer's state is whatever it is then (:mod:`helpers.retrain` resets it).
        x, y: training images ``(N, *input_shape)`` and integer labels ``(N,)``.
        epochs, batch_size, seed: the schedule.
        masks: ``{kernel path: bool array}``: gradients of ``False`` entries are zeroed before
            every update and the mask is multiplied into the kernel after it.
        validation_data: ``(x_val, y_val)`` evaluated in inference mode after every epoch.
        verbose: 1 prints one line per epoch (0 is silent).
        on_step: called as ``on_step(step, optimizer)`` after every optimizer step. Without it
            each epoch runs as one compiled loop; with it the same compiled step is called from
            Python (slower, same updates).
        soft_targets: train on the distillation loss (module docstring) instead; its logits
            row ``i`` belongs to ``x[i]`` (the caller checks shapes and values).
        compact_inputs: skip the inputs that lost every connection (module docstring); only
            used for ``Dense`` networks whose first kernel is in ``masks``, with the lean step.
        lean_adam: apply a plain Keras Adam with the lean step (module docstring; the same
            values); ``False`` always calls ``optimizer.apply`` (and multiplies every input).

    Returns:
        Per-epoch lists ``loss`` (the hard cross-entropy, also with ``soft_targets``) and
        ``accuracy`` (over the epoch's mini-batches, in training mode, as Keras reports them)
        and, with ``validation_data``, ``val_loss`` and ``val_accuracy``.
    """
    chain = check_classifier(model)
    xa, ya = check_arrays(chain, x, y, "softmax_cross_entropy")
    evaluator = None if validation_data is None else Evaluator(model, *validation_data)
    set_determinism(seed)
    rng = np.random.default_rng(seed)
    n = int(xa.shape[0])
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    ya = ya.astype(label_spec(chain, "softmax_cross_entropy").dtype.as_numpy_dtype, copy=False)
    graphs = _graphs(
        model,
        chain,
        optimizer,
        xa,
        ya,
        batch_size,
        masks or {},
        soft_targets,
        compact_inputs,
        lean_adam,
    )
    history: dict[str, list[float]] = {"loss": [], "accuracy": []}
    if evaluator is not None:
        history.update(val_loss=[], val_accuracy=[])
    if on_step is None:
        if n not in graphs.epochs:
            graphs.epochs[n] = _compiled_epoch(graphs.step, n, batch_size, chain.dtype)
        run_epoch = graphs.epochs[n]
    else:
        run_epoch = _observed_epoch(graphs, n, batch_size, chain.dtype, optimizer, on_step)
    for epoch in range(epochs):
        loss_sum, correct = run_epoch(tf.constant(rng.permutation(n), dtype=tf.int32))
        if graphs.compact is not None:
            graphs.compact.store()  # the trained rows back into the model (and the moments)
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


__all__ = [
    "EpochFn",
    "SoftTargets",
    "StepCallback",
    "StepFn",
    "check_classifier",
    "connected_inputs",
    "fit_classifier",
]
