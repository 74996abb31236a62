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
    # The probe steps through gradient accumulation (3 steps would update nothing).
    assert engine.mixes_positions(keras.optimizers.Muon(gradient_accumulation_steps=4))
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


TORCH_ONLY = pytest.mark.skipif(keras.backend.backend() != "torch",
                                reason="PyTorch's in-place masking (the other backends mask in the step)")


class _VouchRecorder(keras.callbacks.Callback):
    """After every batch: per masked weight, whether the step was vouched for
    (its in-place clean stamp is current without a forward pass's AND) and
    whether its stored entries outside the mask are exactly 0."""

    def __init__(self):
        super().__init__()
        self.vouched, self.zero, self.wrapped = [], [], []

    def on_train_batch_end(self, batch, logs=None):
        weights = rk.masked_weights(self.model)
        self.wrapped.append("apply" in self.model.optimizer.__dict__)
        params = [w.variable._value for w in weights]
        self.vouched.append([getattr(p, "_rk_clean", (None,))[0] == p._version for p in params])
        self.zero.append([bool(np.all(keras.ops.convert_to_numpy(w.variable)[
            keras.ops.convert_to_numpy(w.mask) == 0] == 0)) for w in weights])


def _vouch_model(kernel_constraint=None):
    layers = [keras.Input((20,))] + [
        keras.layers.Dense(n, activation="relu" if i < 2 else None, name=name,
                           kernel_constraint=kernel_constraint)
        for i, (n, name) in enumerate([(32, "fc1"), (16, "fc2"), (5, "out")])]
    return rk.sparsify(keras.Sequential(layers), 0.8, "erk", seed=0, capture_gradients=False)


@TORCH_ONLY
@pytest.mark.parametrize("name", ["sgd_nesterov", "adamw", "loss_scale_adam", "sgd_clipnorm"])
def test_torch_steps_that_keep_masked_out_entries_zero_skip_the_next_and(name):
    """With a sparse-training callback, an elementwise optimizer's step on a
    masked gradient leaves the stored weight 0 outside the mask, and says so:
    the next forward pass skips its in-place AND. Training is unchanged."""
    x, y = classification_data(60)
    finals = []
    for callbacks in ([rk.baselines.StaticCallback(), _VouchRecorder()], []):
        keras.utils.set_random_seed(0)
        model = _vouch_model(keras.constraints.MaxNorm(3.0) if name == "adamw" else None)
        model.compile(OPTIMIZERS[name](), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, batch_size=20, epochs=2, verbose=0, shuffle=False, callbacks=callbacks)
        finals.append([keras.ops.convert_to_numpy(v) for v in model.trainable_variables])
        if callbacks:
            recorder = callbacks[1]
            assert len(recorder.vouched) == 6 and all(all(step) for step in recorder.vouched)
            assert all(all(step) for step in recorder.zero)
            assert "apply" not in model.optimizer.__dict__  # unwrapped at train end
    for with_callback, without in zip(*finals):
        np.testing.assert_array_equal(with_callback, without)


@keras.saving.register_keras_serializable(package="rigl_keras_tests")
class _AddEverywhere(keras.constraints.Constraint):
    def __call__(self, w):
        return w + 0.01


@TORCH_ONLY
@pytest.mark.parametrize("hazard", ["optimizer_state", "gradient_changed", "constraint", "muon"])
def test_torch_steps_that_could_move_masked_out_entries_are_not_vouched_for(hazard):
    """Momentum left outside the mask, a gradient written after the mask hook
    (here a later hook at the second step, whose momentum then moves masked-out
    entries at every step; a custom step alike), a constraint that moves zeros,
    an optimizer that mixes positions: each makes the step move entries
    outside the mask, so the next forward pass must AND again. Without each
    guard the model would compute with those entries."""
    import torch

    x, y = classification_data(60)
    model = _vouch_model(_AddEverywhere() if hazard == "constraint" else None)
    optimizer = keras.optimizers.Muon(1e-2) if hazard == "muon" else keras.optimizers.SGD(0.05, momentum=0.9)
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    weights = rk.masked_weights(model)
    if hazard == "optimizer_state":
        optimizer.build(model.trainable_variables)
        for w in weights:
            for slot in engine.optimizer_state_for(optimizer, w.variable, model.trainable_variables):
                slot.assign(keras.ops.ones(slot.shape))
    if hazard == "gradient_changed":
        model(x[:1])  # registers the mask hooks first
        def add_one(param):  # at the second step only: momentum carries it on
            if int(keras.ops.convert_to_numpy(optimizer.iterations)) == 1:
                param.grad.add_(1.0)

        for w in weights:
            w.variable._value.register_post_accumulate_grad_hook(add_one)
    recorder = _VouchRecorder()
    model.fit(x, y, batch_size=20, epochs=1, verbose=0,
              callbacks=[rk.baselines.StaticCallback(), recorder])
    # (The first step, before the gradient is changed, keeps them 0.)
    vouched = recorder.vouched[1:] if hazard == "gradient_changed" else recorder.vouched
    assert len(vouched) >= 2 and not any(any(step) for step in vouched)
    # Muon: not even looked at (and projected after every step).
    assert all(recorder.wrapped) == (hazard != "muon")
    if hazard != "muon":  # (Muon: projected after every step)
        assert not all(all(step) for step in recorder.zero)
    out = keras.ops.convert_to_numpy(model(torch.as_tensor(x)))
    h = x
    for i, w in enumerate(weights):
        mask = keras.ops.convert_to_numpy(w.mask)
        kernel = keras.ops.convert_to_numpy(w.variable)
        assert np.all(kernel[mask == 0] == 0), w.name
        h = h @ kernel + keras.ops.convert_to_numpy(w.layer.bias)
        h = np.maximum(h, 0) if i < 2 else h
    np.testing.assert_allclose(out, h, rtol=1e-5, atol=1e-5)
