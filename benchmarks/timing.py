"""Side-by-side timing shared by the benchmarks: medians of round-robin repeats."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence


def median_seconds(
    runs: Mapping[str, Callable[[], object]], repeats: int, *, warm_up: bool = True
) -> dict[str, float]:
    """The median wall-clock seconds of each call in ``runs``.

    Each repeat calls every function once, in order (round robin), so a slow drift of the
    machine's speed affects all of them alike and their ratios stay meaningful. With
    ``warm_up`` each function is first called once untimed (tracing, caches).
    """
    if warm_up:
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def epoch_and_setup(
    run: Callable[[str, int], object],
    names: Sequence[str],
    repeats: int,
    *,
    short: int = 1,
    long: int = 6,
) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds per epoch and seconds of per-call setup of ``run(name, epochs)`` for each name:
    each setting is timed (:func:`median_seconds`) for ``short`` and ``long`` epochs; the
    difference over ``long - short`` is an epoch, the rest of the short call its setup."""
    seconds = median_seconds(
        {
            f"{name} {epochs}": (lambda n=name, e=epochs: run(n, e))
            for name in names
            for epochs in (short, long)
        },
        repeats,
    )
    epoch = {n: (seconds[f"{n} {long}"] - seconds[f"{n} {short}"]) / (long - short) for n in names}
    setup = {n: seconds[f"{n} {short}"] - short * epoch[n] for n in names}
    return epoch, setup
