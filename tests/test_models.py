"""Tests for :mod:`helpers.models`: the MLP and the LeNet, their deterministic training and cache.

Training runs use a tiny configuration (one hidden layer of 8 units, one epoch, 2,000 training
images; the LeNet one epoch on 1,000) so the file runs in about a minute; the full-size
accuracies are measured by hand.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import models
from helpers.data import MnistArrays, load_mnist
from helpers.models import TrainedModel, build_lenet5, build_mlp, train_lenet5, train_mlp
from helpers.network import as_chain, prunable_kernels
from helpers.runtime import INTRA_OP_THREADS, keras, numeric_environment

SMALL = {"hidden": (8,), "epochs": 1, "batch_size": 64, "learning_rate": 1e-2}


# --------------------------------------------------------------------------- build_mlp


def _sizes(model: keras.Model, suffix: str) -> int:
    return sum(int(np.prod(v.shape)) for v in model.weights if v.path.endswith(suffix))


def test_default_parameter_counts() -> None:
    model = build_mlp()
    assert _sizes(model, "/kernel") == 47_200
    assert _sizes(model, "/bias") == 210
    assert model.count_params() == 47_410
    assert model.output_shape == (None, 10)


def test_stable_names_and_paths() -> None:
    model = build_mlp()
    assert model.name == "mlp"
    assert [layer.name for layer in model.layers] == [
        "flatten", "dense_1", "dense_2", "dense_3", "dense_4", "logits"
    ]  # fmt: skip
    assert [v.path for v in model.weights][:2] == ["mlp/dense_1/kernel", "mlp/dense_1/bias"]
    assert model.weights[-1].path == "mlp/logits/bias"
    assert build_mlp().weights[0].path == "mlp/dense_1/kernel"  # same in a second build


def test_activations_and_logits() -> None:
    model = build_mlp(activation="tanh")
    assert model.get_layer("dense_3").activation is keras.activations.tanh
    assert model.get_layer("logits").activation is keras.activations.linear
    assert build_mlp().get_layer("dense_1").activation is keras.activations.relu


def test_dropout_layers() -> None:
    assert not any(isinstance(layer, keras.layers.Dropout) for layer in build_mlp().layers)
    model = build_mlp((20, 10), dropout_rate=0.2)
    names = [layer.name for layer in model.layers]
    assert names == ["flatten", "dense_1", "dropout_1", "dense_2", "dropout_2", "logits"]
    assert model.get_layer("dropout_2").rate == pytest.approx(0.2)
    assert _sizes(model, "/kernel") == 784 * 20 + 20 * 10 + 10 * 10


def test_compiled_with_adam_and_logit_loss() -> None:
    model = build_mlp(learning_rate=3e-4)
    assert isinstance(model.optimizer, keras.optimizers.Adam)
    assert float(model.optimizer.learning_rate) == pytest.approx(3e-4)
    assert isinstance(model.loss, keras.losses.SparseCategoricalCrossentropy)
    assert model.loss.get_config()["from_logits"] is True


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    a, b, c = build_mlp(seed=3), build_mlp(seed=3), build_mlp(seed=4)
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)
    assert not np.array_equal(a.get_weights()[0], c.get_weights()[0])
    # Each layer has its own seed: equally shaped kernels differ.
    assert not np.array_equal(a.get_weights()[2], a.get_weights()[4])
    assert all(not w.any() for w in a.get_weights()[1::2])  # zero biases


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hidden": ()}, "at least one"),
        ({"hidden": (50, 0)}, "hidden\\[1\\]"),
        ({"hidden": (50, -3)}, "positive int"),
        ({"hidden": (50.0,)}, "positive int"),
        ({"hidden": (True,)}, "positive int"),
        ({"hidden": "50"}, "sequence"),
        ({"hidden": 50}, "sequence"),
        ({"dropout_rate": 1.0}, "dropout_rate"),
        ({"dropout_rate": -0.1}, "dropout_rate"),
        ({"dropout_rate": "0.2"}, "dropout_rate"),
        ({"activation": "no_such_activation"}, "activation"),
        ({"activation": None}, "activation"),
        ({"input_shape": ()}, "input_shape"),
        ({"input_shape": (28, 0)}, "input_shape"),
        ({"num_classes": 1}, "num_classes"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"learning_rate": float("nan")}, "learning_rate"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_mlp(**kwargs)


def _arrays(n_train: int = 4, train_label: int = 0, test_side: int = 28) -> MnistArrays:
    """Tiny all-zero image sets for argument checks."""
    return (
        (np.zeros((4, 28, 28)), np.full(n_train, train_label)),
        (np.zeros((2, test_side, test_side)), np.zeros(2)),
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": -1}, "batch_size"),
        ({"lr_schedule": "step"}, "lr_schedule"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"dropout_rate": 1.5}, "dropout_rate"),
        ({"hidden": ()}, "hidden"),
        ({"data": _arrays(n_train=3)}, "train data"),
        ({"data": _arrays(train_label=10)}, "labels"),
        ({"data": _arrays(test_side=7)}, "differ in shape"),
        ({"data": (1, 2, 3)}, "data must be"),
    ],
)
def test_train_bad_arguments(kwargs: dict, match: str, tmp_path: Path) -> None:
    kwargs.setdefault("data", _arrays())
    with pytest.raises(ValueError, match=match):
        train_mlp(cache_dir=tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- training and cache


@pytest.fixture(scope="module")
def small_data() -> MnistArrays:
    (x_train, y_train), (x_test, y_test) = load_mnist()
    return (x_train[:2000], y_train[:2000]), (x_test[:500], y_test[:500])


@pytest.fixture(scope="module")
def first_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cache directory the first run writes (tests only copy it)."""
    return tmp_path_factory.mktemp("first_cache")


@pytest.fixture(scope="module")
def first(small_data: MnistArrays, first_cache: Path) -> TrainedModel:
    """A tiny model trained from scratch into a fresh cache directory."""
    return train_mlp(**SMALL, data=small_data, cache_dir=first_cache)


@pytest.fixture
def cache(first: TrainedModel, first_cache: Path, tmp_path: Path) -> Path:
    """A private copy of the first run's cache directory."""
    target = tmp_path / "cache"
    shutil.copytree(first_cache, target)
    return target


def _entry(cache: Path, first: TrainedModel, suffix: str) -> Path:
    return cache / f"{first.cache_key}{suffix}"


def _assert_same_weights(a: keras.Model, b: keras.Model) -> None:
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)


def test_first_run_trains_and_writes_cache(first: TrainedModel, first_cache: Path) -> None:
    assert first.from_cache is False
    assert first.cache_key is not None
    assert sorted(p.name for p in first_cache.iterdir()) == [
        f"{first.cache_key}.json",
        f"{first.cache_key}.lock",  # held while the entry is checked or written (see below)
        f"{first.cache_key}.weights.h5",
    ]
    record = json.loads(_entry(first_cache, first, ".json").read_text())
    assert record["test_accuracy"] == first.test_accuracy
    assert record["config"]["hidden"] == [8]
    assert record["config"]["keras_version"] == keras.__version__
    assert record["config"]["intra_op_threads"] == INTRA_OP_THREADS  # it changes float32 sums
    assert record["config"]["numerics"] == numeric_environment()  # so do the oneDNN settings
    assert set(first.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(len(v) == 1 for v in first.history.values())
    assert first.history["val_accuracy"][-1] == pytest.approx(first.test_accuracy, abs=1e-6)
    assert first.test_accuracy > 0.3  # well above chance (0.1) after one tiny epoch
    assert first.train_seconds > 0


def test_second_run_loads_identical_model(first: TrainedModel, small_data, cache) -> None:
    again = train_mlp(**SMALL, data=small_data, cache_dir=cache)
    assert again.from_cache is True
    assert again.cache_key == first.cache_key
    _assert_same_weights(first.model, again.model)
    assert again.history == first.history
    assert again.test_accuracy == first.test_accuracy
    # Both come back with a fresh optimizer, so fine-tuning behaves the same either way.
    assert int(first.model.optimizer.iterations) == int(again.model.optimizer.iterations) == 0


def test_training_is_deterministic_without_cache(first: TrainedModel, small_data, tmp_path) -> None:
    fresh = train_mlp(**SMALL, data=small_data, cache_dir=tmp_path, use_cache=False)
    assert fresh.from_cache is False and fresh.cache_key is None
    _assert_same_weights(first.model, fresh.model)
    assert fresh.history == first.history
    assert not any(tmp_path.iterdir())  # use_cache=False neither reads nor writes


def _retrained(first: TrainedModel, small_data: MnistArrays, cache: Path) -> TrainedModel:
    """Call train_mlp again; assert it retrained to the same weights and rewrote the entry."""
    result = train_mlp(**SMALL, data=small_data, cache_dir=cache)
    assert result.from_cache is False
    _assert_same_weights(first.model, result.model)
    assert result.test_accuracy == first.test_accuracy
    assert train_mlp(**SMALL, data=small_data, cache_dir=cache).from_cache is True  # repaired
    return result


def test_corrupt_weights_file_is_retrained(first: TrainedModel, small_data, cache) -> None:
    weights = _entry(cache, first, ".weights.h5")
    content = bytearray(weights.read_bytes())
    content[len(content) // 2] ^= 0xFF
    weights.write_bytes(bytes(content))
    _retrained(first, small_data, cache)


def test_truncated_weights_file_is_retrained(first: TrainedModel, small_data, cache) -> None:
    weights = _entry(cache, first, ".weights.h5")
    weights.write_bytes(weights.read_bytes()[:100])
    _retrained(first, small_data, cache)


def test_missing_files_are_retrained(first: TrainedModel, small_data, cache) -> None:
    _entry(cache, first, ".weights.h5").unlink()
    _retrained(first, small_data, cache)
    _entry(cache, first, ".json").unlink()
    _retrained(first, small_data, cache)


@pytest.mark.parametrize(
    "edit",
    [
        lambda r: r["config"].update(epochs=2),
        lambda r: r["config"].pop("train_digest"),
        lambda r: r.update(test_accuracy=r["test_accuracy"] + 0.01),
        lambda r: r.update(weights_sha256="0" * 64),
        lambda r: r["history"].pop("val_loss"),
    ],
    ids=["config", "config-key-removed", "accuracy", "sha256", "history"],
)
def test_edited_json_is_retrained(first: TrainedModel, small_data, cache, edit) -> None:
    path = _entry(cache, first, ".json")
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))
    _retrained(first, small_data, cache)


def test_garbage_json_is_retrained(first: TrainedModel, small_data, cache) -> None:
    _entry(cache, first, ".json").write_text("{not json")
    _retrained(first, small_data, cache)


def test_other_weights_with_matching_sha_are_retrained(
    first: TrainedModel, small_data, cache
) -> None:
    """Weights that pass the SHA-256 but do not reproduce the recorded accuracy are refused."""
    weights, meta = _entry(cache, first, ".weights.h5"), _entry(cache, first, ".json")
    wrong = build_mlp((8,))
    wrong.set_weights([np.zeros_like(w) for w in wrong.get_weights()])
    models.save_weights_quietly(wrong, weights)
    record = json.loads(meta.read_text())
    record["weights_sha256"] = models._file_sha256(weights)
    meta.write_text(json.dumps(record))
    _retrained(first, small_data, cache)


def test_changed_config_is_a_different_entry(first: TrainedModel, small_data, cache) -> None:
    other = train_mlp(**{**SMALL, "epochs": 2}, data=small_data, cache_dir=cache)
    assert other.from_cache is False
    assert other.cache_key != first.cache_key
    assert len(other.history["loss"]) == 2
    assert not np.array_equal(other.model.get_weights()[0], first.model.get_weights()[0])
    assert len(list(cache.glob("*.json"))) == 2
    # The first entry is untouched and still served.
    assert train_mlp(**SMALL, data=small_data, cache_dir=cache).from_cache is True


def test_changed_data_is_a_different_entry(first: TrainedModel, small_data, cache) -> None:
    (x_train, y_train), test = small_data
    shifted = ((x_train[::-1], y_train[::-1]), test)
    other = train_mlp(**SMALL, data=shifted, cache_dir=cache)
    assert other.from_cache is False and other.cache_key != first.cache_key


def test_cache_dir_from_environment(
    first: TrainedModel, small_data, cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(models.CACHE_DIR_ENV, str(cache))
    assert train_mlp(**SMALL, data=small_data).from_cache is True


def test_default_cache_dir_is_git_ignored() -> None:
    root = Path(models.__file__).resolve().parent.parent
    assert models.DEFAULT_CACHE_DIR == root / ".cache" / "models"
    assert ".cache/" in (root / ".gitignore").read_text().splitlines()


# --------------------------------------------------------------------------- LeNet-5

LENET_SMALL = {"epochs": 1, "batch_size": 64, "learning_rate": 1e-2}
LENET_PATHS = [
    f"lenet5/{name}/{kind}"
    for name in ("conv_1", "conv_2", "dense_1", "dense_2", "logits")
    for kind in ("kernel", "bias")
]


def test_lenet5_sizes_and_shapes() -> None:
    model = build_lenet5()
    assert [tuple(v.shape) for v in model.weights if v.path.endswith("/kernel")] == [
        (5, 5, 1, 6), (5, 5, 6, 16), (256, 120), (120, 84), (84, 10)
    ]  # fmt: skip
    assert _sizes(model, "/kernel") == 150 + 2_400 + 30_720 + 10_080 + 840 == 44_190
    assert _sizes(model, "/bias") == 6 + 16 + 120 + 84 + 10 == 236
    assert model.count_params() == 44_426
    assert model.input_shape == (None, 28, 28, 1)
    assert model.output_shape == (None, 10)
    assert model.get_layer("pool_2").output.shape == (None, 4, 4, 16)


def test_lenet5_stable_names_and_paths() -> None:
    model = build_lenet5()
    assert model.name == "lenet5"
    assert [layer.name for layer in model.layers] == [
        "conv_1", "pool_1", "conv_2", "pool_2", "flatten", "dense_1", "dense_2", "logits"
    ]  # fmt: skip
    assert [v.path for v in model.weights] == LENET_PATHS
    assert [v.path for v in build_lenet5(seed=5).weights] == LENET_PATHS  # a second build


def test_lenet5_is_a_supported_chain() -> None:
    model = build_lenet5()
    chain = as_chain(model)
    assert [type(op).__name__ for op in chain.ops] == [
        "ConvStep", "PoolStep", "ConvStep", "PoolStep", "FlattenStep",
        "DenseStep", "DenseStep", "DenseStep",
    ]  # fmt: skip
    assert [op.padding for op in chain.ops[:4]] == ["VALID"] * 4
    assert [step.activation for step in chain.steps] == ["relu"] * 4 + ["linear"]
    assert list(prunable_kernels(model)) == LENET_PATHS[::2]
    assert isinstance(model.loss, keras.losses.SparseCategoricalCrossentropy)
    assert model.loss.get_config()["from_logits"] is True


def test_lenet5_same_seed_same_weights_other_seed_other_weights() -> None:
    a, b, c = build_lenet5(seed=3), build_lenet5(seed=3), build_lenet5(seed=4)
    _assert_same_weights(a, b)
    for wa, wc in zip(a.get_weights()[::2], c.get_weights()[::2], strict=True):
        assert not np.array_equal(wa, wc)
    assert all(not w.any() for w in a.get_weights()[1::2])  # zero biases
    x = np.random.default_rng(0).random((3, 28, 28, 1), dtype=np.float32)
    np.testing.assert_array_equal(a.predict_on_batch(x), b.predict_on_batch(x))


def test_lenet5_other_input_shapes() -> None:
    model = build_lenet5(input_shape=(32, 32, 3), num_classes=4)
    assert model.get_layer("conv_1").kernel.shape == (5, 5, 3, 6)
    assert model.get_layer("dense_1").kernel.shape == (5 * 5 * 16, 120)
    assert model.output_shape == (None, 4)
    assert build_lenet5(input_shape=(16, 16, 1)).get_layer("dense_1").kernel.shape == (16, 120)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"input_shape": (28, 28)}, "height, width, channels"),
        ({"input_shape": (28, 28, 1, 1)}, "height, width, channels"),
        ({"input_shape": (15, 28, 1)}, "at least 16x16"),
        ({"input_shape": (28, 28, 0)}, "input_shape"),
        ({"input_shape": "28"}, "input_shape"),
        ({"num_classes": 1}, "num_classes"),
        ({"seed": -1}, "seed"),
        ({"seed": True}, "seed"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"learning_rate": float("inf")}, "learning_rate"),
    ],
)
def test_lenet5_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_lenet5(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"lr_schedule": "linear"}, "lr_schedule"),
        ({"weight_decay": float("nan")}, "weight_decay"),
        ({"seed": -2}, "seed"),
        (
            {"data": ((np.zeros((4, 784)), np.zeros(4)), (np.zeros((2, 784)), np.zeros(2)))},
            "LeNet-5 needs images",
        ),
        (
            {"data": ((np.zeros((4, 12, 12)), np.zeros(4)), (np.zeros((2, 12, 12)), np.zeros(2)))},
            "at least 16x16",
        ),
        ({"data": _arrays(train_label=-1)}, "labels"),
    ],
)
def test_train_lenet5_bad_arguments(kwargs: dict, match: str, tmp_path: Path) -> None:
    kwargs.setdefault("data", _arrays())
    with pytest.raises(ValueError, match=match):
        train_lenet5(cache_dir=tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def lenet_data(small_data: MnistArrays) -> MnistArrays:
    (x_train, y_train), (x_test, y_test) = small_data
    return (x_train[:1000], y_train[:1000]), (x_test[:300], y_test[:300])


@pytest.fixture(scope="module")
def lenet_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lenet_cache")


@pytest.fixture(scope="module")
def lenet_first(lenet_data: MnistArrays, lenet_cache: Path) -> TrainedModel:
    """A LeNet trained for one epoch on 1,000 images into a fresh cache directory."""
    return train_lenet5(**LENET_SMALL, data=lenet_data, cache_dir=lenet_cache)


def test_lenet5_first_run_trains_and_writes_cache(
    lenet_first: TrainedModel, lenet_cache: Path
) -> None:
    assert lenet_first.from_cache is False
    assert lenet_first.cache_key is not None and lenet_first.cache_key.startswith("lenet5_seed0_")
    assert sorted(p.name for p in lenet_cache.iterdir()) == [
        f"{lenet_first.cache_key}.json",
        f"{lenet_first.cache_key}.lock",
        f"{lenet_first.cache_key}.weights.h5",
    ]
    config = json.loads((lenet_cache / f"{lenet_first.cache_key}.json").read_text())["config"]
    assert config["architecture"] == "lenet5"
    assert config["input_shape"] == [28, 28, 1]
    assert config["conv_filters"] == [6, 16] and config["dense"] == [120, 84]
    assert config["n_train"] == 1000 and config["epochs"] == 1
    assert lenet_first.model.name == "lenet5"
    assert all(len(v) == 1 for v in lenet_first.history.values())
    assert lenet_first.history["val_accuracy"][-1] == pytest.approx(lenet_first.test_accuracy)
    assert lenet_first.test_accuracy > 0.3  # well above chance (0.1) after one tiny epoch


def test_lenet5_cache_round_trip(
    lenet_first: TrainedModel, lenet_data: MnistArrays, lenet_cache: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(lenet_cache, cache)
    again = train_lenet5(**LENET_SMALL, data=lenet_data, cache_dir=cache)
    assert again.from_cache is True and again.cache_key == lenet_first.cache_key
    _assert_same_weights(lenet_first.model, again.model)
    assert again.history == lenet_first.history
    assert again.test_accuracy == lenet_first.test_accuracy
    # Images that already have their channel axis are the same data: the same entry.
    (x_train, y_train), (x_test, y_test) = lenet_data
    with_channel = ((x_train[..., None], y_train), (x_test[..., None], y_test))
    assert train_lenet5(**LENET_SMALL, data=with_channel, cache_dir=cache).from_cache is True
    # A corrupt entry is retrained, to the same weights.
    weights = cache / f"{lenet_first.cache_key}.weights.h5"
    weights.write_bytes(weights.read_bytes()[:100])
    retrained = train_lenet5(**LENET_SMALL, data=lenet_data, cache_dir=cache)
    assert retrained.from_cache is False
    _assert_same_weights(lenet_first.model, retrained.model)


def test_lenet5_training_is_deterministic_without_cache(
    lenet_first: TrainedModel, lenet_data: MnistArrays, tmp_path: Path
) -> None:
    fresh = train_lenet5(**LENET_SMALL, data=lenet_data, cache_dir=tmp_path, use_cache=False)
    assert fresh.from_cache is False and fresh.cache_key is None
    _assert_same_weights(lenet_first.model, fresh.model)
    assert not any(tmp_path.iterdir())


def test_lenet5_and_mlp_entries_do_not_collide(
    lenet_first: TrainedModel, first: TrainedModel
) -> None:
    assert first.cache_key is not None and first.cache_key.startswith("mlp8_drop0_seed0_")
    assert lenet_first.cache_key != first.cache_key


def test_processes_wanting_the_same_network_train_it_once(
    small_data, tmp_path, monkeypatch
) -> None:
    """Two trainers started together (as pytest-xdist runs notebooks in parallel): the lock on
    the cache entry makes the second wait and load the first one's network."""
    import threading
    import time

    calls = []
    real_fit = models._fit

    def slow_fit(*args, **kwargs):
        calls.append(threading.get_ident())
        time.sleep(1.0)  # both threads are past their cache lookup long before this ends
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(models, "_fit", slow_fit)
    results: list[TrainedModel] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(train_mlp(**SMALL, data=small_data, cache_dir=tmp_path))
        )
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert sorted(r.from_cache for r in results) == [False, True]
    _assert_same_weights(results[0].model, results[1].model)
