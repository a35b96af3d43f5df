"""The lean Adam step of ``helpers.training`` against Keras' ``optimizer.apply``, side by side.

Seconds per epoch of :func:`helpers.training.fit_classifier` on the 60,000 MNIST training images,
in one process:

- dense training as :func:`helpers.models.train_mlp` runs it (784-50-50-50-50-10, batch 128,
  Adam 2e-3 with weight decay 0.05 on the kernels, cosine schedule), with ``lean_adam=False``
  (Keras' ``optimizer.apply``) and ``True`` (the lean update); both train bitwise the same
  weights, which is checked here too;
- masked retraining as :func:`helpers.retrain.masked_fit` runs it (batch 256, a fresh Adam 2e-3,
  cosine schedule) on the trained seed-0 network pruned by one-shot OBD (exact diagonal) at 90%
  and 95%: Keras' update with every input multiplied, the lean update with every input
  multiplied, and the lean update with only the connected inputs (the default).

Each setting is timed for 1 and for 4 epochs (medians of round-robin repeats); the difference
over 3 is the time of an epoch.

    OBD_CACHE_DIR=... python -m benchmarks.train_speed [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import platform

import numpy as np

from benchmarks.cli import benchmark_parser, write_json
from benchmarks.timing import epoch_and_setup
from helpers.data import load_mnist
from helpers.experiments import trained_model, training_second_derivatives
from helpers.models import build_mlp, learning_rate_for
from helpers.pruning import apply_masks, masks_from_scores, snapshot
from helpers.runtime import keras, set_determinism, tf
from helpers.saliency import obd
from helpers.training import fit_classifier

FRACTIONS = (0.9, 0.95)
LONG = 4  # epochs of the long call (the short one has 1)


def adam(steps: int, weight_decay: float | None) -> keras.optimizers.Adam:
    optimizer = keras.optimizers.Adam(
        learning_rate=learning_rate_for(2e-3, "cosine", steps), weight_decay=weight_decay
    )
    if weight_decay:
        optimizer.exclude_from_weight_decay(var_names=["bias"])
    return optimizer


def main(argv: list[str] | None = None) -> dict:
    parser = benchmark_parser(__doc__, repeats=3)
    args = parser.parse_args(argv)

    set_determinism(0)
    (x, y), _ = load_mnist()
    print(f"TensorFlow {tf.__version__}, {platform.processor() or platform.machine()}")
    print(f"seconds per epoch, median of {args.repeats}")

    # dense training: a fresh network each call, so both settings train the same thing
    weights: dict[str, list[np.ndarray]] = {}

    def dense(name: str, epochs: int) -> None:
        model = build_mlp(seed=0)
        steps = epochs * int(np.ceil(len(x) / 128))
        fit_classifier(
            model,
            adam(steps, 0.05),
            x,
            y,
            epochs=epochs,
            batch_size=128,
            seed=0,
            lean_adam=name == "lean",
        )
        weights[name] = [v.numpy() for v in model.trainable_variables]

    dense_epoch, _ = epoch_and_setup(dense, ["keras", "lean"], args.repeats, long=LONG)
    same = all(np.array_equal(a, b) for a, b in zip(weights["keras"], weights["lean"], strict=True))
    ratio = dense_epoch["keras"] / dense_epoch["lean"]
    print(
        f"dense training (batch 128): optimizer.apply {dense_epoch['keras']:.3f}, "
        f"lean {dense_epoch['lean']:.3f}: {ratio:.2f}x; bitwise the same weights: {same}"
    )
    result: dict = {"dense": {**dense_epoch, "speedup": ratio, "bitwise_equal": same}}

    model = trained_model(0)
    original = snapshot(model)
    scores = obd(model, training_second_derivatives(0))
    settings = {
        "keras, all inputs": dict(lean_adam=False, compact_inputs=False),
        "lean, all inputs": dict(lean_adam=True, compact_inputs=False),
        "lean, connected inputs": dict(lean_adam=True, compact_inputs=True),
    }
    print(f"{'masked retraining (batch 256)':<32}" + "".join(f"{n:>24}" for n in settings))
    result["masked"] = []
    for fraction in FRACTIONS:
        masks = masks_from_scores(scores, fraction)

        def masked(name: str, epochs: int, masks: dict = masks) -> None:
            original.restore()
            apply_masks(model, masks)
            steps = epochs * int(np.ceil(len(x) / 256))
            fit_classifier(
                model,
                adam(steps, None),
                x,
                y,
                epochs=epochs,
                batch_size=256,
                seed=0,
                masks=masks,
                **settings[name],
            )

        epoch, _ = epoch_and_setup(masked, list(settings), args.repeats, long=LONG)
        base = epoch["keras, all inputs"]
        print(
            f"{f'{fraction:.0%} removed':<32}"
            + "".join(f"{f'{epoch[n]:.3f} ({base / epoch[n]:.2f}x)':>24}" for n in settings)
        )
        result["masked"].append({"fraction": fraction, **epoch})
    original.restore()
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
