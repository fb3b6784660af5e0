"""Keras 3 for the comparison tests, on its PyTorch backend (the gradients are read through torch's autograd)."""
import os
import sys

import pytest


def keras_on_torch():
    """The keras module with the torch backend selected here (KERAS_BACKEND is set before Keras is first imported);
    skips when torch or Keras is absent, or when Keras was already imported with another backend."""
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = "torch"
    pytest.importorskip("torch")  # (before Keras: where torch is stubbed out, Keras is not imported at all)
    try:
        import keras
    except Exception as e:  # not installed, or it does not import here
        pytest.skip(f"keras unavailable: {e}")
    if keras.backend.backend() != "torch":
        pytest.skip(f"Keras was imported with the {keras.backend.backend()} backend before these tests")
    return keras
