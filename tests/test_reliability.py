"""Resume, checkpoints, mixed precision, bad numbers, audits and hostile input.

Backend-agnostic (TensorFlow, JAX, torch) except the MirroredStrategy test.
"""

import functools
import os
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rigl_keras as rk
from rigl_keras import backend as rk_backend
from rigl_keras import baselines

from conftest import classification_data, masks, mlp

BACKEND = keras.backend.backend()
RESUMABLE = ["static", "snip", "set", "snfs", "rigl", "prune"]
FIT = dict(batch_size=32, shuffle=False, verbose=0)  # 5 steps per epoch
EPOCHS = 3


def numpy(x):
    return np.array(keras.ops.convert_to_numpy(x))


def counts(model):
    return {name: int(m.sum()) for name, m in masks(model).items()}


class Crash(Exception):
    pass


class CrashAt(keras.callbacks.Callback):
    """Raises in the middle of an epoch, like a preempted job."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.at = (epoch, batch)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise Crash()


def build_method(name):
    keras.utils.set_random_seed(7)
    x, y = classification_data(160)
    model, callbacks = baselines.get(name).build(
        mlp, 0.8, delta_t=3, prune_frequency=3, seed=3, end_step=0.9, prune_end_step=0.8)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model, callbacks, x, y


def state(model):
    """Every variable of the model and its optimizer, by position.

    (Names differ between runs: Keras numbers optimizers sgd, sgd_1, ... and a
    reloaded model's slot names lose the model-name prefix.)
    """
    variables = list(model.variables) + list(model.optimizer.variables)
    return {i: numpy(v).copy() for i, v in enumerate(variables)}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-7, err_msg=key)


@pytest.fixture
def deterministic():
    if BACKEND != "tensorflow":
        yield  # JAX and torch on CPU are deterministic already
        return
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    yield
    if hasattr(tf.config.experimental, "disable_op_determinism"):
        tf.config.experimental.disable_op_determinism()


@functools.lru_cache(maxsize=None)
def reference(name):
    """The state after an uninterrupted run (shared by both resume tests)."""
    model, callbacks, x, y = build_method(name)
    model.fit(x, y, epochs=EPOCHS, callbacks=callbacks, **FIT)
    return state(model)


@pytest.mark.parametrize("name", RESUMABLE)
def test_backup_and_restore_resume_is_exact(name, tmp_path, deterministic):
    expected = reference(name)
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    model, callbacks, x, y = build_method(name)
    with pytest.raises(Crash):
        model.fit(x, y, epochs=EPOCHS, callbacks=callbacks + [backup, CrashAt(1, 2)], **FIT)
    # A new process would rebuild everything; the backup restores the state.
    model, callbacks, x, y = build_method(name)
    model.fit(x, y, epochs=EPOCHS,
              callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))] + callbacks, **FIT)
    assert_same_state(expected, state(model))


@pytest.mark.parametrize("name", RESUMABLE)
def test_model_checkpoint_and_initial_epoch_resume_is_exact(name, tmp_path, deterministic):
    expected = reference(name)
    # The job dies in epoch 1 (after the epoch-0 checkpoint); it is restarted
    # from the checkpoint with initial_epoch.
    path = str(tmp_path / "ckpt.keras")
    model, callbacks, x, y = build_method(name)
    with pytest.raises(Crash):
        model.fit(x, y, epochs=EPOCHS,
                  callbacks=callbacks + [keras.callbacks.ModelCheckpoint(path), CrashAt(1, 3)], **FIT)
    restored = keras.models.load_model(path)
    _, callbacks, _, _ = build_method(name)
    restored.fit(x, y, epochs=EPOCHS, initial_epoch=1, callbacks=callbacks, **FIT)
    assert_same_state(expected, state(restored))


def test_mid_epoch_checkpoints_hold_nothing_outside_the_mask(tmp_path):
    model, callbacks, x, y = build_method("rigl")
    path = str(tmp_path / "step.keras")
    saved = []

    class Audit(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if os.path.exists(path):
                rk.check_sparsity(keras.models.load_model(path))
                saved.append(batch)
                os.remove(path)

    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=callbacks + [
        keras.callbacks.ModelCheckpoint(path, save_freq=3), Audit()])
    assert len(saved) >= 3


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_keeps_exact_counts(policy):
    keras.mixed_precision.set_global_policy(policy)
    x, y = classification_data(200)
    model = rk.sparsify(mlp(), 0.8, "erk")
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    expected = counts(model)
    history = model.fit(x, y, batch_size=20, epochs=1, verbose=0,
                        callbacks=[rk.RigLCallback(delta_t=3, check_invariants=True)])
    assert model.get_layer("fc1").compute_dtype == policy.split("_")[1]
    assert counts(model) == expected
    assert sum(history.history["connections_changed"]) > 0
    assert np.isfinite(history.history["loss"][-1])
    rk.check_sparsity(model, expected)


def _vjp(fn, inputs, upstream):
    """Gradients of fn(*inputs) w.r.t. inputs for the cotangent `upstream`, on any backend."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        inputs = [tf.convert_to_tensor(i) for i in inputs]
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            out = fn(*inputs)
        return [numpy(g) for g in tape.gradient(out, inputs, output_gradients=tf.constant(upstream))]
    if BACKEND == "jax":
        import jax

        _, pull = jax.vjp(fn, *[keras.ops.convert_to_tensor(i) for i in inputs])
        return [numpy(g) for g in pull(keras.ops.convert_to_tensor(upstream))]
    import torch

    inputs = [torch.tensor(i, requires_grad=True) for i in inputs]
    out = fn(*inputs)
    out.backward(torch.tensor(upstream))
    return [numpy(i.grad) for i in inputs]


def test_non_finite_gradient_outside_the_mask_does_not_reach_the_weight():
    mask = keras.ops.convert_to_tensor(np.array([[1, 0], [0, 1]], "uint8"))
    upstream = np.array([[1.0, np.nan], [np.inf, 2.0]], "float32")
    w = np.array([[0.5, np.nan], [np.inf, -1.0]], "float32")  # garbage stored outside the mask
    g = np.zeros((2, 2), "float32")
    forward = numpy(rk_backend.masked_value(w, mask, g))
    np.testing.assert_array_equal(forward, [[0.5, 0.0], [0.0, -1.0]])
    grad_w, grad_g = _vjp(lambda a, b: rk_backend.masked_value(a, mask, b), [w, g], upstream)
    np.testing.assert_array_equal(grad_w, [[1.0, 0.0], [0.0, 2.0]])
    # The capture variable receives the dense gradient ∂L/∂W_eff, unmasked.
    np.testing.assert_array_equal(grad_g, upstream)


@pytest.mark.skipif(BACKEND != "torch", reason="torch.compile")
def test_torch_mask_traced_by_torch_compile():
    """Traced by torch.compile, the mask's bit pattern is computed in the graph
    (not cached on the tensor); values and gradients are the same."""
    import torch

    w = torch.tensor([[0.5, np.nan], [np.inf, -1.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = torch.compile(lambda a: rk_backend.apply_mask(a, mask), backend="eager")(w)
    out.backward(torch.tensor([[1.0, np.nan], [np.inf, 2.0]]))
    np.testing.assert_array_equal(numpy(out.detach()), [[0.5, 0.0], [0.0, -1.0]])
    np.testing.assert_array_equal(numpy(w.grad), [[1.0, 0.0], [0.0, 2.0]])
    assert not hasattr(mask, "_rk_keep_bits")


@pytest.mark.skipif(BACKEND != "torch", reason="torch tensor storage")
def test_torch_mask_pattern_follows_a_replaced_storage():
    """Setting `.data` (as `Module.to` does) replaces a tensor's storage without
    bumping its version: the cached bit pattern is remade all the same."""
    import torch

    layer = rk.MaskedDense(3, use_bias=False)
    layer.build((None, 4))
    w = rk.MaskedWeight(layer, "kernel", "w")
    w.variable.assign(np.ones((4, 3), "float32"))
    x = np.ones((1, 4), "float32")
    np.testing.assert_array_equal(numpy(layer(x)), 4.0)
    w.mask.value.data = torch.tensor([[1.0, 0.0, 0.0]] * 4)
    np.testing.assert_array_equal(numpy(layer(x)), [[4.0, 0.0, 0.0]])


def test_non_finite_scores_skip_updates_and_training_continues():
    x, y = classification_data(100)
    # NaN sample weights make every growth gradient NaN; training data is clean.
    bad_weights = np.full(len(y), np.nan, "float32")
    model = rk.sparsify(mlp(), 0.8, capture_gradients=False)
    model.compile(keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = masks(model)
    with pytest.warns(RuntimeWarning, match="skipped"):
        history = model.fit(x, y, batch_size=20, epochs=1, verbose=0,
                            callbacks=[rk.RigLCallback(delta_t=2, grow_data=(x, y, bad_weights))])
    after = masks(model)
    assert all(np.array_equal(before[n], after[n]) for n in before)
    assert np.isfinite(history.history["loss"][-1]) and history.history["connections_changed"] == [0]


class PoisonCaptured(keras.callbacks.Callback):
    """Before RigL: writes NaN into one weight's captured gradient after every step.

    `restore` (placed after RigL) puts the real gradient back before the next
    forward pass: G is read in the forward pass, so a NaN left there would
    poison training itself, which is not what this test is about.
    """

    def __init__(self, name):
        super().__init__()
        self.name, self.saved = name, None

    def _weight(self):
        [w] = [w for w in rk.masked_weights(self.model) if w.name == self.name]
        return w

    def on_train_batch_end(self, batch, logs=None):
        w = self._weight()
        self.saved = numpy(w.gradient)
        w.gradient.assign(np.full(w.shape, np.nan, "float32"))

    def restore(self):
        poison = self

        class Restore(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                poison._weight().gradient.assign(poison.saved)

        return Restore()


def test_non_finite_captured_gradient_skips_only_that_weight():
    x, y = classification_data(100)
    model = rk.sparsify(mlp(), 0.8)
    model.compile(keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = masks(model)
    poison = PoisonCaptured("fc2")
    with pytest.warns(RuntimeWarning, match="'fc2'.*skipped"):
        history = model.fit(x, y, batch_size=10, epochs=1, verbose=0,
                            callbacks=[poison, rk.RigLCallback(delta_t=3, check_invariants=True), poison.restore()])
    after = masks(model)
    np.testing.assert_array_equal(before["fc2"], after["fc2"])
    assert not np.array_equal(before["fc1"], after["fc1"])
    assert np.isfinite(history.history["loss"][-1])
    assert all(np.isfinite(numpy(w.variable)).all() for w in rk.masked_weights(model))


@pytest.mark.parametrize("policy", ["skip", "stop", "raise"])
def test_on_nonfinite_policy(policy):
    x, y = classification_data(100)
    model = rk.sparsify(mlp(), 0.8)
    model.compile(keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    poison = PoisonCaptured("fc2")
    rigl = rk.RigLCallback(delta_t=3, on_nonfinite=policy)
    callbacks = [poison, rigl, poison.restore()]
    if policy == "raise":
        with pytest.raises(FloatingPointError, match=r"'fc2'.*step 3"):
            model.fit(x, y, batch_size=10, epochs=1, verbose=0, callbacks=callbacks)
        return
    with pytest.warns(RuntimeWarning, match="fc2"):
        history = model.fit(x, y, batch_size=10, epochs=2, verbose=0, callbacks=callbacks)
    # "skip" goes on updating the finite weights; "stop" ends the fit after the first update.
    assert len(history.history["loss"]) == (2 if policy == "skip" else 1)
    assert history.history["mask_updates"][0] == (3 if policy == "skip" else 1)
    assert rk.RigLCallback.from_config(rigl.get_config()).on_nonfinite == policy


def test_on_nonfinite_is_validated():
    with pytest.raises(ValueError, match="on_nonfinite"):
        rk.RigLCallback(on_nonfinite="ignore")


def _audited_model():
    model = rk.sparsify(mlp(), 0.5)
    model.compile(keras.optimizers.Adam(), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = classification_data(40)
    model.fit(x, y, epochs=1, verbose=0)
    return model


def _weight(model, name):
    [w] = [w for w in rk.masked_weights(model) if w.name == name]
    return w


def _break_slot(model, name):
    w = _weight(model, name)
    slots = rk.engine.optimizer_state_for(model.optimizer, w.variable, model.trainable_variables)
    assert len(slots) == 2  # Adam: m and v
    slots[0].assign(numpy(slots[0]) + 1.0)


@pytest.mark.parametrize(
    "break_it, match",
    [
        (lambda m: _weight(m, "fc2").mask.assign(numpy(_weight(m, "fc2").mask) * 2), "fc2.*not binary"),
        (lambda m: _weight(m, "fc1").variable.assign(numpy(_weight(m, "fc1").variable) + 1.0),
         "fc1.*outside the mask"),
        (lambda m: _break_slot(m, "fc2"), "fc2.*optimizer state"),
    ],
    ids=["mask", "weight", "optimizer"],
)
def test_check_sparsity_names_the_broken_weight(break_it, match):
    model = _audited_model()
    rk.check_sparsity(model)
    break_it(model)
    with pytest.raises(rk.SparsityInvariantError, match=match):
        rk.check_sparsity(model)


def test_check_sparsity_counts():
    model = _audited_model()
    expected = counts(model)
    rk.check_sparsity(model, expected)
    with pytest.raises(rk.SparsityInvariantError, match="fc2.*expected"):
        rk.check_sparsity(model, expected | {"fc2": expected["fc2"] + 1})


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    widths=st.lists(st.integers(1, 12), min_size=1, max_size=3),
    sparsity=st.floats(-0.2, 1.1),
    delta_t=st.integers(-1, 4),
    alpha=st.floats(-0.1, 1.2),
    steps=st.integers(1, 12),
    method=st.sampled_from(["rigl", "set", "snfs"]),
)
def test_hostile_configurations_fail_clearly_or_keep_invariants(widths, sparsity, delta_t, alpha, steps, method):
    x, y = classification_data(steps * 4, inputs=5, classes=3)
    layers = [keras.Input((5,))] + [keras.layers.Dense(w, activation="relu") for w in widths]
    dense = keras.Sequential(layers + [keras.layers.Dense(3)])
    try:
        model = rk.sparsify(dense, sparsity, "erk")
        callback = {"rigl": rk.RigLCallback, "set": baselines.SETCallback, "snfs": baselines.SNFSCallback}[method](
            delta_t=delta_t, alpha=alpha, check_invariants=True)
    except ValueError:
        assert not (0 <= sparsity < 1 and delta_t >= 1 and 0 < alpha <= 1)
        return
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    expected = counts(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[callback])
    assert counts(model) == expected


@keras.saving.register_keras_serializable(package="rigl_keras_tests")
class PlainDense(keras.layers.Dense):
    """A user subclass of Dense: it must declare itself maskable, so it stays dense."""


def test_shared_nested_and_unmaskable_layers_train_with_rigl():
    inner = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8, activation="relu", name="inner_fc")],
                             name="inner")
    shared = keras.layers.Dense(8, activation="relu", name="shared")
    inputs = keras.Input((8,))
    h = inner(shared(inputs))
    h = shared(h)
    h = PlainDense(6, name="plain")(h)
    h = keras.layers.Reshape((6, 1))(h)
    h = keras.layers.Conv1D(2, 3, name="conv1d")(h)
    outputs = keras.layers.Dense(3, name="head")(keras.layers.Flatten()(h))
    model = rk.sparsify(keras.Model(inputs, outputs), 0.7, "erk")
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = classification_data(120, inputs=8, classes=3)
    expected = counts(model)
    history = model.fit(x, y, batch_size=12, epochs=2, verbose=0,
                        callbacks=[rk.RigLCallback(delta_t=2, check_invariants=True)])
    assert sum(history.history["connections_changed"]) > 0
    assert counts(model) == expected
    report = rk.sparsity_report(model)
    [plain] = [r for r in report.weights if r.name.startswith("plain")]
    assert plain.note.startswith("cannot be masked")
    assert sorted(expected) == ["conv1d", "head", "inner/inner_fc", "shared"]


MIRRORED = textwrap.dedent(r"""
    import json, os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    tf.config.experimental.enable_op_determinism()
    import keras, numpy as np
    import rigl_keras as rk

    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 12)).astype("float32")
    y = np.argmax(x @ rng.normal(size=(12, 4)), axis=1)

    def run(strategy, grow_data):
        with strategy.scope():
            keras.utils.set_random_seed(1)
            dense = keras.Sequential([keras.Input((12,)), keras.layers.Dense(32, activation="relu"),
                                      keras.layers.Dense(4)])
            model = rk.sparsify(dense, 0.8, "erk", seed=2)
            model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                          keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0,
                  callbacks=[rk.RigLCallback(delta_t=4, grow_data=grow_data, check_invariants=True)])
        return model

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    out = {"replicas": strategy.num_replicas_in_sync}
    for label, grow_data in (("captured", None), ("grow_data", (x, y))):
        mirrored = run(strategy, grow_data)
        single = run(tf.distribute.get_strategy(), grow_data)
        result = {"identical": True, "mask_equal": True, "max_diff": 0.0}
        for a, b in zip(rk.masked_weights(mirrored), rk.masked_weights(single)):
            copies = [v.numpy() for v in a.mask._value.values]
            result["identical"] &= all(np.array_equal(copies[0], c) for c in copies[1:])
            kernels = [v.numpy() for v in a.variable._value.values]
            result["identical"] &= all(np.array_equal(kernels[0], k) for k in kernels[1:])
            result["mask_equal"] &= bool(np.array_equal(copies[0], b.mask.numpy()))
            result["max_diff"] = max(result["max_diff"], float(np.abs(kernels[0] - b.variable.numpy()).max()))
        out[label] = result
    print(json.dumps(out))
""")


@functools.lru_cache(maxsize=None)
def _mirrored_report():
    import json

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", MIRRORED], capture_output=True, text=True, timeout=600,
                            env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute.MirroredStrategy is TensorFlow-only")
@pytest.mark.parametrize("label", ["captured", "grow_data"])
def test_mirrored_strategy_replicas_agree_and_match_single_device(label):
    out = _mirrored_report()
    assert out["replicas"] == 2
    assert out[label]["identical"]
    assert out[label]["mask_equal"]
    assert out[label]["max_diff"] < 1e-4
