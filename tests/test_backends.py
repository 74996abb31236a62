"""Across backends: a `.keras` file saved under one backend loads under another."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import rigl_keras as rk

BACKENDS = ("tensorflow", "jax", "torch")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SAVE = r"""
import sys, numpy as np, keras, rigl_keras as rk
keras.utils.set_random_seed(3)
inputs = keras.Input((6, 4))
x = keras.layers.LSTM(5, return_sequences=True, name="lstm")(inputs)
x = keras.layers.Conv1D(3, 2, name="conv")(x)
x = keras.layers.Flatten()(x)
outputs = keras.layers.Dense(2, name="fc")(x)
model = rk.sparsify(keras.Model(inputs, outputs), 0.7, "erk", seed=1)
x = np.random.default_rng(0).random((3, 6, 4), dtype="float32")
model.save(sys.argv[1] + "/model.keras")
np.savez(sys.argv[1] + "/expected.npz", x=x, y=np.asarray(model.predict(x, verbose=0)),
         **{w.name: keras.ops.convert_to_numpy(w.mask) for w in rk.masked_weights(model)})
"""


def _available(backend):
    module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[backend]
    try:
        __import__(module)
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("source", [b for b in BACKENDS if b != keras.backend.backend()])
def test_keras_file_from_another_backend(source, tmp_path):
    if not _available(source):
        pytest.skip(f"{source} is not installed")
    env = dict(os.environ, KERAS_BACKEND=source, PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", SAVE, str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = np.load(tmp_path / "expected.npz")
    loaded = keras.models.load_model(str(tmp_path / "model.keras"))
    np.testing.assert_allclose(loaded.predict(expected["x"], verbose=0), expected["y"],
                               rtol=1e-5, atol=1e-6)
    masks = {w.name: keras.ops.convert_to_numpy(w.mask) for w in rk.masked_weights(loaded)}
    assert set(masks) == {"lstm/lstm_cell/kernel", "lstm/lstm_cell/recurrent_kernel", "conv", "fc"}
    for name, mask in masks.items():
        np.testing.assert_array_equal(mask, expected[name])


@pytest.mark.parametrize("size", [12, 1 << 20])
def test_host_commit_matches_numpy(size):
    """`backend.assign_masked` (compiled on JAX from 2^20 entries, NumPy elsewhere)
    sets the mask and resets each variable outside `keep` to its fill value."""
    from rigl_keras import backend as backend_lib

    rng = np.random.default_rng(0)
    shape = (size // 4, 4)
    new_mask = rng.random(shape) < 0.3
    keep = new_mask & (rng.random(shape) < 0.8)
    mask = keras.Variable(np.zeros(shape, "uint8"), dtype="uint8", trainable=False)
    weight = keras.Variable(rng.normal(size=shape).astype("float32"))
    slot = keras.Variable(rng.normal(size=shape).astype("float32"))
    w0, s0 = np.array(weight.numpy()), np.array(slot.numpy())
    backend_lib.assign_masked(mask, new_mask, keep, [(weight, 0.0), (slot, 0.1)])
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(mask), new_mask.astype("uint8"))
    assert keras.backend.standardize_dtype(mask.dtype) == "uint8"
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(weight), np.where(keep, w0, 0))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(slot),
                                  np.where(keep, s0, np.float32(0.1)))
