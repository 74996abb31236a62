"""rigl_keras.selection: exact O(n) top-k against a stable-sort reference, on the current backend."""

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keras import ops

from rigl_keras.selection import kth_largest, top_k_mask


def reference(scores: np.ndarray, k: int) -> np.ndarray:
    """True at the first k of a stable sort by (-score, index)."""
    order = np.lexsort((np.arange(scores.size), -scores))[:k]
    out = np.zeros(scores.size, bool)
    out[order] = True
    return out


if keras.backend.backend() == "jax":  # eager JAX compiles every op per shape: jit once
    import jax

    _jitted = jax.jit(top_k_mask)

    def _select(scores, k):
        return _jitted(scores, ops.convert_to_tensor(k, "int32"))

else:
    _select = top_k_mask


def run(scores, k):
    return ops.convert_to_numpy(_select(ops.convert_to_tensor(np.asarray(scores, "float32")), k))


@st.composite
def cases(draw):
    # A few fixed lengths: eager JAX compiles each op once per shape.
    n = draw(st.sampled_from([1, 2, 3, 17, 200]))
    kind = draw(st.sampled_from(["small_ints", "normal", "extremes"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "small_ints":  # many ties
        scores = rng.integers(-2, 3, size=n).astype("float32")
    elif kind == "normal":
        scores = rng.normal(size=n).astype("float32")
    else:  # values whose float bits differ only in the low or the high half
        pool = np.array(
            [0.0, -0.0, 1.0, np.nextafter(1.0, 2.0), -1.0, 3.4e38, -3.4e38, 1e-45, -1e-45],
            "float32",
        )
        scores = rng.choice(pool, size=n)
    scores[rng.random(n) < draw(st.sampled_from([0.0, 0.3, 0.9]))] = -np.inf
    k = draw(st.one_of(st.just(0), st.just(n), st.integers(0, n)))
    return scores, k


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_matches_stable_sort(case):
    scores, k = case
    got = run(scores, k)
    np.testing.assert_array_equal(got, reference(scores, k))
    if k:
        t = float(ops.convert_to_numpy(kth_largest(ops.convert_to_tensor(scores), k)))
        assert t == np.sort(scores)[::-1][k - 1]


@pytest.mark.parametrize("k", [0, 1])
def test_single_entry(k):
    np.testing.assert_array_equal(run([2.5], k), [k == 1])
    np.testing.assert_array_equal(run([-np.inf], k), [k == 1])


def test_ties_go_to_lower_index():
    scores = np.zeros(70_000, "float32")  # spans more than one 16-bit index digit
    scores[[5, 69_999]] = 1.0
    got = run(scores, 40_000)
    expected = np.zeros(70_000, bool)
    expected[[5, 69_999]] = True
    expected[np.flatnonzero(scores == 0)[: 40_000 - 2]] = True
    np.testing.assert_array_equal(got, expected)


def test_all_minus_inf_and_zeros():
    scores = np.full(1000, -np.inf, "float32")
    np.testing.assert_array_equal(run(scores, 10), np.arange(1000) < 10)
    scores = np.where(np.arange(1000) % 2 == 0, 0.0, -0.0).astype("float32")
    np.testing.assert_array_equal(run(scores, 501), np.arange(1000) < 501)


def test_tensor_k():
    scores = np.random.default_rng(0).integers(0, 3, size=500).astype("float32")
    for k in (0, 1, 250, 500):
        got = ops.convert_to_numpy(top_k_mask(ops.convert_to_tensor(scores), ops.convert_to_tensor(k, "int32")))
        np.testing.assert_array_equal(got, reference(scores, k))


def test_compiled():
    scores = np.random.default_rng(1).integers(0, 4, size=3000).astype("float32")
    x = ops.convert_to_tensor(scores)
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        fn = jax.jit(top_k_mask)
    elif backend == "tensorflow":
        import tensorflow as tf

        fn = tf.function(top_k_mask, jit_compile=True)
    else:
        pytest.skip("no compiled path tested on " + backend)
    for k in (1, 777, 2999):
        k_t = ops.convert_to_tensor(k, "int32")
        np.testing.assert_array_equal(ops.convert_to_numpy(fn(x, k_t)), reference(scores, k))


def test_validation():
    with pytest.raises(ValueError):
        top_k_mask(ops.zeros((3,)), 4)
    with pytest.raises(ValueError):
        top_k_mask(ops.zeros((3,)), -1)
    with pytest.raises(ValueError):
        top_k_mask(ops.zeros((2, 2)), 1)
    with pytest.raises(TypeError):
        top_k_mask(ops.zeros((3,)), 1.5)
    with pytest.raises(TypeError):
        top_k_mask(ops.zeros((3,), dtype="int32"), 1)
    with pytest.raises(ValueError):
        kth_largest(ops.zeros((3,)), 0)


@settings(max_examples=30, deadline=None)
@given(
    values=st.lists(st.sampled_from([-np.inf, -1.0, -0.0, 0.0, 0.5, 2.0]), min_size=1, max_size=60),
    data=st.data(),
)
def test_select_top_k_host_path_matches_reference(values, data):
    from rigl_keras.selection import select_top_k

    scores = np.array(values, dtype="float32")
    k = data.draw(st.integers(0, len(values)))
    got = keras.ops.convert_to_numpy(select_top_k(keras.ops.convert_to_tensor(scores), k))
    order = np.lexsort((np.arange(len(scores)), -scores))[:k]
    expected = np.zeros(len(scores), bool)
    expected[order] = True
    np.testing.assert_array_equal(got, expected)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(), st.sampled_from([2, 8, 1 << 16]))
def test_host_top_k_mask_matches_stable_sort_whatever_the_sample(case, sample):
    """The sampled bound only narrows the candidates: any sample size (a stride
    of 1 to 100, bounds too high so that the fallback runs) gives the same set."""
    from unittest import mock

    from rigl_keras import selection

    scores, k = case
    if not 0 < k < scores.size:
        return
    with mock.patch.object(selection, "_HOST_SAMPLE", sample):
        got = selection.host_top_k_mask(scores, k)
    np.testing.assert_array_equal(got, reference(scores, k))


def test_host_top_k_mask_is_fast_on_masked_scores():
    """Most entries equal (-inf outside a 10% mask) is the engine's usual input;
    the selection is still exact there, with the bound found in one try."""
    from rigl_keras import selection

    rng = np.random.default_rng(0)
    scores = np.full(1 << 18, -np.inf, "float32")
    active = rng.random(scores.size) < 0.1
    scores[active] = rng.random(int(active.sum()), dtype="float32")
    k = int(0.7 * active.sum())
    b, idx = selection._host_candidates(scores, k)
    assert k <= idx.size <= 1.5 * k  # candidates: about 1.25 k, not the 90% at -inf
    np.testing.assert_array_equal(selection.host_top_k_mask(scores, k), reference(scores, k))
