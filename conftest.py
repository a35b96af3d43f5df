"""Settings for every pytest run from this repository, whatever paths it is given.

The suite checks the notebooks under another numeric environment than the one that executed
them: ``python -m helpers.notebooks`` runs the kernels with TensorFlow's oneDNN kernels (its
default on x86), the tests run with them off (Eigen's kernels), in this process and in the
notebook kernels nbval starts (they inherit this environment). Trained weights then differ in
their last bits, as on another CPU, so a checked output or an assertion that holds only for one
machine's rounding fails here too. An explicit setting is kept:
``TF_ENABLE_ONEDNN_OPTS=1 python -m pytest`` checks under the executing path. TensorFlow reads the
variable when it is imported, so it is set here, before any test module imports it. This file
sits at the repository root so that it applies to ``python -m pytest notebooks/NN_x.ipynb`` too,
which does not load ``tests/conftest.py``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
