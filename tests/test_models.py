"""Tests for :mod:`helpers.models`: the MLP, its deterministic training and its weight cache.

Training runs use a tiny configuration (one hidden layer of 8 units, one epoch, 2,000 training
images) so the file runs in well under a minute; the full-size accuracy is measured by hand.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import models
from helpers.data import MnistArrays, load_mnist
from helpers.models import TrainedModel, build_mlp, train_mlp
from helpers.runtime import keras

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
        f"{first.cache_key}.weights.h5",
    ]
    record = json.loads(_entry(first_cache, first, ".json").read_text())
    assert record["test_accuracy"] == first.test_accuracy
    assert record["config"]["hidden"] == [8]
    assert record["config"]["keras_version"] == keras.__version__
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
    models._save_weights(wrong, weights)
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
