"""sparsify / strip_masks / sparsity_report on Sequential, functional and nested models."""

import keras
import numpy as np
import pytest

import rigl_keras as rk
from rigl_keras.distributions import active_count
from rigl_keras.layers import masked_layers_of

from conftest import convnet, masks, mlp


@pytest.mark.parametrize("build", [mlp, convnet])
@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_exact_counts_binary_masks_zero_outside(build, distribution):
    model = build()
    sparsities = rk.sparsity_distribution(model, 0.8, distribution)
    sparse = rk.sparsify(model, 0.8, distribution, seed=1)
    layers = masked_layers_of(sparse)
    assert [l.name for l in layers] == list(sparsities)
    for layer in layers:
        mask = layer.mask.numpy()
        assert set(np.unique(mask)) <= {0.0, 1.0}
        assert int(mask.sum()) == active_count(mask.size, sparsities[layer.name])
        assert np.all(layer.raw_kernel.numpy()[mask == 0] == 0)
        original = model.get_layer(layer.name).kernel.numpy()
        np.testing.assert_array_equal(layer.raw_kernel.numpy()[mask == 1], original[mask == 1])
    if distribution == "uniform":
        assert layers[0].mask.numpy().all()


def test_input_model_is_untouched_and_other_weights_copied():
    model = convnet()
    bn = model.get_layer("bn")
    bn.moving_mean.assign(np.arange(8, dtype="float32"))
    before = [w.copy() for w in model.get_weights()]
    sparse = rk.sparsify(model, 0.5)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(sparse.get_layer("bn").moving_mean.numpy(), np.arange(8))
    assert not any(rk.layers.is_masked(l) for l in model.layers)


def test_sparsity_zero_reproduces_predictions():
    model = convnet()
    x = np.random.rand(3, 8, 8, 3).astype("float32")
    np.testing.assert_allclose(rk.sparsify(model, 0.0).predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)


def test_seed_controls_masks():
    model = mlp()
    a, b, c = (masks(rk.sparsify(model, 0.9, seed=s)) for s in (0, 0, 1))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_strip_masks_identical_predictions_and_plain_layers():
    sparse = rk.sparsify(convnet(), 0.8, seed=2)
    plain = rk.strip_masks(sparse)
    x = np.random.rand(3, 8, 8, 3).astype("float32")
    np.testing.assert_allclose(plain.predict(x, verbose=0), sparse.predict(x, verbose=0), rtol=1e-6, atol=1e-7)
    assert not any(rk.layers.is_masked(l) for l in plain.layers)
    assert type(plain.get_layer("conv1")) is keras.layers.Conv2D
    kernel = plain.get_layer("conv1").kernel.numpy()
    np.testing.assert_array_equal(kernel == 0, sparse.get_layer("conv1").mask.numpy() == 0)


def test_nested_model_and_shared_layer():
    inner = keras.Sequential([keras.Input((6,)), keras.layers.Dense(6, name="inner_fc")], name="inner")
    shared = keras.layers.Dense(6, name="shared")
    inputs = keras.Input((6,))
    x = shared(inputs)
    x = inner(x)
    x = shared(x)
    outputs = keras.layers.Dense(2, name="head")(x)
    model = keras.Model(inputs, outputs)
    sparse = rk.sparsify(model, 0.5, "erk")
    names = [l.name for l in masked_layers_of(sparse)]
    assert sorted(names) == ["head", "inner_fc", "shared"]
    x = np.random.rand(2, 6).astype("float32")
    np.testing.assert_allclose(rk.strip_masks(sparse).predict(x, verbose=0), sparse.predict(x, verbose=0), rtol=1e-6)


def test_sparsity_report():
    inputs = keras.Input((8, 3))
    x = keras.layers.Conv1D(4, 3, name="c1d")(inputs)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(5, name="fc")(x)
    model = keras.Model(inputs, outputs)
    sparse = rk.sparsify(model, 0.75, "erk", custom_sparsity={"fc": 0.75})
    report = rk.sparsity_report(sparse)
    assert report["fc"].total == 24 * 5 and report["fc"].active == 30
    assert report["fc"].density == pytest.approx(0.25)
    assert report["c1d"].note == "cannot be masked" and report["c1d"].active == 36
    assert report.total == 120 + 36 and report.active == 66
    assert "fc" in str(report) and "cannot be masked" in str(report)
    assert rk.sparsity_report(model)["fc"].note == "not masked"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sparsity=1.0), "sparsity"),
        (dict(distribution="nope"), "distribution"),
        (dict(custom_sparsity={"ghost": 0.5}), "custom_sparsity"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_bad_input(kwargs, match):
    args = dict(sparsity=0.5) | kwargs
    with pytest.raises(ValueError, match=match):
        rk.sparsify(mlp(), **args)


def test_subclassed_model_is_rejected_clearly():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.fc = keras.layers.Dense(3)

        def call(self, x):
            return self.fc(x)

    net = Net()
    net(np.zeros((1, 4), "float32"))
    with pytest.raises(ValueError, match="Sequential and functional"):
        rk.sparsify(net, 0.5)
