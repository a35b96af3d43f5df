"""Masked retraining with and without skipping the inputs that lost every connection.

On the full 60,000 MNIST training images and the trained seed-0 784-50-50-50-50-10 network
(``helpers.experiments.trained_model(0)``), in one process: the network is pruned by OBD
(exact diagonal) at each fraction, and :func:`helpers.retrain.masked_fit` (batch 256, as in
notebook 08) is timed with ``compact_inputs=False`` (every input multiplied) and ``True`` (only
the inputs that keep a first-layer weight), round-robin, median of the repeats. Each call is
timed for 1 and for 6 epochs: the difference over 5 is the time of an epoch, the rest the
call's setup (masks, data, optimizer; the compact call also gathers the connected columns of the
60,000 images once). The ratio full / compact of the epoch times is the speed-up; the number of
connected inputs is printed beside it.

One-shot OBD masks keep more inputs connected than the iterative schedule of notebook 08 at
the same fraction (at 90% removed, iterative OBD keeps 340 of 784 pixels), so the speed-ups
below are on the low side of what the notebook's later rounds get.

    OBD_CACHE_DIR=... python -m benchmarks.retrain_speed [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import platform

from benchmarks.cli import benchmark_parser, write_json
from benchmarks.timing import epoch_and_setup
from helpers.data import load_mnist
from helpers.experiments import trained_model, training_second_derivatives
from helpers.pruning import masks_from_scores, snapshot
from helpers.retrain import masked_fit
from helpers.runtime import set_determinism, tf
from helpers.saliency import obd
from helpers.training import connected_inputs

FRACTIONS = (0.5, 0.75, 0.9, 0.95, 0.99)


def main(argv: list[str] | None = None) -> dict:
    parser = benchmark_parser(__doc__, repeats=3)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)

    set_determinism(0)
    (x, y), _ = load_mnist()
    model = trained_model(0)
    dense = snapshot(model)
    scores = obd(model, training_second_derivatives(0))
    first = model.get_layer("dense_1").kernel.path
    print(f"TensorFlow {tf.__version__}, {platform.processor() or platform.machine()}")
    print(f"masked_fit, batch {args.batch_size}, median of {args.repeats}; seconds per epoch")
    print(
        f"{'removed':>8} {'inputs kept':>12} {'full':>7} {'compact':>8} {'speed-up':>9}"
        f" {'setup: full':>12} {'compact':>8}"
    )
    rows = []
    for fraction in FRACTIONS:
        masks = masks_from_scores(scores, fraction)

        def fit(setting: str, epochs: int, masks: dict = masks) -> None:
            dense.restore()
            masked_fit(
                model,
                masks,
                x,
                y,
                epochs=epochs,
                batch_size=args.batch_size,
                compact_inputs=setting == "compact",
            )

        times, setups = epoch_and_setup(fit, ["full", "compact"], args.repeats)
        epoch = {False: times["full"], True: times["compact"]}
        setup = {False: setups["full"], True: setups["compact"]}
        kept = int(connected_inputs(masks[first]).size)
        ratio = epoch[False] / epoch[True]
        print(
            f"{fraction:>8.0%} {kept:>12} {epoch[False]:>7.3f} {epoch[True]:>8.3f} "
            f"{ratio:>8.2f}x {setup[False]:>12.3f} {setup[True]:>8.3f}"
        )
        rows.append(
            {
                "fraction": fraction,
                "inputs_kept": kept,
                "epoch_full": epoch[False],
                "epoch_compact": epoch[True],
                "setup_full": setup[False],
                "setup_compact": setup[True],
                "speedup": ratio,
            }
        )
    dense.restore()
    write_json(args.json, rows)
    return {"rows": rows}


if __name__ == "__main__":
    main()
