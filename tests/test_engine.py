"""The drop/grow engine on hand-computed cases, ties, optimizer state, any shape."""

import warnings

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rigl_keras as rk
from rigl_keras import engine
from rigl_keras.sparsify import random_mask


def np_masks(mask, weights, grow, n_drop, n_grow=None):
    new, keep = engine.drop_grow_masks(
        np.asarray(mask, "float32"), np.abs(np.asarray(weights, "float32")),
        np.asarray(grow, "float32"), n_drop, n_grow,
    )
    return keras.ops.convert_to_numpy(new), keras.ops.convert_to_numpy(keep)


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
    assert new.tolist() == [True, True, False]  # regrown, but not kept: weight reset


def test_ties_are_broken_by_index():
    # Equal magnitudes: the higher index is dropped; equal grow scores: the lower index grows.
    new, keep = np_masks([1, 1, 1, 0, 0, 0], [0.2, -0.2, 0.2, 0, 0, 0], [0, 0, 0, 1, 1, 1], 1)
    assert keep.tolist() == [True, True, False, False, False, False]
    assert new.tolist() == [True, True, False, True, False, False]


def test_counts_out_of_range():
    with pytest.raises(ValueError, match="n_drop"):
        np_masks([1, 0], [1, 0], [0, 1], 2)
    with pytest.raises(ValueError, match="n_grow"):
        np_masks([1, 0], [1, 0], [0, 1], 1, 3)


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


def _trained_layer(optimizer):
    model = keras.Sequential([keras.Input((4,)), rk.MaskedDense(3, name="d")])
    model.compile(optimizer, "mse")
    rng = np.random.default_rng(0)
    model.fit(rng.random((16, 4)), rng.random((16, 3)), epochs=2, verbose=0)
    return model, model.get_layer("d")


@pytest.mark.parametrize(
    "optimizer, slot_count",
    [(lambda: keras.optimizers.SGD(0.1, momentum=0.9), 1), (lambda: keras.optimizers.Adam(0.01), 2)],
)
def test_grown_and_dropped_positions_have_zero_weight_and_state(optimizer, slot_count):
    model, layer = _trained_layer(optimizer())
    mask = np.ones((4, 3), "float32")
    mask[:, 2] = 0  # column 2 inactive
    kernel = layer.raw_kernel.numpy() * mask
    kernel[0, 0] = 1e-4  # the smallest active weight: dropped first
    layer.mask.assign(mask)
    layer.raw_kernel.assign(kernel)
    slots = engine.optimizer_state_for(model.optimizer, layer.raw_kernel, model.trainable_variables)
    assert len(slots) == slot_count
    for slot in slots:
        slot.assign(slot.numpy() * mask)
    before = [s.numpy().copy() for s in slots]
    grow = np.zeros((4, 3), "float32")
    grow[3, 2] = 5.0  # grow (3, 2)
    result = engine.drop_grow(layer, 1, grow, slots)
    new_mask = layer.mask.numpy()
    assert new_mask[0, 0] == 0 and new_mask[3, 2] == 1 and new_mask.sum() == mask.sum()
    assert result.changed == 1 and result.active == 8
    assert layer.raw_kernel.numpy()[3, 2] == 0 and layer.raw_kernel.numpy()[0, 0] == 0
    survivors = (mask == 1) & (new_mask == 1)
    np.testing.assert_array_equal(layer.raw_kernel.numpy()[survivors], kernel[survivors])
    for slot, old in zip(slots, before):
        values = slot.numpy()
        assert values[3, 2] == 0 and values[0, 0] == 0
        np.testing.assert_array_equal(values[survivors], old[survivors])
        assert np.any(values[survivors] != 0)
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
    model.fit(np.ones((2, 2)), np.ones((2, 2)), verbose=0)
    layer = model.get_layer("t")
    slots = engine.optimizer_state_for(model.optimizer, layer.kernel, model.trainable_variables)
    assert len(slots) == 2 and all("kernel_x" not in s.name for s in slots)


def test_loss_scale_optimizer_state_is_found():
    model, layer = _trained_layer(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(momentum=0.9)))
    slots = engine.optimizer_state_for(model.optimizer, layer.raw_kernel, model.trainable_variables)
    assert [s.name.endswith("kernel_momentum") for s in slots] == [True]


def test_non_finite_scores_skip_the_layer_with_a_warning():
    layer = rk.MaskedDense(2)
    layer.build((None, 2))
    layer.mask.assign([[1, 0], [1, 0]])
    before = layer.mask.numpy().copy()
    with pytest.warns(RuntimeWarning, match="skipped"):
        result = engine.drop_grow(layer, 1, np.array([[0, np.nan], [0, 1]], "float32"))
    assert result.skipped and result.changed == 0
    np.testing.assert_array_equal(layer.mask.numpy(), before)


def test_prune_keeps_largest_and_only_shrinks():
    layer = rk.MaskedDense(2)
    layer.build((None, 3))
    layer.raw_kernel.assign([[0.1, -0.5], [0.3, 0.0], [-0.9, 0.2]])
    layer.mask.assign([[1, 1], [1, 0], [1, 1]])
    result = engine.prune(layer, 3)
    assert layer.mask.numpy().tolist() == [[0, 1], [1, 0], [1, 0]]
    assert result.changed == 2 and result.active == 3
    np.testing.assert_array_equal(layer.raw_kernel.numpy(), np.float32([[0, -0.5], [0.3, 0], [-0.9, 0]]))


def test_dense_layer_stays_dense_and_untouched():
    # A dense layer (first layer under "uniform") has nowhere else to grow:
    # dropping would only reset its smallest weights to zero.
    layer = rk.MaskedDense(3)
    layer.build((None, 4))
    kernel = layer.raw_kernel.numpy().copy()
    result = engine.drop_grow(layer, 3, np.ones((4, 3), "float32"))
    assert result.changed == 0 and result.active == 12
    np.testing.assert_array_equal(layer.raw_kernel.numpy(), kernel)
    np.testing.assert_array_equal(layer.mask.numpy(), 1.0)
