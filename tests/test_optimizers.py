"""Every optimizer Keras ships keeps the sparse invariants under every kind of callback.

Counts stay exact, weights outside the mask stay 0 and optimizer state outside the mask
stays at the optimizer's initial value (`check_sparsity`), whether the optimizer's update
is elementwise or mixes positions (Muon: projected after each step).
"""

import keras
import numpy as np
import pytest

import rigl_keras as rk
from rigl_keras import engine

from conftest import classification_data, counts, mlp

OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.05),
    "sgd_nesterov": lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
    "rmsprop": lambda: keras.optimizers.RMSprop(1e-3, momentum=0.5),
    "adam": lambda: keras.optimizers.Adam(1e-3),
    "adam_amsgrad": lambda: keras.optimizers.Adam(1e-3, amsgrad=True),
    "adamw": lambda: keras.optimizers.AdamW(1e-3, weight_decay=0.1),
    "adadelta": lambda: keras.optimizers.Adadelta(1.0),
    "adagrad": lambda: keras.optimizers.Adagrad(0.05),
    "adamax": lambda: keras.optimizers.Adamax(1e-3),
    # The default epsilon_1 = 1e-30 underflows (see the warning test below).
    "adafactor": lambda: keras.optimizers.Adafactor(1e-2, epsilon_1=1e-15),
    "nadam": lambda: keras.optimizers.Nadam(1e-3),
    "ftrl": lambda: keras.optimizers.Ftrl(0.05, l1_regularization_strength=1e-3),
    "lion": lambda: keras.optimizers.Lion(1e-4),
    "lamb": lambda: keras.optimizers.Lamb(1e-3),
    "muon": lambda: keras.optimizers.Muon(1e-2),
    "schedule_free_adamw": lambda: keras.optimizers.ScheduleFreeAdamW(1e-3),
    "loss_scale_adam": lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(1e-3)),
    "sgd_clipnorm": lambda: keras.optimizers.SGD(0.05, momentum=0.9, clipnorm=0.1),
}


# Optimizers are backend-independent Keras code: the whole matrix runs on
# TensorFlow, the ones with special handling on every backend (CI time).
EVERYWHERE = {"sgd", "adam", "adagrad", "ftrl", "muon", "adafactor", "loss_scale_adam"}
CASES = [
    pytest.param(name, "rigl", marks=() if name in EVERYWHERE else pytest.mark.skipif(
        keras.backend.backend() != "tensorflow", reason="full optimizer matrix on TensorFlow only"))
    for name in sorted(OPTIMIZERS)
] + [("muon", "static"), ("adagrad", "static")]


@pytest.mark.parametrize("name, method", CASES)
def test_every_keras_optimizer_keeps_the_invariants(name, method):
    x, y = classification_data(80)
    model = rk.sparsify(mlp(), 0.8, "erk", seed=0)
    model.compile(OPTIMIZERS[name](), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    expected = counts(model)
    callback = (rk.baselines.StaticCallback(check_invariants=True) if method == "static"
                else rk.RigLCallback(delta_t=2, alpha=0.5, end_step=1.0, check_invariants=True))
    model.fit(x, y, batch_size=20, epochs=2, verbose=0, callbacks=[callback])  # 3 updates
    rk.check_sparsity(model, expected)
    assert np.isfinite(model.evaluate(x, y, verbose=0))


def test_only_position_mixing_optimizers_are_projected():
    assert engine.mixes_positions(keras.optimizers.Muon())
    assert engine.mixes_positions(keras.optimizers.LossScaleOptimizer(keras.optimizers.Muon()))
    for name in ("sgd", "adam", "adagrad", "adafactor", "ftrl", "lion", "lamb", "schedule_free_adamw"):
        assert not engine.mixes_positions(OPTIMIZERS[name]()), name


def test_muon_without_the_projection_would_fill_the_masked_out_entries():
    # The regression the projection fixes: Muon's orthogonalised update is dense.
    x, y = classification_data(60)
    model = rk.sparsify(mlp(), 0.8, "erk", seed=0)
    model.compile(keras.optimizers.Muon(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=20, epochs=1, verbose=0)  # no sparse-training callback
    with pytest.raises(rk.SparsityInvariantError, match="outside"):
        rk.check_sparsity(model)
    # The outputs never saw those entries: restoring the invariant changes nothing.
    before = keras.ops.convert_to_numpy(model(x[:8]))
    rk.restore_invariants(model)
    rk.check_sparsity(model)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x[:8])), before, rtol=1e-6)


def test_adafactor_state_is_recomputed_so_it_is_neither_reset_nor_audited():
    traits = engine.optimizer_traits(keras.optimizers.Adafactor(epsilon_1=1e-15))
    assert traits.derived_slots == {"velocity"} and not traits.mixes_positions


def test_an_optimizer_that_makes_nan_from_zero_gradients_is_named_at_fit_start():
    # Keras' Adafactor: v = r_i c_j / mean(r) underflows to 0 where a row and
    # a column get no gradient (epsilon_1 = 1e-30), and 0 / sqrt(0) is NaN.
    assert engine.optimizer_traits(keras.optimizers.Adafactor()).makes_nonfinite
    x, y = classification_data(40)
    model = rk.sparsify(mlp(), 0.8, "erk", seed=0)
    model.compile(keras.optimizers.Adafactor(), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.warns(RuntimeWarning, match="epsilon_1"):
        model.fit(x, y, batch_size=20, epochs=1, verbose=0, callbacks=[rk.baselines.StaticCallback()])


def _ema_fails_in_keras_with_capture():
    # TensorFlow at the end of every fit; JAX only with ema_overwrite_frequency.
    return keras.backend.backend() == "tensorflow"


def test_weight_moving_average_is_state_reset_with_the_rest():
    # use_ema: the optimizer's moving average of the weights is reset where
    # connections change and written into the weights every 3 steps and at the end.
    x, y = classification_data(80)
    model = rk.sparsify(mlp(), 0.8, "erk", seed=0, capture_gradients=False)
    model.compile(keras.optimizers.Adam(1e-3, use_ema=True, ema_overwrite_frequency=3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    expected = counts(model)
    set_cb = rk.baselines.SETCallback(delta_t=2, alpha=0.5, end_step=1.0, check_invariants=True)
    history = model.fit(x, y, batch_size=20, epochs=2, verbose=0, callbacks=[set_cb])
    assert sum(history.history["connections_changed"]) > 0
    rk.check_sparsity(model, expected)


def test_weight_moving_average_with_captured_gradients_fails_clearly_where_keras_cannot_do_it():
    x, y = classification_data(40)
    model = rk.sparsify(mlp(), 0.8, "erk", seed=0)
    model.compile(keras.optimizers.Adam(1e-3, use_ema=True),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rigl = rk.RigLCallback(delta_t=2, end_step=1.0, check_invariants=True)
    if _ema_fails_in_keras_with_capture():
        with pytest.raises(ValueError, match="use_ema"):
            model.fit(x, y, batch_size=20, epochs=1, verbose=0, callbacks=[rigl])
        assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 0
    else:
        model.fit(x, y, batch_size=20, epochs=1, verbose=0, callbacks=[rigl])
        rk.check_sparsity(model)
