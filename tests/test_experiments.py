"""Multi-seed curves: bookkeeping, files, and agreement with a direct sweep."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import experiments
from helpers.data import load_mnist
from helpers.models import build_mlp
from helpers.pruning import sweep
from helpers.saliency import magnitude


def test_curves_statistics_and_thresholds(tmp_path) -> None:
    curves = experiments.Curves(
        label="toy",
        fractions=np.array([0.0, 0.5, 0.9, 1.0]),
        accuracy=np.array([[0.98, 0.96, 0.80, 0.1], [0.97, 0.94, 0.70, 0.1]]),
        seeds=(0, 1),
    )
    np.testing.assert_allclose(curves.mean, [0.975, 0.95, 0.75, 0.1])
    np.testing.assert_allclose(curves.low, [0.97, 0.94, 0.70, 0.1])
    assert curves.first_below(0.96) == 0.5
    assert curves.first_below(0.5) == 1.0
    assert curves.first_below(0.01) is None
    np.testing.assert_allclose(curves.at(0.9), [0.80, 0.70])
    with pytest.raises(ValueError, match="not among the swept fractions"):
        curves.at(0.3)
    experiments.save_curves([curves], tmp_path / "c.json")
    (loaded,) = experiments.load_curves(tmp_path / "c.json")
    assert loaded.label == "toy" and loaded.seeds == (0, 1)
    np.testing.assert_array_equal(loaded.accuracy, curves.accuracy)


def test_pruning_curves_equal_direct_sweeps(monkeypatch) -> None:
    (x_train, y_train), (x_test, y_test) = load_mnist()
    small = ((x_train[:500], y_train[:500]), (x_test[:300], y_test[:300]))
    models = {seed: build_mlp(hidden=(8,), seed=seed) for seed in (3, 4)}
    monkeypatch.setattr(experiments, "load_mnist", lambda: small)
    monkeypatch.setattr(experiments, "trained_model", lambda seed, dropout_rate=0.0: models[seed])
    monkeypatch.setattr(experiments, "_second", {})
    fractions = [0.0, 0.3, 0.9]
    curves = experiments.pruning_curves("magnitude", "layer", seeds=(3, 4), fractions=fractions)
    assert curves.accuracy.shape == (2, 3) and curves.label == "magnitude, layer-wise"
    for row, seed in zip(curves.accuracy, (3, 4), strict=True):
        direct = sweep(
            models[seed], magnitude(models[seed]), *small[1], fractions=fractions, scope="layer"
        )
        np.testing.assert_array_equal(row, direct.accuracy)
    obd = experiments.pruning_curves("obd", seeds=(3,), fractions=fractions)
    assert obd.label == "obd, all-layer" and obd.accuracy.shape == (1, 3)
    with pytest.raises(ValueError, match="saliency must be one of"):
        experiments.saliency_scores(3, "random")  # type: ignore[arg-type]


def test_custom_saliency_function(monkeypatch) -> None:
    (x_train, y_train), (x_test, y_test) = load_mnist()
    small = ((x_train[:200], y_train[:200]), (x_test[:200], y_test[:200]))
    model = build_mlp(hidden=(8,), seed=5)
    monkeypatch.setattr(experiments, "load_mnist", lambda: small)
    monkeypatch.setattr(experiments, "trained_model", lambda seed, dropout_rate=0.0: model)

    def signed(seed: int, rate: float) -> dict[str, np.ndarray]:
        return {
            layer.kernel.path: layer.kernel.numpy()
            for layer in model.layers
            if hasattr(layer, "kernel")
        }

    curves = experiments.pruning_curves(signed, seeds=(5,), fractions=[0.0, 0.5], label="signed")
    direct = sweep(model, signed(5, 0.0), *small[1], fractions=[0.0, 0.5])
    np.testing.assert_array_equal(curves.accuracy[0], direct.accuracy)
    with pytest.raises(ValueError, match="give a label"):
        experiments.pruning_curves(signed, seeds=(5,))
