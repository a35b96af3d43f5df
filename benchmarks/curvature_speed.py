"""Cost of each second-derivative method as a ratio to one plain gradient pass.

On the full 60,000 MNIST training images and the 784-50-50-50-50-10 network, in one process:
a compiled gradient pass (``helpers.curvature.gradients``, kernels only) and each method of
``helpers.curvature.second_derivatives`` are timed side by side, round-robin, and the median of
the repeats is reported. Brute-force autodiff is timed on ``--autodiff-weights`` weights of the
first kernel over the same data and extrapolated to all 47,200 weights.

    python -m benchmarks.curvature_speed              # trained model (cached by helpers.models)
    python -m benchmarks.curvature_speed --untrained  # freshly initialised weights

Targets (issue 2): ``lecun`` <= 1.3x and ``exact`` <= 4x a gradient pass.
"""

from __future__ import annotations

import platform
from collections.abc import Callable

import numpy as np

from benchmarks.cli import benchmark_parser, write_json
from benchmarks.timing import median_seconds
from helpers.curvature import DEFAULT_BATCH_SIZE, autodiff_entries, gradients, second_derivatives
from helpers.data import load_mnist
from helpers.models import build_mlp, train_mlp
from helpers.network import prunable_kernels
from helpers.runtime import set_determinism, tf


def main(argv: list[str] | None = None) -> dict:
    parser = benchmark_parser(__doc__, repeats=5)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--autodiff-weights", type=int, default=64)
    parser.add_argument(
        "--untrained", action="store_true", help="use initial instead of trained weights"
    )
    args = parser.parse_args(argv)

    set_determinism(0)
    (x, y), _ = load_mnist()
    model = build_mlp(seed=0) if args.untrained else train_mlp(seed=0).model
    n_weights = sum(int(np.prod(k.shape)) for k in prunable_kernels(model).values())
    first = next(iter(prunable_kernels(model)))
    bs = args.batch_size

    runs: dict[str, Callable[[], object]] = {
        "gradient": lambda: gradients(model, x, y, batch_size=bs),
        "lecun": lambda: second_derivatives(model, x, y, method="lecun", batch_size=bs),
        "lecun-full": lambda: second_derivatives(model, x, y, method="lecun-full", batch_size=bs),
        "exact": lambda: second_derivatives(model, x, y, method="exact", batch_size=bs),
        "autodiff (sample)": lambda: autodiff_entries(
            model,
            x,
            y,
            path=first,
            indices=np.arange(args.autodiff_weights),
            batch_size=bs,
            chunk_size=args.autodiff_weights,
        ),
    }
    median = median_seconds(runs, args.repeats)
    per_weight = median.pop("autodiff (sample)") / args.autodiff_weights
    autodiff_total = per_weight * n_weights
    grad = median["gradient"]

    print(
        f"TensorFlow {tf.__version__}, {platform.processor() or platform.machine()}, "
        f"{tf.config.threading.get_inter_op_parallelism_threads() or 'default'} inter-op threads"
    )
    print(
        f"60,000 images, {n_weights:,} weights, batch size {bs}, median of {args.repeats} runs "
        f"({'untrained' if args.untrained else 'trained'} weights)\n"
    )
    print(f"{'method':<28}{'seconds':>10}{'x gradient':>12}")
    for name, seconds in median.items():
        print(f"{name:<28}{seconds:>10.3f}{seconds / grad:>12.2f}")
    print(
        f"{'autodiff (extrapolated)':<28}{autodiff_total:>10.1f}{autodiff_total / grad:>12.0f}"
        f"   ({per_weight * 1e3:.2f} ms per weight, "
        f"from {args.autodiff_weights} weights)"
    )
    results = {
        "batch_size": bs,
        "repeats": args.repeats,
        "trained": not args.untrained,
        "seconds": median,
        "ratio_to_gradient": {name: seconds / grad for name, seconds in median.items()},
        "autodiff_extrapolated_seconds": autodiff_total,
        "autodiff_ratio_to_gradient": autodiff_total / grad,
    }
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
