"""Masked retraining: fine-tune a pruned network with its pruned weights held at exactly zero.

:func:`masked_fit` trains a model whose kernels carry keep-masks (the format of
:mod:`helpers.pruning`: ``{kernel path: bool array}``, ``True`` = kept). It uses a **fresh** Adam
optimizer (a new one, or the one it used last on this model with zeroed state, so the compiled
step is reused), so both moment estimates start at zero, and multiplies every kernel gradient by its
mask before the update. A pruned entry therefore has gradient 0, first moment
:math:`m = \\beta_1 m + (1-\\beta_1)\\cdot 0 = 0` and second moment :math:`v = 0` at every step,
and its Adam update :math:`m / (\\sqrt v + \\epsilon)` is exactly 0: the weight never moves off
zero. After each step the masks are also multiplied into the kernels (belt and braces). Biases
are never pruned and train normally; dropout layers are active during training.

:func:`iterative_prune` alternates pruning and masked retraining along an increasing schedule
of fractions removed. Each round scores the **current** (pruned, retrained) model and removes the
lowest-scored of the still-kept weights, so weights pruned in earlier rounds stay pruned and the
cumulative number removed after a round is exactly ``round(fraction * n)``, as in
:func:`helpers.pruning.masks_from_scores`. One-shot pruning with a single retraining is the
one-element schedule with the whole epoch budget::

    one_shot = iterative_prune(model, x, y, schedule=[0.9], epochs_per_round=6, saliency=...)
    iterative = iterative_prune(model, x, y, schedule=[0.5, 0.7, 0.8, 0.9, 0.95, 0.99],
                                epochs_per_round=1, saliency=...)   # same budget: 6 epochs

:func:`obd_saliency` and :func:`magnitude_saliency` make the ``saliency`` callables.

**Distillation.** :func:`teacher_targets` records a teacher's logits on the training images (for
example the dense network's, before it is pruned); passed as ``distill=`` to :func:`masked_fit`
or :func:`iterative_prune`, retraining minimises Hinton et al.'s (2015) mix of the hard
cross-entropy and the cross-entropy to the teacher's softened outputs
(:mod:`helpers.training`), so the pruned network is pulled towards what the dense one computed.
"""

from __future__ import annotations

import copy
import hashlib
import math
import numbers
import operator
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from helpers.curvature import Method, second_derivatives
from helpers.evaluate import Evaluator
from helpers.inputs import check_arrays
from helpers.models import check_lr_schedule, learning_rate_for
from helpers.network import prunable_kernels
from helpers.pruning import Masks, Scope, apply_masks, check_fraction, check_scope, removal_count
from helpers.runtime import keras
from helpers.saliency import Scores, check_scores, magnitude, obd
from helpers.training import SoftTargets, StepCallback, check_classifier, fit_classifier

#: A saliency function: the scores of every kernel weight of a model (lower = pruned sooner).
Saliency = Callable[[keras.Model], Scores]


DEFAULT_BATCH_SIZE = 128
DEFAULT_LEARNING_RATE = 1e-3
DEFAULT_TEMPERATURE = 4.0
DEFAULT_DISTILL_WEIGHT = 0.9
_TEACHER_BATCH_SIZE = 2000


# --------------------------------------------------------------------------- argument checks


def _non_negative_int(value: object, name: str) -> int:
    """``value`` as an int, if it is an integer (not a bool) >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return operator.index(value)


def _positive_int(value: object, name: str) -> int:
    """``value`` as an int, if it is an integer (not a bool) > 0."""
    if _non_negative_int(value, name) == 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return operator.index(value)


def _positive_float(value: object, name: str) -> float:
    """``value`` as a finite float > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    number = float(value)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return number


def check_schedule(schedule: Sequence[float]) -> list[float]:
    """``schedule`` as a list of floats, or ``ValueError`` unless it is a non-empty, strictly
    increasing sequence of fractions in [0, 1]."""
    if isinstance(schedule, (str, bytes)) or not isinstance(schedule, (Sequence, np.ndarray)):
        raise ValueError(f"schedule must be a sequence of fractions in [0, 1], got {schedule!r}")
    fractions = [check_fraction(f) for f in schedule]
    if not fractions:
        raise ValueError("schedule is empty: give at least one fraction to remove")
    for i in range(1, len(fractions)):
        if fractions[i] <= fractions[i - 1]:
            raise ValueError(
                f"schedule must be strictly increasing, got {fractions[i - 1]} then "
                f"{fractions[i]} at positions {i - 1} and {i}"
            )
    return fractions


def check_round_epochs(epochs_per_round: int | Sequence[int], rounds: int) -> list[int]:
    """Epochs of each of ``rounds`` rounds: one non-negative int for all, or a sequence of one
    per round; ``ValueError`` otherwise."""
    if isinstance(epochs_per_round, (Sequence, np.ndarray)) and not isinstance(
        epochs_per_round, (str, bytes)
    ):
        epochs = [_non_negative_int(e, "epochs_per_round entries") for e in epochs_per_round]
        if len(epochs) != rounds:
            raise ValueError(
                f"epochs_per_round has {len(epochs)} entries for a schedule of {rounds} "
                "fractions: give one number per round, or one for all"
            )
        return epochs
    return [_non_negative_int(epochs_per_round, "epochs_per_round")] * rounds


# --------------------------------------------------------------------------- distillation


def _logits(teacher: keras.Model, x: np.ndarray) -> np.ndarray:
    """One teacher's logits on ``x`` in inference mode (log-probabilities for a softmax output)."""
    chain = check_classifier(teacher)
    xa = np.asarray(x, dtype=chain.dtype)
    if xa.ndim < 1 or xa.shape[1:] != tuple(chain.input_shape):
        raise ValueError(
            f"x must have shape (N, {', '.join(map(str, chain.input_shape))}), got {xa.shape}"
        )
    outputs = [
        keras.ops.convert_to_numpy(teacher(xa[i : i + _TEACHER_BATCH_SIZE], training=False))
        for i in range(0, len(xa), _TEACHER_BATCH_SIZE)
    ]
    logits = np.concatenate(outputs) if outputs else np.zeros((0, 0), dtype=chain.dtype)
    if chain.steps[-1].activation == "softmax":
        with np.errstate(divide="ignore"):
            logits = np.log(logits)
        logits = np.maximum(logits, np.finfo(logits.dtype).min)  # log 0 -> a large negative
    if not np.all(np.isfinite(logits)):
        raise ValueError("the teacher's outputs are not finite (check its weights)")
    return logits


def teacher_targets(
    teacher: keras.Model | Sequence[keras.Model],
    x: np.ndarray,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    weight: float = DEFAULT_DISTILL_WEIGHT,
) -> SoftTargets:
    r"""The teacher's logits on ``x`` (inference mode), for ``distill=`` in :func:`masked_fit`.

    They are computed now, so pruning the teacher afterwards (it may be the very model that is
    about to be pruned) does not change them. A teacher ending in softmax gives the log of its
    probabilities, which softmax maps back to the same distribution.

    Several teachers (an *ensemble*, as in Hinton et al.'s paper) give the mean of their
    logits: the soft target :math:`\sigma(ar t/T)` is then the normalised geometric mean of
    the teachers' softened distributions.

    Args:
        teacher: a supported classifier (:mod:`helpers.network`), or a non-empty sequence of
            them with the same number of classes.
        x: the training images ``(N, *input_shape)`` retraining will use, in the same order.
        temperature: :math:`T > 0`; higher spreads the teacher's probability over more classes.
        weight: :math:`\alpha \in [0, 1]`, the share of the soft term (0: plain cross-entropy).
    """
    temperature = _positive_float(temperature, "temperature")
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not 0 <= weight <= 1:
        raise ValueError(f"weight must be a number in [0, 1], got {weight!r}")
    teachers = list(teacher) if isinstance(teacher, Sequence) else [teacher]
    if not teachers:
        raise ValueError("teacher is an empty sequence: give a model or several")
    each = [_logits(t, x) for t in teachers]
    if len({e.shape for e in each}) > 1:
        raise ValueError(
            f"the teachers disagree on the shape of their outputs: {[e.shape for e in each]}"
        )
    logits = each[0] if len(each) == 1 else np.mean(each, axis=0, dtype=np.float64)
    logits = logits.astype(each[0].dtype, copy=False)
    return SoftTargets(logits=logits, temperature=temperature, weight=float(weight))


def _check_distill(distill: object, n: int, classes: int) -> SoftTargets | None:
    """``distill`` if it is ``None`` or :class:`SoftTargets` for ``n`` samples and ``classes``."""
    if distill is None:
        return None
    if not isinstance(distill, SoftTargets):
        raise ValueError(
            f"distill must come from teacher_targets(...), got {type(distill).__name__}"
        )
    if distill.logits.shape != (n, classes):
        raise ValueError(
            f"distill has the teacher's logits for shape {distill.logits.shape}, but retraining "
            f"has {n} samples and {classes} classes: compute them on the same x"
        )
    return distill


# --------------------------------------------------------------------------- masked training


_OPTIMIZERS_ATTRIBUTE = "_helpers_retrain_optimizers"
_OPTIMIZERS_PER_MODEL = 16


def _fresh_adam(
    model: keras.Model, learning_rate: float, lr_schedule: str, steps: int
) -> keras.optimizers.Adam:
    """An Adam optimizer for ``model`` in the state of a new one: step count and both moments
    zero. The one used last for the same model and settings is reset and returned, so
    :func:`helpers.training.fit_classifier` reuses its compiled step (tracing a new graph each
    round of :func:`iterative_prune` cost about as much as an epoch)."""
    cache: dict[tuple, keras.optimizers.Adam] = model.__dict__.get(_OPTIMIZERS_ATTRIBUTE, {})
    object.__setattr__(model, _OPTIMIZERS_ATTRIBUTE, cache)  # not a Keras-tracked attribute
    key = (learning_rate, lr_schedule, steps, tuple(v.path for v in model.trainable_variables))
    optimizer = cache.pop(key, None)
    if optimizer is None:
        optimizer = keras.optimizers.Adam(
            learning_rate=learning_rate_for(learning_rate, lr_schedule, steps)
        )
    else:
        for variable in optimizer.variables:
            if variable.name != "learning_rate":  # the iteration count and the moments
                variable.assign(np.zeros(variable.shape, variable.dtype))
    cache[key] = optimizer
    while len(cache) > _OPTIMIZERS_PER_MODEL:
        del cache[next(iter(cache))]
    return optimizer


def masked_fit(
    model: keras.Model,
    masks: Mapping[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    lr_schedule: str = "constant",
    seed: int = 0,
    verbose: int = 0,
    validation_data: tuple[np.ndarray, np.ndarray] | None = None,
    on_step: StepCallback | None = None,
    distill: SoftTargets | None = None,
    compact_inputs: bool = True,
) -> dict[str, list[float]]:
    """Train ``model`` in place with its pruned kernel weights held at exactly zero.

    The masks are validated as :func:`helpers.pruning.apply_masks` does (same paths and shapes as
    the model's kernels, boolean or 0/1) and applied first, so pruned weights are zero from the
    start. Training runs Adam(``learning_rate``) -- a fresh optimizer, moments at zero, no weight
    decay -- on the mean softmax cross-entropy of each mini-batch, with gradients of pruned
    entries zeroed before every update (module docstring). Each epoch visits the ``N`` samples
    once in an order drawn from ``np.random.default_rng(seed)``; :func:`set_determinism` is
    called with ``seed``, so the same call on the same model gives the same weights.

    Args:
        model: a supported classifier (see :mod:`helpers.network`) whose last layer gives logits
            (or applies softmax); its compiled optimizer is not used.
        masks: ``{kernel path: array}``, ``True``/1 where the weight is kept.
        x, y: training images ``(N, *input_shape)`` and integer labels ``(N,)``.
        epochs: passes over the data (0 only applies the masks).
        batch_size, learning_rate, seed: the schedule.
        lr_schedule: ``"constant"`` or ``"cosine"`` (from ``learning_rate`` down to 0 over the
            ``epochs``; a fine-tuning run then ends at a small step, as the dense training did).
        verbose: 1 prints one line per epoch (0 is silent).
        validation_data: ``(x_val, y_val)`` evaluated in inference mode after every epoch.
        on_step: called as ``on_step(step, optimizer)`` after every optimizer step. Without it
            each epoch runs as one compiled loop; with it the same compiled step is called from
            Python (slower, same updates).
        distill: :func:`teacher_targets` on this ``x``: minimise the distillation loss instead
            of the plain cross-entropy (module docstring).
        compact_inputs: for a network of ``Dense`` layers, leave out of each step the inputs
            whose every first-layer weight is pruned (:mod:`helpers.training`): the same sum
            without its zero terms, faster after heavy pruning; ``False`` multiplies them all.

    Returns:
        Per-epoch lists ``loss`` (the plain cross-entropy, also when distilling) and
        ``accuracy`` (means over the epoch's mini-batches, in training mode, as Keras reports
        them) and, with ``validation_data``, ``val_loss`` and ``val_accuracy``.
    """
    chain = check_classifier(model)
    epochs = _non_negative_int(epochs, "epochs")
    batch_size = _positive_int(batch_size, "batch_size")
    learning_rate = _positive_float(learning_rate, "learning_rate")
    lr_schedule = check_lr_schedule(lr_schedule)
    seed = _non_negative_int(seed, "seed")
    apply_masks(model, masks)  # validates the masks and zeroes the pruned weights
    kept = {p: np.asarray(masks[p]).astype(bool) for p in prunable_kernels(model)}
    x, y = check_arrays(chain, x, y, "softmax_cross_entropy")
    distill = _check_distill(distill, len(x), chain.num_outputs)
    steps = max(1, epochs * math.ceil(len(x) / batch_size))
    optimizer = _fresh_adam(model, learning_rate, lr_schedule, steps)
    return fit_classifier(
        model,
        optimizer,
        x,
        y,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        masks=kept,
        validation_data=validation_data,
        verbose=verbose,
        on_step=on_step,
        soft_targets=distill,
        compact_inputs=compact_inputs,
    )


# --------------------------------------------------------------------------- iterative pruning


@dataclass
class RoundResult:
    """One round of :func:`iterative_prune`.

    Attributes:
        fraction: the cumulative fraction of kernel weights removed after this round.
        removed: the cumulative number removed (``round(fraction * n)``; per kernel with
            ``scope="layer"``, summed).
        accuracy_before_retraining: test accuracy right after pruning (``None`` without test data).
        accuracy_after: test accuracy after the round's retraining (``None`` without test data).
        masks: the keep-masks after this round (copies).
        seconds: wall-clock time of the round (scoring, pruning, retraining, evaluation).
        history: the round's :func:`masked_fit` history.
    """

    fraction: float
    removed: int
    accuracy_before_retraining: float | None
    accuracy_after: float | None
    masks: Masks
    seconds: float
    history: dict[str, list[float]] = field(default_factory=dict)


def _lowest_kept(scores: np.ndarray, kept: np.ndarray, count: int) -> np.ndarray:
    """Flat indices of the ``count`` lowest-scored kept entries (ties: lower index first)."""
    candidates = np.flatnonzero(kept)
    order = np.argsort(scores[candidates], kind="stable")
    return candidates[order[:count]]


def shrink_masks(
    scores: Mapping[str, np.ndarray],
    masks: Mapping[str, np.ndarray],
    fraction: float,
    *,
    scope: Scope = "global",
) -> Masks:
    """New keep-masks that remove, among the weights ``masks`` still keeps, the lowest-scored
    ones until exactly ``round(fraction * n)`` weights are removed in all (``n`` counted over all
    kernels with ``scope="global"``, per kernel with ``"layer"``). Pruned weights stay pruned.

    Raises:
        ValueError: ``masks`` already remove more than ``fraction`` asks for.
    """
    check_scope(scope)
    fraction = check_fraction(fraction)
    paths = list(masks)
    if set(scores) != set(paths):
        raise ValueError(
            f"scores and masks name different kernels: {sorted(scores)} vs {sorted(paths)}"
        )
    keep = {p: np.asarray(masks[p], dtype=bool) for p in paths}
    values = {p: np.asarray(scores[p], dtype=np.float64) for p in paths}
    for p in paths:
        if values[p].shape != keep[p].shape:
            raise ValueError(
                f"scores[{p!r}] has shape {values[p].shape}; the mask has shape {keep[p].shape}"
            )
    groups = [[p] for p in paths] if scope == "layer" else [paths]
    out: Masks = {}
    for group in groups:
        flat_keep = np.concatenate([keep[p].reshape(-1) for p in group])
        flat_scores = np.concatenate([values[p].reshape(-1) for p in group])
        target = removal_count(fraction, flat_keep.size)
        already = int(flat_keep.size - np.count_nonzero(flat_keep))
        if already > target:
            where = "in total" if scope == "global" else f"in {group[0]!r}"
            raise ValueError(
                f"the masks already remove {already} weights {where}; fraction {fraction} "
                f"removes only {target}"
            )
        flat_keep[_lowest_kept(flat_scores, flat_keep, target - already)] = False
        start = 0
        for p in group:
            out[p] = flat_keep[start : start + keep[p].size].reshape(keep[p].shape)
            start += keep[p].size
    return out


def iterative_prune(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    schedule: Sequence[float],
    saliency: Saliency,
    epochs_per_round: int | Sequence[int],
    batch_size: int = DEFAULT_BATCH_SIZE,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    lr_schedule: str = "constant",
    seed: int = 0,
    x_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
    scope: Scope = "global",
    distill: SoftTargets | None = None,
) -> list[RoundResult]:
    """Prune ``model`` (in place) to each fraction of ``schedule`` in turn, retraining after each.

    Round ``r`` computes ``saliency(model)`` on the current pruned and retrained model, removes
    the lowest-scored still-kept weights so that ``round(schedule[r] * n)`` are removed in all
    (:func:`shrink_masks`), applies the masks and runs :func:`masked_fit` for
    ``epochs_per_round`` epochs (0: no retraining; a sequence gives each round its own number) with seed ``seed + r`` and a fresh Adam. The
    model starts with every weight kept. One-shot pruning with one retraining is
    ``schedule=[fraction]`` with the whole epoch budget (module docstring).

    Args:
        model: a supported classifier; left pruned and retrained after the last round.
        x, y: training data for retraining (and for the saliency, if it uses them).
        schedule: strictly increasing cumulative fractions removed, each in [0, 1].
        saliency: ``model -> scores`` (:func:`obd_saliency`, :func:`magnitude_saliency`).
        epochs_per_round: epochs after every round, or one number per round of ``schedule``
            (for example a longer retraining at the last, sparsest steps).
        batch_size, learning_rate, lr_schedule, seed: retraining, as in
            :func:`masked_fit` (a ``"cosine"`` schedule restarts in every round).
        x_test, y_test: if given, test accuracy is measured before and after each retraining.
        scope: ``"global"`` ranks all kernels together, ``"layer"`` each kernel on its own.
        distill: :func:`teacher_targets` of a teacher on ``x`` (the same targets every round),
            or ``None`` for plain cross-entropy.

    Returns:
        One :class:`RoundResult` per fraction of the schedule.
    """
    fractions = check_schedule(schedule)
    check_scope(scope)
    check_lr_schedule(lr_schedule)
    round_epochs = check_round_epochs(epochs_per_round, len(fractions))
    seed = _non_negative_int(seed, "seed")
    if (x_test is None) != (y_test is None):
        raise ValueError("give both x_test and y_test, or neither")
    evaluator = None if x_test is None else Evaluator(model, x_test, y_test)
    masks: Masks = {p: np.ones(k.shape, dtype=bool) for p, k in prunable_kernels(model).items()}
    results = []
    for r, fraction in enumerate(fractions):
        start = time.perf_counter()
        scores = check_scores(model, saliency(model))
        masks = shrink_masks(scores, masks, fraction, scope=scope)
        apply_masks(model, masks)
        before = None if evaluator is None else evaluator().accuracy
        history = masked_fit(
            model,
            masks,
            x,
            y,
            epochs=round_epochs[r],
            batch_size=batch_size,
            learning_rate=learning_rate,
            lr_schedule=lr_schedule,
            seed=seed + r,
            distill=distill,
        )
        after = None if evaluator is None else evaluator().accuracy
        results.append(
            RoundResult(
                fraction=fraction,
                removed=sum(int(m.size - np.count_nonzero(m)) for m in masks.values()),
                accuracy_before_retraining=before,
                accuracy_after=after,
                masks=copy.deepcopy(masks),
                seconds=time.perf_counter() - start,
                history=history,
            )
        )
    return results


# --------------------------------------------------------------------------- saliencies


def _weights_digest(model: keras.Model) -> str:
    """SHA-256 of every variable of ``model`` (path, dtype, shape and bytes)."""
    digest = hashlib.sha256()
    for variable in model.weights:
        values = np.ascontiguousarray(variable.numpy())
        digest.update(f"{variable.path}|{values.dtype}|{values.shape}|".encode())
        digest.update(values.tobytes())
    return digest.hexdigest()


def obd_saliency(
    x: np.ndarray, y: np.ndarray, method: Method = "exact", remember: int = 8
) -> Saliency:
    """``model -> obd(model, second_derivatives(model, x, y, method=method))``: the OBD
    saliency with second derivatives recomputed on the model as it is when called.

    The returned function remembers its last ``remember`` results, keyed by a digest of the
    model's weights: scoring the same network again (the dense network at the start of several
    experiments) returns a copy of the scores computed the first time, which are the same
    numbers. ``remember=0`` recomputes every time.
    """
    remember = operator.index(remember)
    if remember < 0:
        raise ValueError(f"remember must be >= 0, got {remember}")
    memo: dict[tuple[int, str], Scores] = {}

    def score(model: keras.Model) -> Scores:
        key = (id(model), _weights_digest(model)) if remember else None
        if key is not None and key in memo:
            memo[key] = memo.pop(key)  # most recently used last
        else:
            scores = obd(model, second_derivatives(model, x, y, method=method))
            if key is None:
                return scores
            memo[key] = scores
            while len(memo) > remember:
                memo.pop(next(iter(memo)))
        return {path: values.copy() for path, values in memo[key].items()}

    return score


def magnitude_saliency() -> Saliency:
    """``model -> |w|`` (:func:`helpers.saliency.magnitude`)."""
    return magnitude


__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_DISTILL_WEIGHT",
    "DEFAULT_LEARNING_RATE",
    "DEFAULT_TEMPERATURE",
    "RoundResult",
    "Saliency",
    "SoftTargets",
    "StepCallback",
    "check_round_epochs",
    "check_schedule",
    "iterative_prune",
    "magnitude_saliency",
    "masked_fit",
    "obd_saliency",
    "shrink_masks",
    "teacher_targets",
]
