"""RigLCallback inside model.fit: hand-computed growth, exact counts, logs, schedule, errors.

Backend-agnostic: runs under KERAS_BACKEND=tensorflow, jax and torch.
"""

import math
import warnings

import keras
import numpy as np
import pytest

import rigl_keras as rk

from conftest import attach, classification_data, compile_sgd, counts, masks, mlp

TF_ONLY = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                             reason="tf.data.Dataset is a TensorFlow-backend input")
NO_TORCH = pytest.mark.skipif(keras.backend.backend() == "torch",
                              reason="Keras' torch trainer rejects steps_per_execution > 1")


def numpy(x):
    return np.array(keras.ops.convert_to_numpy(x))


def expected_rigl_mask(mask, kernel, grow_score, k):
    """The RigL update with numpy: keep the n - k largest |w|, grow top-k score elsewhere.

    Ties go to the lower flat index (stable argsort), as in the library.
    """
    flat_m, flat_w, flat_g = mask.ravel() != 0, np.abs(kernel).ravel(), np.abs(grow_score).ravel()
    active = np.flatnonzero(flat_m)
    keep = active[np.argsort(-flat_w[active], kind="stable")[: len(active) - k]]
    candidates = np.setdiff1d(np.arange(flat_m.size), keep)
    grow = candidates[np.argsort(-flat_g[candidates], kind="stable")[:k]]
    expected = np.zeros(flat_m.size, "uint8")
    expected[keep] = 1
    expected[grow] = 1
    return expected.reshape(mask.shape), keep, grow


def linear_model(rng, n_in=5, n_out=4):
    model = keras.Sequential([keras.Input((n_in,)), rk.MaskedDense(n_out, name="d")])
    [w] = rk.masked_weights(model)
    mask = (rng.random((n_in, n_out)) < 0.5).astype("uint8")
    kernel = rng.normal(size=(n_in, n_out)).astype("float32") * mask
    w.mask.assign(mask)
    w.variable.assign(kernel)
    return model, w, mask, kernel


def test_rigl_grows_where_the_dense_gradient_is_largest_with_grow_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 5)).astype("float32")
    y = rng.normal(size=(16, 4)).astype("float32")
    model, w, mask, kernel = linear_model(rng)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    bias = numpy(model.get_layer("d").bias)
    # Hand-computed dense gradient of mean((xW + b - y)^2) w.r.t. W.
    grad = x.T @ (2 * (x @ kernel + bias - y) / y.size)
    callback = attach(
        rk.RigLCallback(delta_t=10, alpha=0.5, decay="constant", end_step=100,
                        grow_data=(x, y), grow_batch_size=16),
        model,
    )
    n_active = int(mask.sum())
    expected, keep, grow = expected_rigl_mask(mask, kernel, grad, n_active // 2)
    [result] = callback.update(10)
    np.testing.assert_array_equal(numpy(w.mask), expected)
    assert result.active == n_active
    was_active = mask.ravel() != 0
    assert result.changed == int(np.sum(~was_active[grow]))
    # New connections start at 0; connections that stay (kept, or dropped and
    # grown back) keep their weight.
    np.testing.assert_array_equal(numpy(w.variable), np.where((expected != 0) & (mask != 0), kernel, 0))


def test_captured_gradient_is_the_dense_batch_gradient_and_drives_growth():
    # One full-batch training step with lr 0; the update then runs by hand.
    rng = np.random.default_rng(4)
    x = rng.normal(size=(16, 5)).astype("float32")
    y = rng.normal(size=(16, 4)).astype("float32")
    model, w, mask, kernel = linear_model(rng)
    model.compile(keras.optimizers.SGD(0.0), "mse")
    bias = numpy(model.get_layer("d").bias)
    grad = x.T @ (2 * (x @ kernel + bias - y) / y.size)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    captured = numpy(w.gradient)
    np.testing.assert_allclose(captured, grad, rtol=1e-4, atol=1e-6)
    assert np.any(captured[mask == 0] != 0)  # dense: nonzero outside the mask
    callback = attach(rk.RigLCallback(delta_t=1, alpha=0.5, decay="constant", end_step=100), model)
    expected, _, _ = expected_rigl_mask(mask, kernel, captured, int(mask.sum()) // 2)
    callback.update(1)
    np.testing.assert_array_equal(numpy(w.mask), expected)


class SnapshotRigL(rk.RigLCallback):
    """Records mask, weight and captured gradient of every weight just before each update."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.snapshots = []

    def update(self, step, logs=None):
        before = {w.name: (numpy(w.mask), numpy(w.variable), numpy(w.gradient)) for w in self.masked_weights}
        fraction = self.drop_fraction(step)
        results = super().update(step, logs)
        after = {w.name: numpy(w.mask) for w in self.masked_weights}
        self.snapshots.append((step, fraction, before, after, results))
        return results


def test_rigl_without_grow_data_grows_top_k_of_the_captured_gradient():
    x, y = classification_data(200)
    model = compile_sgd(rk.sparsify(mlp(), 0.8, "erk", seed=0))
    rigl = SnapshotRigL(delta_t=4, alpha=0.4, end_step=20)
    model.fit(x, y, batch_size=20, epochs=2, verbose=0, callbacks=[rigl])
    assert [s[0] for s in rigl.snapshots] == [4, 8, 12, 16]
    grown_somewhere = False
    for step, fraction, before, after, results in rigl.snapshots:
        for result in results:
            mask, kernel, grad = before[result.weight]
            assert np.any(grad != 0)
            k = int(fraction * int(mask.sum()))
            expected, keep, grow = expected_rigl_mask(mask, kernel, grad, k)
            np.testing.assert_array_equal(after[result.weight], expected, err_msg=f"{result.weight} @ {step}")
            assert result.changed == int(np.sum(mask.ravel()[grow] == 0))
            grown_somewhere |= result.changed > 0
    assert grown_somewhere


class BatchGradientRigL(rk.RigLCallback):
    """Checks at every update that G is ∂L/∂W_eff of the batch just trained
    on (lr 0: the weights at the update are those the batch saw) and of no
    other batch."""

    def __init__(self, x, y, batch_size, **kwargs):
        super().__init__(**kwargs)
        self.x, self.y, self.batch_size = x, y, batch_size
        self.checked = []

    def on_train_batch_begin(self, batch, logs=None):
        super().on_train_batch_begin(batch, logs)
        self.batch = batch

    def update(self, step, logs=None):
        weights = self.masked_weights
        captured = [numpy(w.gradient) for w in weights]
        rows = slice(self.batch * self.batch_size, (self.batch + 1) * self.batch_size)
        other = slice(((self.batch + 1) % 10) * self.batch_size,
                      ((self.batch + 1) % 10 + 1) * self.batch_size)
        mine = rk.backend.dense_gradients(self.model, weights, (self.x[rows], self.y[rows]))
        theirs = rk.backend.dense_gradients(self.model, weights, (self.x[other], self.y[other]))
        for g, a, b in zip(captured, mine, theirs):
            np.testing.assert_allclose(g, numpy(a), rtol=1e-4, atol=1e-6)
            assert not np.allclose(g, numpy(b), rtol=1e-4, atol=1e-6)
        self.checked.append(step)
        return super().update(step, logs)


@pytest.mark.parametrize("run_eagerly", [False, True], ids=["compiled", "eager"])
def test_update_reads_the_gradient_of_its_own_batch_and_capture_pauses_between_updates(run_eagerly):
    """On PyTorch and TensorFlow capture is paused between updates (G reads
    NaN, not stale values) and on for the update batches; JAX captures at
    every step. Either way the update grows from its own batch's gradient."""
    x, y = classification_data(200)
    model = rk.sparsify(mlp(), 0.8, "erk", seed=0)
    model.compile(keras.optimizers.SGD(0.0), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  run_eagerly=run_eagerly)
    rigl = BatchGradientRigL(x, y, 20, delta_t=4, alpha=0.3, end_step=40)
    finite, functions = [], []

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            weights = rk.masked_weights(self.model)  # (syncs JAX's training state)
            finite.append(all(np.isfinite(numpy(w.gradient)).all() for w in weights))
            functions.append(getattr(self.model, "train_function", None))

    probe = Probe()
    model.fit(x, y, batch_size=20, epochs=2, shuffle=False, verbose=0, callbacks=[rigl, probe])
    assert rigl.checked == [4, 8, 12, 16, 20]
    if keras.backend.backend() == "jax":
        assert all(finite)
    else:
        # Batch i ends at step i + 1; updates every 4 steps.
        assert finite == [(i + 1) % 4 == 0 for i in range(20)]
    assert all(w.gradient.trainable for w in rk.masked_weights(model))  # capture back on
    if keras.backend.backend() == "tensorflow" and not run_eagerly:
        # Two step functions, each traced once, swapped in and out; the
        # captured one is left in place; a second fit makes no new one.
        assert len(set(map(id, functions))) == 2
        assert model.train_function is functions[3]
        model.fit(x, y, batch_size=20, epochs=1, shuffle=False, verbose=0, callbacks=[rigl, probe])
        assert len(set(map(id, functions))) == 2
        assert rigl.checked[-2:] == [24, 28]


@pytest.mark.parametrize("recompile", ["same_optimizer", "new_optimizer"])
def test_capture_is_back_after_a_fit_that_raised_while_paused(recompile):
    """A fit that raises leaves capture paused (Keras calls no on_train_end).
    A step traced in that state is not taken for one with capture; an
    optimizer built in that state is refused before training."""
    x, y = classification_data(200)
    model = rk.sparsify(mlp(), 0.8, "erk", seed=0)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = keras.optimizers.SGD(0.0)
    model.compile(optimizer, loss)

    class Boom(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:
                raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.fit(x, y, batch_size=20, epochs=1, verbose=0,
                  callbacks=[rk.RigLCallback(delta_t=4, end_step=40), Boom()])
    # New step functions; the step traced while capture is still paused.
    model.compile(optimizer if recompile == "same_optimizer" else keras.optimizers.SGD(0.0), loss)
    model.train_on_batch(x[:20], y[:20])
    rigl = BatchGradientRigL(x, y, 20, delta_t=4, alpha=0.3, end_step=40)
    if recompile == "new_optimizer" and keras.backend.backend() != "jax":  # JAX never pauses
        # That step built the new optimizer without G.
        with pytest.raises(ValueError, match="built without the gradient-capture variables"):
            model.fit(x, y, batch_size=20, epochs=1, verbose=0, callbacks=[rigl])
        model.compile(keras.optimizers.SGD(0.0), loss)
        model.train_on_batch(x[:20], y[:20])  # traced with capture on
    step = int(numpy(model.optimizer.iterations))
    model.fit(x, y, batch_size=20, epochs=1, shuffle=False, verbose=0, callbacks=[rigl])
    # G of each update's own batch.
    assert rigl.checked == [t for t in range(step + 1, step + 11) if t % 4 == 0]


@pytest.mark.parametrize("grow_data", [False, True], ids=["captured", "grow_data"])
def test_fit_changes_connectivity_with_exact_counts_and_logs(grow_data):
    x, y = classification_data(400)
    model = compile_sgd(rk.sparsify(mlp(), 0.8, "erk", seed=0))
    expected = counts(model)
    before = masks(model)
    batch_logs = []
    recorder = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: batch_logs.append(dict(logs)))
    rigl = rk.RigLCallback(delta_t=5, grow_data=(x, y) if grow_data else None, check_invariants=True)
    history = model.fit(x, y, batch_size=20, epochs=2, callbacks=[rigl, recorder], verbose=0)
    after = masks(model)
    assert counts(model) == expected
    assert any(not np.array_equal(before[n], after[n]) for n in before)
    updates = [logs for logs in batch_logs if "connections_changed" in logs]
    assert len(updates) == 5  # steps 5..25 < T_end = 0.75 * 40 = 30
    assert sum(u["connections_changed"] for u in updates) == sum(history.history["connections_changed"])
    assert sum(history.history["connections_changed"]) > 0
    assert history.history["mask_updates"] == [4, 1]
    for step, logs in zip(range(5, 30, 5), updates):
        assert logs["drop_fraction"] == pytest.approx(0.3 / 2 * (1 + math.cos(math.pi * step / 30)))
    rk.check_sparsity(model, expected)


@pytest.mark.parametrize(
    "optimizer",
    [lambda: keras.optimizers.SGD(0.05, momentum=0.9), lambda: keras.optimizers.Adam(1e-3),
     lambda: keras.optimizers.Adagrad(0.05)],
    ids=["sgd", "adam", "adagrad"],
)
def test_optimizer_state_stays_initial_outside_the_mask_during_fit(optimizer):
    x, y = classification_data(200)
    model = rk.sparsify(mlp(), 0.9, "erk")
    model.compile(optimizer(), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, batch_size=20, epochs=2, verbose=0,
                        callbacks=[rk.RigLCallback(delta_t=3, alpha=0.5, check_invariants=True)])
    assert sum(history.history["connections_changed"]) > 0
    rk.check_sparsity(model)


class StepRecorder(rk.RigLCallback):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = []

    def update(self, step, logs=None):
        self.steps.append((step, self.current_step()))
        return super().update(step, logs)


@NO_TORCH
def test_steps_per_execution_updates_at_multiples_of_delta_t():
    x, y = classification_data(200)
    model = rk.sparsify(mlp(), 0.8)
    model.compile(keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=4)
    rigl = StepRecorder(delta_t=8, end_step=20)
    history = model.fit(x, y, batch_size=10, epochs=1, verbose=0, callbacks=[rigl])
    assert rigl.steps == [(8, 8), (16, 16)]
    assert history.history["mask_updates"] == [2]
    assert history.history["connections_changed"][0] > 0


@NO_TORCH
def test_delta_t_not_a_multiple_of_steps_per_execution_fails_before_any_step():
    x, y = classification_data(200)
    model = rk.sparsify(mlp(), 0.8)
    model.compile(keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=4)
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match="steps_per_execution"):
        model.fit(x, y, batch_size=10, epochs=1, verbose=0, callbacks=[rk.RigLCallback(delta_t=10)])
    assert int(numpy(model.optimizer.iterations)) == 0
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_schedule_follows_the_optimizer_step_not_the_batch_index():
    x, y = classification_data(100)
    model = compile_sgd(rk.sparsify(mlp(), 0.8))
    model.optimizer.build(model.trainable_variables)
    model.optimizer.iterations.assign(95)
    history = model.fit(x, y, batch_size=10, epochs=1, verbose=0,
                        callbacks=[rk.RigLCallback(delta_t=100, end_step=1000)])
    assert history.history["mask_updates"] == [1]  # step 100 only


def test_repeated_fit_calls_each_update_with_a_fractional_end_step():
    x, y = classification_data(200)
    model = compile_sgd(rk.sparsify(mlp(), 0.8))
    rigl = StepRecorder(delta_t=2, alpha=0.3, end_step=0.8)  # 10 steps per fit: T_end = first + 8
    fractions = []
    for _ in range(3):
        logs = []
        recorder = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs=None, out=logs: out.append(dict(logs)))
        history = model.fit(x, y, batch_size=20, epochs=1, verbose=0, callbacks=[rigl, recorder])
        assert history.history["mask_updates"] == [3]
        fractions.append([l["drop_fraction"] for l in logs if "drop_fraction" in l])
    assert [s for s, _ in rigl.steps] == [2, 4, 6, 12, 14, 16, 22, 24, 26]
    # Each fit runs its own cosine from its first step.
    expected = [0.3 / 2 * (1 + math.cos(math.pi * t / 8)) for t in (2, 4, 6)]
    for f in fractions:
        assert f == pytest.approx(expected)


def test_repeated_fit_calls_with_an_int_end_step_share_one_absolute_schedule():
    x, y = classification_data(200)
    model = compile_sgd(rk.sparsify(mlp(), 0.8))
    rigl = StepRecorder(delta_t=3, end_step=15)  # absolute: updates at 3, 6, 9, 12
    model.fit(x, y, batch_size=20, epochs=1, verbose=0, callbacks=[rigl])
    model.fit(x, y, batch_size=20, epochs=1, verbose=0, callbacks=[rigl])
    with pytest.warns(RuntimeWarning, match="no connectivity update"):
        model.fit(x, y, batch_size=20, epochs=1, verbose=0, callbacks=[rigl])
    assert [s for s, _ in rigl.steps] == [3, 6, 9, 12]


def test_a_fit_without_any_possible_update_warns():
    x, y = classification_data(100)
    model = compile_sgd(rk.sparsify(mlp(), 0.8))
    before = masks(model)
    with pytest.warns(RuntimeWarning, match="no connectivity update"):
        history = model.fit(x, y, batch_size=10, epochs=1, verbose=0,
                            callbacks=[rk.RigLCallback(delta_t=50, end_step=1000)])
    assert history.history["mask_updates"] == [0]
    assert all(np.array_equal(before[n], masks(model)[n]) for n in before)


def test_a_fit_with_updates_does_not_warn():
    x, y = classification_data(100)
    model = compile_sgd(rk.sparsify(mlp(), 0.8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model.fit(x, y, batch_size=10, epochs=1, verbose=0, callbacks=[rk.RigLCallback(delta_t=5)])


def _batches(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


@pytest.mark.parametrize("source", ["tuple", pytest.param("dataset", marks=TF_ONLY), "iterable"])
def test_grow_data_sources(source):
    x, y = classification_data(100)
    if source == "dataset":
        import tensorflow as tf

        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(25)
    elif source == "tuple":
        data = (x, y)
    else:
        data = _batches(x, y, 25)
    model = compile_sgd(rk.sparsify(mlp(), 0.8, capture_gradients=False))
    assert all(w.gradient is None for w in rk.masked_weights(model))
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
        (dict(grow_data=[np.zeros((1, 2)), np.zeros(1)]), "tuple"),
        (dict(grow_data=(np.zeros((1, 2)), np.zeros(1)), grow_batch_size=0), "grow_batch_size"),
        (dict(grow_batch_size=0), "grow_batch_size"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rk.RigLCallback(**kwargs)


def test_model_without_masked_weights_is_rejected_and_untouched():
    x, y = classification_data(50)
    model = compile_sgd(mlp())
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match="no masked weight"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[rk.RigLCallback()])
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_no_captured_gradient_and_no_grow_data_is_rejected_at_train_begin():
    x, y = classification_data(50)
    model = compile_sgd(rk.sparsify(mlp(), 0.5, capture_gradients=False))
    with pytest.raises(ValueError, match="capture_gradients=True, or pass grow_data"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[rk.RigLCallback()])
    assert int(numpy(model.optimizer.iterations)) == 0


def test_fractional_end_step_needs_known_length():
    x, y = classification_data(50)
    model = compile_sgd(rk.sparsify(mlp(), 0.5))

    def unknown_length():  # a generator: Keras cannot know the number of steps
        yield from _batches(x, y, 10)

    with pytest.raises(ValueError, match="end_step"):
        model.fit(unknown_length(), epochs=1, verbose=0, callbacks=[rk.RigLCallback()])


def test_config_round_trip():
    callback = rk.RigLCallback(delta_t=7, alpha=0.2, end_step=500, decay="constant", seed=3, grow_batch_size=64)
    clone = rk.RigLCallback.from_config(callback.get_config())
    assert clone.get_config() == callback.get_config()
    assert clone.schedule == callback.schedule


def test_official_timing_updates_from_step_zero_to_the_end_step_inclusive():
    x, y = classification_data(200)
    model = compile_sgd(rk.sparsify(mlp(), 0.8))
    rigl = StepRecorder(delta_t=3, alpha=0.3, end_step=9, timing="official")
    logs = []
    recorder = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs=None, out=logs: out.append(dict(logs)))
    model.fit(x, y, batch_size=20, epochs=1, verbose=0, callbacks=[rigl, recorder])
    # The batches starting at steps 0, 3, 6 and 9 are update batches; the
    # update follows each (the step counter counts the batch).
    assert rigl.steps == [(0, 1), (3, 4), (6, 7), (9, 10)]
    fractions = [l["drop_fraction"] for l in logs if "drop_fraction" in l]
    assert fractions == pytest.approx([0.15 * (1 + math.cos(math.pi * t / 9)) for t in (0, 3, 6, 9)])
    assert fractions[-1] == pytest.approx(0.0)  # TF's cosine_decay reaches 0 at T_end


def test_official_timing_rigl_skips_the_update_batch_and_grows_from_its_gradient():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(8, 5)).astype("float32")
    y = rng.normal(size=(8, 4)).astype("float32")
    model, w, mask, kernel = linear_model(rng)
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse")
    bias = numpy(model.get_layer("d").bias)
    grad = x.T @ (2 * (x @ kernel + bias - y) / y.size)  # batch 0 at the initial weights
    rigl = SnapshotRigL(delta_t=100, alpha=0.5, decay="constant", end_step=1, timing="official")
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[rigl])
    assert [s[0] for s in rigl.snapshots] == [0]
    expected, _, _ = expected_rigl_mask(mask, kernel, grad, int(mask.sum()) // 2)
    np.testing.assert_array_equal(numpy(w.mask), expected)
    # The batch's optimizer step was undone: weights as before it (new
    # connections at 0), bias untouched, momentum back to 0; the step counter counts it.
    np.testing.assert_array_equal(numpy(w.variable), np.where((expected != 0) & (mask != 0), kernel, 0))
    np.testing.assert_array_equal(numpy(model.get_layer("d").bias), bias)
    assert all(not np.any(numpy(v)) for v in model.optimizer.variables
               if v is not model.optimizer.iterations and "momentum" in v.path)
    assert int(numpy(model.optimizer.iterations)) == 1


def test_official_timing_set_trains_on_the_update_batch():
    x, y = classification_data(40)
    model = compile_sgd(rk.sparsify(mlp(), 0.8))
    bias = numpy(model.get_layer("fc1").bias)
    set_cb = rk.baselines.SETCallback(delta_t=100, end_step=1, timing="official")
    history = model.fit(x, y, batch_size=40, epochs=1, verbose=0, callbacks=[set_cb])
    assert history.history["mask_updates"] == [1]
    assert np.any(numpy(model.get_layer("fc1").bias) != bias)


def test_official_timing_needs_an_int_end_step_and_single_step_executions():
    with pytest.raises(ValueError, match="int `end_step`"):
        rk.RigLCallback(timing="official", end_step=0.5)
    with pytest.raises(ValueError, match="timing"):
        rk.RigLCallback(timing="tf1", end_step=10)
    if keras.backend.backend() == "torch":
        return  # Keras' torch trainer rejects steps_per_execution > 1
    x, y = classification_data(40)
    model = rk.sparsify(mlp(), 0.8)
    model.compile(keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=2)
    with pytest.raises(ValueError, match="steps_per_execution=1"):
        model.fit(x, y, batch_size=10, epochs=1, verbose=0,
                  callbacks=[rk.RigLCallback(delta_t=4, end_step=8, timing="official")])


@pytest.mark.parametrize("order", ["early_stopping_first", "early_stopping_last"])
def test_early_stopping_restoring_best_weights_keeps_the_invariants(order):
    x, y = classification_data(200)
    model = compile_sgd(rk.sparsify(mlp(), 0.8), lr=0.3)
    expected = counts(model)
    rigl = rk.RigLCallback(delta_t=2, alpha=0.5, end_step=1.0)
    # Monitoring the training loss with patience 0 and a large learning rate:
    # a later epoch is worse, so the best masks and weights are an earlier
    # epoch's, while the momentum is the last epoch's.
    stop = keras.callbacks.EarlyStopping(monitor="loss", patience=0, restore_best_weights=True,
                                         mode="max", verbose=0)
    callbacks = [stop, rigl] if order == "early_stopping_first" else [rigl, stop]
    history = model.fit(x, y, batch_size=20, epochs=3, verbose=0, callbacks=callbacks)
    assert len(history.history["loss"]) == 2  # stopped, best epoch restored
    assert stop.best_weights is not None and stop.stopped_epoch == 1
    rk.check_sparsity(model, expected)


def test_set_weights_guard_survives_a_deep_copy():
    import copy

    x, y = classification_data(40)
    model = compile_sgd(rk.sparsify(mlp(), 0.8))
    model.fit(x, y, batch_size=20, epochs=1, verbose=0, callbacks=[rk.RigLCallback(delta_t=1)])
    clone = copy.deepcopy(model)
    assert clone.set_weights.__self__ is clone


@pytest.mark.parametrize("bad", ["feature_size", "labels"], ids=["wrong-feature-size", "wrong-label-shape"])
def test_grow_data_that_does_not_fit_the_model_fails_at_fit_start_naming_it(bad):
    x, y = classification_data(100)
    model = compile_sgd(rk.sparsify(mlp(), 0.8, capture_gradients=False))
    grow = (x[:, :7], y) if bad == "feature_size" else (x, np.zeros((100, 3, 3), "float32"))
    with pytest.raises(ValueError, match="`grow_data` cannot be fed"):
        model.fit(x, y, batch_size=10, epochs=1, verbose=0,
                  callbacks=[rk.RigLCallback(delta_t=5, grow_data=grow)])
    assert int(numpy(model.optimizer.iterations)) == 0


def test_one_shot_grow_data_iterators_are_refused_and_pydatasets_restart():
    x, y = classification_data(100)
    with pytest.raises(ValueError, match="one-shot iterator"):
        rk.RigLCallback(grow_data=(b for b in _batches(x, y, 25)))
    with pytest.raises(ValueError, match="one-shot iterator"):
        rk.RigLCallback(grow_data=iter(_batches(x, y, 25)))

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            return x[index * 25:(index + 1) * 25], y[index * 25:(index + 1) * 25]

    model = compile_sgd(rk.sparsify(mlp(), 0.8, capture_gradients=False))
    history = model.fit(x, y, batch_size=10, epochs=2, verbose=0,
                        callbacks=[rk.RigLCallback(delta_t=2, end_step=1.0, grow_data=Batches())])
    assert sum(history.history["mask_updates"]) == 9  # more updates than the 2 batches: restarted


def test_gradient_accumulation_counts_optimizer_steps_for_the_schedule():
    x, y = classification_data(200)
    model = rk.sparsify(mlp(), 0.8)
    model.compile(keras.optimizers.SGD(0.05, gradient_accumulation_steps=4),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rigl = StepRecorder(delta_t=2, alpha=0.3, end_step=0.75)
    logs = []
    recorder = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs=None, out=logs: out.append(dict(logs)))
    history = model.fit(x, y, batch_size=10, epochs=2, verbose=0, callbacks=[rigl, recorder])
    # 40 batches = 10 optimizer steps; T_end = 0.75 * 10 -> 8 (not 0.75 * 40).
    assert int(numpy(model.optimizer.iterations)) == 10
    assert [s for s, _ in rigl.steps] == [2, 4, 6]
    assert sum(history.history["mask_updates"]) == 3
    fractions = [l["drop_fraction"] for l in logs if "drop_fraction" in l]
    assert fractions == pytest.approx([0.15 * (1 + math.cos(math.pi * t / 8)) for t in (2, 4, 6)])
