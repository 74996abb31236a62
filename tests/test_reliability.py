"""Resume, checkpoints, mixed precision, bad numbers, audits and hostile input."""

import os
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rigl_keras as rk
from rigl_keras import baselines

from conftest import classification_data, masks, mlp

RESUMABLE = ["static", "snip", "set", "snfs", "rigl", "prune"]


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
        mlp, 0.8, grow_data=(x, y), delta_t=3, prune_frequency=3, seed=3, end_step=0.9,
        prune_end_step=0.8)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model, callbacks, x, y


def state(model):
    """Every variable of the model and its optimizer, by position.

    (Names differ between runs: Keras numbers optimizers sgd, sgd_1, ... and a
    reloaded model's slot names lose the model-name prefix.)
    """
    variables = list(model.variables) + list(model.optimizer.variables)
    return {i: keras.ops.convert_to_numpy(v).copy() for i, v in enumerate(variables)}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-7, err_msg=key)


@pytest.fixture
def deterministic():
    tf.config.experimental.enable_op_determinism()
    yield
    tf.config.experimental.disable_op_determinism() if hasattr(
        tf.config.experimental, "disable_op_determinism") else None


@pytest.mark.parametrize("name", RESUMABLE)
def test_backup_and_restore_resume_is_exact(name, tmp_path, deterministic):
    fit = dict(batch_size=16, epochs=4, shuffle=False, verbose=0)
    model, callbacks, x, y = build_method(name)
    model.fit(x, y, callbacks=callbacks, **fit)
    reference = state(model)

    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    model, callbacks, x, y = build_method(name)
    with pytest.raises(Crash):
        model.fit(x, y, callbacks=callbacks + [backup, CrashAt(2, 4)], **fit)
    # A new process would rebuild everything; the backup restores the state.
    model, callbacks, x, y = build_method(name)
    model.fit(x, y, callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))] + callbacks, **fit)
    assert_same_state(reference, state(model))


@pytest.mark.parametrize("name", ["rigl", "snfs", "prune"])
def test_model_checkpoint_and_initial_epoch_resume_is_exact(name, tmp_path, deterministic):
    fit = dict(batch_size=16, shuffle=False, verbose=0)
    model, callbacks, x, y = build_method(name)
    model.fit(x, y, epochs=4, callbacks=callbacks, **fit)
    reference = state(model)

    # The job is a 4-epoch fit that dies in epoch 2 (after the epoch-1
    # checkpoint); it is restarted from the checkpoint with initial_epoch.
    path = str(tmp_path / "ckpt.keras")
    model, callbacks, x, y = build_method(name)
    with pytest.raises(Crash):
        model.fit(x, y, epochs=4, callbacks=callbacks + [keras.callbacks.ModelCheckpoint(path), CrashAt(2, 3)],
                  **fit)
    restored = keras.models.load_model(path)
    _, callbacks, _, _ = build_method(name)
    restored.fit(x, y, epochs=4, initial_epoch=2, callbacks=callbacks, **fit)
    assert_same_state(reference, state(restored))


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
    counts = {n: int(m.sum()) for n, m in masks(model).items()}
    history = model.fit(x, y, batch_size=20, epochs=2, verbose=0,
                        callbacks=[rk.RigLCallback(delta_t=3, grow_data=(x, y), check_invariants=True)])
    assert model.get_layer("fc1").compute_dtype == policy.split("_")[1]
    assert {n: int(m.sum()) for n, m in masks(model).items()} == counts
    assert sum(history.history["connections_changed"]) > 0
    assert np.isfinite(history.history["loss"][-1])
    rk.check_sparsity(model, counts)


def test_non_finite_gradient_outside_the_mask_does_not_reach_the_kernel():
    layer = rk.MaskedDense(2)
    layer.build((None, 2))
    layer.mask.assign([[1, 0], [0, 1]])
    upstream = tf.constant([[1.0, np.nan], [np.inf, 2.0]])
    with tf.GradientTape() as tape:
        effective = layer.kernel
    grad = tape.gradient(effective, layer.raw_kernel.value, output_gradients=upstream).numpy()
    np.testing.assert_array_equal(grad, [[1.0, 0.0], [0.0, 2.0]])


def test_non_finite_scores_skip_updates_and_training_continues():
    x, y = classification_data(200)
    # NaN sample weights make every growth gradient NaN; training data is clean.
    bad_weights = np.full(len(y), np.nan, "float32")
    model = rk.sparsify(mlp(), 0.8)
    model.compile(keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = masks(model)
    with pytest.warns(RuntimeWarning, match="skipped"):
        history = model.fit(x, y, batch_size=20, epochs=1, verbose=0,
                            callbacks=[rk.RigLCallback(delta_t=3, grow_data=(x, y, bad_weights))])
    after = masks(model)
    assert all(np.array_equal(before[n], after[n]) for n in before)
    assert np.isfinite(history.history["loss"][-1]) and history.history["connections_changed"] == [0]


def _audited_model():
    model = rk.sparsify(mlp(), 0.5)
    model.compile(keras.optimizers.Adam(), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = classification_data(40)
    model.fit(x, y, epochs=1, verbose=0)
    return model


@pytest.mark.parametrize(
    "break_it, match",
    [
        (lambda m: m.get_layer("fc2").mask.assign(m.get_layer("fc2").mask * 0.5), "fc2.*not binary"),
        (lambda m: m.get_layer("fc1").raw_kernel.assign(
            m.get_layer("fc1").raw_kernel + 1.0), "fc1.*outside the mask"),
        (lambda m: [s.assign(s + 1.0) for s in m.optimizer.variables if "fc2_kernel_velocity" in s.name],
         "fc2.*optimizer state"),
    ],
)
def test_check_sparsity_names_the_broken_layer(break_it, match):
    model = _audited_model()
    rk.check_sparsity(model)
    break_it(model)
    with pytest.raises(rk.SparsityInvariantError, match=match):
        rk.check_sparsity(model)


def test_check_sparsity_counts():
    model = _audited_model()
    counts = {n: int(m.sum()) for n, m in masks(model).items()}
    rk.check_sparsity(model, counts)
    with pytest.raises(rk.SparsityInvariantError, match="fc2.*expected"):
        rk.check_sparsity(model, counts | {"fc2": counts["fc2"] + 1})


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
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
            delta_t=delta_t, alpha=alpha, check_invariants=True,
            **({} if method == "set" else {"grow_data": (x, y)}))
    except ValueError:
        assert not (0 <= sparsity < 1 and delta_t >= 1 and 0 < alpha <= 1)
        return
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    counts = {n: int(m.sum()) for n, m in masks(model).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[callback])
    assert {n: int(m.sum()) for n, m in masks(model).items()} == counts


def test_shared_nested_and_unmaskable_layers_train_with_rigl():
    inner = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8, activation="relu", name="inner_fc")],
                             name="inner")
    shared = keras.layers.Dense(8, activation="relu", name="shared")
    inputs = keras.Input((8,))
    h = inner(shared(inputs))
    h = shared(h)
    h = keras.layers.Reshape((8, 1))(h)
    h = keras.layers.Conv1D(2, 3, name="conv1d")(h)
    outputs = keras.layers.Dense(3, name="head")(keras.layers.Flatten()(h))
    model = rk.sparsify(keras.Model(inputs, outputs), 0.7, "erk")
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = classification_data(120, inputs=8, classes=3)
    counts = {n: int(m.sum()) for n, m in masks(model).items()}
    history = model.fit(x, y, batch_size=12, epochs=2, verbose=0,
                        callbacks=[rk.RigLCallback(delta_t=2, grow_data=(x, y), check_invariants=True)])
    assert sum(history.history["connections_changed"]) > 0
    assert {n: int(m.sum()) for n, m in masks(model).items()} == counts
    report = rk.sparsity_report(model)
    assert report["conv1d"].note == "cannot be masked"
    assert sorted(counts) == ["head", "inner_fc", "shared"]


MIRRORED = textwrap.dedent(r"""
    import json, os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    tf.config.experimental.enable_op_determinism()
    import keras, numpy as np
    import rigl_keras as rk

    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 12)).astype("float32")
    y = np.argmax(x @ rng.normal(size=(12, 4)), axis=1)

    def run(strategy):
        with strategy.scope():
            keras.utils.set_random_seed(1)
            dense = keras.Sequential([keras.Input((12,)), keras.layers.Dense(32, activation="relu"),
                                      keras.layers.Dense(4)])
            model = rk.sparsify(dense, 0.8, "erk", seed=2)
            model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                          keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0,
                  callbacks=[rk.RigLCallback(delta_t=4, grow_data=(x, y), check_invariants=True)])
        return model

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    mirrored = run(strategy)
    single = run(tf.distribute.get_strategy())
    out = {"replicas": strategy.num_replicas_in_sync, "identical": True, "mask_equal": True, "max_diff": 0.0}
    for a, b in zip(rk.layers.masked_layers_of(mirrored), rk.layers.masked_layers_of(single)):
        copies = [v.numpy() for v in a.mask._value.values]
        out["identical"] &= all(np.array_equal(copies[0], c) for c in copies[1:])
        kernels = [v.numpy() for v in a.raw_kernel._value.values]
        out["identical"] &= all(np.array_equal(kernels[0], k) for k in kernels[1:])
        out["mask_equal"] &= bool(np.array_equal(copies[0], b.mask.numpy()))
        out["max_diff"] = max(out["max_diff"], float(np.abs(kernels[0] - b.raw_kernel.numpy()).max()))
    print(json.dumps(out))
""")


def test_mirrored_strategy_replicas_agree_and_match_single_device():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", MIRRORED], capture_output=True, text=True, timeout=600,
                            env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    assert out["identical"]
    assert out["mask_equal"]
    assert out["max_diff"] < 1e-4
