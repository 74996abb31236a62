"""Masked layers: drop-in construction, masking semantics, serialization, no retracing."""

import keras
import numpy as np
import pytest

import rigl_keras as rk
from rigl_keras.layers import masked_layers_of


@pytest.mark.parametrize(
    "plain, masked, shape",
    [
        (keras.layers.Dense(3, activation="relu", use_bias=True), rk.MaskedDense, (4,)),
        (keras.layers.Conv2D(2, 3, strides=2, padding="same"), rk.MaskedConv2D, (6, 6, 3)),
        (keras.layers.DepthwiseConv2D(3, depth_multiplier=2), rk.MaskedDepthwiseConv2D, (6, 6, 3)),
    ],
)
def test_same_constructor_and_mask_variable(plain, masked, shape):
    layer = masked.from_config(plain.get_config())
    x = np.random.rand(2, *shape).astype("float32")
    plain(x), layer(x)
    config, plain_config = layer.get_config(), plain.get_config()
    config.pop("name"), plain_config.pop("name")
    assert config == plain_config
    assert tuple(layer.mask.shape) == tuple(layer.raw_kernel.shape)
    assert not layer.mask.trainable
    assert [v.name for v in layer.trainable_variables] == ["kernel", "bias"]
    np.testing.assert_array_equal(layer.mask.numpy(), 1.0)
    # With an all-ones mask the layer computes exactly what the plain one does.
    plain.set_weights([layer.raw_kernel.numpy(), layer.bias.numpy()])
    np.testing.assert_array_equal(layer(x), plain(x))


def _masked_dense(units=3, inputs=4):
    layer = rk.MaskedDense(units)
    layer.build((None, inputs))
    rng = np.random.default_rng(0)
    mask = (rng.random((inputs, units)) < 0.5).astype("float32")
    layer.mask.assign(mask)
    layer.raw_kernel.assign(rng.normal(size=(inputs, units)) * mask)
    return layer, mask


def test_masked_out_entries_have_no_effect_even_if_not_finite():
    layer, mask = _masked_dense()
    x = np.random.rand(5, 4).astype("float32")
    before = layer(x).numpy()
    kernel = layer.raw_kernel.numpy()
    kernel[mask == 0] = np.array([1e6, np.nan, np.inf, -np.inf] * 12)[: int((mask == 0).sum())]
    layer.raw_kernel.assign(kernel)
    after = layer(x).numpy()
    assert np.all(np.isfinite(after))
    np.testing.assert_array_equal(before, after)
    np.testing.assert_array_equal(layer.kernel.numpy()[mask == 0], 0.0)


def test_gradient_of_stored_kernel_is_zero_outside_mask():
    import tensorflow as tf

    layer, mask = _masked_dense()
    x = np.random.rand(5, 4).astype("float32")
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x) ** 2)
    grad = tape.gradient(loss, layer.raw_kernel).numpy()
    assert np.all(grad[mask == 0] == 0)
    assert np.any(grad[mask == 1] != 0)


def _model():
    inputs = keras.Input((6, 6, 3))
    x = rk.MaskedConv2D(4, 3, activation="relu", name="c")(inputs)
    x = rk.MaskedDepthwiseConv2D(3, name="d")(x)
    x = keras.layers.Flatten()(x)
    outputs = rk.MaskedDense(2, name="f")(x)
    return keras.Model(inputs, outputs)


def test_keras_save_load_round_trip_without_custom_objects(tmp_path):
    model = rk.sparsify(_model(), 0.7, "erk", seed=3)
    x = np.random.rand(4, 6, 6, 3).astype("float32")
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    for name in ("c", "d", "f"):
        assert type(loaded.get_layer(name)) is type(model.get_layer(name))
        np.testing.assert_array_equal(loaded.get_layer(name).mask.numpy(), model.get_layer(name).mask.numpy())
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_loading_a_plain_layer_store_gives_a_clear_error():
    layer = rk.MaskedDense(2)
    layer.build((None, 3))
    with pytest.raises(ValueError, match="expected 3 variables"):
        layer.load_own_variables({"0": np.zeros((3, 2)), "1": np.zeros(2)})


def test_compiled_train_step_sees_new_mask_without_retracing():
    model = rk.sparsify(
        keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d")]), 0.0, "erk"
    )
    model.compile(keras.optimizers.SGD(0.0), "mse")  # lr 0: weights stay put
    x = np.random.rand(8, 4).astype("float32")
    y = np.random.rand(8, 3).astype("float32")
    model.train_on_batch(x, y)
    function = model.train_function
    layer = model.get_layer("d")
    for trial in range(3):
        mask = (np.random.default_rng(trial).random((4, 3)) < 0.5).astype("float32")
        layer.mask.assign(mask)
        loss = model.train_on_batch(x, y)
        kernel = layer.raw_kernel.numpy() * mask
        expected = np.mean((x @ kernel + layer.bias.numpy() - y) ** 2)
        np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert model.train_function is function
    tracing = getattr(function, "experimental_get_tracing_count", None)
    if tracing is not None:
        assert tracing() == 1


def test_grow_momentum_travels_through_save_and_load(tmp_path):
    model = rk.sparsify(
        keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d")]), 0.5, "erk"
    )
    layer = model.get_layer("d")
    layer.ensure_grow_momentum().assign(np.arange(12, dtype="float32").reshape(4, 3))
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path).get_layer("d")
    np.testing.assert_array_equal(loaded.grow_momentum.numpy(), layer.grow_momentum.numpy())
    assert [l.name for l in masked_layers_of(model)] == ["d"]
