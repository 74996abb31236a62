"""RigLCallback inside model.fit: hand-computed growth, exact counts, logs, schedule, errors."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import rigl_keras as rk
from rigl_keras.distributions import active_count

from conftest import classification_data, compile_sgd, masks, mlp


def attach(callback, model, steps=100, epochs=1):
    callback.set_model(model)
    callback.set_params({"steps": steps, "epochs": epochs, "verbose": 0})
    callback.on_train_begin()
    return callback


def test_rigl_grows_where_the_dense_gradient_is_largest():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 5)).astype("float32")
    y = rng.normal(size=(16, 4)).astype("float32")
    model = keras.Sequential([keras.Input((5,)), rk.MaskedDense(4, name="d")])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    layer = model.get_layer("d")
    mask = (rng.random((5, 4)) < 0.5).astype("float32")
    kernel = rng.normal(size=(5, 4)).astype("float32") * mask
    layer.mask.assign(mask)
    layer.raw_kernel.assign(kernel)
    bias = layer.bias.numpy()
    # Hand-computed dense gradient of mean((xW + b - y)^2) w.r.t. W.
    grad = x.T @ (2 * (x @ kernel + bias - y) / y.size)
    callback = attach(
        rk.RigLCallback(delta_t=10, alpha=0.5, decay="constant", end_step=100,
                        grow_data=(x, y), grow_batch_size=16),
        model,
    )
    n_active = int(mask.sum())
    k = n_active // 2
    flat_w, flat_g, flat_m = np.abs(kernel).ravel(), np.abs(grad).ravel(), mask.ravel()
    active = np.flatnonzero(flat_m)
    keep = active[np.argsort(-flat_w[active], kind="stable")[: n_active - k]]
    candidates = np.setdiff1d(np.arange(20), keep)
    grow = candidates[np.argsort(-flat_g[candidates], kind="stable")[:k]]
    expected = np.zeros(20)
    expected[np.concatenate([keep, grow])] = 1
    [result] = callback.update(10)
    np.testing.assert_array_equal(layer.mask.numpy().ravel(), expected)
    assert result.active == n_active
    new_positions = (expected == 1) & ~np.isin(np.arange(20), keep)
    assert np.all(layer.raw_kernel.numpy().ravel()[new_positions] == 0)


def test_fit_changes_connectivity_with_exact_counts_and_logs():
    x, y = classification_data(400)
    model = compile_sgd(rk.sparsify(mlp(), 0.8, "erk", seed=0))
    expected = {name: int(m.sum()) for name, m in masks(model).items()}
    before = masks(model)
    batch_logs = []
    recorder = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: batch_logs.append(dict(logs)))
    rigl = rk.RigLCallback(delta_t=5, grow_data=(x, y), check_invariants=True)
    history = model.fit(x, y, batch_size=20, epochs=2, callbacks=[rigl, recorder], verbose=0)
    after = masks(model)
    assert {n: int(m.sum()) for n, m in after.items()} == expected
    assert any(not np.array_equal(before[n], after[n]) for n in before)
    updates = [logs for logs in batch_logs if "connections_changed" in logs]
    assert len(updates) == 5  # steps 5..25 < T_end = 0.75 * 40 = 30
    assert sum(u["connections_changed"] for u in updates) == sum(history.history["connections_changed"])
    assert history.history["mask_updates"] == [4, 1]
    for step, logs in zip(range(5, 30, 5), updates):
        assert logs["drop_fraction"] == pytest.approx(0.3 / 2 * (1 + math.cos(math.pi * step / 30)))
    rk.check_sparsity(model, expected)


@pytest.mark.parametrize("optimizer", [lambda: keras.optimizers.SGD(0.05, momentum=0.9), lambda: keras.optimizers.Adam(1e-3)])
def test_optimizer_state_stays_zero_outside_the_mask_during_fit(optimizer):
    x, y = classification_data(200)
    model = rk.sparsify(mlp(), 0.9, "erk")
    model.compile(optimizer(), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=20, epochs=2, verbose=0,
              callbacks=[rk.RigLCallback(delta_t=3, alpha=0.5, grow_data=(x, y), check_invariants=True)])
    rk.check_sparsity(model)


def test_steps_per_execution_still_updates():
    x, y = classification_data(200)
    model = rk.sparsify(mlp(), 0.8)
    model.compile(keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=4)
    history = model.fit(x, y, batch_size=10, epochs=1, verbose=0,
                        callbacks=[rk.RigLCallback(delta_t=6, end_step=20, grow_data=(x, y))])
    assert history.history["mask_updates"] == [3]  # steps 6, 12, 18


def test_schedule_follows_the_optimizer_step_not_the_batch_index():
    x, y = classification_data(100)
    model = compile_sgd(rk.sparsify(mlp(), 0.8))
    model.optimizer.build(model.trainable_variables)
    model.optimizer.iterations.assign(95)
    history = model.fit(x, y, batch_size=10, epochs=1, verbose=0,
                        callbacks=[rk.RigLCallback(delta_t=100, end_step=1000, grow_data=(x, y))])
    assert history.history["mask_updates"] == [1]  # step 100 only


@pytest.mark.parametrize("source", ["dataset", "generator"])
def test_grow_data_sources(source):
    x, y = classification_data(100)
    if source == "dataset":
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(25)
    else:
        data = [(x[i:i + 25], y[i:i + 25]) for i in range(0, 100, 25)]
    model = compile_sgd(rk.sparsify(mlp(), 0.8))
    history = model.fit(x, y, batch_size=10, epochs=1, verbose=0,
                        callbacks=[rk.RigLCallback(delta_t=2, grow_data=data)])
    assert history.history["connections_changed"][0] > 0


def test_array_batches_are_keyed_to_the_step():
    x, y = classification_data(300)
    source = rk.GrowData((x, y), batch_size=32, seed=5)
    a, b, c = source.batch(100), source.batch(100), source.batch(200)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (32, 20)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(delta_t=0), "delta_t"),
        (dict(delta_t=2.5), "delta_t"),
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=1.5), "alpha"),
        (dict(end_step=0), "end_step"),
        (dict(end_step=-3), "end_step"),
        (dict(end_step=1.5), "end_step"),
        (dict(decay="linear"), "decay"),
        (dict(seed="x"), "seed"),
        (dict(grow_data=42), "grow_data"),
        (dict(grow_data=(np.zeros((1, 2)), np.zeros(1)), grow_batch_size=0), "grow_batch_size"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rk.RigLCallback(**kwargs)


def test_model_without_masked_layers_is_rejected_and_untouched():
    x, y = classification_data(50)
    model = compile_sgd(mlp())
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match="no masked layer"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[rk.RigLCallback(grow_data=(x, y))])
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_missing_grow_data_is_rejected_at_train_begin():
    x, y = classification_data(50)
    model = compile_sgd(rk.sparsify(mlp(), 0.5))
    with pytest.raises(ValueError, match="grow_data"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[rk.RigLCallback()])


def test_fractional_end_step_needs_known_length():
    x, y = classification_data(50)
    model = compile_sgd(rk.sparsify(mlp(), 0.5))
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(10).repeat().take(5)
    data = data.filter(lambda a, b: True)  # length unknown
    with pytest.raises(ValueError, match="end_step"):
        model.fit(data, epochs=1, verbose=0, callbacks=[rk.RigLCallback(grow_data=(x, y))])


def test_config_round_trip():
    callback = rk.RigLCallback(delta_t=7, alpha=0.2, end_step=500, decay="constant", seed=3, grow_batch_size=64)
    clone = rk.RigLCallback.from_config(callback.get_config())
    assert clone.get_config() == callback.get_config()
    assert clone.schedule == callback.schedule
