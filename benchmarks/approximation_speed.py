"""Cost and fidelity of each Hessian-diagonal approximation, next to LeCun's and the exact one.

On the full 60,000 MNIST training images and the trained seed-0 784-50-50-50-50-10 network
(``helpers.experiments.trained_model(0)``), in one process: every estimator is timed as a ratio
to one compiled gradient pass (``helpers.curvature.gradients``), round-robin, median of the
repeats, and scored against ``second_derivatives(method="exact")`` with
:func:`helpers.approximations.fidelity` (relative error of the whole diagonal, Spearman rank
correlation over all 47,200 kernel weights).

    OBD_CACHE_DIR=... python -m benchmarks.approximation_speed [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import platform
from collections.abc import Callable

import numpy as np

from benchmarks.cli import benchmark_parser, write_json
from benchmarks.timing import median_seconds
from helpers.approximations import empirical_fisher, fidelity, hutchinson, monte_carlo_fisher
from helpers.curvature import DEFAULT_BATCH_SIZE, gradients, second_derivatives
from helpers.data import load_mnist
from helpers.experiments import trained_model
from helpers.network import prunable_kernels
from helpers.runtime import set_determinism, tf


def main(argv: list[str] | None = None) -> dict:
    parser = benchmark_parser(__doc__, repeats=3)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--seed", type=int, default=0, help="seed of the stochastic estimators")
    args = parser.parse_args(argv)

    set_determinism(0)
    (x, y), _ = load_mnist()
    model = trained_model(0)
    n_weights = sum(int(np.prod(k.shape)) for k in prunable_kernels(model).values())
    bs, seed = args.batch_size, args.seed

    runs: dict[str, Callable[[], object]] = {
        "gradient": lambda: gradients(model, x, y, batch_size=bs),
        "lecun": lambda: second_derivatives(model, x, y, method="lecun", batch_size=bs),
        "exact": lambda: second_derivatives(model, x, y, method="exact", batch_size=bs),
        "empirical Fisher": lambda: empirical_fisher(model, x, y, batch_size=bs),
        "MC Fisher, 1 sample": lambda: monte_carlo_fisher(
            model, x, y, samples=1, seed=seed, batch_size=bs
        ),
        "MC Fisher, 10 samples": lambda: monte_carlo_fisher(
            model, x, y, samples=10, seed=seed, batch_size=bs
        ),
        "Hutchinson, 1 probe": lambda: hutchinson(model, x, y, probes=1, seed=seed, batch_size=bs),
        "Hutchinson, 10 probes": lambda: hutchinson(
            model, x, y, probes=10, seed=seed, batch_size=bs
        ),
    }
    results = {name: fn() for name, fn in runs.items()}  # trace, warm up, and keep the values
    median = median_seconds(runs, args.repeats, warm_up=False)
    grad = median["gradient"]
    exact = results["exact"]
    scores = {
        name: fidelity(values, exact) for name, values in results.items() if name != "gradient"
    }

    print(
        f"TensorFlow {tf.__version__}, {platform.processor() or platform.machine()}, "
        f"{len(tf.config.list_logical_devices())} logical device(s)"
    )
    print(
        f"60,000 images, {n_weights:,} weights, batch size {bs}, median of {args.repeats} runs, "
        f"trained seed-0 network, estimator seed {seed}\n"
    )
    print(f"{'estimator':<24}{'seconds':>9}{'x gradient':>12}{'rel. error':>12}{'Spearman':>10}")
    for name, seconds in median.items():
        score = scores.get(name)
        tail = f"{score.relative_error:>12.3f}{score.spearman:>10.3f}" if score else ""
        print(f"{name:<24}{seconds:>9.3f}{seconds / grad:>12.2f}{tail}")
    out = {
        "batch_size": bs,
        "repeats": args.repeats,
        "seed": seed,
        "seconds": median,
        "ratio_to_gradient": {name: seconds / grad for name, seconds in median.items()},
        "relative_error": {name: s.relative_error for name, s in scores.items()},
        "spearman": {name: s.spearman for name, s in scores.items()},
    }
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
