"""How the cost of each second-derivative method grows with the data and with the network.

Three measurements, each printed as a table (and optionally written to JSON):

1. **Samples**: time of a gradient pass, ``"lecun"`` and ``"exact"`` on the 784-50-50-50-50-10
   network for 7,500 to 60,000 MNIST training images (should be linear).
2. **Width**: the same on 784-W-W-W-W-10 networks (initial weights, all 60,000 images) for
   W = 50 ... 400, as seconds and as ratios to the gradient pass.
3. **Memory**: in a fresh process that has loaded the data and the model, the peak resident
   memory during one call of each method (sampled every millisecond from ``/proc/self/statm``,
   tracing included) above the memory before the call, per method, width and batch size.

    python -m benchmarks.curvature_scaling [--quick] [--json results.json]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.cli import benchmark_parser, write_json

ROOT = Path(__file__).resolve().parents[1]


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # trace and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _passes(model, x, y, batch_size: int) -> dict[str, Callable[[], object]]:
    from helpers.curvature import gradients, second_derivatives

    return {
        "gradient": lambda: gradients(model, x, y, batch_size=batch_size),
        "lecun": lambda: second_derivatives(model, x, y, method="lecun", batch_size=batch_size),
        "exact": lambda: second_derivatives(model, x, y, method="exact", batch_size=batch_size),
    }


def scaling_with_samples(repeats: int, sizes: list[int]) -> list[dict]:
    from helpers.data import load_mnist
    from helpers.models import build_mlp

    (x, y), _ = load_mnist()
    model = build_mlp(seed=0)
    rows = []
    for n in sizes:
        times = {k: _median_time(f, repeats) for k, f in _passes(model, x[:n], y[:n], 2000).items()}
        rows.append({"samples": n, **times})
    return rows


def scaling_with_width(repeats: int, widths: list[int]) -> list[dict]:
    from helpers.data import load_mnist
    from helpers.models import build_mlp

    (x, y), _ = load_mnist()
    rows = []
    for width in widths:
        model = build_mlp(hidden=(width,) * 4, seed=0)
        weights = sum(
            int(v.shape[0]) * int(v.shape[1]) for v in model.trainable_weights if len(v.shape) == 2
        )
        times = {k: _median_time(f, repeats) for k, f in _passes(model, x, y, 2000).items()}
        rows.append({"width": width, "weights": weights, **times})
    return rows


MEMORY_CHILD = """
import os, sys, threading, time
from helpers.data import load_mnist
from helpers.models import build_mlp
from helpers.curvature import gradients, second_derivatives

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

(x, y), _ = load_mnist()
model = build_mlp(hidden=(int(sys.argv[3]),) * 4, seed=0)
method, batch = sys.argv[1], int(sys.argv[2])
before, peak, done = rss(), [0], threading.Event()

def poll():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.001)

watcher = threading.Thread(target=poll)
watcher.start()
if method == "gradient":
    gradients(model, x, y, batch_size=batch)
else:
    second_derivatives(model, x, y, method=method, batch_size=batch)
done.set()
watcher.join()
print(max(peak[0], rss()) - before)
"""


def _peak_mib(method: str, batch: int, width: int) -> float:
    """Peak resident memory of one call in a fresh process, above the memory before the call
    (data and model loaded; the call's tracing included), sampled every millisecond."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, method, str(batch), str(width)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout.strip().splitlines()[-1]) / 2**20


def memory_peaks(batches: list[int], widths: list[int]) -> list[dict]:
    rows = []
    for width in widths:
        for batch in batches:
            row = {"width": width, "batch_size": batch}
            for method in ("gradient", "lecun", "exact"):
                row[method] = _peak_mib(method, batch, width)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else 3
    sizes = [15_000, 60_000] if args.quick else [7_500, 15_000, 30_000, 60_000]
    widths = [50, 200] if args.quick else [50, 100, 200, 400]

    results = {
        "samples": scaling_with_samples(repeats, sizes),
        "width": scaling_with_width(repeats, widths),
        "memory_mib": memory_peaks([500, 2000, 8000], [50, 400] if not args.quick else [50]),
    }
    print("1. time (s) against the number of samples, 784-50-50-50-50-10, batch 2,000")
    print(f"{'samples':>8}{'gradient':>10}{'lecun':>8}{'exact':>8}{'exact/gradient':>16}")
    for r in results["samples"]:
        print(
            f"{r['samples']:>8,}{r['gradient']:>10.3f}{r['lecun']:>8.3f}{r['exact']:>8.3f}{r['exact'] / r['gradient']:>16.2f}"
        )
    print("\n2. time (s) against the width W of 784-W-W-W-W-10, 60,000 samples")
    print(
        f"{'W':>5}{'weights':>10}{'gradient':>10}{'lecun':>8}{'exact':>8}{'lecun/grad':>12}{'exact/grad':>12}"
    )
    for r in results["width"]:
        print(
            f"{r['width']:>5}{r['weights']:>10,}{r['gradient']:>10.3f}{r['lecun']:>8.3f}{r['exact']:>8.3f}"
            f"{r['lecun'] / r['gradient']:>12.2f}{r['exact'] / r['gradient']:>12.2f}"
        )
    print("\n3. peak memory of one call above data and model (MiB), 60,000 samples")
    print(f"{'W':>5}{'batch':>7}{'gradient':>10}{'lecun':>8}{'exact':>8}")
    for r in results["memory_mib"]:
        print(
            f"{r['width']:>5}{r['batch_size']:>7,}{r['gradient']:>10.0f}{r['lecun']:>8.0f}{r['exact']:>8.0f}"
        )
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
