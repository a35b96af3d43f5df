"""Masked retraining with and without skipping the inputs that lost every connection.

On the full 60,000 MNIST training images and the trained seed-0 784-50-50-50-50-10 network
(``helpers.experiments.trained_model(0)``), in one process: the network is pruned by OBD
(exact diagonal) at each fraction, and one epoch of :func:`helpers.retrain.masked_fit` (batch
256, as in notebook 08) is timed with ``compact_inputs=False`` (every input multiplied) and
``True`` (only the inputs that keep a first-layer weight), round-robin, median of the repeats.
The ratio full / compact is the speed-up; the number of connected inputs is printed beside it.

One-shot OBD masks keep more inputs connected than the iterative schedule of notebook 08 at
the same fraction (at 90% removed, iterative OBD keeps 340 of 784 pixels), so the speed-ups
below are on the low side of what the notebook's later rounds get.

    OBD_CACHE_DIR=... python -m benchmarks.retrain_speed [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform

from benchmarks.timing import median_seconds
from helpers.data import load_mnist
from helpers.experiments import trained_model, training_second_derivatives
from helpers.pruning import masks_from_scores, snapshot
from helpers.retrain import masked_fit
from helpers.runtime import set_determinism, tf
from helpers.saliency import obd
from helpers.training import connected_inputs

FRACTIONS = (0.5, 0.75, 0.9, 0.95, 0.99)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    set_determinism(0)
    (x, y), _ = load_mnist()
    model = trained_model(0)
    dense = snapshot(model)
    scores = obd(model, training_second_derivatives(0))
    first = model.get_layer("dense_1").kernel.path
    print(f"TensorFlow {tf.__version__}, {platform.processor() or platform.machine()}")
    print(f"one epoch of masked_fit, batch {args.batch_size}, median of {args.repeats}")
    print(f"{'removed':>8} {'inputs kept':>12} {'full (s)':>9} {'compact (s)':>12} {'speed-up':>9}")
    rows = []
    for fraction in FRACTIONS:
        masks = masks_from_scores(scores, fraction)

        def epoch(compact: bool, masks: dict = masks) -> None:
            dense.restore()
            masked_fit(
                model, masks, x, y, epochs=1, batch_size=args.batch_size, compact_inputs=compact
            )

        seconds = median_seconds(
            {"full": lambda: epoch(False), "compact": lambda: epoch(True)}, args.repeats
        )
        kept = int(connected_inputs(masks[first]).size)
        ratio = seconds["full"] / seconds["compact"]
        print(
            f"{fraction:>8.0%} {kept:>12} {seconds['full']:>9.3f} {seconds['compact']:>12.3f} "
            f"{ratio:>8.2f}x"
        )
        rows.append({"fraction": fraction, "inputs_kept": kept, **seconds, "speedup": ratio})
    dense.restore()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    return {"rows": rows}


if __name__ == "__main__":
    main()
