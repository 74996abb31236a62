"""Per-weight sparsities: hand-computed ERK cases, official integer budget, capping,
selectors, invariants for any shape."""

import math

import keras
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
    # Official budget (200 − ⌊100⌋) + (100 − ⌊50⌋) = 150 = eps * (0.15 * 200 + 0.25 * 100)
    # => eps = 150 / 55.
    result = rk.sparsity_distribution(dense_stack(20, 5), 0.5, "erk")
    eps = 150 / 55
    assert result["d0"] == pytest.approx(1 - 0.15 * eps)
    assert result["d1"] == pytest.approx(1 - 0.25 * eps)
    assert (1 - result["d0"]) * 200 + (1 - result["d1"]) * 100 == pytest.approx(150)


def test_erk_caps_layers_that_would_exceed_density_one():
    # Kernels (100, 100) scale 0.02 and (100, 2) scale 0.51; at S = 0.5 the
    # small layer would get density 8.6, so it is made dense (entering the
    # budget as −⌊0.5·200⌋) and the big one carries the rest:
    # (5000 − 100) / 10000 = 0.49 density.
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
    # Layers outside the custom map hold the official budget
    # Σ(N − ⌊S·N⌋) with the dense d2 entering as −⌊S·N⌋:
    # d1 gets (400 − 200) − 50 = 150 of its 400.
    assert result["d1"] == pytest.approx(1 - 150 / 400)
    # At S = 0.8 the dense d2 alone uses the whole budget of 100.
    with pytest.raises(ValueError, match="leaves no weights"):
        rk.sparsity_distribution(model, 0.8, "erk", custom_sparsity={"d0": 0.3}, dense_layers=["d2"])


def test_power_scale_zero_is_uniform_everywhere():
    result = rk.sparsity_distribution(dense_stack(20, 7, 3), 0.6, "erk", erk_power_scale=0.0)
    # Changed: one density for every weight, from the official integer budget
    # (200 − 120) + (140 − 84) + (21 − ⌊12.6⌋) = 145 of 361 (was exactly 0.6).
    assert result == {name: pytest.approx(1 - 145 / 361) for name in ("d0", "d1", "d2")}


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
        # Changed: the budget is the official integer one, Σ(N − ⌊S·N⌋)
        # (was (1 − S)·ΣN); capped dense weights enter as −⌊S·N⌋ and add N.
        expected = sum(n - math.floor(sparsity * n) for n in sizes)
        active = sum((1 - result[f"d{i}"]) * n for i, n in enumerate(sizes))
        assert active == pytest.approx(expected, rel=1e-9, abs=1e-6)
        # Each mask gets N − ⌊s·N⌋ >= (1 − s)·N: at most one extra per weight
        # (one also when float s·N falls just below an integer).
        exact = sum(active_count(n, result[f"d{i}"]) for i, n in enumerate(sizes))
        assert expected <= exact <= expected + len(sizes)


def test_active_count_is_n_minus_floor():
    # Changed: active_count(N, s) = N − ⌊s·N⌋ (official rule); was round half up
    # of (1 − s)·N, which gave 1 and 0 in the first two cases.
    assert active_count(10, 0.87) == 2  # 10 − ⌊8.7⌋
    assert active_count(100, 0.999) == 1  # 100 − ⌊99.9⌋
    assert active_count(100, 0.29) == 72  # float64: 0.29·100 = 28.999999999999996
    assert active_count(10, 0.75) == 3
    assert active_count(7, 0.0) == 7
    assert active_count(7, 1.0) == 0


def test_erk_capping_iterates_and_keeps_the_official_budget():
    # Kernels (50, 50), (50, 3), (3, 1): N = 2500, 150, 3; ERK scales
    # 100/2500 = 0.04, 53/150, 4/3. S = 0.5; official budget
    # (2500 − 1250) + (150 − 75) + (3 − ⌊1.5⌋) = 1327.
    # Round 1: eps = 1327 / (100 + 53 + 4) = 8.45; d2 density 11.3 > 1: dense.
    # Round 2: budget 1250 + 75 − 1 = 1324, eps = 1324 / 153 = 8.65;
    #          d1 density 3.06 > 1: dense.
    # Round 3: budget 1250 − 75 − 1 = 1174, eps = 11.74; d0 density 0.4696.
    model = dense_stack(50, 3, 1, inputs=50)
    result = rk.sparsity_distribution(model, 0.5, "erk")
    assert result == {"d0": pytest.approx(1 - 1174 / 2500), "d1": 0.0, "d2": 0.0}
    counts = {name: active_count(n, result[name]) for name, n in zip(result, (2500, 150, 3))}
    assert counts == {"d0": 1174, "d1": 150, "d2": 3}
    assert sum(counts.values()) == 1327  # the old (1 − S)·ΣN rule gave 1326.5
    sparse = rk.sparsify(model, 0.5, "erk")
    got = {w.name: int(keras.ops.convert_to_numpy(w.mask).sum()) for w in rk.masked_weights(sparse)}
    assert got == counts


def test_er_ignores_power_scale():
    # Changed: ER ignores erk_power_scale (official code); ERK uses it.
    model = dense_stack(20, 7, 3)
    er = rk.sparsity_distribution(model, 0.6, "er")
    assert rk.sparsity_distribution(model, 0.6, "er", erk_power_scale=0.3) == er
    erk = rk.sparsity_distribution(model, 0.6, "erk")
    assert rk.sparsity_distribution(model, 0.6, "erk", erk_power_scale=0.3) != erk


# ---------------------------------------------------------------------------
# Selectors in custom_sparsity and dense_layers
# ---------------------------------------------------------------------------

KERNEL = "lstm/lstm_cell/kernel"
RECURRENT = "lstm/lstm_cell/recurrent_kernel"


def lstm_model():
    inputs = keras.Input((5, 3))
    x = keras.layers.LSTM(4, name="lstm")(inputs)
    x = keras.layers.Dense(6, name="fc1")(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="fc2")(x))


def _custom(custom, **kwargs):
    return rk.sparsity_distribution(lstm_model(), 0.5, "erk", custom_sparsity=custom, **kwargs)


def test_weight_names():
    assert list(_custom(None)) == [KERNEL, RECURRENT, "fc1", "fc2"]


@pytest.mark.parametrize(
    "selector, picked",
    [
        (KERNEL, [KERNEL]),  # exact weight name
        ("lstm", [KERNEL, RECURRENT]),  # layer name: both LSTM kernels
        ("lstm_cell", [KERNEL, RECURRENT]),  # an inner layer's name
        ("fc*", ["fc1", "fc2"]),  # glob pattern over weight names
        ("*recurrent*", [RECURRENT]),
        (keras.layers.LSTM, [KERNEL, RECURRENT]),  # class
        (keras.layers.Dense, ["fc1", "fc2"]),
    ],
)
def test_selectors(selector, picked):
    result = _custom({selector: 0.25})
    assert [name for name, s in result.items() if s == 0.25] == picked
    # dense_layers takes the same selectors (checked on the plan: ERK may cap
    # other weights to dense as well).
    _, _, dense = rk.distributions.plan(lstm_model(), dense_layers=[selector])
    assert sorted(dense) == sorted(picked)


@pytest.mark.parametrize("reverse", [False, True], ids=["class-first", "weight-first"])
def test_specificity_pattern_beats_class_and_layer_beats_pattern(reverse):
    custom = {keras.layers.Dense: 0.1, "fc*": 0.2, "fc2": 0.3, keras.layers.LSTM: 0.4, "*kernel": 0.6}
    if reverse:
        custom = dict(reversed(list(custom.items())))
    result = _custom(custom)
    assert result == {KERNEL: 0.6, RECURRENT: 0.6, "fc1": 0.2, "fc2": 0.3}


@pytest.mark.parametrize(
    "order",
    ["layer-first", "weight-first"],
)
def test_weight_name_beats_layer_name(order):
    items = [("lstm", 0.4), (KERNEL, 0.7)]
    if order == "weight-first":
        items.reverse()
    result = _custom(dict(items))
    assert result[KERNEL] == 0.7 and result[RECURRENT] == 0.4


@pytest.mark.parametrize("argument", ["custom_sparsity", "dense_layers"])
@pytest.mark.parametrize("selector", ["ghost", "lstm/ghost", "nothing*", keras.layers.Conv2D])
def test_unknown_selector_raises(argument, selector):
    value = {selector: 0.5} if argument == "custom_sparsity" else [selector]
    with pytest.raises(ValueError, match=argument):
        rk.sparsity_distribution(lstm_model(), 0.5, "erk", **{argument: value})
