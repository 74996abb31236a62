"""sparsify / strip_masks / sparsity_report on Sequential, functional and nested models."""

import keras
import numpy as np
import pytest

import rigl_keras as rk
from rigl_keras.distributions import active_count

from conftest import convnet, masks, mlp


def npv(x):
    return keras.ops.convert_to_numpy(x)


@pytest.mark.parametrize("build", [mlp, convnet])
@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_exact_counts_binary_masks_zero_outside(build, distribution):
    model = build()
    sparsities = rk.sparsity_distribution(model, 0.8, distribution)
    sparse = rk.sparsify(model, 0.8, distribution, seed=1)
    weights = rk.masked_weights(sparse)
    assert [w.name for w in weights] == list(sparsities)
    for w in weights:
        mask = npv(w.mask)
        assert mask.dtype == np.float32  # in memory, masks have the weight's dtype
        assert set(np.unique(mask)) <= {0, 1}
        assert int(mask.sum()) == active_count(mask.size, sparsities[w.name])
        assert np.all(npv(w.variable)[mask == 0] == 0)
        original = npv(getattr(model.get_layer(w.layer.name), w.attribute))
        np.testing.assert_array_equal(npv(w.variable)[mask == 1], original[mask == 1])
    if distribution == "uniform":
        assert npv(weights[0].mask).all()


def test_input_model_is_untouched_and_other_weights_copied():
    model = convnet()
    bn = model.get_layer("bn")
    bn.moving_mean.assign(np.arange(8, dtype="float32"))
    before = [np.copy(w) for w in model.get_weights()]
    sparse = rk.sparsify(model, 0.5)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(npv(sparse.get_layer("bn").moving_mean), np.arange(8))
    assert not any(rk.layers.is_masked(l) for l in model.layers)


def test_sparsity_zero_reproduces_predictions():
    model = convnet()
    x = np.random.rand(3, 8, 8, 3).astype("float32")
    np.testing.assert_allclose(npv(rk.sparsify(model, 0.0)(x)), npv(model(x)), rtol=1e-6, atol=1e-7)


def test_seed_controls_masks():
    model = mlp()
    a, b, c = (masks(rk.sparsify(model, 0.9, seed=s)) for s in (0, 0, 1))
    assert list(a) == ["fc1", "fc2", "out"]  # keyed by weight name
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_strip_masks_identical_predictions_and_plain_layers():
    sparse = rk.sparsify(convnet(), 0.8, seed=2)
    plain = rk.strip_masks(sparse)
    x = np.random.rand(3, 8, 8, 3).astype("float32")
    np.testing.assert_allclose(npv(plain(x)), npv(sparse(x)), rtol=1e-6, atol=1e-7)
    assert not any(rk.layers.is_masked(l) for l in plain.layers)
    assert type(plain.get_layer("conv1")) is keras.layers.Conv2D
    kernel = npv(plain.get_layer("conv1").kernel)
    np.testing.assert_array_equal(kernel == 0, masks(sparse)["conv1"] == 0)


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
    # Names are chains of layer names; a shared layer is masked once.
    names = [w.name for w in rk.masked_weights(sparse)]
    assert sorted(names) == ["head", "inner/inner_fc", "shared"]
    x = np.random.rand(2, 6).astype("float32")
    np.testing.assert_allclose(npv(rk.strip_masks(sparse)(x)), npv(sparse(x)), rtol=1e-6, atol=1e-7)


@keras.saving.register_keras_serializable(package="test_sparsify")
class Odd(keras.layers.Layer):
    """A layer rigl_keras has no declaration for, with a 2-D weight."""

    def build(self, shape):
        self.w = self.add_weight(name="w", shape=(shape[-1], 5), initializer="ones")

    def call(self, x):
        return keras.ops.matmul(x, self.w)


def test_sparsity_report():
    inputs = keras.Input((8, 3))
    x = keras.layers.Conv1D(4, 3, name="c1d")(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(5, name="fc")(x)
    outputs = Odd(name="odd")(x)
    model = keras.Model(inputs, outputs)
    with pytest.warns(UserWarning, match="cannot be masked"):
        sparse = rk.sparsify(model, 0.75, "erk", custom_sparsity={"fc": 0.75})
    report = rk.sparsity_report(sparse)
    # Changed: rows are per weight (`.weights`); Conv1D is maskable now; the
    # unmaskable row is the custom layer's weight.
    assert [r.name for r in report.weights] == ["c1d", "fc", "odd/w"]
    assert report["fc"].total == 24 * 5 and report["fc"].active == 30
    assert report["fc"].density == pytest.approx(0.25)
    # c1d alone carries the ERK budget: 36 − ⌊0.75·36⌋ = 9.
    assert report["c1d"].total == 36 and report["c1d"].active == 9 and report["c1d"].note == ""
    assert report["odd/w"].note.startswith("cannot be masked") and report["odd/w"].active == 25
    assert report.total == 120 + 36 + 25 and report.active == 30 + 9 + 25
    assert "fc" in str(report) and "cannot be masked" in str(report)
    assert rk.sparsity_report(model)["fc"].note == "not masked"


def test_already_masked_model_is_rejected():
    with pytest.raises(ValueError, match="already masked"):
        rk.sparsify(rk.sparsify(mlp(), 0.5), 0.5)


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
    # Changed: non-graph models are now copied from their config and wrapped
    # (SparseModel); one that cannot be copied (unregistered, no config) is
    # rejected with a pointer to the masked layers.
    with pytest.raises(ValueError, match="Cannot copy model 'net'.*masked layers"):
        rk.sparsify(net, 0.5)


def test_no_weight_is_silently_emptied():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="a"), keras.layers.Dense(2, name="b")])
    # N − ⌊s·N⌋ keeps at least one entry for any s < 1 (0.1's round((1 − s)·N) gave 0).
    sparse = rk.sparsify(model, 0.9999, "erk")
    assert all(r.active >= 1 for r in rk.sparsity_report(sparse))
    with pytest.warns(UserWarning, match="no active entry"):
        rk.sparsify(model, 0.5, "erk", custom_sparsity={"b": 1.0})
