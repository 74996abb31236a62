"""Per-layer sparsities: hand-computed ERK cases, capping, invariants for any shape."""

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rigl_keras as rk
from rigl_keras.distributions import active_count


def dense_stack(*widths, inputs=10):
    layers = [keras.Input((inputs,))]
    layers += [keras.layers.Dense(w, name=f"d{i}") for i, w in enumerate(widths)]
    return keras.Sequential(layers)


def test_uniform_keeps_first_layer_dense():
    model = dense_stack(20, 5, 3)
    assert rk.sparsity_distribution(model, 0.9, "uniform") == {"d0": 0.0, "d1": 0.9, "d2": 0.9}


def test_erk_hand_computed():
    # Kernels (10, 20) and (20, 5): scales 30/200 = 0.15 and 25/100 = 0.25.
    # Budget 0.5 * 300 = 150 = eps * (0.15 * 200 + 0.25 * 100) => eps = 150 / 55.
    result = rk.sparsity_distribution(dense_stack(20, 5), 0.5, "erk")
    eps = 150 / 55
    assert result["d0"] == pytest.approx(1 - 0.15 * eps)
    assert result["d1"] == pytest.approx(1 - 0.25 * eps)
    assert (1 - result["d0"]) * 200 + (1 - result["d1"]) * 100 == pytest.approx(150)


def test_erk_caps_layers_that_would_exceed_density_one():
    # Kernels (100, 100) scale 0.02 and (100, 2) scale 0.51; at S = 0.5 the
    # small layer would get density 8.6, so it is made dense and the big one
    # carries the rest: (5100 - 200) / 10000 = 0.49 density.
    result = rk.sparsity_distribution(dense_stack(100, 2, inputs=100), 0.5, "erk")
    assert result == {"d0": pytest.approx(0.51), "d1": 0.0}


def test_er_uses_only_channel_dimensions_for_convolutions():
    inputs = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(8, 5, name="big")(inputs)
    x = keras.layers.Conv2D(8, 1, name="small")(x)
    model = keras.Model(inputs, x)
    # At S = 0.95 no layer is capped (at 0.8 ERK would make `small` dense).
    er = rk.sparsity_distribution(model, 0.95, "er")
    erk = rk.sparsity_distribution(model, 0.95, "erk")
    # ER: scales (4+8)/32 and (8+8)/64 ignore the 5x5 kernel; ERK adds it.
    ratio_er = (1 - er["big"]) / (1 - er["small"])
    assert ratio_er == pytest.approx((12 / 32) / (16 / 64))
    ratio_erk = (1 - erk["big"]) / (1 - erk["small"])
    assert ratio_erk == pytest.approx((22 / 800) / (18 / 64))


def test_custom_and_dense_layers():
    model = dense_stack(20, 20, 5)
    result = rk.sparsity_distribution(model, 0.5, "erk", custom_sparsity={"d0": 0.3}, dense_layers=["d2"])
    assert result["d0"] == 0.3 and result["d2"] == 0.0
    # Layers outside the custom map hold exactly (1 - S) of their weights:
    # d1 gets 250 - 100 (the dense d2) = 150 of its 400.
    assert result["d1"] == pytest.approx(1 - 150 / 400)
    # At S = 0.8 the dense d2 alone uses the whole budget of 100.
    with pytest.raises(ValueError, match="leaves no weights"):
        rk.sparsity_distribution(model, 0.8, "erk", custom_sparsity={"d0": 0.3}, dense_layers=["d2"])


def test_power_scale_zero_is_uniform_everywhere():
    result = rk.sparsity_distribution(dense_stack(20, 7, 3), 0.6, "erk", erk_power_scale=0.0)
    assert all(v == pytest.approx(0.6) for v in result.values())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sparsity=1.0), "sparsity"),
        (dict(sparsity=-0.1), "sparsity"),
        (dict(sparsity=True), "sparsity"),
        (dict(sparsity="0.5"), "sparsity"),
        (dict(distribution="gaussian"), "distribution"),
        (dict(custom_sparsity={"nope": 0.5}), "custom_sparsity"),
        (dict(custom_sparsity={"d0": 1.5}), "custom_sparsity"),
        (dict(dense_layers=["nope"]), "dense_layers"),
        (dict(erk_power_scale=-1), "erk_power_scale"),
    ],
)
def test_bad_input(kwargs, match):
    args = dict(sparsity=0.5, distribution="erk") | kwargs
    with pytest.raises(ValueError, match=match):
        rk.sparsity_distribution(dense_stack(4, 3), **args)


def test_model_without_maskable_layer():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Activation("relu")])
    with pytest.raises(ValueError, match="no maskable layer"):
        rk.sparsity_distribution(model, 0.5)


@settings(max_examples=40, deadline=None)
@given(
    widths=st.lists(st.integers(1, 64), min_size=1, max_size=5),
    inputs=st.integers(1, 64),
    sparsity=st.floats(0.0, 0.99),
    distribution=st.sampled_from(["uniform", "er", "erk"]),
)
def test_any_shape_gives_valid_sparsities_and_exact_budget(widths, inputs, sparsity, distribution):
    model = dense_stack(*widths, inputs=inputs)
    result = rk.sparsity_distribution(model, sparsity, distribution)
    assert list(result) == [f"d{i}" for i in range(len(widths))]
    assert all(0.0 <= s <= 1.0 for s in result.values())
    sizes = [l.kernel.shape[0] * l.kernel.shape[1] for l in model.layers]
    if distribution != "uniform":
        expected = (1 - sparsity) * sum(sizes)
        active = sum((1 - result[f"d{i}"]) * n for i, n in enumerate(sizes))
        assert active == pytest.approx(expected, rel=1e-6, abs=1e-6)
        exact = sum(active_count(n, result[f"d{i}"]) for i, n in enumerate(sizes))
        assert abs(exact - expected) <= len(sizes) / 2 + 1e-6


def test_active_count_rounds_half_up():
    assert active_count(10, 0.75) == 3  # 2.5 -> 3
    assert active_count(100, 0.9) == 10
    assert active_count(7, 0.0) == 7
