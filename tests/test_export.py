"""Compact files: packed-bit masks in `.keras`, and sparse export with only the active weights."""

import os

import keras
import numpy as np
import pytest

import rigl_keras as rk
from rigl_keras.export import export_sparse, load_sparse


def lenet():
    return keras.Sequential([
        keras.Input((784,)),
        keras.layers.Dense(300, activation="relu", name="fc1"),
        keras.layers.Dense(100, activation="relu", name="fc2"),
        keras.layers.Dense(10, name="out"),
    ])


@pytest.mark.parametrize("sparsity", [0.9, 0.98])
def test_sparse_export_round_trip_and_size(tmp_path, sparsity):
    sparse = rk.sparsify(lenet(), sparsity, "uniform", capture_gradients=False)
    x = np.random.default_rng(0).random((8, 784), dtype="float32")
    expected = sparse.predict(x, verbose=0)

    path = str(tmp_path / "model.npz")
    summary = export_sparse(sparse, path)
    loaded = load_sparse(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, rtol=1e-6, atol=1e-6)
    assert all(not rk.layers.is_masked(layer) for layer in loaded.layers)

    # A masked entry costs 4 bytes if active plus at most 1/8 byte of
    # position; fc1 (dense under "uniform") and the rest are stored dense.
    masked, active = summary["masked_entries"], summary["active_entries"]
    bound = summary["bytes_dense_equivalent"] - 4 * masked + 4 * active + masked / 8
    assert os.path.getsize(path) < bound + 20_000


def test_masked_keras_file_is_no_larger_than_dense(tmp_path):
    dense = lenet()
    sparse = rk.sparsify(dense, 0.9, "erk")
    dense_path, sparse_path = str(tmp_path / "dense.keras"), str(tmp_path / "sparse.keras")
    dense.save(dense_path)
    sparse.save(sparse_path)
    assert os.path.getsize(sparse_path) <= os.path.getsize(dense_path)
    loaded = keras.models.load_model(sparse_path)
    for a, b in zip(rk.masked_weights(sparse), rk.masked_weights(loaded)):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a.mask), keras.ops.convert_to_numpy(b.mask))


def test_load_sparse_rejects_other_files(tmp_path):
    path = str(tmp_path / "other.npz")
    np.savez(path, a=np.zeros(3))
    with pytest.raises(ValueError, match="not a rigl_keras sparse export"):
        load_sparse(path)


def test_export_needs_masks():
    with pytest.raises(ValueError, match="no masked weight"):
        export_sparse(lenet(), "unused.npz")


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TFLite conversion needs TensorFlow")
def test_tflite_recipe_from_strip_masks(tmp_path):
    import tensorflow as tf

    sparse = rk.sparsify(lenet(), 0.9, "erk", capture_gradients=False)
    plain = rk.strip_masks(sparse)
    x = np.random.default_rng(0).random((1, 784), dtype="float32")
    export_dir = str(tmp_path / "saved")
    plain.export(export_dir, verbose=False)
    converter = tf.lite.TFLiteConverter.from_saved_model(export_dir)
    converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    flat = converter.convert()
    dense_converter = tf.lite.TFLiteConverter.from_saved_model(export_dir)
    assert len(flat) < 0.5 * len(dense_converter.convert())
    interpreter = tf.lite.Interpreter(model_content=flat)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(out, plain.predict(x, verbose=0), rtol=1e-4, atol=1e-5)
