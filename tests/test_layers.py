"""Masked weights: construction, masking semantics, layer coverage, custom layers,
serialization, gradient capture, no retracing. Backend-agnostic."""

import keras
import numpy as np
import pytest

import rigl_keras as rk
from rigl_keras import backend as rk_backend

from conftest import masks

L = keras.layers
TF_ONLY = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="uses tf.GradientTape")

def npv(x):
    return keras.ops.convert_to_numpy(x)


def _weight(layer, attribute="kernel", name="w"):
    return rk.MaskedWeight(layer, attribute, name)


# ---------------------------------------------------------------------------
# Single masked layers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_plain, masked, shape",
    [
        (lambda: L.Dense(3, activation="relu", use_bias=True), rk.MaskedDense, (4,)),
        (lambda: L.Conv2D(2, 3, strides=2, padding="same"), rk.MaskedConv2D, (6, 6, 3)),
        (lambda: L.DepthwiseConv2D(3, depth_multiplier=2), rk.MaskedDepthwiseConv2D, (6, 6, 3)),
    ],
)
@pytest.mark.parametrize("capture", [True, False])
def test_same_constructor_and_mask_variable(make_plain, masked, shape, capture):
    plain = make_plain()
    layer = masked.from_config(plain.get_config() | {"capture_gradients": capture})
    x = np.random.rand(2, *shape).astype("float32")
    plain(x), layer(x)
    config, plain_config = layer.get_config(), plain.get_config()
    config.pop("name"), plain_config.pop("name")
    assert config.pop("capture_gradients") is capture
    assert config == plain_config
    w = _weight(layer)
    assert tuple(w.mask.shape) == tuple(w.variable.shape)
    assert not w.mask.trainable
    assert w.mask.dtype == w.variable.dtype  # in memory; packed bits on disk
    # The capture variable G is trainable (the optimizer overwrites it with ∂L/∂W_eff).
    names = [v.name for v in layer.trainable_variables]
    assert names == (["kernel", "bias", "kernel_grad"] if capture else ["kernel", "bias"])
    assert (w.gradient is not None) is capture
    np.testing.assert_array_equal(npv(w.mask), 1)
    # With an all-ones mask the layer computes exactly what the plain one does.
    plain.set_weights([npv(w.variable), npv(layer.bias)])
    np.testing.assert_array_equal(npv(layer(x)), npv(plain(x)))


def _masked_dense(units=3, inputs=4):
    layer = rk.MaskedDense(units)
    layer.build((None, inputs))
    rng = np.random.default_rng(0)
    mask = (rng.random((inputs, units)) < 0.5).astype("uint8")
    w = _weight(layer)
    w.mask.assign(mask)
    w.variable.assign(rng.normal(size=(inputs, units)).astype("float32") * mask)
    return layer, w, mask


def test_masked_out_entries_have_no_effect_even_if_not_finite():
    layer, w, mask = _masked_dense()
    x = np.random.rand(5, 4).astype("float32")
    before = npv(layer(x))
    kernel = npv(w.variable).copy()
    kernel[mask == 0] = np.array([1e6, np.nan, np.inf, -np.inf] * 12, "float32")[: int((mask == 0).sum())]
    w.variable.assign(kernel)
    after = npv(layer(x))
    assert np.all(np.isfinite(after))
    np.testing.assert_array_equal(before, after)
    np.testing.assert_array_equal(npv(layer.kernel)[mask == 0], 0.0)
    np.testing.assert_array_equal(npv(w.effective())[mask == 0], 0.0)


@TF_ONLY
def test_gradient_of_stored_kernel_is_zero_outside_mask_tf():
    import tensorflow as tf

    layer, w, mask = _masked_dense()
    x = np.random.rand(5, 4).astype("float32")
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x) ** 2)
    grad = tape.gradient(loss, w.variable).numpy()
    assert np.all(grad[mask == 0] == 0)
    assert np.any(grad[mask == 1] != 0)


def test_training_step_leaves_stored_kernel_zero_outside_mask():
    # Backend-agnostic form of the test above: one SGD step with lr 1 moves
    # the stored kernel only where the mask is 1.
    model = rk.sparsify(keras.Sequential([keras.Input((4,)), L.Dense(3, name="d")]), 0.5, "erk", seed=1)
    w = rk.masked_weights(model)[0]
    mask = npv(w.mask)
    before = npv(w.variable).copy()
    model.compile(keras.optimizers.SGD(1.0), "mse")
    x = np.random.rand(8, 4).astype("float32")
    model.train_on_batch(x, np.random.rand(8, 3).astype("float32") + 5)
    after = npv(w.variable)
    np.testing.assert_array_equal(after[mask == 0], 0)
    assert np.all(after[mask == 1] != before[mask == 1])


@pytest.mark.parametrize("policy", ["float32", "mixed_float16", "mixed_bfloat16", "float64"])
def test_forward_follows_every_mask_change(policy):
    """The mask is read afresh after each change (torch caches a bit pattern
    per mask version), in every compute dtype, with garbage outside the mask."""
    layer = rk.MaskedDense(5, use_bias=False, dtype=policy)
    layer.build((None, 6))
    w = _weight(layer)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 6)).astype("float32")
    kernel = rng.normal(size=(6, 5))
    w.variable.assign(kernel)
    compute = layer.compute_dtype
    for _ in range(3):
        mask = rng.random((6, 5)) < 0.5
        w.mask.assign(mask.astype(w.mask.dtype))
        stored = npv(w.variable).astype("float64")
        expected = x.astype(compute).astype("float64") @ np.where(
            mask, stored.astype(compute).astype("float64"), 0.0)
        out = npv(layer(x)).astype("float64")
        np.testing.assert_allclose(out, expected, rtol=1e-2 if "mixed" in policy else 1e-5,
                                   atol=1e-2 if "mixed" in policy else 1e-6)
        np.testing.assert_array_equal(npv(layer.kernel)[~mask], 0)
        # An entry assigned outside the mask stays invisible.
        garbage = stored.copy()
        garbage[~mask] = np.nan
        w.variable.assign(garbage)
        np.testing.assert_array_equal(npv(layer(x)).astype("float64"), out)
        w.variable.assign(stored)



TORCH_ONLY = pytest.mark.skipif(keras.backend.backend() != "torch", reason="torch tensors")


@TORCH_ONLY
@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_torch_forward_cleans_the_stored_weight_in_place_once(policy):
    """Eager torch reads the stored weight itself, zeroed outside its mask in
    place (no masked copy): once per change of the weight or the mask."""
    mask = _masked_dense()[2]
    layer = rk.MaskedDense(3, dtype=policy)
    layer.build((None, 4))
    w = _weight(layer)
    w.mask.assign(mask)
    garbage = np.where(mask == 1, 0.5, np.nan).astype("float32")
    w.variable.assign(garbage)
    x = np.ones((2, 4), "float32")
    out = npv(layer(x))
    np.testing.assert_allclose(out, np.ones((2, 4)) @ np.where(mask == 1, 0.5, 0.0), rtol=1e-3)
    np.testing.assert_array_equal(npv(w.variable), np.where(mask == 1, 0.5, 0.0))
    param = w.variable.value if policy == "float32" else w.variable._value
    version = param._version
    layer(x)
    assert param._version == version  # nothing changed: no second AND
    # A mask change alone (the weight untouched) is followed.
    fewer = mask.copy()
    fewer[0] = 0
    w.mask.assign(fewer)
    np.testing.assert_allclose(npv(layer(x)), np.ones((2, 4)) @ np.where(fewer == 1, 0.5, 0.0),
                               rtol=1e-3)
    assert not param._backward_hooks  # hooks go on each forward pass's own node


@TORCH_ONLY
def test_torch_mask_without_zeros_costs_no_and_until_it_gets_one():
    """A weight kept dense (all-ones mask, e.g. the first layer under
    "uniform") is read and updated as it is: no AND over the weight or its
    gradient. Once its mask has a zero, both are masked again."""
    layer = rk.MaskedDense(3, use_bias=False, capture_gradients=False)
    layer.build((None, 4))
    w = _weight(layer)
    w.mask.assign(np.ones((4, 3), "float32"))
    w.variable.assign(np.full((4, 3), 0.5, "float32"))
    param = w.variable.value
    x = np.ones((2, 4), "float32")
    version = param._version
    layer(x).sum().backward()
    plain = L.Dense(3, use_bias=False)  # the gradient's version as autograd leaves it
    plain.build((None, 4))
    plain(x).sum().backward()
    assert param._version == version  # neither written
    assert param.grad._version == plain.kernel.value.grad._version
    np.testing.assert_array_equal(npv(param.grad), np.full((4, 3), 2.0))
    fewer = np.ones((4, 3), "float32")
    fewer[0] = 0
    w.mask.assign(fewer)
    param.grad = None
    out = layer(x)
    out.sum().backward()
    np.testing.assert_array_equal(npv(out), np.full((2, 3), 1.5))
    np.testing.assert_array_equal(npv(w.variable), 0.5 * fewer)
    np.testing.assert_array_equal(npv(param.grad), 2.0 * fewer)


@TORCH_ONLY
@pytest.mark.parametrize("capture", [False, True])
def test_torch_gradient_of_the_stored_weight_is_masked(capture):
    """`.grad` of the stored weight (what `backward`, and so Keras' torch
    trainer, gives) is masked, also when it accumulates over two backward
    passes and when the layer is called twice in one pass. Without capture,
    `torch.autograd.grad` with respect to the stored weight gives ∂L/∂W_eff,
    unmasked (documented in `backend._torch_mask_grad`)."""
    import torch

    layer = rk.MaskedDense(4, use_bias=False, capture_gradients=capture)
    layer.build((None, 4))
    w = _weight(layer)
    mask = np.eye(4, dtype="float32")
    w.mask.assign(mask)
    w.variable.assign(np.full((4, 4), 2.0, "float32"))
    x = torch.ones((1, 4))
    upstream = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    param = w.variable.value
    layer(x).backward(upstream)
    np.testing.assert_array_equal(npv(param.grad), np.diag([1.0, 2.0, 3.0, 4.0]))
    layer(layer(x)).sum().backward()  # accumulates: d/dW_ii of sum(x W W) is 4 here
    np.testing.assert_array_equal(npv(param.grad), np.diag([5.0, 6.0, 7.0, 8.0]))
    param.grad = None
    (grad,) = torch.autograd.grad(layer(x).sum(), [param])
    np.testing.assert_array_equal(npv(grad), mask if capture else np.ones((4, 4)))


@TORCH_ONLY
def test_torch_stateless_call_leaves_its_inputs_untouched():
    """Values given to `stateless_call` are not the variables' storage: masked
    by a copy, never in place."""
    model = rk.sparsify(keras.Sequential([keras.Input((4,)), L.Dense(3, name="d")]), 0.5, "erk", seed=1)
    w = rk.masked_weights(model)[0]
    mask = npv(w.mask)
    values = [keras.ops.convert_to_tensor(np.where(mask == 0, np.nan, 1.0).astype("float32"))
              if v is w.variable else v.value for v in model.trainable_variables]
    x = np.ones((2, 4), "float32")
    out, _ = model.stateless_call(values, [v.value for v in model.non_trainable_variables], x)
    bias = npv(model.get_layer("d").bias)
    np.testing.assert_allclose(npv(out), x @ mask + bias, rtol=1e-6)
    assert np.isnan(npv(values[[v is w.variable for v in model.trainable_variables].index(True)])).any()


def _model():
    inputs = keras.Input((6, 6, 3))
    x = rk.MaskedConv2D(4, 3, activation="relu", name="c")(inputs)
    x = rk.MaskedDense(3, name="d")(x)
    x = L.Flatten()(x)
    outputs = rk.MaskedDense(2, name="f")(x)
    return keras.Model(inputs, outputs)


def test_keras_save_load_round_trip_without_custom_objects(tmp_path):
    model = _model()
    rk.set_random_masks(model, 0.7, "erk", seed=3)
    x = np.random.rand(4, 6, 6, 3).astype("float32")
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    for name in ("c", "d", "f"):
        assert type(loaded.get_layer(name)) is type(model.get_layer(name))
    before, after = masks(model), masks(loaded)
    assert list(before) == ["c", "d", "f"] == list(after)
    for name in before:
        assert after[name].dtype == np.float32
        np.testing.assert_array_equal(after[name], before[name])
    np.testing.assert_array_equal(npv(loaded(x)), npv(model(x)))


def test_loading_a_plain_layer_store_gives_a_clear_error():
    layer = rk.MaskedDense(2)
    layer.build((None, 3))
    # kernel, bias and kernel_mask are saved (the capture variable is not).
    with pytest.raises(ValueError, match="expected 3 variables"):
        layer.load_own_variables({"0": np.zeros((3, 2)), "1": np.zeros(2)})


def test_compiled_train_step_sees_new_mask_without_retracing():
    model = rk.sparsify(keras.Sequential([keras.Input((4,)), L.Dense(3, name="d")]), 0.0, "erk")
    model.compile(keras.optimizers.SGD(0.0), "mse")  # lr 0: weights stay put
    x = np.random.rand(8, 4).astype("float32")
    y = np.random.rand(8, 3).astype("float32")
    model.train_on_batch(x, y)
    function = model.train_function
    w = rk.masked_weights(model)[0]
    bias = npv(model.get_layer("d").bias)
    for trial in range(3):
        mask = (np.random.default_rng(trial).random((4, 3)) < 0.5).astype("uint8")
        w.mask.assign(mask)
        loss = model.train_on_batch(x, y)
        kernel = npv(w.variable) * mask
        expected = np.mean((x @ kernel + bias - y) ** 2)
        np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert model.train_function is function
    tracing = getattr(function, "experimental_get_tracing_count", None)
    if tracing is not None:
        assert tracing() == 1


def test_momentum_travels_through_save_and_load(tmp_path):
    model = rk.sparsify(keras.Sequential([keras.Input((4,)), L.Dense(3, name="d")]), 0.5, "erk")
    w = rk.masked_weights(model)[0]
    w.ensure_momentum().assign(np.arange(12, dtype="float32").reshape(4, 3))
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = rk.masked_weights(keras.models.load_model(path))
    assert [v.name for v in loaded] == ["d"]
    np.testing.assert_array_equal(npv(loaded[0].momentum), npv(w.momentum))


# ---------------------------------------------------------------------------
# Layer coverage: every supported layer kind through sparsify, strip, save/load
# ---------------------------------------------------------------------------


def _functional(body, shape, dtype="float32", head=True):
    inputs = keras.Input(shape, dtype=dtype)
    x = body(inputs)
    if head:
        x = L.Dense(2, name="head")(L.Flatten()(x))
    return keras.Model(inputs, x)


def _nested():
    inner = keras.Sequential([keras.Input((4,)), L.Dense(5, name="inner_fc")], name="inner")
    return _functional(lambda i: inner(i), (4,))


def _shared():
    shared = L.Dense(4, name="shared")
    return _functional(lambda i: shared(shared(i)), (4,))


def _rnn(name):
    return [f"l/{name}_cell/kernel", f"l/{name}_cell/recurrent_kernel", "head"]


_EMB = dict(sparse_embeddings=True)
COVERAGE = [
    ("Dense", lambda: _functional(lambda i: L.Dense(5, name="l")(i), (4,)), {}, ["l", "head"], None),
    ("EinsumDense", lambda: _functional(
        lambda i: L.EinsumDense("abc,cd->abd", output_shape=(3, 5), bias_axes="d", name="l")(i), (3, 4)),
     {}, ["l", "head"], None),
    ("Conv1D", lambda: _functional(lambda i: L.Conv1D(3, 2, name="l")(i), (5, 2)), {}, ["l", "head"], None),
    ("Conv2D", lambda: _functional(lambda i: L.Conv2D(3, 2, name="l")(i), (4, 4, 2)), {}, ["l", "head"], None),
    ("Conv3D", lambda: _functional(lambda i: L.Conv3D(3, 2, name="l")(i), (3, 3, 3, 2)), {}, ["l", "head"], None),
    ("Conv1DTranspose", lambda: _functional(lambda i: L.Conv1DTranspose(3, 2, name="l")(i), (4, 2)),
     {}, ["l", "head"], None),
    ("Conv2DTranspose", lambda: _functional(lambda i: L.Conv2DTranspose(3, 2, name="l")(i), (3, 3, 2)),
     {}, ["l", "head"], None),
    ("Conv3DTranspose", lambda: _functional(lambda i: L.Conv3DTranspose(3, 2, name="l")(i), (2, 2, 2, 2)),
     {}, ["l", "head"], None),
    ("DepthwiseConv1D", lambda: _functional(lambda i: L.DepthwiseConv1D(2, depth_multiplier=2, name="l")(i), (5, 3)),
     {}, ["l", "head"], None),
    ("DepthwiseConv2D", lambda: _functional(lambda i: L.DepthwiseConv2D(2, depth_multiplier=2, name="l")(i), (4, 4, 3)),
     {}, ["l", "head"], None),
    ("SeparableConv1D", lambda: _functional(lambda i: L.SeparableConv1D(4, 2, name="l")(i), (5, 3)),
     {}, ["l/depthwise_kernel", "l/pointwise_kernel", "head"], None),
    ("SeparableConv2D", lambda: _functional(lambda i: L.SeparableConv2D(4, 2, name="l")(i), (4, 4, 3)),
     {}, ["l/depthwise_kernel", "l/pointwise_kernel", "head"], None),
    ("Embedding-sparse_embeddings", lambda: _functional(lambda i: L.Embedding(12, 4, name="l")(i), (3,), "int32"),
     _EMB, ["l", "head"], None),
    ("Embedding-custom_sparsity", lambda: _functional(lambda i: L.Embedding(12, 4, name="l")(i), (3,), "int32"),
     dict(custom_sparsity={"l": 0.5}), ["l", "head"], None),
    ("SimpleRNN", lambda: _functional(lambda i: L.SimpleRNN(3, name="l")(i), (4, 2)), {}, _rnn("simple_rnn"),
     None),
    ("LSTM", lambda: _functional(lambda i: L.LSTM(3, name="l")(i), (4, 2)), {}, _rnn("lstm"), None),
    ("GRU", lambda: _functional(lambda i: L.GRU(3, name="l")(i), (4, 2)), {}, _rnn("gru"), None),
    ("MultiHeadAttention", lambda: _functional(lambda i: L.MultiHeadAttention(2, 3, name="l")(i, i), (3, 4)),
     {}, ["l/query", "l/key", "l/value", "l/attention_output", "head"], None),
    ("Bidirectional-LSTM", lambda: _functional(lambda i: L.Bidirectional(L.LSTM(3, name="lstm"), name="l")(i), (4, 2)),
     {}, [f"l/{d}_lstm/lstm_cell/{k}" for d in ("forward", "backward") for k in ("kernel", "recurrent_kernel")]
     + ["head"], None),
    ("TimeDistributed-Dense", lambda: _functional(lambda i: L.TimeDistributed(L.Dense(3, name="d"), name="l")(i), (4, 2)),
     {}, ["l/d", "head"], None),
    ("nested-model", _nested, {}, ["inner/inner_fc", "head"], None),
    ("shared-layer", _shared, {}, ["shared", "head"], None),
]


def _inputs(model, n=2):
    shape = (n,) + tuple(model.inputs[0].shape[1:])
    rng = np.random.default_rng(0)
    if "int" in str(model.inputs[0].dtype):
        return rng.integers(0, 12, size=shape).astype("int32")
    return rng.normal(size=shape).astype("float32")


@pytest.mark.parametrize(
    "build, kwargs, expected",
    [pytest.param(b, k, e, id=i, marks=[m] if m else []) for i, b, k, e, m in COVERAGE],
)
def test_layer_coverage(build, kwargs, expected, tmp_path):
    model = build()
    x = _inputs(model)
    dense_out = npv(model(x))
    sparsities = rk.sparsity_distribution(model, 0.8, "erk", **kwargs)
    sparse = rk.sparsify(model, 0.8, "erk", seed=5, **kwargs)
    weights = rk.masked_weights(sparse)
    assert [w.name for w in weights] == expected
    assert list(sparsities) == expected
    for w in weights:
        mask = npv(w.mask)
        assert mask.dtype == npv(w.variable).dtype and set(np.unique(mask)) <= {0, 1}
        assert int(mask.sum()) == rk.active_count(w.size, sparsities[w.name])
        assert np.all(npv(w.variable)[mask == 0] == 0)
    assert any(npv(w.mask).min() == 0 for w in weights)  # something is actually sparse
    report = rk.sparsity_report(sparse)
    assert not [r.name for r in report.weights if r.note.startswith("cannot be masked")]
    for w in weights:
        assert report[w.name].active == int(npv(w.mask).sum())
    out = npv(sparse(x))
    assert not np.allclose(out, dense_out)  # the masks are applied
    plain = rk.strip_masks(sparse)
    assert not rk.masked_weights(plain)
    np.testing.assert_allclose(npv(plain(x)), out, rtol=1e-6, atol=1e-6)
    path = str(tmp_path / "m.keras")
    sparse.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(npv(loaded(x)), out)
    before, after = masks(sparse), masks(loaded)
    assert list(after) == list(before)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])


# ---------------------------------------------------------------------------
# Custom layers: the maskable protocol
# ---------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="test")
@rk.maskable("kernel")
class Linear(keras.layers.Layer):
    def __init__(self, units=3, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.kernel = self.add_weight(name="kernel", shape=(input_shape[-1], self.units))
        self.offset = self.add_weight(name="offset", shape=(self.units,), initializer="ones")

    def call(self, x):
        return keras.ops.matmul(x, self.kernel) + self.offset

    def get_config(self):
        return super().get_config() | {"units": self.units}


@keras.saving.register_keras_serializable(package="test")
@rk.maskable("kernel", "ghost")
class Misdeclared(Linear):
    pass


@keras.saving.register_keras_serializable(package="test")
class Unsupported(Linear):
    """A layer with a 2-D weight and no declaration."""


def _with(layer_cls):
    inputs = keras.Input((6,))
    x = layer_cls(5, name="custom")(inputs)
    return keras.Model(inputs, L.Dense(2, name="head")(x))


def test_custom_maskable_layer_is_masked_and_round_trips(tmp_path):
    model = _with(Linear)
    sparse = rk.sparsify(model, 0.8, "erk", seed=2)
    weights = {w.name: w for w in rk.masked_weights(sparse)}
    assert list(weights) == ["custom", "head"]
    layer = sparse.get_layer("custom")
    assert isinstance(layer, Linear) and rk.layers.is_masked(layer)
    sparsities = rk.sparsity_distribution(model, 0.8, "erk")
    mask = npv(weights["custom"].mask)
    assert int(mask.sum()) == rk.active_count(30, sparsities["custom"]) and mask.min() == 0
    x = np.random.rand(3, 6).astype("float32")
    path = str(tmp_path / "m.keras")
    sparse.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.get_layer("custom")) is type(layer)
    np.testing.assert_array_equal(masks(loaded)["custom"], mask)
    np.testing.assert_array_equal(npv(loaded(x)), npv(sparse(x)))
    np.testing.assert_allclose(npv(rk.strip_masks(sparse)(x)), npv(sparse(x)), rtol=1e-6, atol=1e-6)


def test_declaration_of_a_missing_weight_raises_before_anything_changes():
    model = _with(Misdeclared)
    before = [npv(v).copy() for v in model.weights]
    with pytest.raises(ValueError, match="ghost"):
        rk.sparsify(model, 0.5)
    assert not any(rk.layers.is_masked(l) for l in model.layers)
    for a, b in zip(before, model.weights):
        np.testing.assert_array_equal(a, npv(b))


def test_unsupported_layer_stays_dense_and_is_reported():
    model = _with(Unsupported)
    with pytest.warns(UserWarning, match="cannot be masked"):
        sparse = rk.sparsify(model, 0.8, "erk")
    assert [w.name for w in rk.masked_weights(sparse)] == ["head"]
    rows = [r for r in rk.sparsity_report(sparse).weights if r.note.startswith("cannot be masked")]
    assert [(r.name, r.total, r.active) for r in rows] == [("custom/kernel", 30, 30)]
    assert np.count_nonzero(npv(sparse.get_layer("custom").kernel)) == 30
    for argument in ("custom_sparsity", "dense_layers"):
        value = {"custom": 0.5} if argument == "custom_sparsity" else ["custom"]
        with pytest.raises(ValueError, match="'custom'.*cannot be masked"):
            rk.sparsify(model, 0.8, "erk", **{argument: value})


# ---------------------------------------------------------------------------
# The captured gradient
# ---------------------------------------------------------------------------


def test_captured_gradient_equals_dense_gradient_of_effective_kernel():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.normal(size=(16, 3)).astype("float32")
    base = keras.Sequential([keras.Input((4,)), L.Dense(5, activation="tanh", name="h"), L.Dense(3, name="d")])
    model = rk.sparsify(base, 0.6, "uniform", custom_sparsity={"h": 0.5}, seed=4)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    weights = rk.masked_weights(model)
    assert [w.name for w in weights] == ["h", "d"]
    saved = [npv(v).copy() for v in model.weights]
    reference = [npv(g) for g in rk_backend.dense_gradients(model, weights, (x, y))]
    # Analytic ∂L/∂W_eff of the last layer: mse = mean((h W + b − y)²).
    hidden = np.tanh(x @ npv(weights[0].effective()) + npv(model.get_layer("h").bias))
    out = hidden @ npv(weights[1].effective()) + npv(model.get_layer("d").bias)
    analytic = hidden.T @ (2.0 * (out - y) / y.size)
    np.testing.assert_allclose(reference[1], analytic, rtol=1e-4, atol=1e-6)
    for a, b in zip(saved, model.weights):  # the reference pass changed nothing
        np.testing.assert_array_equal(a, npv(b))
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    for w, ref in zip(weights, reference):
        np.testing.assert_allclose(npv(w.gradient), ref, rtol=1e-4, atol=1e-5)
    # Dense, not masked: non-zero where the last layer's mask is 0. (A hidden
    # unit whose outgoing connections are all masked gets exactly 0 in `h`.)
    captured, outside = npv(weights[1].gradient), npv(weights[1].mask) == 0
    assert outside.any() and np.all(captured[outside] != 0)
    np.testing.assert_allclose(captured, analytic, rtol=1e-4, atol=1e-5)
