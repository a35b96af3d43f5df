"""Helpers for the *Optimal Brain Damage, step by step* notebooks.

One module per job:

- :mod:`helpers.runtime` -- quiet TensorFlow import, seeds and determinism.
- :mod:`helpers.data` -- the MNIST arrays, checksum-verified.
- :mod:`helpers.models` -- the 784-50-50-50-50-10 network and its cached training.
- :mod:`helpers.network` -- which Keras models are supported, as a chain of layers.
- :mod:`helpers.curvature` -- diagonal second derivatives of the loss (LeCun's backprop, exact, autodiff).
- :mod:`helpers.saliency` -- pruning scores: magnitude and OBD.
- :mod:`helpers.pruning` -- masks from scores, applying them, accuracy sweeps.
- :mod:`helpers.evaluate` -- compiled loss and accuracy of a model on arrays.
- :mod:`helpers.notebooks` -- re-execute the notebooks and check their committed outputs.
"""

__all__: list[str] = []
