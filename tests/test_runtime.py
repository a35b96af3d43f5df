"""Tests for :mod:`helpers.runtime`: the intra-op thread count TensorFlow runs with.

The count is fixed when TensorFlow initialises its devices, which this process has long done,
so the settings other than the default are checked in fresh interpreters.
"""

from __future__ import annotations

import os

import pytest

from helpers.runtime import INTRA_OP_THREADS, tf

PRINT_THREADS = (
    "from helpers.runtime import INTRA_OP_THREADS, tf; "
    "print(INTRA_OP_THREADS, tf.config.threading.get_intra_op_parallelism_threads())"
)


def test_this_process_runs_with_the_configured_count() -> None:
    expected = int(os.environ.get("OBD_INTRA_OP_THREADS", "1") or 1)
    assert INTRA_OP_THREADS == expected
    assert tf.config.threading.get_intra_op_parallelism_threads() == expected


@pytest.mark.parametrize(("value", "expected"), [("", "1 1"), ("3", "3 3"), ("0", "0 0")])
def test_environment_variable_sets_the_count(fresh_python, value: str, expected: str) -> None:
    done = fresh_python(PRINT_THREADS, {"OBD_INTRA_OP_THREADS": value}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == expected.split()


@pytest.mark.parametrize("value", ["two", "-1", "1.5"])
def test_bad_count_is_refused_by_name(fresh_python, value: str) -> None:
    done = fresh_python(PRINT_THREADS, {"OBD_INTRA_OP_THREADS": value}, timeout=120)
    assert done.returncode != 0
    assert "OBD_INTRA_OP_THREADS must be a non-negative integer" in done.stderr
    assert repr(value) in done.stderr
