"""Quiet TensorFlow import, seeds and determinism, in one place.

TensorFlow >= 2.16 writes C++ log lines (oneDNN notice, CUDA probe, CPU feature guard) to the
process's standard error while it is imported, whatever ``TF_CPP_MIN_LOG_LEVEL`` says. In a
Jupyter kernel those lines appear as red stderr output under the first cell. This module
imports TensorFlow once with file descriptor 2 pointed at ``/dev/null`` and re-exports it, so
every other module (and every notebook) does ``from helpers.runtime import tf, keras``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for the duration of the block (C++ logs included)."""
    # Always the C-level descriptor 2, where TensorFlow's C++ logger writes: in a Jupyter kernel
    # sys.stderr.fileno() may be a copy of it, while ipykernel forwards fd 2 into the cell output.
    fd = 2
    sys.stderr.flush()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def _env_count(name: str, default: str) -> int:
    """A non-negative int from the environment variable ``name`` (a clear error otherwise)."""
    text = os.environ.get(name, default).strip() or default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name} must be a non-negative integer, got {text!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {text!r}")
    return value


INTRA_OP_THREADS: int = _env_count("OBD_INTRA_OP_THREADS", "1")
"""Threads TensorFlow may use inside one op (``OBD_INTRA_OP_THREADS``, default 1; 0 lets
TensorFlow choose, one per core). One thread makes every float32 sum independent of the core
count, so the committed outputs reproduce on any machine with the same instruction set; and the
test suite runs two processes on two cores, where one thread each is faster than two each."""
INTER_OP_THREADS: int = _env_count("OBD_INTER_OP_THREADS", "0")
"""Threads TensorFlow may use to run independent ops of a graph at the same time
(``OBD_INTER_OP_THREADS``, default 0: TensorFlow's choice, one per core). It changes no result,
only which ops may overlap. The test suite sets 1 in its two worker processes
(``tests/conftest.py``): there two processes share two cores, and two processes retraining
side by side were about 8% faster with one thread each than with TensorFlow's two each (the
whole suite's time did not change measurably); a process alone is faster with two."""
_logical_cpus = _env_count("OBD_LOGICAL_CPUS", "0")

with _stderr_silenced():
    import keras
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    # before the devices are initialised (below), after which the pools cannot change
    tf.config.threading.set_intra_op_parallelism_threads(INTRA_OP_THREADS)
    tf.config.threading.set_inter_op_parallelism_threads(INTER_OP_THREADS)
    # OBD_LOGICAL_CPUS=N splits the CPU into N logical devices (to test tf.distribute code
    # paths on one machine); it must happen before the devices are initialised.
    if _logical_cpus > 1:
        tf.config.set_logical_device_configuration(
            tf.config.list_physical_devices("CPU")[0],
            [tf.config.LogicalDeviceConfiguration() for _ in range(_logical_cpus)],
        )
    # Initialise the devices now, still silenced: the CUDA probe logs an error on CPU-only hosts.
    tf.config.list_logical_devices()

if not keras.__version__.startswith("3."):  # pragma: no cover - depends on the installation
    raise ImportError(
        f"helpers needs Keras 3 (TensorFlow >= 2.16); found keras {keras.__version__}"
    )


def set_determinism(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow and make TensorFlow ops deterministic.

    Calls :func:`keras.utils.set_random_seed` and
    :func:`tf.config.experimental.enable_op_determinism`, so the same run gives the same numbers.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def numeric_environment() -> dict[str, object]:
    """The settings besides the thread count that change TensorFlow's float32 sums, as this
    process runs them: whether the oneDNN kernels are on (``TF_ENABLE_ONEDNN_OPTS``, read when
    TensorFlow was imported; on by default on x86) and the instruction set oneDNN may use
    (``ONEDNN_MAX_CPU_ISA``, "" when not set). A network trained under other settings differs in
    its last bits, so the model cache keys on them (:mod:`helpers.models`)."""
    try:
        from tensorflow.python.util import _pywrap_util_port

        onednn = bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):  # pragma: no cover - a TensorFlow without the query
        onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "").strip().lower() not in ("0", "false")
    return {"onednn": onednn, "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "")}


__all__ = [
    "INTER_OP_THREADS",
    "INTRA_OP_THREADS",
    "keras",
    "numeric_environment",
    "set_determinism",
    "tf",
]
