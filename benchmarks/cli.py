"""The command line every benchmark shares: ``--repeats``, ``--json`` and writing the JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def benchmark_parser(doc: str | None, repeats: int | None = None) -> argparse.ArgumentParser:
    """A parser described by the first line of the benchmark's docstring, with ``--json`` and,
    if ``repeats`` is given, ``--repeats`` defaulting to it."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    if repeats is not None:
        parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--json", help="also write the results to this JSON file")
    return parser


def write_json(path: str | None, results: object) -> None:
    """Write ``results`` to ``path`` as indented JSON (nothing when ``path`` is ``None``)."""
    if path:
        Path(path).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


__all__ = ["benchmark_parser", "write_json"]
