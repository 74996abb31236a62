"""Baselines on the shared engine: Static, SET, SNFS, SNIP, pruning, Small-Dense, registry."""

import json
import subprocess
import sys

import keras
import numpy as np
import pytest

import rigl_keras as rk
from rigl_keras import baselines
from rigl_keras.distributions import active_count

from conftest import classification_data, compile_sgd, masks, mlp


def counts(model):
    return {name: int(m.sum()) for name, m in masks(model).items()}


def fit(model, callbacks, x, y, epochs=2, batch_size=20, each_batch=None):
    extra = []
    if each_batch is not None:
        extra = [keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: each_batch(model))]
    return model.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0, callbacks=callbacks + extra)


def test_static_masks_never_change():
    x, y = classification_data(200)
    model = compile_sgd(rk.sparsify(mlp(), 0.8))
    before = masks(model)
    fit(model, [baselines.StaticCallback(check_invariants=True)], x, y)
    after = masks(model)
    assert all(np.array_equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize(
    "make",
    [
        lambda x, y: baselines.SETCallback(delta_t=3, check_invariants=True),
        lambda x, y: rk.RigLCallback(delta_t=3, grow_data=(x, y), check_invariants=True),
        lambda x, y: baselines.SNFSCallback(delta_t=3, grow_data=(x, y), check_invariants=True),
    ],
    ids=["set", "rigl", "snfs"],
)
def test_dynamic_methods_keep_exact_per_layer_counts(make):
    x, y = classification_data(200)
    model = compile_sgd(rk.sparsify(mlp(), 0.85, "erk"))
    expected, before = counts(model), masks(model)
    seen = []
    fit(model, [make(x, y)], x, y, each_batch=lambda m: seen.append(counts(m)))
    assert all(c == expected for c in seen)
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
    layer = model.get_layer("d")
    mask = np.array([[1, 0], [1, 0], [1, 1]], "float32")
    kernel = np.array([[0.5, 0], [0.05, 0], [-0.7, 0.3]], "float32")
    layer.mask.assign(mask)
    layer.raw_kernel.assign(kernel)
    callback = baselines.SNFSCallback(delta_t=2, alpha=0.25, decay="constant", end_step=100,
                                      momentum=0.5, grow_data=(x, y), grow_batch_size=8)
    callback.set_model(model)
    callback.set_params({"steps": 100, "epochs": 1})
    callback.on_train_begin()
    grad = x.T @ (2 * (x @ kernel - y) / y.size)  # dense gradient, hand-computed
    callback.after_step(0, 1, {})  # not an update step: only the momentum moves
    np.testing.assert_allclose(layer.grow_momentum.numpy(), 0.5 * grad, rtol=1e-5, atol=1e-7)
    # Growth follows |momentum|, not the current gradient: make them disagree.
    momentum = np.array([[0, 9.0], [0, 0.1], [0, 0]], "float32")
    layer.grow_momentum.assign(momentum)
    callback.after_step(1, 2, {})  # step 2 is an update step: m <- 0.5 m + 0.5 g first
    m = 0.5 * momentum + 0.5 * grad
    np.testing.assert_allclose(layer.grow_momentum.numpy(), m, rtol=1e-5, atol=1e-7)
    # k = floor(0.25 * 4) = 1: drop the smallest |w|, 0.05 at (1, 0); grow the
    # largest |m| among the positions not kept: (0, 1), (1, 0), (1, 1).
    candidates = [(0, 1), (1, 0), (1, 1)]
    grown = max(candidates, key=lambda p: abs(m[p]))
    assert grown == (0, 1)
    assert max(candidates, key=lambda p: abs(grad[p])) == (1, 1)  # the gradient disagrees
    expected = np.array([[1, 0], [0, 0], [1, 1]], "float32")
    expected[grown] = 1
    np.testing.assert_array_equal(layer.mask.numpy(), expected)


def test_snfs_redistribution_keeps_the_total_exact():
    x, y = classification_data(200)
    model = compile_sgd(rk.sparsify(mlp(), 0.8, "erk"))
    total = sum(counts(model).values())
    seen = []
    fit(model, [baselines.SNFSCallback(delta_t=3, alpha=0.5, grow_data=(x, y), redistribute=True,
                                       check_invariants=True)], x, y,
        each_batch=lambda m: seen.append(counts(m)))
    assert all(sum(c.values()) == total for c in seen)
    assert len({tuple(c.values()) for c in seen}) > 1  # the budget did move


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
    layer = model.get_layer("d")
    random_mask = layer.mask.numpy().copy()
    callback = baselines.SNIPCallback(0.5, "erk", grow_data=(x, y), grow_batch_size=16)
    callback.set_model(model)
    callback.set_params({"steps": 10, "epochs": 1})
    callback.on_train_begin()
    mask = layer.mask.numpy()
    assert int(mask.sum()) == active_count(18, 0.5) == 9
    kernel = layer.raw_kernel.numpy()
    assert np.all(kernel[mask == 0] == 0) and np.all(kernel[mask == 1] != 0)
    # Some kept connections were zeroed by sparsify: they were re-drawn.
    revived = (mask == 1) & (random_mask == 0)
    assert revived.any() and np.all(kernel[revived] != 0)


def test_snip_matches_hand_computed_sensitivity():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.normal(size=(16, 2)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), rk.MaskedDense(2, name="d", use_bias=False)])
    model.compile(keras.optimizers.SGD(0.0), "mse")
    layer = model.get_layer("d")
    kernel = rng.normal(size=(4, 2)).astype("float32")
    layer.raw_kernel.assign(kernel)  # mask all ones: nothing is re-drawn
    grad = x.T @ (2 * (x @ kernel - y) / y.size)
    score = np.abs(grad * kernel).ravel()
    callback = baselines.SNIPCallback(0.75, "erk", grow_data=(x, y), grow_batch_size=16)
    callback.set_model(model)
    callback.set_params({"steps": 10, "epochs": 1})
    callback.on_train_begin()
    expected = np.zeros(8)
    expected[np.argsort(-score, kind="stable")[:2]] = 1
    np.testing.assert_array_equal(layer.mask.numpy().ravel(), expected)


def test_pruning_only_shrinks_and_reaches_final_sparsity_at_end_step():
    x, y = classification_data(200)
    model = compile_sgd(rk.sparsify(mlp(), 0.0))
    finals = rk.sparsity_distribution(model, 0.9, "erk")
    callback = baselines.MagnitudePruningCallback(finals, begin_step=4, end_step=16, frequency=4,
                                                  check_invariants=True)
    history = []
    fit(model, [callback], x, y, epochs=2, each_batch=lambda m: history.append(
        (int(m.optimizer.iterations), counts(m))))
    for (_, a), (_, b) in zip(history, history[1:]):
        assert all(b[n] <= a[n] for n in a)
    schedule = rk.PolynomialSchedule(0.5, 4, 16, frequency=4)
    by_step = dict(history)
    for name, final in finals.items():
        size = int(np.prod(model.get_layer(name).mask.shape))
        assert by_step[16][name] == active_count(size, final)
        assert by_step[15][name] > by_step[16][name] or final == 0
        assert by_step[8][name] == active_count(size, callback._schedules[name].sparsity(8))
    assert schedule.sparsity(10) == pytest.approx(0.5 + (0 - 0.5) * (1 - 6 / 12) ** 3)


def test_polynomial_schedule_values():
    s = rk.PolynomialSchedule(0.9, begin_step=100, end_step=1100, frequency=100, initial_sparsity=0.1)
    assert s.sparsity(0) == pytest.approx(0.1)
    assert s.sparsity(600) == pytest.approx(0.9 + (0.1 - 0.9) * 0.5**3)
    assert s.sparsity(1100) == s.sparsity(5000) == pytest.approx(0.9)
    assert s.is_prune_step(100) and s.is_prune_step(1100) and not s.is_prune_step(150)


def test_small_dense_width_on_lenet_300_100():
    def lenet(w):
        return keras.Sequential([
            keras.Input((784,)),
            keras.layers.Dense(max(1, round(300 * w))),
            keras.layers.Dense(max(1, round(100 * w))),
            keras.layers.Dense(10),
        ])

    w = baselines.small_dense_width(lenet, 0.9)
    # Sparse parameters: 10% of 266,200 kernel weights + 410 biases = 27,030.
    # 30000 w^2 + 236600 w + 10 = 27030 gives w = 0.1126.
    assert w == pytest.approx(0.1126, abs=0.002)
    assert lenet(w).count_params() == pytest.approx(27030, rel=0.01)


def build_small(width):
    return mlp(width)


@pytest.mark.parametrize("name", baselines.METHODS)
def test_every_method_trains_and_round_trips(name, tmp_path):
    x, y = classification_data(200)
    model, callbacks = baselines.get(name).build(
        build_small, 0.8, grow_data=(x, y), delta_t=3, prune_frequency=3, seed=1)
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
    assert baselines.get("rigl").needs_grow_data and not baselines.get("set").needs_grow_data
    with pytest.raises(ValueError, match="Unknown method"):
        baselines.get("lottery")
    with pytest.raises(ValueError, match="grow_data"):
        baselines.get("snip").build(build_small, 0.5)


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


def test_pruning_map_with_unknown_layer_is_rejected_before_any_step():
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


def test_schedule_equals_tfmot_polynomial_decay():
    pytest.importorskip("importlib")
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
