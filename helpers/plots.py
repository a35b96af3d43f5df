"""Matplotlib helpers shared by the notebooks: accuracy curves with a band over seeds."""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.axes import Axes

from helpers.experiments import Curves


def plot_curves(ax: Axes, curves: Sequence[Curves], *, title: str | None = None) -> Axes:
    """Mean test accuracy (line) and min-max over seeds (band) against percent of weights pruned."""
    for c in curves:
        (line,) = ax.plot(
            100 * c.fractions, 100 * c.mean, label=f"{c.label} ({len(c.seeds)} seeds)", lw=1.5
        )
        ax.fill_between(
            100 * c.fractions, 100 * c.low, 100 * c.high, color=line.get_color(), alpha=0.25, lw=0
        )
    ax.set_xlabel("weights pruned (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=11)
    return ax


__all__ = ["plot_curves"]
