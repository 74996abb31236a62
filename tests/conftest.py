"""Shared fixtures: quiet TensorFlow, deterministic seeds, small models."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    yield
    keras.mixed_precision.set_global_policy("float32")


def mlp(width: float = 1.0, inputs: int = 20, classes: int = 5) -> keras.Model:
    """A small MLP with three Dense layers, widths scaled by `width`."""
    return keras.Sequential(
        [
            keras.Input((inputs,)),
            keras.layers.Dense(max(1, round(32 * width)), activation="relu", name="fc1"),
            keras.layers.Dense(max(1, round(16 * width)), activation="relu", name="fc2"),
            keras.layers.Dense(classes, name="out"),
        ],
        name="mlp",
    )


def convnet() -> keras.Model:
    """A small functional ConvNet with Conv2D, DepthwiseConv2D, BN and Dense."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = keras.layers.Conv2D(6, 1, name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(4, name="head")(x)
    return keras.Model(inputs, outputs, name="convnet")


def classification_data(n=256, inputs=20, classes=5, seed=0):
    """A learnable synthetic problem: labels from a fixed random linear map."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, inputs)).astype("float32")
    w = rng.normal(size=(inputs, classes)).astype("float32")
    return x, np.argmax(x @ w, axis=1)


def compile_sgd(model, lr=0.05, momentum=0.9):
    model.compile(
        keras.optimizers.SGD(lr, momentum=momentum),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def masks(model) -> dict:
    """{weight name: mask array} of every masked weight (see rk.masked_weights)."""
    import rigl_keras as rk

    return {w.name: keras.ops.convert_to_numpy(w.mask).copy() for w in rk.masked_weights(model)}


def counts(model) -> dict:
    """{weight name: active count} of every masked weight."""
    return {name: int(m.sum()) for name, m in masks(model).items()}


def attach(callback, model, steps=100, epochs=1):
    """Starts `callback` on `model` outside `fit`, as at the first epoch of a fit of `steps` × `epochs`."""
    callback.set_model(model)
    callback.set_params({"steps": steps, "epochs": epochs, "verbose": 0})
    callback.on_train_begin()
    callback.on_epoch_begin(0)
    return callback
