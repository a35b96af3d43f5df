"""Cost of each second-derivative method on chapter 10's LeNet-5, as a ratio to one gradient pass.

The model: :func:`helpers.models.build_lenet5` (Conv2D 6@5x5 "valid" ReLU, MaxPooling2D 2,
Conv2D 16@5x5 "valid" ReLU, MaxPooling2D 2, Flatten, Dense 120 ReLU, Dense 84 ReLU, Dense 10
logits; 44,190 kernel weights), freshly initialised, on random MNIST-shaped inputs (28x28x1) and
random labels (nothing is downloaded or trained: the costs do not depend on the values). In one
process a compiled gradient pass (``helpers.curvature.gradients``, kernels only) and each method
of ``helpers.curvature.second_derivatives`` are timed side by side, round-robin, and the median of
the repeats is reported. A sanity check of the cost, not a test: nothing is asserted.

    python -m benchmarks.conv_curvature_speed                  # 2,000 inputs, float32
    python -m benchmarks.conv_curvature_speed --samples 500 --repeats 2

Measured on two CPU cores, one intra-op thread, idle (README): ``lecun`` about one gradient
pass; ``exact`` (ReLU: the Gauss-Newton diagonal with per-sample, per-class filter gradients)
about 4.4, since it forms each sample's filter gradient for each of the K = 10 classes.
"""

from __future__ import annotations

import platform
from collections.abc import Callable

import numpy as np

from benchmarks.cli import benchmark_parser, write_json
from benchmarks.timing import median_seconds
from helpers.curvature import DEFAULT_BATCH_SIZE, gradients, second_derivatives
from helpers.models import build_lenet5
from helpers.network import prunable_kernels
from helpers.runtime import tf


def main(argv: list[str] | None = None) -> dict:
    parser = benchmark_parser(__doc__, repeats=5)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--methods", default="lecun,lecun-full,exact")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    x = rng.random((args.samples, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, size=args.samples)
    model = build_lenet5(seed=0)
    n_weights = sum(int(np.prod(k.shape)) for k in prunable_kernels(model).values())
    bs = args.batch_size

    runs: dict[str, Callable[[], object]] = {
        "gradient": lambda: gradients(model, x, y, batch_size=bs)
    }
    for method in args.methods.split(","):
        runs[method] = lambda m=method: second_derivatives(model, x, y, method=m, batch_size=bs)
    median = median_seconds(runs, args.repeats)
    grad = median["gradient"]

    devices = [d.device_type for d in tf.config.list_logical_devices()]
    print(
        f"TensorFlow {tf.__version__}, {platform.processor() or platform.machine()}, "
        f"devices {devices}"
    )
    print(
        f"LeNet-5 of chapter 10, {n_weights:,} kernel weights, {args.samples:,} random 28x28x1 "
        f"inputs, batch size {bs}, float32, median of {args.repeats} runs\n"
    )
    print(f"{'method':<14}{'seconds':>10}{'x gradient':>12}")
    for name, seconds in median.items():
        print(f"{name:<14}{seconds:>10.4f}{seconds / grad:>12.2f}")
    results = {
        "samples": args.samples,
        "batch_size": bs,
        "repeats": args.repeats,
        "devices": devices,
        "seconds": median,
        "ratio_to_gradient": {name: seconds / grad for name, seconds in median.items()},
    }
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
