"""Tests for :mod:`helpers.runtime`: the intra- and inter-op thread counts TensorFlow runs with.

The count is fixed when TensorFlow initialises its devices, which this process has long done,
so the settings other than the default are checked in fresh interpreters.
"""

from __future__ import annotations

import os

import pytest

from helpers.runtime import INTER_OP_THREADS, INTRA_OP_THREADS, numeric_environment, tf


def _print_count(kind: str) -> str:
    """A script printing helpers.runtime's ``kind``-op count and the one TensorFlow runs with."""
    name = f"{kind.upper()}_OP_THREADS"
    return (
        f"from helpers.runtime import {name}, tf; "
        f"print({name}, tf.config.threading.get_{kind}_op_parallelism_threads())"
    )


PRINT = {
    "OBD_INTRA_OP_THREADS": _print_count("intra"),
    "OBD_INTER_OP_THREADS": _print_count("inter"),
}


def test_this_process_runs_with_the_configured_count() -> None:
    expected = int(os.environ.get("OBD_INTRA_OP_THREADS", "1") or 1)
    assert INTRA_OP_THREADS == expected
    assert tf.config.threading.get_intra_op_parallelism_threads() == expected
    inter = int(os.environ.get("OBD_INTER_OP_THREADS", "0") or 0)
    assert INTER_OP_THREADS == inter
    assert tf.config.threading.get_inter_op_parallelism_threads() == inter


def test_the_suite_workers_run_one_inter_op_thread() -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.skip("only the pytest-xdist workers set it (tests/conftest.py)")
    assert os.environ["OBD_INTER_OP_THREADS"] == "1"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("OBD_INTRA_OP_THREADS", "", "1 1"),
        ("OBD_INTRA_OP_THREADS", "3", "3 3"),
        ("OBD_INTRA_OP_THREADS", "0", "0 0"),
        ("OBD_INTER_OP_THREADS", "", "0 0"),
        ("OBD_INTER_OP_THREADS", "1", "1 1"),
        ("OBD_INTER_OP_THREADS", "3", "3 3"),
    ],
)
def test_environment_variable_sets_the_count(
    fresh_python, name: str, value: str, expected: str
) -> None:
    done = fresh_python(PRINT[name], {name: value}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == expected.split()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OBD_INTRA_OP_THREADS", "two"),
        ("OBD_INTRA_OP_THREADS", "-1"),
        ("OBD_INTRA_OP_THREADS", "1.5"),
        ("OBD_INTER_OP_THREADS", "one"),
    ],
)
def test_bad_count_is_refused_by_name(fresh_python, name: str, value: str) -> None:
    done = fresh_python(PRINT[name], {name: value}, timeout=120)
    assert done.returncode != 0
    assert f"{name} must be a non-negative integer" in done.stderr
    assert repr(value) in done.stderr


def test_the_suite_checks_the_notebooks_under_another_numeric_path(fresh_python) -> None:
    from helpers.notebooks import KERNEL_ENV

    # the committed outputs come from kernels with oneDNN on ...
    assert KERNEL_ENV["TF_ENABLE_ONEDNN_OPTS"] == "1"
    if os.environ["TF_ENABLE_ONEDNN_OPTS"] != "0":
        pytest.skip("TF_ENABLE_ONEDNN_OPTS was set explicitly: checking under that path")
    # ... and the root conftest.py turned it off for this process and every process it starts,
    # the notebook kernels of nbval included
    assert numeric_environment()["onednn"] is False
    script = "from helpers.runtime import numeric_environment; print(numeric_environment())"
    done = fresh_python(script, {}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("{'onednn': False")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"TF_ENABLE_ONEDNN_OPTS": "1", "ONEDNN_MAX_CPU_ISA": "AVX2"},
            "{'onednn': True, 'onednn_max_cpu_isa': 'AVX2'}",
        ),
        (
            {"TF_ENABLE_ONEDNN_OPTS": "0", "ONEDNN_MAX_CPU_ISA": ""},
            "{'onednn': False, 'onednn_max_cpu_isa': ''}",
        ),
    ],
)
def test_numeric_environment_reports_the_settings_tensorflow_started_with(
    fresh_python, env: dict[str, str], expected: str
) -> None:
    script = "from helpers.runtime import numeric_environment; print(numeric_environment())"
    done = fresh_python(script, env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected
