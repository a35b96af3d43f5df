"""Masked retraining and iterative pruning: pruned weights never revive, counts are exact."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import training
from helpers.data import load_mnist
from helpers.models import build_mlp
from helpers.pruning import apply_masks, masks_from_scores, removal_count, snapshot
from helpers.retrain import (
    check_round_epochs,
    check_schedule,
    iterative_prune,
    magnitude_saliency,
    masked_fit,
    obd_saliency,
    shrink_masks,
    teacher_targets,
)
from helpers.runtime import keras, tf
from helpers.saliency import magnitude
from helpers.training import SoftTargets, _distillation_loss, connected_inputs

Arrays = tuple[np.ndarray, np.ndarray]


@pytest.fixture(scope="module")
def mnist_subset() -> tuple[Arrays, Arrays]:
    """1,500 training and 500 test images: enough to see the loss fall in a few steps."""
    (x, y), (x_test, y_test) = load_mnist()
    return (x[:1500], y[:1500]), (x_test[:500], y_test[:500])


def tiny(seed: int = 0, dropout_rate: float = 0.0) -> keras.Sequential:
    return build_mlp(hidden=(16, 16), dropout_rate=dropout_rate, seed=seed)


def kernels(model: keras.Model) -> dict[str, np.ndarray]:
    return {
        layer.kernel.path: layer.kernel.numpy().copy()
        for layer in model.layers
        if isinstance(layer, keras.layers.Dense)
    }


def biases(model: keras.Model) -> dict[str, np.ndarray]:
    return {
        layer.bias.path: layer.bias.numpy().copy()
        for layer in model.layers
        if isinstance(layer, keras.layers.Dense)
    }


def moments(optimizer: keras.optimizers.Optimizer, path: str, shape: tuple) -> list[np.ndarray]:
    """Adam's first and second moment variables of the kernel at ``path``."""
    prefix = path.replace("/", "_")
    found = {
        v.name: v.numpy()
        for v in optimizer.variables
        if v.name in (f"{prefix}_momentum", f"{prefix}_velocity") and tuple(v.shape) == shape
    }
    assert len(found) == 2, f"Adam moments of {path} not found among {optimizer.variables}"
    return list(found.values())


def half_masks(model: keras.Model) -> dict[str, np.ndarray]:
    return masks_from_scores(magnitude(model), 0.5)


# ---------------------------------------------------------------------------------------------
# masked_fit
# ---------------------------------------------------------------------------------------------


def test_pruned_weights_and_their_adam_moments_stay_zero_at_every_step(mnist_subset) -> None:
    (x, y), _ = mnist_subset
    model = tiny()
    masks = half_masks(model)
    start_kernels, start_biases = kernels(model), biases(model)
    steps: list[int] = []
    nonzero_kept_moments: list[bool] = []

    def check(step: int, optimizer: keras.optimizers.Optimizer) -> None:
        steps.append(step)
        for path, weights in kernels(model).items():
            pruned = ~masks[path]
            assert np.all(weights[pruned] == 0.0), f"step {step}: {path} revived"
            for moment in moments(optimizer, path, weights.shape):
                assert np.all(moment[pruned] == 0.0), f"step {step}: {path} moment non-zero"
                nonzero_kept_moments.append(bool(np.any(moment[masks[path]] != 0.0)))

    history = masked_fit(
        model, masks, x, y, epochs=3, batch_size=128, learning_rate=1e-2, on_step=check
    )

    assert steps == list(range(3 * 12))  # 1,500 images in batches of 128: 12 steps per epoch
    assert all(nonzero_kept_moments)
    final = kernels(model)
    # Weights from pixels that are 0 in every image have zero gradient; all others should move.
    lit = np.any(x.reshape(len(x), -1) != 0, axis=0)
    for i, (path, mask) in enumerate(masks.items()):
        assert np.all(final[path][~mask] == 0.0)
        live = mask & lit[:, None] if i == 0 else mask
        changed = final[path][live] != start_kernels[path][live]
        assert changed.mean() > 0.9, f"{path}: only {changed.mean():.0%} of kept weights moved"
    for path, bias in biases(model).items():
        assert np.any(bias != start_biases[path]), f"{path} did not train"
    assert len(history["loss"]) == len(history["accuracy"]) == 3
    assert history["loss"][-1] < 0.5 * history["loss"][0], history["loss"]
    assert history["accuracy"][-1] > history["accuracy"][0]


def test_plain_adam_would_revive_pruned_weights(mnist_subset) -> None:
    """The control for the test above: Keras' own fit moves the zeroed weights at once."""
    (x, y), _ = mnist_subset
    model = tiny()
    masks = half_masks(model)
    apply_masks(model, masks)
    model.fit(x, y, epochs=1, batch_size=128, verbose=0)
    revived = [np.any(kernels(model)[p][~m] != 0.0) for p, m in masks.items()]
    assert all(revived)


def test_masked_fit_reports_validation_and_is_deterministic(mnist_subset) -> None:
    (x, y), (x_test, y_test) = mnist_subset
    runs = []
    for seed in (3, 3, 4):
        model = tiny(seed=1)
        history = masked_fit(
            model, half_masks(model), x, y, epochs=2, seed=seed, validation_data=(x_test, y_test)
        )
        runs.append((kernels(model), biases(model), history))
    (k1, b1, h1), (k2, b2, h2), (k3, _, _) = runs
    assert set(h1) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(len(v) == 2 for v in h1.values())
    assert 0.0 <= min(h1["val_accuracy"]) <= max(h1["val_accuracy"]) <= 1.0
    assert h1 == h2
    for path in k1:
        np.testing.assert_array_equal(k1[path], k2[path])
    for path in b1:
        np.testing.assert_array_equal(b1[path], b2[path])
    assert any(not np.array_equal(k1[p], k3[p]) for p in k1)  # another seed, another order


def test_observing_every_step_does_not_change_the_updates(mnist_subset) -> None:
    (x, y), _ = mnist_subset
    results = []
    for on_step in (None, lambda step, optimizer: None):
        model = tiny(seed=2)
        history = masked_fit(
            model, half_masks(model), x[:1000], y[:1000], epochs=2, on_step=on_step
        )
        results.append((kernels(model), history))
    (k1, h1), (k2, h2) = results
    np.testing.assert_allclose(h1["loss"], h2["loss"], rtol=1e-6)
    assert h1["accuracy"] == h2["accuracy"]
    for path in k1:
        np.testing.assert_allclose(k1[path], k2[path], rtol=0, atol=1e-6)


def test_a_second_round_reuses_the_compiled_step_and_equals_a_fresh_start(mnist_subset) -> None:
    (x, y), _ = mnist_subset
    reused = tiny(seed=7)
    masked_fit(reused, half_masks(reused), x, y, epochs=1, seed=0)
    after_first = kernels(reused), biases(reused)
    masks = masks_from_scores(magnitude(reused), 0.7)  # other masks, same shapes and settings
    traces = training.traces
    masked_fit(reused, masks, x[::-1].copy(), y[::-1].copy(), epochs=1, seed=1)  # other data too
    assert training.traces == traces  # nothing traced again: the step was reused
    fresh = tiny(seed=7)  # another model: a new optimizer and a new graph
    for layer in fresh.layers:
        if isinstance(layer, keras.layers.Dense):
            layer.kernel.assign(after_first[0][layer.kernel.path])
            layer.bias.assign(after_first[1][layer.bias.path])
    masked_fit(fresh, masks, x[::-1].copy(), y[::-1].copy(), epochs=1, seed=1)
    assert training.traces > traces
    for got, expected in ((kernels(reused), kernels(fresh)), (biases(reused), biases(fresh))):
        for path in expected:
            np.testing.assert_array_equal(got[path], expected[path])


def test_a_snapshot_taken_before_retraining_restores_every_weight(mnist_subset) -> None:
    (x, y), _ = mnist_subset
    model = tiny(seed=8, dropout_rate=0.3)
    before = [v.numpy().copy() for v in model.variables]  # kernels, biases, dropout seed state
    original = snapshot(model)
    masked_fit(model, half_masks(model), x, y, epochs=1)
    assert any(
        not np.array_equal(v.numpy(), b) for v, b in zip(model.variables, before, strict=True)
    )
    original.restore()
    for variable, value in zip(model.variables, before, strict=True):
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)


def test_masked_fit_with_dropout(mnist_subset) -> None:
    (x, y), _ = mnist_subset
    model = tiny(dropout_rate=0.2)
    masks = half_masks(model)
    history = masked_fit(model, masks, x, y, epochs=2)
    for path, weights in kernels(model).items():
        assert np.all(weights[~masks[path]] == 0.0)
    assert history["loss"][-1] < history["loss"][0]


def test_masked_fit_with_zero_epochs_only_applies_the_masks(mnist_subset) -> None:
    (x, y), _ = mnist_subset
    model = tiny()
    masks = half_masks(model)
    before = kernels(model)
    assert masked_fit(model, masks, x, y, epochs=0) == {"loss": [], "accuracy": []}
    for path, weights in kernels(model).items():
        np.testing.assert_array_equal(weights, np.where(masks[path], before[path], 0.0))


def test_masked_fit_rejects_masks_that_do_not_match(mnist_subset) -> None:
    (x, y), _ = mnist_subset
    model = tiny()
    other = build_mlp(hidden=(16,), seed=0)
    with pytest.raises(ValueError, match="masks do not match model 'mlp': missing"):
        masked_fit(model, half_masks(other), x, y, epochs=1)
    masks = half_masks(model)
    first = next(iter(masks))
    with pytest.raises(ValueError, match=rf"masks\['{first}'\] has shape \(16, 784\)"):
        masked_fit(model, {**masks, first: masks[first].T}, x, y, epochs=1)
    with pytest.raises(ValueError, match="must be boolean"):
        masked_fit(model, {**masks, first: masks[first] * 0.5}, x, y, epochs=1)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        masked_fit(model, masks, x, y, epochs=1, batch_size=0)
    with pytest.raises(ValueError, match="learning_rate must be a positive number"):
        masked_fit(model, masks, x, y, epochs=1, learning_rate=-1.0)
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        masked_fit(model, masks, x, y, epochs=1, lr_schedule="linear")


def test_cosine_schedule_decays_the_step_to_zero_over_the_call(mnist_subset) -> None:
    (x, y), _ = mnist_subset
    model = tiny()
    masks = half_masks(model)
    rates: list[float] = []

    def record(step: int, optimizer: keras.optimizers.Optimizer) -> None:
        # the rate of the step just taken (the schedule is read at iterations - 1)
        rates.append(float(optimizer.learning_rate))

    masked_fit(
        model, masks, x, y, epochs=2, learning_rate=0.01, lr_schedule="cosine", on_step=record
    )
    steps = 2 * 12  # 1,500 images in batches of 128
    assert len(rates) == steps
    # Keras' CosineDecay at the optimizer's iteration count i: 0.01 * (1 + cos(pi * i / steps)) / 2
    expected = [0.01 * (1 + np.cos(np.pi * (i + 1) / steps)) / 2 for i in range(steps)]
    np.testing.assert_allclose(rates, expected, rtol=1e-5, atol=1e-9)
    assert rates[-1] < 1e-9 and np.all(np.diff(rates) < 0)
    constant: list[float] = []
    masked_fit(
        model,
        masks,
        x,
        y,
        epochs=1,
        learning_rate=0.01,
        on_step=lambda step, opt: constant.append(float(opt.learning_rate)),
    )
    np.testing.assert_allclose(constant, 0.01, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# iterative_prune
# ---------------------------------------------------------------------------------------------


def anti_magnitude(model: keras.Model) -> dict[str, np.ndarray]:
    """-|w|: ranks the pruned weights (w = 0) *last*, so they would come back if allowed."""
    return {p: -s for p, s in magnitude(model).items()}


def test_iterative_prune_counts_are_exact_and_pruned_weights_stay_pruned(mnist_subset) -> None:
    (x, y), (x_test, y_test) = mnist_subset
    model = tiny()
    n = sum(k.size for k in kernels(model).values())
    schedule = [0.3, 0.6, 0.9]
    results = iterative_prune(
        model,
        x,
        y,
        schedule=schedule,
        saliency=anti_magnitude,
        epochs_per_round=1,
        x_test=x_test,
        y_test=y_test,
    )
    assert [r.fraction for r in results] == schedule
    assert [r.removed for r in results] == [removal_count(f, n) for f in schedule]
    previous = {p: np.ones(k.shape, dtype=bool) for p, k in kernels(model).items()}
    for r in results:
        assert r.removed == sum(int((~m).sum()) for m in r.masks.values())
        for path, mask in r.masks.items():
            assert not np.any(mask & ~previous[path]), f"{path} revived at {r.fraction}"
        assert 0.0 <= r.accuracy_before_retraining <= 1.0
        assert 0.0 <= r.accuracy_after <= 1.0
        assert r.seconds > 0
        assert len(r.history["loss"]) == 1
        previous = r.masks
    for path, weights in kernels(model).items():
        assert np.all(weights[~results[-1].masks[path]] == 0.0)
    assert results[0].masks is not results[1].masks


def test_iterative_prune_layer_scope_with_obd(mnist_subset) -> None:
    (x, y), _ = mnist_subset
    model = tiny()
    shapes = {p: k.shape for p, k in kernels(model).items()}
    results = iterative_prune(
        model,
        x,
        y,
        schedule=[0.5, 0.75],
        saliency=obd_saliency(x[:300], y[:300]),
        epochs_per_round=1,
        scope="layer",
    )
    for r in results:
        assert r.accuracy_before_retraining is None and r.accuracy_after is None
        for path, mask in r.masks.items():
            size = int(np.prod(shapes[path]))
            assert int((~mask).sum()) == removal_count(r.fraction, size)


def test_one_shot_is_a_one_element_schedule(mnist_subset) -> None:
    (x, y), (x_test, y_test) = mnist_subset
    model = tiny()
    n = sum(k.size for k in kernels(model).values())
    (result,) = iterative_prune(
        model,
        x,
        y,
        schedule=[0.5],
        saliency=magnitude_saliency(),
        epochs_per_round=3,
        x_test=x_test,
        y_test=y_test,
    )
    assert result.removed == removal_count(0.5, n)
    assert len(result.history["loss"]) == 3
    assert result.accuracy_after > result.accuracy_before_retraining


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ([0.5, 0.3], "strictly increasing, got 0.5 then 0.3"),
        ([0.5, 0.5], "strictly increasing"),
        ([0.2, 1.5], r"fraction must be in \[0, 1\], got 1.5"),
        ([-0.1], r"fraction must be in \[0, 1\]"),
        ([], "schedule is empty"),
        ("0.5", "schedule must be a sequence"),
    ],
)
def test_bad_schedules_are_rejected(schedule, message) -> None:
    with pytest.raises(ValueError, match=message):
        check_schedule(schedule)


def test_iterative_prune_rejects_bad_schedule_and_bad_scores(mnist_subset) -> None:
    (x, y), _ = mnist_subset
    model = tiny()
    with pytest.raises(ValueError, match="strictly increasing"):
        iterative_prune(
            model, x, y, schedule=[0.9, 0.5], saliency=magnitude_saliency(), epochs_per_round=1
        )
    other = build_mlp(hidden=(16,), seed=0)
    with pytest.raises(ValueError, match="scores do not match model 'mlp'"):
        iterative_prune(
            model, x, y, schedule=[0.5], saliency=lambda _: magnitude(other), epochs_per_round=1
        )


def test_shrink_masks_refuses_to_grow_back() -> None:
    scores = {"a": np.arange(4.0).reshape(2, 2)}
    masks = {"a": np.array([[False, False], [False, True]])}
    with pytest.raises(ValueError, match=r"already remove 3 weights in total; fraction 0\.5"):
        shrink_masks(scores, masks, 0.5)
    np.testing.assert_array_equal(shrink_masks(scores, masks, 1.0)["a"], np.zeros((2, 2), bool))


# --------------------------------------------------------------------------- distillation


def test_distillation_loss_is_hintons_formula() -> None:
    rng = np.random.default_rng(0)
    z, t = rng.normal(size=(6, 4)) * 3, rng.normal(size=(6, 4)) * 3
    hard = rng.uniform(size=6)
    soft = SoftTargets(logits=t, temperature=2.5, weight=0.7)

    def softmax(a: np.ndarray) -> np.ndarray:
        e = np.exp(a - a.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    expected = 0.3 * hard - 0.7 * 2.5**2 * np.sum(
        softmax(t / 2.5) * np.log(softmax(z / 2.5)), axis=1
    )
    got = _distillation_loss(tf.constant(z), tf.constant(hard), tf.constant(t), soft, True)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    # a model ending in softmax gives probabilities: the same loss from log p
    probs = _distillation_loss(
        tf.constant(softmax(z)), tf.constant(hard), tf.constant(t), soft, False
    )
    np.testing.assert_allclose(probs.numpy(), expected, rtol=1e-10)


def test_teacher_targets_are_the_teachers_logits_frozen_at_call_time(mnist_subset) -> None:
    (x, _), _ = mnist_subset
    teacher = tiny(seed=4)
    soft = teacher_targets(teacher, x[:300], temperature=3.0, weight=0.5)
    np.testing.assert_allclose(soft.logits, teacher(x[:300], training=False).numpy(), rtol=1e-6)
    assert (soft.temperature, soft.weight) == (3.0, 0.5)
    before = soft.logits.copy()
    apply_masks(teacher, half_masks(teacher))  # pruning the teacher afterwards changes nothing
    np.testing.assert_array_equal(soft.logits, before)


def test_weight_zero_is_plain_retraining_and_distilling_pulls_towards_the_teacher(
    mnist_subset,
) -> None:
    (x, y), _ = mnist_subset
    teacher = tiny(seed=5)
    masked_fit(teacher, masks_from_scores(magnitude(teacher), 0.0), x, y, epochs=3, seed=0)
    t_pred = np.argmax(teacher(x, training=False).numpy(), axis=1)
    runs = {}
    for name, distill in (
        ("plain", None),
        ("weight 0", teacher_targets(teacher, x, weight=0.0)),
        ("distilled", teacher_targets(teacher, x, temperature=4.0, weight=1.0)),
    ):
        student = tiny(seed=6)
        masked_fit(student, half_masks(student), x, y, epochs=3, seed=1, distill=distill)
        runs[name] = student
    plain, zero = kernels(runs["plain"]), kernels(runs["weight 0"])
    for path in plain:
        np.testing.assert_allclose(zero[path], plain[path], rtol=0, atol=1e-6)

    def agreement(model: keras.Model) -> float:
        return float(np.mean(np.argmax(model(x, training=False).numpy(), axis=1) == t_pred))

    def soft_ce(model: keras.Model) -> float:
        p_t = tf.nn.softmax(teacher(x, training=False) / 4.0)
        return float(
            -tf.reduce_mean(tf.reduce_sum(p_t * tf.nn.log_softmax(model(x) / 4.0), axis=1))
        )

    assert soft_ce(runs["distilled"]) < soft_ce(runs["plain"])
    assert agreement(runs["distilled"]) > agreement(runs["plain"])


def test_distillation_arguments_are_checked(mnist_subset) -> None:
    (x, y), _ = mnist_subset
    model = tiny()
    masks = half_masks(model)
    for bad in (0.0, -1.0, float("nan"), "4"):
        with pytest.raises(ValueError, match="temperature"):
            teacher_targets(model, x[:10], temperature=bad)
    for bad in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match="weight"):
            teacher_targets(model, x[:10], weight=bad)
    with pytest.raises(ValueError, match="shape"):
        teacher_targets(model, x[:10].reshape(10, -1))
    with pytest.raises(ValueError, match="compute them on the same x"):
        masked_fit(model, masks, x, y, epochs=1, distill=teacher_targets(model, x[:100]))
    with pytest.raises(ValueError, match="teacher_targets"):
        masked_fit(model, masks, x, y, epochs=1, distill=np.zeros((len(x), 10)))
    with pytest.raises(ValueError, match="teacher_targets"):
        iterative_prune(
            model,
            x,
            y,
            schedule=[0.5],
            saliency=magnitude_saliency(),
            epochs_per_round=1,
            distill="teacher",
        )
    broken = tiny()
    broken.layers[-1].kernel.assign(np.full(broken.layers[-1].kernel.shape, np.inf, np.float32))
    with pytest.raises(ValueError, match="not finite"):
        teacher_targets(broken, x[:10])


def test_iterative_prune_takes_one_epoch_count_per_round(mnist_subset) -> None:
    (x, y), _ = mnist_subset
    model = tiny()
    results = iterative_prune(
        model,
        x,
        y,
        schedule=[0.3, 0.6, 0.8],
        saliency=magnitude_saliency(),
        epochs_per_round=[0, 2, 1],
    )
    assert [len(r.history["loss"]) for r in results] == [0, 2, 1]


@pytest.mark.parametrize(
    ("epochs", "message"),
    [
        ([1, 2], "has 2 entries for a schedule of 3 fractions"),
        ([1, -1, 2], "epochs_per_round entries must be a non-negative int, got -1"),
        ([1, 1.5, 2], "epochs_per_round entries must be a non-negative int, got 1.5"),
        (-2, "epochs_per_round must be a non-negative int, got -2"),
        ("3", "epochs_per_round must be a non-negative int, got '3'"),
    ],
)
def test_bad_epochs_per_round_are_rejected(epochs, message) -> None:
    with pytest.raises(ValueError, match=message):
        check_round_epochs(epochs, 3)


# ---------------------------------------------------------------------------------------------
# skipping the inputs that lost every connection
# ---------------------------------------------------------------------------------------------


def masks_cutting_inputs(model: keras.Model, cut: np.ndarray) -> dict[str, np.ndarray]:
    """Magnitude masks at 40%, with every first-layer weight of the inputs ``cut`` removed too."""
    masks = masks_from_scores(magnitude(model), 0.4)
    first = model.get_layer("dense_1").kernel.path
    masks[first][cut] = False
    return masks


@pytest.mark.parametrize("dropout_rate", [0.0, 0.2])
def test_skipping_disconnected_inputs_is_the_full_product_without_its_zero_terms(
    mnist_subset, dropout_rate
) -> None:
    (x, y), _ = mnist_subset
    cut = np.arange(0, 784, 3)  # a third of the pixels lose every weight
    trained = {}
    for compact in (False, True):
        model = tiny(dropout_rate=dropout_rate)
        masks = masks_cutting_inputs(model, cut)
        history = masked_fit(model, masks, x, y, epochs=2, seed=3, compact_inputs=compact)
        trained[compact] = (kernels(model), biases(model), history["loss"])
        graphs = next(iter(model.__dict__[training._GRAPHS_ATTRIBUTE].values()))
        if compact:  # the step really ran on the connected inputs only
            assert graphs.data[0].numpy().shape == (len(x), 784 - cut.size)
            rows = graphs.compact.rows.numpy()
            np.testing.assert_array_equal(rows, np.setdiff1d(np.arange(784), cut))
            assert graphs.compact.kernel.numpy().shape == (rows.size, 16)  # only those rows train
        else:
            assert graphs.compact is None
        for path, kernel in kernels(model).items():
            assert np.all(kernel[~masks[path]] == 0.0)
    (k0, b0, loss0), (k1, b1, loss1) = trained[False], trained[True]
    for path in k0:
        np.testing.assert_allclose(k1[path], k0[path], atol=2e-5, err_msg=path)
    for path in b0:
        np.testing.assert_allclose(b1[path], b0[path], atol=2e-5, err_msg=path)
    np.testing.assert_allclose(loss1, loss0, rtol=1e-5)


def test_a_reused_compact_step_takes_the_new_connected_inputs(mnist_subset) -> None:
    """A second call with other disconnected inputs reuses the step (no new trace) and equals
    the full product again: the connected inputs and the data are reloaded, not kept."""
    (x, y), _ = mnist_subset
    results = {}
    first = masks_cutting_inputs(tiny(), np.arange(0, 784, 3))
    second = masks_cutting_inputs(tiny(), np.arange(0, 784, 2))
    for compact in (False, True):
        model = tiny()
        masked_fit(model, first, x, y, epochs=1, seed=0, compact_inputs=compact)
        traces = training.traces
        masked_fit(model, second, x, y, epochs=1, seed=1, compact_inputs=compact)
        assert training.traces == traces
        results[compact] = kernels(model)
    for path in results[False]:
        np.testing.assert_allclose(results[True][path], results[False][path], atol=2e-5)


def test_connected_inputs_are_the_rows_with_a_kept_weight() -> None:
    mask = np.array([[False, False], [True, False], [False, False], [True, True]])
    np.testing.assert_array_equal(connected_inputs(mask), [1, 3])
    assert connected_inputs(np.zeros((3, 2), bool)).size == 0


def test_an_ensemble_of_teachers_gives_the_mean_of_their_logits(mnist_subset) -> None:
    (x, _), _ = mnist_subset
    teachers = [tiny(seed=s) for s in (4, 5, 6)]
    soft = teacher_targets(teachers, x[:300], temperature=2.0, weight=0.7)
    expected = np.mean([t(x[:300], training=False).numpy() for t in teachers], axis=0)
    np.testing.assert_allclose(soft.logits, expected, rtol=1e-5, atol=1e-6)
    assert soft.logits.dtype == np.float32 and (soft.temperature, soft.weight) == (2.0, 0.7)
    # one teacher in a list is that teacher
    alone = teacher_targets([teachers[0]], x[:300])
    np.testing.assert_array_equal(alone.logits, teacher_targets(teachers[0], x[:300]).logits)
    with pytest.raises(ValueError, match="empty sequence"):
        teacher_targets([], x[:10])
    with pytest.raises(ValueError, match="disagree on the shape"):
        teacher_targets([teachers[0], build_mlp(hidden=(16,), num_classes=5, seed=0)], x[:10])


def test_obd_saliency_remembers_a_network_it_has_scored(mnist_subset, monkeypatch) -> None:
    from helpers import retrain

    (x, y), _ = mnist_subset
    calls = []
    real = retrain.second_derivatives

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(retrain, "second_derivatives", counted)
    model = tiny(3)
    saliency = obd_saliency(x[:300], y[:300])
    first = saliency(model)
    again = saliency(model)
    assert len(calls) == 1  # same weights: remembered
    for path, values in first.items():
        np.testing.assert_array_equal(values, again[path])
        values[:] = -1.0  # the caller owns its copy; the remembered scores are untouched
    np.testing.assert_array_equal(saliency(model)[path], again[path])

    original = snapshot(model)
    apply_masks(model, half_masks(model))
    pruned = saliency(model)  # new weights: recomputed, and different
    assert len(calls) == 2
    assert any(not np.array_equal(pruned[p], again[p]) for p in pruned)
    original.restore()
    saliency(model)  # the dense weights again: still remembered
    assert len(calls) == 2

    fresh = obd_saliency(x[:300], y[:300], remember=0)
    fresh(model), fresh(model)
    assert len(calls) == 4
    uncached = fresh(model)
    for path, values in again.items():
        np.testing.assert_array_equal(values, uncached[path])
    with pytest.raises(ValueError, match="remember must be >= 0"):
        obd_saliency(x, y, remember=-1)
