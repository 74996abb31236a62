"""Baselines on the shared engine: Static, SET, SNFS, SNIP, pruning, Small-Dense, registry.

Backend-agnostic: runs under KERAS_BACKEND=tensorflow, jax and torch.
"""

import json
import subprocess
import sys

import keras
import numpy as np
import pytest

import rigl_keras as rk
from rigl_keras import baselines
from rigl_keras.distributions import active_count

from conftest import attach, classification_data, compile_sgd, counts, masks, mlp


def numpy(x):
    return np.array(keras.ops.convert_to_numpy(x))


def fit(model, callbacks, x, y, epochs=1, batch_size=20, each_batch=None):
    extra = []
    if each_batch is not None:
        class EachBatch(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                each_batch(self.model)  # `self.model` syncs JAX state first

        extra = [EachBatch()]
    return model.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0, callbacks=callbacks + extra)


def weight(model, name):
    return {w.name: w for w in rk.masked_weights(model)}[name]


def test_static_masks_never_change():
    x, y = classification_data(200)
    model = compile_sgd(rk.sparsify(mlp(), 0.8))
    before = masks(model)
    fit(model, [baselines.StaticCallback(check_invariants=True)], x, y)
    after = masks(model)
    assert all(np.array_equal(before[n], after[n]) for n in before)


def test_static_sparse_training_with_adagrad_keeps_the_initial_accumulator_outside_the_mask():
    # Adagrad's accumulator starts at 0.1, not 0: the audit must compare with that.
    x, y = classification_data(100)
    model = rk.sparsify(mlp(), 0.8, capture_gradients=False)
    model.compile(keras.optimizers.Adagrad(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    fit(model, [baselines.StaticCallback(check_invariants=True)], x, y, epochs=1)
    rk.check_sparsity(model)
    w = weight(model, "fc1")
    [accumulator] = rk.engine.optimizer_state_for(model.optimizer, w.variable, model.trainable_variables)
    state, mask = numpy(accumulator), numpy(w.mask)
    np.testing.assert_allclose(state[mask == 0], 0.1)
    assert np.all(state[mask == 1] >= 0.1) and np.any(state[mask == 1] > 0.1)


@pytest.mark.parametrize(
    "make",
    [
        lambda x, y: baselines.SETCallback(delta_t=3, check_invariants=True),
        lambda x, y: rk.RigLCallback(delta_t=3, check_invariants=True),
        lambda x, y: rk.RigLCallback(delta_t=3, grow_data=(x, y), check_invariants=True),
        lambda x, y: baselines.SNFSCallback(delta_t=3, check_invariants=True),
        lambda x, y: baselines.SNFSCallback(delta_t=3, grow_data=(x, y), check_invariants=True),
    ],
    ids=["set", "rigl", "rigl-grow_data", "snfs", "snfs-grow_data"],
)
def test_dynamic_methods_keep_exact_per_weight_counts(make):
    x, y = classification_data(200)
    model = compile_sgd(rk.sparsify(mlp(), 0.85, "erk"))
    expected, before = counts(model), masks(model)
    seen = []
    fit(model, [make(x, y)], x, y, epochs=1, each_batch=lambda m: seen.append(counts(m)))
    assert len(seen) == 10 and all(c == expected for c in seen)
    assert any(not np.array_equal(before[n], masks(model)[n]) for n in before)


def _set_run(seed):
    x, y = classification_data(200)
    keras.utils.set_random_seed(0)
    model = compile_sgd(rk.sparsify(mlp(), 0.8, seed=0))
    fit(model, [baselines.SETCallback(delta_t=4, seed=seed)], x, y, epochs=1)
    return masks(model)


def test_set_growth_is_random_and_seeded():
    a, b, c = _set_run(1), _set_run(1), _set_run(2)
    assert all(np.array_equal(a[n], b[n]) for n in a)
    assert any(not np.array_equal(a[n], c[n]) for n in a)


def test_snfs_momentum_is_an_ema_of_dense_gradients_and_drives_growth():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 3)).astype("float32")
    y = rng.normal(size=(8, 2)).astype("float32")
    model = keras.Sequential([keras.Input((3,)), rk.MaskedDense(2, name="d", use_bias=False)])
    model.compile(keras.optimizers.SGD(0.0), "mse")
    [w] = rk.masked_weights(model)
    mask = np.array([[1, 0], [1, 0], [1, 1]], "uint8")
    kernel = np.array([[0.5, 0], [0.05, 0], [-0.7, 0.3]], "float32")
    w.mask.assign(mask)
    w.variable.assign(kernel)
    callback = attach(baselines.SNFSCallback(delta_t=2, alpha=0.25, decay="constant", end_step=100,
                                             momentum=0.5, grow_data=(x, y), grow_batch_size=8), model)
    grad = x.T @ (2 * (x @ kernel - y) / y.size)  # dense gradient, hand-computed
    callback.after_step(0, 1, {})  # not an update step: only the momentum moves
    np.testing.assert_allclose(numpy(w.momentum), 0.5 * grad, rtol=1e-5, atol=1e-7)
    # Growth follows |momentum|, not the current gradient: make them disagree.
    momentum = np.array([[0, 9.0], [0, 0.1], [0, 0]], "float32")
    w.momentum.assign(momentum)
    callback.after_step(1, 2, {})  # step 2 is an update step: m <- 0.5 m + 0.5 g first
    m = 0.5 * momentum + 0.5 * grad
    np.testing.assert_allclose(numpy(w.momentum), m, rtol=1e-5, atol=1e-7)
    # k = floor(0.25 * 4) = 1: drop the smallest |w|, 0.05 at (1, 0); grow the
    # largest |m| among the positions not kept: (0, 1), (1, 0), (1, 1).
    candidates = [(0, 1), (1, 0), (1, 1)]
    grown = max(candidates, key=lambda p: abs(m[p]))
    assert grown == (0, 1)
    assert max(candidates, key=lambda p: abs(grad[p])) == (1, 1)  # the gradient disagrees
    expected = np.array([[1, 0], [0, 0], [1, 1]], "uint8")
    expected[grown] = 1
    np.testing.assert_array_equal(numpy(w.mask), expected)


class RecordGradients(keras.callbacks.Callback):
    """Placed after SNFS: records every step's captured gradient and SNFS momentum."""

    def __init__(self):
        super().__init__()
        self.grads, self.momenta = [], []

    def on_train_batch_end(self, batch, logs=None):
        weights = rk.masked_weights(self.model)
        self.grads.append({w.name: numpy(w.gradient) for w in weights})
        self.momenta.append({w.name: numpy(w.momentum) for w in weights})


class PoisonGradient(keras.callbacks.Callback):
    """Placed before SNFS: writes a NaN into one captured gradient at given batches.

    The callback returned by `restore` (placed after SNFS and the recorder)
    puts the real value back: G is read in the forward pass, and a NaN left
    there would poison the next training step itself.
    """

    def __init__(self, name, batches):
        super().__init__()
        self.name, self.batches, self.saved = name, batches, None

    def on_train_batch_end(self, batch, logs=None):
        self.saved = None
        if batch in self.batches:
            w = weight(self.model, self.name)
            self.saved = numpy(w.gradient)
            g = self.saved.copy()
            g.flat[0] = np.nan
            w.gradient.assign(g)

    def restore(self):
        poison = self

        class Restore(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                if poison.saved is not None:
                    weight(self.model, poison.name).gradient.assign(poison.saved)

        return Restore()


def _ema(grads, beta):
    m = np.zeros_like(grads[0])
    for g in grads:
        if np.all(np.isfinite(g)):
            m = beta * m + (1 - beta) * g
    return m


@pytest.mark.parametrize("poison", [False, True], ids=["clean", "nan-step"])
def test_snfs_momentum_is_the_ema_of_captured_training_gradients(poison):
    x, y = classification_data(60)
    model = compile_sgd(rk.sparsify(mlp(), 0.8, "erk"))
    snfs = baselines.SNFSCallback(delta_t=2, end_step=100, momentum=0.7)
    recorder = RecordGradients()
    poisoner = PoisonGradient("fc2", {1})
    callbacks = [poisoner, snfs, recorder, poisoner.restore()] if poison else [snfs, recorder]
    model.fit(x, y, batch_size=20, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
    assert len(recorder.grads) == 3
    for name in recorder.grads[0]:
        grads = [g[name] for g in recorder.grads]
        assert not np.allclose(grads[0], grads[2])
        for step in range(3):
            np.testing.assert_allclose(recorder.momenta[step][name], _ema(grads[: step + 1], 0.7),
                                       rtol=1e-5, atol=1e-7, err_msg=f"{name} after step {step + 1}")
        assert np.all(np.isfinite(recorder.momenta[-1][name]))
    if poison:
        assert np.isnan(recorder.grads[1]["fc2"]).any()
        np.testing.assert_array_equal(recorder.momenta[1]["fc2"], recorder.momenta[0]["fc2"])


def test_snfs_redistribution_keeps_the_total_exact():
    x, y = classification_data(200)
    model = compile_sgd(rk.sparsify(mlp(), 0.8, "erk"))
    total = sum(counts(model).values())
    seen = []
    fit(model, [baselines.SNFSCallback(delta_t=3, alpha=0.5, redistribute=True, check_invariants=True)],
        x, y, each_batch=lambda m: seen.append(counts(m)))
    assert all(sum(c.values()) == total for c in seen)
    assert len({tuple(c.values()) for c in seen}) > 1  # the budget did move


@pytest.mark.parametrize(
    "sparsify_args, dense",
    [(dict(distribution="uniform"), "fc1"), (dict(distribution="erk", custom_sparsity={"fc2": 0.0}), "fc2")],
    ids=["uniform-first-layer", "custom-sparsity-0"],
)
def test_snfs_redistribution_never_touches_dense_weights(sparsify_args, dense):
    x, y = classification_data(200)
    model = compile_sgd(rk.sparsify(mlp(), 0.8, **sparsify_args))
    w = weight(model, dense)
    assert counts(model)[dense] == w.size
    initial = numpy(w.variable)
    seen = []
    fit(model, [baselines.SNFSCallback(delta_t=2, alpha=0.5, redistribute=True, check_invariants=True)],
        x, y, epochs=1, each_batch=lambda m: seen.append(counts(m)))
    assert all(c[dense] == w.size for c in seen)
    assert len({tuple(c.values()) for c in seen}) > 1  # the others did move
    # Trained (so not reset), never zeroed by a drop.
    final = numpy(w.variable)
    assert not np.array_equal(final, initial) and np.all(final != 0)


def test_allocate_is_proportional_capped_and_exact():
    assert baselines._allocate(10, [1, 1], [100, 100]) == [5, 5]
    assert baselines._allocate(10, [3, 1], [100, 100]) == [8, 2]  # 7.5/2.5: remainder to the first
    assert baselines._allocate(10, [9, 1], [4, 100]) == [4, 6]
    with pytest.raises(ValueError):
        baselines._allocate(10, [1, 1], [2, 2])


def test_snip_redraws_zeroed_weights_and_hits_exact_counts():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(16, 6)).astype("float32")
    y = rng.normal(size=(16, 3)).astype("float32")
    dense = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, name="d")])
    model = rk.sparsify(dense, 0.5, "erk")
    model.compile(keras.optimizers.SGD(0.0), "mse")
    [w] = rk.masked_weights(model)
    random_mask = numpy(w.mask)
    attach(baselines.SNIPCallback(0.5, "erk", grow_data=(x, y), grow_batch_size=16), model, steps=10)
    mask = numpy(w.mask)
    assert int(mask.sum()) == active_count(18, 0.5) == 9
    kernel = numpy(w.variable)
    assert np.all(kernel[mask == 0] == 0) and np.all(kernel[mask == 1] != 0)
    # Some kept connections were zeroed by sparsify: they were re-drawn.
    revived = (mask == 1) & (random_mask == 0)
    assert revived.any() and np.all(kernel[revived] != 0)


def _snip_linear(rng):
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.normal(size=(16, 2)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), rk.MaskedDense(2, name="d", use_bias=False)])
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse")
    [w] = rk.masked_weights(model)
    kernel = rng.normal(size=(4, 2)).astype("float32")
    w.variable.assign(kernel)  # mask all ones: nothing is re-drawn
    grad = x.T @ (2 * (x @ kernel - y) / y.size)
    expected = np.zeros(8, "uint8")
    expected[np.argsort(-np.abs(grad * kernel).ravel(), kind="stable")[:2]] = 1
    return model, w, x, y, kernel, expected.reshape(4, 2)


def test_snip_matches_hand_computed_sensitivity_with_grow_data():
    model, w, x, y, _, expected = _snip_linear(np.random.default_rng(3))
    attach(baselines.SNIPCallback(0.75, "erk", grow_data=(x, y), grow_batch_size=16), model, steps=10)
    np.testing.assert_array_equal(numpy(w.mask), expected)


def test_snip_from_the_first_training_batch_restores_the_initialization():
    model, w, x, y, kernel, expected = _snip_linear(np.random.default_rng(3))
    # One full-batch step: SNIP scores its captured gradient, then restores the
    # initial weights (pruned) and resets the optimizer state.
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
              callbacks=[baselines.SNIPCallback(0.75, "erk", check_invariants=True)])
    np.testing.assert_array_equal(numpy(w.mask), expected)
    np.testing.assert_allclose(numpy(w.variable), kernel * expected, rtol=1e-6)
    for slot in rk.engine.optimizer_state_for(model.optimizer, w.variable, model.trainable_variables):
        np.testing.assert_array_equal(numpy(slot), 0)


def test_snip_without_grow_data_chooses_the_mask_once_with_exact_counts():
    x, y = classification_data(200)
    model = compile_sgd(rk.sparsify(mlp(), 0.9, "erk"))
    targets = rk.sparsity_distribution(model, 0.9, "erk")
    seen = []
    fit(model, [baselines.SNIPCallback(0.9, "erk", check_invariants=True)], x, y,
        each_batch=lambda m: seen.append(masks(m)))
    assert len(seen) == 10
    final = masks(model)
    for name, target in targets.items():
        assert int(final[name].sum()) == active_count(weight(model, name).size, target)
        assert all(np.array_equal(s[name], final[name]) for s in seen)
    rk.check_sparsity(model)


def test_pruning_only_shrinks_and_reaches_final_sparsity_at_end_step():
    x, y = classification_data(200)
    model = compile_sgd(rk.sparsify(mlp(), 0.0, capture_gradients=False))
    finals = rk.sparsity_distribution(model, 0.9, "erk")
    callback = baselines.MagnitudePruningCallback(finals, begin_step=4, end_step=16, frequency=4,
                                                  check_invariants=True)
    history = []
    fit(model, [callback], x, y, epochs=2, each_batch=lambda m: history.append(
        (int(numpy(m.optimizer.iterations)), counts(m))))
    for (_, a), (_, b) in zip(history, history[1:]):
        assert all(b[n] <= a[n] for n in a)
    schedule = rk.PolynomialSchedule(0.5, 4, 16, frequency=4)
    by_step = dict(history)
    for name, final in finals.items():
        size = weight(model, name).size
        assert by_step[16][name] == active_count(size, final)
        assert by_step[15][name] > by_step[16][name] or final == 0
        assert by_step[8][name] == active_count(size, callback._schedules[name].sparsity(8))
    assert schedule.sparsity(10) == pytest.approx(0.5 + (0 - 0.5) * (1 - 6 / 12) ** 3)


def test_prune_method_without_distribution_targets_s_on_every_weight():
    x, y = classification_data(200)
    model, callbacks = baselines.get("prune").build(
        mlp, 0.8, prune_begin_step=0, prune_end_step=6, prune_frequency=3, seed=1)
    compile_sgd(model)
    assert counts(model) == {w.name: w.size for w in rk.masked_weights(model)}  # starts dense
    fit(model, callbacks, x, y, epochs=1)
    final = counts(model)
    assert sorted(final) == ["fc1", "fc2", "out"]
    for w in rk.masked_weights(model):
        assert final[w.name] == active_count(w.size, 0.8), w.name  # uniform, first layer included
    # With a distribution, pruning follows it instead (ERK differs per weight).
    model, callbacks = baselines.get("prune").build(mlp, 0.8, distribution="erk", prune_end_step=6,
                                                    prune_frequency=3)
    compile_sgd(model)
    fit(model, callbacks, x, y, epochs=1)
    targets = rk.sparsity_distribution(model, 0.8, "erk")
    assert counts(model) == {w.name: active_count(w.size, targets[w.name]) for w in rk.masked_weights(model)}
    assert len(set(targets.values())) > 1


def test_polynomial_schedule_values():
    s = rk.PolynomialSchedule(0.9, begin_step=100, end_step=1100, frequency=100, initial_sparsity=0.1)
    assert s.sparsity(0) == pytest.approx(0.1)
    assert s.sparsity(600) == pytest.approx(0.9 + (0.1 - 0.9) * 0.5**3)
    assert s.sparsity(1100) == s.sparsity(5000) == pytest.approx(0.9)
    assert s.is_prune_step(100) and s.is_prune_step(1100) and not s.is_prune_step(150)


def lenet(w):
    return keras.Sequential([
        keras.Input((784,)),
        keras.layers.Dense(max(1, round(300 * w)), name="fc1"),
        keras.layers.Dense(max(1, round(100 * w)), name="fc2"),
        keras.layers.Dense(10, name="logits"),
    ])


def tiny(w):
    # 10 -> h -> 5 with h = round(20 w): 16 h + 5 parameters; kernels 200 + 100 at w = 1.
    return keras.Sequential([
        keras.Input((10,)),
        keras.layers.Dense(max(1, round(20 * w)), name="hidden"),
        keras.layers.Dense(5, name="out"),
    ])


def hidden_units(width):
    return tiny(width).get_layer("hidden").units


def test_small_dense_width_on_lenet_300_100():
    w = baselines.small_dense_width(lenet, 0.9)
    # Sparse parameters: 10% of 266,200 kernel weights + 410 biases = 27,030.
    # 30000 w^2 + 236600 w + 10 = 27030 gives w = 0.1126.
    assert w == pytest.approx(0.1126, abs=0.002)
    assert lenet(w).count_params() == pytest.approx(27030, rel=0.01)
    # The default rule is "params" and ignores masks.
    assert baselines.small_dense_width(lenet, 0.9, "params") == w


def test_small_dense_rules_hand_computed_on_a_tiny_model():
    # S = 0.9 on every kernel: a = (200 − 180) + (100 − 90) = 30 active, 25 biases.
    # params:  P* = 25 + 30 = 55            -> 16 h + 5 = 55   -> h = 3 (53) beats 4 (69).
    # storage: P* = 55 + 300 mask bits / 32 = 64.375 -> h = 4 (69, off 4.6) beats 3 (53, off 11.4).
    assert hidden_units(baselines.small_dense_width(tiny, 0.9)) == 3
    assert hidden_units(baselines.small_dense_width(tiny, 0.9, "storage")) == 4
    # 8-bit parameters make the 300 mask bits weigh 37.5 parameters:
    # S = 0.5: a = 100 + 50 = 150, P* = 175 (params, h = 11: 181) or 212.5 (h = 13: 213).
    assert hidden_units(baselines.small_dense_width(tiny, 0.5)) == 11
    assert hidden_units(baselines.small_dense_width(tiny, 0.5, "storage", param_bits=8)) == 13
    # A dense layer stores no mask: only hidden's 200 mask bits count.
    # S = 0.9, "out" dense: a = 20 + 100 = 120, P* = 145 + 200 / 8 = 170 -> h = 10 (165).
    assert hidden_units(baselines.small_dense_width(
        tiny, 0.9, "storage", dense_layers=["out"], param_bits=8)) == 10
    # A custom per-layer sparsity: hidden at 0.5, out at 0.9 -> a = 100 + 10 = 110, P* = 135,
    # h = 8 (133).
    assert hidden_units(baselines.small_dense_width(
        tiny, 0.9, custom_sparsity={"hidden": 0.5})) == 8


def test_small_dense_storage_rule_can_exceed_the_dense_width():
    # 1-bit parameters: the masks (300 bits) cost as much as 300 parameters, so at
    # S = 0.01 (a = 198 + 99 = 297) P* = 25 + 297 + 300 = 622 -> h = 39 (629) > 20.
    width = baselines.small_dense_width(tiny, 0.01, "storage", param_bits=1)
    assert width > 1.0 and hidden_units(width) == 39


def lenet_sizes(width):
    model = lenet(width)
    return model.get_layer("fc1").units, model.get_layer("fc2").units


def test_small_dense_rules_on_lenet_at_the_official_sparsities():
    # One multiplier moves both widths (round(300 w), round(100 w)); near the targets
    # the reachable sizes and their parameter counts 785·h1 + h1·h2 + 11·h2 + 10 are
    # (7, 2): 5,541   (8, 3): 6,347   (11, 4): 8,733   (12, 4): 9,522   (13, 4): 10,307
    # (17, 6): 13,523 (18, 6): 14,308 (22, 7): 17,511  (23, 8): 18,337.
    # params at S = 0.98, every kernel at S: 4,704 + 600 + 20 active + 410 biases = 5,734
    # (the official MLP config's comment) -> (7, 2). The official config uses (8, 8) instead.
    assert lenet_sizes(baselines.small_dense_width(lenet, 0.98)) == (7, 2)
    # storage: + 266,200 mask bits / 32 = 8,318.75 -> 14,052.75 -> (18, 6).
    assert lenet_sizes(baselines.small_dense_width(lenet, 0.98, "storage")) == (18, 6)
    # The official MNIST map (fc1 at S, fc2 at 0.9·S, logits dense):
    # 4,704 + (30,000 − 26,460) + 1,000 = 9,244 active + 410 = 9,654 -> (12, 4);
    # storage adds (235,200 + 30,000) / 32 = 8,287.5 (logits has no mask) -> 17,941.5
    # -> (23, 8).
    layers = dict(custom_sparsity={"fc1": 0.98, "fc2": 0.98 * 0.9}, dense_layers=["logits"])
    assert lenet_sizes(baselines.small_dense_width(
        lenet, 0.98, distribution="uniform", **layers)) == (12, 4)
    assert lenet_sizes(baselines.small_dense_width(
        lenet, 0.98, "storage", distribution="uniform", **layers)) == (23, 8)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rule="bits"), "`rule`"),
    (dict(rule=None), "`rule`"),
    (dict(param_bits=0), "`param_bits`"),
    (dict(param_bits=8.0), "`param_bits`"),
    (dict(distribution="gaussian"), "`distribution`"),
    (dict(custom_sparsity={"nope": 0.5}), "custom_sparsity"),
    (dict(sparsity=1.0), "sparsity"),
    (dict(build_fn=None), "`build_fn`"),
])
def test_small_dense_width_rejects_bad_arguments(kwargs, match):
    args = dict(build_fn=tiny, sparsity=0.9)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        baselines.small_dense_width(**args)


def build_small(width):
    return mlp(width)


CASES = [(name, False) for name in baselines.METHODS] + [(name, True) for name in ("snip", "snfs", "rigl")]


@pytest.mark.parametrize("name, grow_data", CASES,
                         ids=[n + ("-grow_data" if g else "") for n, g in CASES])
def test_every_method_trains_and_round_trips(name, grow_data, tmp_path):
    x, y = classification_data(200)
    model, callbacks = baselines.get(name).build(
        build_small, 0.8, grow_data=(x, y) if grow_data else None, delta_t=3, prune_frequency=3, seed=1)
    compile_sgd(model)
    history = fit(model, callbacks, x, y, epochs=1)
    assert np.isfinite(history.history["loss"][-1])
    report = rk.sparsity_report(model)
    if name not in ("dense", "small_dense"):
        assert report.density == pytest.approx(0.2, abs=0.01)
    path = str(tmp_path / f"{name}.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(x[:8], verbose=0), model.predict(x[:8], verbose=0), rtol=1e-6)
    for callback in callbacks:
        clone = type(callback).from_config(callback.get_config())
        assert clone.get_config() == callback.get_config()


def test_registry():
    assert baselines.get("RigL").name == "rigl" and baselines.get("small-dense").name == "small_dense"
    assert {n for n in baselines.METHODS if baselines.get(n).uses_gradients} == {"rigl", "snfs", "snip"}
    with pytest.raises(ValueError, match="Unknown method"):
        baselines.get("lottery")


@pytest.mark.parametrize("name", ["snip", "snfs", "rigl", "static", "set"])
def test_build_captures_gradients_only_where_they_are_read(name):
    x, y = classification_data(40)
    method = baselines.get(name)
    model, [callback] = method.build(build_small, 0.5)  # no grow_data: no longer an error
    captured = [w.gradient is not None for w in rk.masked_weights(model)]
    # SNFS's step moves its momentum itself (capture_momentum): it reads no G.
    assert captured and all(c == (method.uses_gradients and name != "snfs") for c in captured)
    assert all((w.momentum_beta is not None) == (name == "snfs")
               for w in rk.masked_weights(model))
    if method.uses_gradients:
        assert callback.source.captured
        model, [callback] = method.build(build_small, 0.5, grow_data=(x, y))
        assert not callback.source.captured
        assert all(w.gradient is None for w in rk.masked_weights(model))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: baselines.MagnitudePruningCallback(1.0, 0, 10), "final_sparsity"),
        (lambda: baselines.MagnitudePruningCallback(0.5, 10, 10), "end_step"),
        (lambda: baselines.MagnitudePruningCallback(0.5, 0, 10, frequency=0), "frequency"),
        (lambda: baselines.MagnitudePruningCallback(0.5, 0, 1.5), "end_step"),
        (lambda: baselines.MagnitudePruningCallback({"a": 2.0}, 0, 10), "final_sparsity"),
        (lambda: baselines.MagnitudePruningCallback("x", 0, 10), "final_sparsity"),
        (lambda: baselines.SNIPCallback(1.0), "sparsity"),
        (lambda: baselines.SNIPCallback(0.5, "nope"), "distribution"),
        (lambda: baselines.SNFSCallback(momentum=1.0), "momentum"),
        (lambda: baselines.SETCallback(delta_t=0), "delta_t"),
    ],
)
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_pruning_map_with_unknown_weight_is_rejected_before_any_step():
    x, y = classification_data(50)
    model = compile_sgd(rk.sparsify(mlp(), 0.0))
    before = masks(model)
    with pytest.raises(ValueError, match="not masked"):
        fit(model, [baselines.MagnitudePruningCallback({"ghost": 0.5}, 0, 10)], x, y, epochs=1)
    assert all(np.array_equal(before[n], masks(model)[n]) for n in before)


TFMOT_CHECK = r"""
import json, sys
import tensorflow_model_optimization as tfmot
from rigl_keras import PolynomialSchedule
from rigl_keras.baselines import MagnitudePruningCallback
s = tfmot.sparsity.keras.PolynomialDecay(0.1, 0.9, begin_step=10, end_step=210, power=3, frequency=20)
ours = PolynomialSchedule(0.9, 10, 210, frequency=20, initial_sparsity=0.1, exponent=3)
bad = []
for step in range(0, 260):
    should, value = s(step)
    if bool(should) != (ours.is_prune_step(step) and (step - 10) % 20 == 0) or abs(float(value) - ours.sparsity(step)) > 1e-6:
        bad.append(step)
cb = MagnitudePruningCallback(s)
constant = MagnitudePruningCallback(tfmot.sparsity.keras.ConstantSparsity(0.6, begin_step=5, frequency=7))
print(json.dumps({"bad": bad, "config": cb.get_config(), "constant": constant.get_config()}))
"""


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="tensorflow-model-optimization schedules are TensorFlow objects")
def test_schedule_equals_tfmot_polynomial_decay():
    probe = subprocess.run([sys.executable, "-c", "import tensorflow_model_optimization"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("tensorflow-model-optimization is not installed (optional extra)")
    result = subprocess.run([sys.executable, "-c", TFMOT_CHECK], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["bad"] == []
    assert report["config"]["final_sparsity"] == 0.9 and report["config"]["exponent"] == 3
    constant = report["constant"]
    assert constant["final_sparsity"] == constant["initial_sparsity"] == 0.6
    assert constant["begin_step"] == 5 and constant["frequency"] == 7


# --- SNFS with the momentum moved by the training step (capture_momentum) ---


def test_snfs_step_moves_the_momentum_by_hand():
    """With capture_momentum(β) the optimizer step sets m ← β·m + (1 − β)·g: after
    t steps on one batch with the weights frozen (lr 0), m = (1 − β^t)·g."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 3)).astype("float32")
    y = rng.normal(size=(8, 2)).astype("float32")
    model = keras.Sequential([keras.Input((3,)), rk.MaskedDense(2, name="d", use_bias=False,
                                                                 capture_gradients=False)])
    rk.capture_momentum(model, 0.5)
    model.compile(keras.optimizers.SGD(0.0), "mse")
    [w] = rk.masked_weights(model)
    kernel = np.array([[0.5, 0], [0.05, 0], [-0.7, 0.3]], "float32")
    w.mask.assign((kernel != 0).astype(w.mask.dtype))
    w.variable.assign(kernel)
    grad = x.T @ (2 * (x @ kernel - y) / y.size)  # the dense gradient, inactive entries too
    snfs = baselines.SNFSCallback(delta_t=1000, end_step=2000, momentum=0.5)
    calls = []
    snfs.after_step = lambda *args: calls.append(args)  # nothing to do between updates
    model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[snfs])
    np.testing.assert_allclose(numpy(w.momentum), (1 - 0.5**3) * grad, rtol=1e-5, atol=1e-7)
    assert calls == [] and w.gradient is None and w.momentum_beta == 0.5


def test_snfs_step_momentum_matches_the_callback_momentum():
    """The same run with the momentum moved in the step or by the callback
    after each batch: the same momenta (to rounding) and the same masks."""
    x, y = classification_data(120)

    def run(in_step):
        keras.utils.set_random_seed(3)
        model = rk.sparsify(mlp(), 0.8, seed=3, capture_gradients=not in_step)
        if in_step:
            rk.capture_momentum(model, 0.9)
        compile_sgd(model)
        snfs = baselines.SNFSCallback(delta_t=3, alpha=0.3, end_step=12, check_invariants=True)
        model.fit(x, y, batch_size=20, epochs=2, shuffle=False, verbose=0, callbacks=[snfs])
        return masks(model), {w.name: numpy(w.momentum) for w in rk.masked_weights(model)}

    (masks_step, momenta_step), (masks_callback, momenta_callback) = run(True), run(False)
    for name in masks_step:
        np.testing.assert_allclose(momenta_step[name], momenta_callback[name],
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(masks_step[name], masks_callback[name])


def test_snfs_registry_model_moves_its_momentum_in_the_step(tmp_path):
    model, [snfs] = baselines.get("snfs").build(lambda width: mlp(width), 0.8, delta_t=2)
    weights = rk.masked_weights(model)
    assert all(w.momentum_beta == 0.9 and w.gradient is None for w in weights)
    compile_sgd(model)
    x, y = classification_data(80)
    model.fit(x, y, batch_size=20, epochs=2, verbose=0, callbacks=[snfs])
    assert snfs._in_step and any(np.any(numpy(w.momentum) != 0) for w in weights)
    # Saved and loaded: the momenta come back, still moved by the step.
    model.save(tmp_path / "snfs.keras")
    loaded = keras.saving.load_model(tmp_path / "snfs.keras")
    for w, v in zip(weights, rk.masked_weights(loaded)):
        np.testing.assert_array_equal(numpy(v.momentum), numpy(w.momentum))
        assert v.momentum.trainable and v.momentum_beta == 0.9
    loaded.fit(x, y, batch_size=20, epochs=1, verbose=0,
               callbacks=[baselines.SNFSCallback(delta_t=2)])


def test_capture_momentum_switches_a_callback_momentum_model(tmp_path):
    """Momenta made by the callback (a model without capture_momentum), saved and
    loaded, become step-moved ones with their values once the model is recompiled."""
    x, y = classification_data(80)
    model = compile_sgd(rk.sparsify(mlp(), 0.8))
    model.fit(x, y, batch_size=20, epochs=1, verbose=0,
              callbacks=[baselines.SNFSCallback(delta_t=2)])
    model.save(tmp_path / "plain.keras")
    loaded = keras.saving.load_model(tmp_path / "plain.keras")
    assert all(v.momentum_beta is None and not v.momentum.trainable
               for v in rk.masked_weights(loaded))
    with pytest.raises(ValueError, match="compile it again"):
        rk.capture_momentum(loaded, 0.9)  # its restored optimizer is built
    compile_sgd(loaded)
    rk.capture_momentum(loaded, 0.9)
    for w, v in zip(rk.masked_weights(model), rk.masked_weights(loaded)):
        np.testing.assert_array_equal(numpy(v.momentum), numpy(w.momentum))
        assert v.momentum.trainable and v.momentum_beta == 0.9
    assert len(loaded.weights) == len(model.weights)  # the plain ones were replaced
    loaded.fit(x, y, batch_size=20, epochs=1, verbose=0,
               callbacks=[baselines.SNFSCallback(delta_t=2)])


@pytest.mark.parametrize("problem, match", [
    ("beta", "β = \\[0.5\\]"),
    ("partial", "only some masked weights"),
    ("grow_data", "grow_data"),
    ("loss_scale", "loss scaling"),
    ("accumulation", "gradient_accumulation_steps"),
])
def test_snfs_refuses_a_step_momentum_it_cannot_use_before_training(problem, match):
    x, y = classification_data(40)
    model = rk.sparsify(mlp(), 0.8, capture_gradients=False)
    if problem == "partial":
        rk.masked_weights(model)[0].capture_momentum(0.9)
    else:
        rk.capture_momentum(model, 0.5 if problem == "beta" else 0.9)
    optimizer = keras.optimizers.SGD(0.05, gradient_accumulation_steps=2 if problem == "accumulation" else None)
    if problem == "loss_scale":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    snfs = baselines.SNFSCallback(delta_t=2, grow_data=(x, y) if problem == "grow_data" else None)
    before = [numpy(v) for v in model.weights]
    with pytest.raises(ValueError, match=match):
        model.fit(x, y, batch_size=20, epochs=1, verbose=0, callbacks=[snfs])
    assert all(np.array_equal(a, numpy(v)) for a, v in zip(before, model.weights))


def test_capture_momentum_refuses_a_built_optimizer_and_bad_beta():
    x, y = classification_data(40)
    model = compile_sgd(rk.sparsify(mlp(), 0.8))
    model.fit(x, y, batch_size=20, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="already built"):
        rk.capture_momentum(model)
    with pytest.raises(ValueError, match="momentum"):
        rk.capture_momentum(rk.sparsify(mlp(), 0.8), 1.0)
    with pytest.raises(ValueError, match="no masked weight"):
        rk.capture_momentum(mlp())


@pytest.mark.skipif(keras.backend.backend() == "torch",
                    reason="Keras' torch trainer rejects steps_per_execution > 1")
def test_snfs_step_momentum_allows_steps_per_execution():
    x, y = classification_data(80)
    model = rk.sparsify(mlp(), 0.8, capture_gradients=False)
    rk.capture_momentum(model, 0.9)
    model.compile(keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy(
        from_logits=True), steps_per_execution=2)
    snfs = baselines.SNFSCallback(delta_t=2, end_step=8, check_invariants=True)
    before = masks(model)
    history = model.fit(x, y, batch_size=10, epochs=1, verbose=0, callbacks=[snfs])
    assert history.history["mask_updates"] == [3]  # steps 2, 4, 6 (end_step 8 exclusive)
    assert any(np.any(before[n] != m) for n, m in masks(model).items())


def test_snfs_step_momentum_keeps_entries_whose_gradient_is_not_finite():
    """One output's target is inf: its column of ∂L/∂W is not finite and keeps
    M (here 0); the other column moves to (1 − β)·g."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 3)).astype("float32")
    y = np.stack([rng.normal(size=4), np.full(4, np.inf)], axis=1).astype("float32")
    model = keras.Sequential([keras.Input((3,)), rk.MaskedDense(2, use_bias=False,
                                                                 capture_gradients=False)])
    rk.capture_momentum(model, 0.5)
    model.compile(keras.optimizers.SGD(0.0), "mse")
    [w] = rk.masked_weights(model)
    kernel = numpy(w.variable)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    momentum = numpy(w.momentum)
    grad = x.T @ (2 * (x @ kernel[:, :1] - y[:, :1]) / y.size)
    np.testing.assert_allclose(momentum[:, :1], 0.5 * grad, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(momentum[:, 1], 0.0)
