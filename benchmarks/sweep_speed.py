"""Pruning sweeps: a full evaluation at every point against the incremental first layer.

On the 10,000 MNIST test images and the trained seed-0 784-50-50-50-50-10 network
(``helpers.experiments.trained_model(0)``), in one process: a 101-point sweep (0, 1, ..., 100%
removed, all-layer) by magnitude and by OBD (exact diagonal), each evaluated by
:class:`helpers.evaluate.Evaluator` (the whole network at every point) and by
:class:`helpers.incremental.IncrementalEvaluator` (the first layer's product updated by the
weights removed since the previous point), round-robin, median of the repeats. Each sweep
includes what :func:`helpers.pruning.sweep` does around the evaluations (masks, applying them);
the evaluators are built once, outside the timing. The two curves are also compared: how many
of the 101 points give a different accuracy, and the largest loss difference.

    OBD_CACHE_DIR=... python -m benchmarks.sweep_speed [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import platform

import numpy as np

from benchmarks.cli import benchmark_parser, write_json
from benchmarks.timing import median_seconds
from helpers.data import load_mnist
from helpers.evaluate import Evaluator
from helpers.experiments import trained_model, training_second_derivatives
from helpers.incremental import IncrementalEvaluator
from helpers.pruning import sweep
from helpers.runtime import set_determinism, tf
from helpers.saliency import magnitude, obd


def main(argv: list[str] | None = None) -> dict:
    parser = benchmark_parser(__doc__, repeats=3)
    args = parser.parse_args(argv)

    set_determinism(0)
    _, (x, y) = load_mnist()
    model = trained_model(0)
    evaluators = {"full": Evaluator(model, x, y), "incremental": IncrementalEvaluator(model, x, y)}
    rankings = {"magnitude": magnitude(model), "OBD": obd(model, training_second_derivatives(0))}
    print(f"TensorFlow {tf.__version__}, {platform.processor() or platform.machine()}")
    print(
        f"101-point sweeps of {len(y):,} test images, median of {args.repeats}; seconds per sweep"
    )
    print(
        f"{'ranking':<10} {'full':>7} {'incremental':>12} {'speed-up':>9}"
        f" {'points differing':>17} {'max |loss diff|':>16}"
    )
    rows = []
    for name, scores in rankings.items():
        results = {}

        def run(kind: str, scores: dict = scores, results: dict = results) -> None:
            results[kind] = sweep(model, scores, x, y, evaluator=evaluators[kind])

        seconds = median_seconds(
            {kind: (lambda k=kind: run(k)) for kind in evaluators}, args.repeats
        )
        full, incremental = results["full"], results["incremental"]
        differing = int(np.count_nonzero(full.accuracy != incremental.accuracy))
        loss_gap = float(np.max(np.abs(full.loss - incremental.loss)))
        ratio = seconds["full"] / seconds["incremental"]
        print(
            f"{name:<10} {seconds['full']:>7.2f} {seconds['incremental']:>12.2f} {ratio:>8.2f}x"
            f" {differing:>17} {loss_gap:>16.1e}"
        )
        rows.append(
            {
                "ranking": name,
                "full": seconds["full"],
                "incremental": seconds["incremental"],
                "speedup": ratio,
                "points_differing": differing,
                "max_loss_difference": loss_gap,
            }
        )
    write_json(args.json, rows)
    return {"rows": rows}


if __name__ == "__main__":
    main()
