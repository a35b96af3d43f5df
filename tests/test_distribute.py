"""tf.distribute: the same numbers under MirroredStrategy with two logical CPU devices.

The logical devices must be configured before TensorFlow initialises its devices, which the test
process has long done, so the check runs in a fresh interpreter with ``OBD_LOGICAL_CPUS=2``
(read by :mod:`helpers.runtime`) and reports back as JSON.
"""

from __future__ import annotations

import json

SCRIPT = r"""
import json
import numpy as np
from helpers.runtime import tf
from helpers.curvature import autodiff_entries, gradients, second_derivatives
from helpers.models import build_mlp
from helpers.pruning import sweep
from helpers.saliency import magnitude

devices = [d.name for d in tf.config.list_logical_devices("CPU")]
strategy = tf.distribute.MirroredStrategy(devices)
rng = np.random.default_rng(0)
x = rng.random((203, 28, 28)).astype("float32")
y = rng.integers(0, 10, size=203)
model = build_mlp(hidden=(12, 8), seed=3)
out = {"devices": len(devices), "replicas": strategy.num_replicas_in_sync, "errors": {}}
for method in ("lecun", "lecun-full", "exact"):
    a = second_derivatives(model, x, y, method=method, batch_size=64)
    b = second_derivatives(model, x, y, method=method, batch_size=64, strategy=strategy)
    out["errors"][method] = max(float(np.abs(a[k] - b[k]).max() / np.abs(a[k]).max()) for k in a)
path = model.layers[-1].kernel.path
a = autodiff_entries(model, x, y, path=path, indices=np.arange(20))
b = autodiff_entries(model, x, y, path=path, indices=np.arange(20), strategy=strategy)
out["errors"]["autodiff"] = float(np.abs(a - b).max() / np.abs(a).max())
g1, g2 = gradients(model, x, y), gradients(model, x, y, strategy=strategy)
out["errors"]["gradient"] = max(float(np.abs(g1[k] - g2[k]).max() / np.abs(g1[k]).max()) for k in g1)
fractions = [0.0, 0.5, 0.9]
s1 = sweep(model, magnitude(model), x, y, fractions=fractions, batch_size=50)
s2 = sweep(model, magnitude(model), x, y, fractions=fractions, batch_size=50, strategy=strategy)
out["sweep_accuracy"] = [s1.accuracy.tolist(), s2.accuracy.tolist()]
out["sweep_loss_error"] = float(np.abs(s1.loss - s2.loss).max() / np.abs(s1.loss).max())
print(json.dumps(out))
"""


def test_mirrored_strategy_on_two_logical_cpus_matches_single_device(fresh_python) -> None:
    done = fresh_python(SCRIPT, {"OBD_LOGICAL_CPUS": "2"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["devices"] == 2 and result["replicas"] == 2
    for method, error in result["errors"].items():
        assert error < 1e-5, (method, error)  # float32 sums added in another order
    single, mirrored = result["sweep_accuracy"]
    assert single == mirrored
    assert result["sweep_loss_error"] < 1e-5
