"""Tests for :mod:`helpers.runtime`: the intra-op thread count TensorFlow runs with.

The count is fixed when TensorFlow initialises its devices, which this process has long done,
so the settings other than the default are checked in fresh interpreters.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.runtime import INTRA_OP_THREADS, tf

ROOT = Path(__file__).resolve().parents[1]
PRINT_THREADS = (
    "from helpers.runtime import INTRA_OP_THREADS, tf; "
    "print(INTRA_OP_THREADS, tf.config.threading.get_intra_op_parallelism_threads())"
)


def _run(value: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OBD_INTRA_OP_THREADS": value, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", PRINT_THREADS],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_this_process_runs_with_the_configured_count() -> None:
    expected = int(os.environ.get("OBD_INTRA_OP_THREADS", "1") or 1)
    assert INTRA_OP_THREADS == expected
    assert tf.config.threading.get_intra_op_parallelism_threads() == expected


@pytest.mark.parametrize(("value", "expected"), [("", "1 1"), ("3", "3 3"), ("0", "0 0")])
def test_environment_variable_sets_the_count(value: str, expected: str) -> None:
    done = _run(value)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == expected.split()


@pytest.mark.parametrize("value", ["two", "-1", "1.5"])
def test_bad_count_is_refused_by_name(value: str) -> None:
    done = _run(value)
    assert done.returncode != 0
    assert "OBD_INTRA_OP_THREADS must be a non-negative integer" in done.stderr
    assert repr(value) in done.stderr
