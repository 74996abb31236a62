"""The drop/grow engine on hand-computed cases, ties, optimizer state, any shape."""


import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rigl_keras as rk
from rigl_keras import engine
from rigl_keras.layers import MaskedWeight
from rigl_keras.sparsify import random_mask


def np_masks(mask, weights, grow, n_drop, n_grow=None):
    new, keep = engine.drop_grow_masks(
        np.asarray(mask, "float32"), np.abs(np.asarray(weights, "float32")),
        np.asarray(grow, "float32"), n_drop, n_grow,
    )
    return keras.ops.convert_to_numpy(new), keras.ops.convert_to_numpy(keep)


@settings(max_examples=50, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    density=st.floats(0.0, 1.0),
    fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_any_shape_keeps_exact_count(shape, density, fraction, seed):
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    mask = random_mask(shape, int(round(density * size)), rng)
    weights = rng.normal(size=shape) * mask
    n_drop = int(fraction * mask.sum())
    new, keep = np_masks(mask, weights, rng.random(shape), n_drop)
    assert new.shape == tuple(shape)
    assert new.sum() == mask.sum()
    assert keep.sum() == mask.sum() - n_drop
    assert np.all(mask[keep] == 1)  # kept positions were active
    kept_min = np.abs(weights[keep]).min() if keep.any() else np.inf
    dropped = (mask == 1) & ~keep
    assert not dropped.any() or np.abs(weights[dropped]).max() <= kept_min


def test_hand_computed_drop_and_grow():
    mask = [1, 1, 1, 0, 0, 0]
    weights = [0.5, -0.1, 0.3, 0, 0, 0]
    grow = [0.0, 0.05, 0.0, 0.2, 0.7, 0.1]
    new, keep = np_masks(mask, weights, grow, 1)
    # Drop |-0.1| (index 1), grow the inactive position with the largest score (4).
    assert keep.tolist() == [True, False, True, False, False, False]
    assert new.tolist() == [True, False, True, False, True, False]
    new, keep = np_masks(mask, weights, grow, 2)
    # Drop 0.1 and 0.3 (indices 1, 2); grow 4 then 3.
    assert keep.tolist() == [True, False, False, False, False, False]
    assert new.tolist() == [True, False, False, True, True, False]


def test_just_dropped_position_can_be_regrown():
    new, keep = np_masks([1, 1, 0], [0.5, 0.1, 0], [0.0, 9.0, 1.0], 1)
    assert keep.tolist() == [True, False, False]
    assert new.tolist() == [True, True, False]  # regrown (drop_grow keeps its weight: see below)


def test_ties_are_broken_by_index():
    # Equal magnitudes: the higher index is dropped; equal grow scores: the lower index grows.
    new, keep = np_masks([1, 1, 1, 0, 0, 0], [0.2, -0.2, 0.2, 0, 0, 0], [0, 0, 0, 1, 1, 1], 1)
    assert keep.tolist() == [True, True, False, False, False, False]
    assert new.tolist() == [True, True, False, True, False, False]


def test_ties_go_to_the_lower_index_on_large_inputs():
    # Many ties at the threshold, on the backend's own tensors: keep the 5
    # lowest-index active ones of equal magnitude, grow the 7 lowest-index
    # free positions of equal score (ties among 500 positions).
    size = 1000
    mask = np.zeros(size, "float32")
    mask[::2] = 1  # 500 active at even indices
    weights = np.where(mask == 1, 0.5, 0).astype("float32")
    grow = np.where(mask == 1, 0, 1).astype("float32")
    grow[999] = 2.0  # one clear winner
    new, keep = np_masks(mask, weights, grow, 495, 502)
    assert np.flatnonzero(keep).tolist() == [0, 2, 4, 6, 8]
    grown = np.flatnonzero(new & ~keep)
    # Free positions: the 500 odd indices (score 1, 2 at 999) and the 495
    # dropped even ones (score 0): all odd ones grow, then the two lowest
    # dropped ones, 10 and 12.
    assert grown.tolist() == sorted([10, 12] + list(range(1, 1000, 2)))
    assert new.sum() == 5 + 502


def npv(x):
    return keras.ops.convert_to_numpy(x)


def _trained(optimizer, sparsity=0.0):
    model = rk.sparsify(keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d")]), sparsity, "erk")
    model.compile(optimizer, "mse")
    rng = np.random.default_rng(0)
    model.fit(rng.random((16, 4)).astype("float32"), rng.random((16, 3)).astype("float32"), epochs=2, verbose=0)
    return model, rk.masked_weights(model)[0]


def _slots(model, w):
    return engine.optimizer_state_for(model.optimizer, w.variable, model.trainable_variables)


@pytest.mark.parametrize(
    "optimizer, slot_count, initial",
    [
        (lambda: keras.optimizers.SGD(0.1, momentum=0.9), 1, 0.0),
        (lambda: keras.optimizers.Adam(0.01), 2, 0.0),
        (lambda: keras.optimizers.Adagrad(0.1, initial_accumulator_value=0.1), 1, 0.1),
    ],
)
def test_grown_and_dropped_positions_get_zero_weight_and_initial_state(optimizer, slot_count, initial):
    model, w = _trained(optimizer())
    mask = np.ones((4, 3), "uint8")
    mask[:, 2] = 0  # column 2 inactive
    kernel = npv(w.variable) * mask
    kernel[0, 0] = 1e-4  # the smallest active weight: dropped first
    w.mask.assign(mask)
    w.variable.assign(kernel)
    slots = _slots(model, w)
    assert len(slots) == slot_count
    for slot in slots:
        assert engine.slot_initial_value(model.optimizer, slot) == pytest.approx(initial)
        state = npv(slot)
        slot.assign(np.where(mask == 1, state, np.float32(initial)))
    before = [npv(s).copy() for s in slots]
    grow = np.zeros((4, 3), "float32")
    grow[3, 2] = 5.0  # grow (3, 2)
    result = engine.drop_grow(w, 1, grow, slots, optimizer=model.optimizer)
    new_mask = npv(w.mask)
    assert new_mask[0, 0] == 0 and new_mask[3, 2] == 1 and new_mask.sum() == mask.sum()
    assert result.changed == 1 and result.active == 8 and not result.skipped
    assert npv(w.variable)[3, 2] == 0 and npv(w.variable)[0, 0] == 0
    survivors = (mask == 1) & (new_mask == 1)
    np.testing.assert_array_equal(npv(w.variable)[survivors], kernel[survivors])
    for slot, old in zip(slots, before):
        values = npv(slot)
        # Changed: reset to the optimizer's initial value (Adagrad: 0.1), not 0.
        assert values[3, 2] == pytest.approx(initial) and values[0, 0] == pytest.approx(initial)
        np.testing.assert_array_equal(values[survivors], old[survivors])
        assert np.any(values[survivors] != initial)
    rk.check_sparsity(model)


def test_dropped_and_regrown_connection_keeps_weight_and_state():
    # Changed (official rule): a connection dropped and grown back in the same
    # update is not new; it keeps its weight and optimizer state.
    model, w = _trained(keras.optimizers.SGD(0.1, momentum=0.9))
    kernel = np.float32([[0.9, 0.8, 0], [0.1, 0.7, 0], [0.6, 0, 0], [0.5, 0, 0]])
    mask = (kernel != 0).astype("uint8")  # 6 active
    w.mask.assign(mask)
    w.variable.assign(kernel)
    (slot,) = _slots(model, w)
    momentum = np.arange(1, 13, dtype="float32").reshape(4, 3) * mask
    slot.assign(momentum)
    grow = np.zeros((4, 3), "float32")
    grow[1, 0] = 9.0  # the smallest weight (0.1 at (1, 0)) is dropped and regrown
    grow[3, 2] = 8.0  # and (3, 2) grows
    result = engine.drop_grow(w, 2, grow, [slot], optimizer=model.optimizer)
    # Drops: 0.1 at (1, 0) and 0.5 at (3, 0); grows (1, 0) and (3, 2).
    expected_mask = mask.copy()
    expected_mask[3, 0], expected_mask[3, 2] = 0, 1
    np.testing.assert_array_equal(npv(w.mask), expected_mask)
    assert result.changed == 1 and result.active == 6
    expected_kernel = kernel.copy()
    expected_kernel[3, 0] = 0  # dropped: reset
    np.testing.assert_array_equal(npv(w.variable), expected_kernel)  # (1, 0) keeps 0.1
    expected_momentum = momentum.copy()
    expected_momentum[3, 0] = 0
    np.testing.assert_array_equal(npv(slot), expected_momentum)  # (1, 0) keeps 4.0
    rk.check_sparsity(model)


def test_check_sparsity_passes_on_adagrad_training():
    x = np.random.default_rng(0).normal(size=(32, 20)).astype("float32")
    y = np.random.default_rng(1).integers(0, 5, size=32)
    from conftest import mlp

    model = rk.sparsify(mlp(), 0.8, "erk")
    model.compile(keras.optimizers.Adagrad(0.1, initial_accumulator_value=0.1),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    counts = {w.name: engine.active_connections(w) for w in rk.masked_weights(model)}
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    rk.check_sparsity(model, counts)
    for w in rk.masked_weights(model):
        (slot,) = _slots(model, w)
        outside = npv(w.mask) == 0
        np.testing.assert_allclose(npv(slot)[outside], 0.1)  # untouched initial accumulator
        score = np.random.default_rng(2).random(w.shape).astype("float32")
        engine.drop_grow(w, counts[w.name] // 3, score, [slot], optimizer=model.optimizer)
    rk.check_sparsity(model, counts)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    rk.check_sparsity(model, counts)
    # The audit does look at the state: 0 is not Adagrad's initial value.
    w = rk.masked_weights(model)[0]
    (slot,) = _slots(model, w)
    state = npv(slot)
    state[npv(w.mask) == 0] = 0.0
    slot.assign(state)
    with pytest.raises(rk.SparsityInvariantError, match="initial"):
        rk.check_sparsity(model)


def test_optimizer_state_is_matched_by_longest_name():
    class Two(keras.layers.Layer):
        def build(self, shape):
            self.kernel = self.add_weight(name="kernel", shape=(2, 2))
            self.kernel_x = self.add_weight(name="kernel_x", shape=(2, 2))

        def call(self, x):
            return x @ self.kernel @ self.kernel_x

    model = keras.Sequential([keras.Input((2,)), Two(name="t")])
    model.compile(keras.optimizers.Adam(), "mse")
    model.fit(np.ones((2, 2), "float32"), np.ones((2, 2), "float32"), verbose=0)
    layer = model.get_layer("t")
    slots = engine.optimizer_state_for(model.optimizer, layer.kernel, model.trainable_variables)
    assert len(slots) == 2 and all("kernel_x" not in s.name for s in slots)


def test_loss_scale_optimizer_state_is_found():
    model, w = _trained(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(momentum=0.9)))
    slots = _slots(model, w)
    assert [s.name.endswith("kernel_momentum") for s in slots] == [True]


def _weight(units, inputs):
    layer = rk.MaskedDense(units)
    layer.build((None, inputs))
    return MaskedWeight(layer, "kernel", "w")


def test_non_finite_scores_skip_the_weight_with_a_warning():
    w = _weight(2, 2)
    w.mask.assign(np.uint8([[1, 0], [1, 0]]))
    before = npv(w.mask).copy()
    with pytest.warns(RuntimeWarning, match="skipped"):
        result = engine.drop_grow(w, 1, np.array([[0, np.nan], [0, 1]], "float32"))
    assert result.skipped and result.changed == 0
    np.testing.assert_array_equal(npv(w.mask), before)


def test_constant_grow_scores_skip_the_weight_with_a_warning():
    w = _weight(3, 4)
    mask = np.uint8([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    w.mask.assign(mask)
    kernel = npv(w.variable).copy()
    with pytest.warns(RuntimeWarning, match="constant"):
        result = engine.drop_grow(w, 2, np.full((4, 3), 0.5, "float32"))
    assert result.skipped and result.changed == 0 and result.active == 6
    np.testing.assert_array_equal(npv(w.mask), mask)
    np.testing.assert_array_equal(npv(w.variable), kernel)


def test_prune_keeps_largest_and_only_shrinks():
    w = _weight(2, 3)
    w.variable.assign(np.float32([[0.1, -0.5], [0.3, 0.0], [-0.9, 0.2]]))
    w.mask.assign(np.uint8([[1, 1], [1, 0], [1, 1]]))
    result = engine.prune(w, 3)
    assert npv(w.mask).tolist() == [[0, 1], [1, 0], [1, 0]]
    assert result.changed == 2 and result.active == 3
    np.testing.assert_array_equal(npv(w.variable), np.float32([[0, -0.5], [0.3, 0], [-0.9, 0]]))


def test_dense_weight_stays_dense_and_untouched():
    # A dense weight (first layer under "uniform") has nowhere else to grow:
    # dropping would only reset its smallest weights to zero.
    w = _weight(3, 4)
    kernel = npv(w.variable).copy()
    result = engine.drop_grow(w, 3, np.random.default_rng(0).random((4, 3)).astype("float32"))
    assert result.changed == 0 and result.active == 12
    np.testing.assert_array_equal(npv(w.variable), kernel)
    np.testing.assert_array_equal(npv(w.mask), 1)


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    density=st.sampled_from([0.05, 0.3, 0.9]),
    fraction=st.floats(0.0, 1.0),
    ties=st.booleans(),
    grow_more=st.booleans(),
)
def test_host_and_device_paths_agree(seed, density, fraction, ties, grow_more):
    """Weights in host memory (every CPU run) take the NumPy path, weights on an
    accelerator the `keras.ops` one with the compiled radix select; both give
    the same masks, weights, optimizer state and counts, ties included."""
    from unittest import mock

    from rigl_keras import selection

    rng = np.random.default_rng(seed)
    mask = random_mask((40, 30), int(density * 1200), rng)
    kernel = (rng.normal(size=(40, 30)) * mask).astype("float32")
    grow = rng.random((40, 30)).astype("float32")
    if ties:  # many equal magnitudes and scores
        kernel, grow = np.round(kernel, 1), np.round(grow, 1)
    momentum = (rng.normal(size=(40, 30)) * mask).astype("float32")
    n_active = int(mask.sum())
    n_drop = int(fraction * n_active)
    n_grow = min(1200 - (n_active - n_drop), n_drop + 7) if grow_more else n_drop

    def update(device):
        w = _weight(30, 40)
        w.mask.assign(mask)
        w.variable.assign(kernel)
        slot = keras.Variable(momentum)
        patches = [mock.patch.object(engine, "_ops_for", lambda x: engine._DEVICE),
                   mock.patch.object(selection, "HOST_BELOW", 0)] if device else []
        for patch in patches:
            patch.start()
        try:
            if prune:
                result = engine.prune(w, n_active - n_drop, [slot])
            else:
                result = engine.drop_grow(w, n_drop, grow, [slot], n_grow=n_grow)
        finally:
            for patch in patches:
                patch.stop()
        return result, npv(w.mask), npv(w.variable), npv(slot)

    for prune in (False, True):
        host, device = update(False), update(True)
        assert host[0] == device[0]
        for got, expected in zip(host[1:], device[1:]):
            np.testing.assert_array_equal(got, expected)
        assert host[1].sum() == n_active - n_drop + (0 if prune else n_grow)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from(["float16", "float32", "float64"]),
    fill=st.sampled_from([0.0, -0.0, 0.1, 1.0, float("nan"), float("-inf")]),
    size=st.integers(0, 300),
)
def test_host_select_is_np_where_bit_for_bit(seed, dtype, fill, size):
    """The commit's bitwise select equals np.where exactly: NaN, Inf and signed
    zeros in the values, any fill, every float width."""
    from rigl_keras import backend as rk_backend

    rng = np.random.default_rng(seed)
    value = rng.normal(size=size).astype(dtype)
    specials = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0], dtype)
    where = rng.random(size) < 0.2
    value[where] = rng.choice(specials, int(where.sum()))
    keep = rng.random(size) < rng.random()
    bits = rk_backend.host_keep_bits(keep, value.dtype)
    got = rk_backend.host_select(bits, value, fill)
    expected = np.where(keep, value, value.dtype.type(fill))
    assert got.dtype == value.dtype
    int_type = f"i{value.dtype.itemsize}"
    np.testing.assert_array_equal(got.view(int_type), expected.view(int_type))
