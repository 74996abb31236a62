"""Exact O(n) top-k selection for mask updates on large kernels.

A RigL update picks the k largest of N scores (16.7M for a 4096x4096 Dense).
A sorted `ops.top_k` does that in O(N log N) and, on CPU, takes seconds
(TensorFlow's unsorted top_k is hardly faster and JAX's is always sorted).
`top_k_mask` instead finds the k-th largest value t in O(N), then returns
`scores > t` plus the lowest-index entries equal to t that are still needed:
the same set as a stable sort by (-score, index) cut after k entries.

All comparisons are on int32 keys made from the float bits, whose integer
order is the float order (-0.0 mapped onto +0.0), so the result is bit-exact
even where a backend flushes subnormals to zero in float compares (TF and
XLA on CPU do). How t is found:
  * TensorFlow and JAX: a two-pass radix select on the keys: a histogram of
    the high 16 bits picks the high half of t, a histogram of the low 16 bits
    (of the entries in that bucket) the rest.
  * torch: `torch.kthvalue` (quickselect) on the float scores, and float
    compares (eager torch pays for each n-sized temporary; it does not flush
    subnormals unless `torch.set_flush_denormal(True)` was called).
Ties at t, when more of them exist than are needed, are resolved by a second
radix select on the entries' indices (a cumulative sum would also do, but
measured 2-3x slower than two histogram passes on CPU for XLA and TF).

That is the accelerator path. Weights in host memory (every weight when
training on CPU, on any backend) and small weights are selected in NumPy
instead (`host_top_k_indices`): a strided sample bounds the k-th largest
value, and np.partition runs only on the ~1.25·k candidates above the bound,
so many equal scores (-inf outside a mask, zero gradients) cost nothing.

All of this is `keras.ops` except the small helpers `_histogram`,
`_torch_kth_largest` and `_is_traced`, which are the only backend-specific
code. Run under `jax.jit` or `tf.function(jit_compile=True)` for speed; it is
also correct eagerly, and on the numpy backend.
"""

from __future__ import annotations

import numbers

import keras
import numpy as np
from keras import ops

__all__ = ["top_k_mask", "kth_largest", "select_top_k", "host_top_k_mask", "host_top_k_indices",
           "HOST_BELOW"]

_DIGIT_BITS = 16
_BINS = 1 << _DIGIT_BITS
_SIGN = np.int32(-(2**31))  # 0x80000000 as int32
_LOW31 = np.int32(2**31 - 1)  # 0x7FFFFFFF
_MAX_SIZE = 2**31 - 1  # counts and indices are int32


# --------------------------------------------------------------------------
# Backend-specific helpers (the only ones).


def _histogram(digits):
    """int32 counts of each value of `digits` (int32 in [0, _BINS)), length _BINS."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax.numpy as jnp

        # ops.bincount has no static length on JAX, so it cannot be jitted.
        return jnp.bincount(digits, length=_BINS).astype("int32")
    if backend == "tensorflow":
        import tensorflow as tf

        # tf.math.bincount derives its size from max(x), which XLA rejects.
        return tf.raw_ops.DenseBincount(
            input=digits, size=_BINS, weights=tf.zeros([0], tf.int32)
        )
    return ops.cast(ops.bincount(digits, minlength=_BINS), "int32")


def _torch_kth_largest(values, k):
    """k-th largest of a 1-D torch tensor by quickselect (O(n), CPU and CUDA)."""
    import torch

    n = int(values.shape[0])
    return torch.kthvalue(values, n - k + 1).values


def _is_traced(x) -> bool:
    """True when `x` is symbolic (jax.jit, tf.function), where Python `if` cannot branch."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return isinstance(x, jax.core.Tracer)
    if backend == "tensorflow":
        import tensorflow as tf

        return not tf.executing_eagerly()
    return False


# --------------------------------------------------------------------------
# Radix select on int32 keys ordered as unsigned 32-bit integers.


def _pick_digit(hist, k):
    """The largest digit d with count(digit >= d) >= k, and count(digit > d)."""
    at_or_above = ops.cumsum(ops.flip(hist))  # [i] = count(digit >= _BINS-1-i)
    d = (_BINS - 1) - ops.sum(ops.cast(ops.less(at_or_above, k), "int32"))
    d = ops.cast(d, "int32")
    bins = ops.arange(_BINS, dtype="int32")
    above = ops.sum(ops.where(ops.greater(bins, d), hist, ops.zeros_like(hist)))
    return d, ops.cast(above, "int32")


def _kth_largest_key(keys, k):
    """The k-th largest (1 <= k <= n) of int32 `keys` read as unsigned 32-bit."""
    n = int(keys.shape[0])
    high = ops.bitwise_and(ops.right_shift(keys, _DIGIT_BITS), _BINS - 1)
    high_hist = _histogram(high)
    d_high, above = _pick_digit(high_hist, k)
    # Second pass: low digits of the entries in bucket d_high; every other
    # entry is counted in bin 0 and subtracted again from it.
    in_bucket = ops.equal(high, d_high)
    low = ops.where(in_bucket, ops.bitwise_and(keys, _BINS - 1), ops.zeros_like(keys))
    low_hist = _histogram(low)
    outside = n - ops.cast(ops.take(high_hist, d_high), "int32")
    first = ops.equal(ops.arange(_BINS, dtype="int32"), 0)
    low_hist = low_hist - ops.where(first, outside, ops.zeros_like(low_hist))
    d_low, _ = _pick_digit(low_hist, k - above)
    return ops.bitwise_or(ops.left_shift(d_high, _DIGIT_BITS), d_low)


def _sortable(x):
    """int32 whose signed order is the float order of float32 `x`, bit-exact.

    -0.0 maps to the same value as +0.0; subnormals stay distinct from 0 even
    on backends that flush them to zero in float comparisons (TF, XLA on CPU).
    """
    bits = ops.view(x, "int32")
    bits = ops.where(ops.equal(bits, _SIGN), ops.zeros_like(bits), bits)
    return ops.where(ops.less(bits, 0), ops.bitwise_xor(bits, _LOW31), bits)


def _from_sortable(s):
    """float32 scalar of a scalar `_sortable` value."""
    bits = ops.where(ops.less(s, 0), ops.bitwise_xor(s, _LOW31), s)
    return ops.reshape(ops.view(ops.reshape(bits, (1,)), "float32"), ())


def _kth_largest_sortable(scores, k):
    """(t, s): s is what to compare (`_sortable(scores)`, or on torch the
    float scores themselves) and t the k-th largest of s."""
    if keras.backend.backend() == "torch":
        # Eager torch pays for every n-sized temporary, and does not flush
        # subnormals unless told to (torch.set_flush_denormal): compare floats.
        return _torch_kth_largest(scores, int(k)), scores
    s = _sortable(scores)
    # Unsigned order of s ^ 0x80000000 is the signed order of s.
    key = _kth_largest_key(ops.bitwise_xor(s, _SIGN), k)
    return ops.bitwise_xor(key, _SIGN), s


# --------------------------------------------------------------------------
# Public API.


def _checked(scores, k):
    scores = ops.convert_to_tensor(scores)
    if len(scores.shape) != 1 or scores.shape[0] is None:
        raise ValueError(f"scores must be 1-D with a static length; got shape {scores.shape}.")
    dtype = keras.backend.standardize_dtype(scores.dtype)
    if dtype not in ("float32", "float16", "bfloat16"):
        raise TypeError(f"scores must be float32 (or float16/bfloat16); got {dtype}.")
    scores = ops.cast(scores, "float32")  # exact for the narrower floats
    n = int(scores.shape[0])
    if n > _MAX_SIZE:
        raise ValueError(f"scores may have at most {_MAX_SIZE} entries; got {n}.")
    if isinstance(k, bool):
        raise TypeError("k must be an int; got bool.")
    if isinstance(k, numbers.Integral):
        k = int(k)
        if not 0 <= k <= n:
            raise ValueError(f"k must be in [0, {n}]; got {k}.")
        return scores, k, n
    if not ops.is_tensor(k) or "int" not in keras.backend.standardize_dtype(k.dtype) or len(k.shape):
        raise TypeError(f"k must be an int or a scalar int tensor; got {k!r}.")
    return scores, ops.cast(k, "int32"), n


def kth_largest(scores, k: int):
    """The k-th largest value of `scores`, in O(n).

    Args:
      scores: 1-D float32 tensor (float16/bfloat16 are upcast exactly) of
        static length n, finite or -inf; NaN is not supported (its result is
        unspecified).
      k: Python int (or scalar int tensor, unchecked), 1 <= k <= n.

    Returns:
      A float32 scalar tensor t: the value at position k of `scores` sorted
      in decreasing order (counting from 1), so count(scores > t) < k <=
      count(scores >= t). -0.0 and +0.0 count as equal.

    Raises:
      ValueError: if `scores` is not 1-D with a static length, has more than
        2**31 - 1 entries, or k is outside [1, n].
      TypeError: if `scores` is not a float tensor of at most 32 bits or k is
        neither an int nor a scalar int tensor.
    """
    scores, k, n = _checked(scores, k)
    if isinstance(k, int) and k == 0:
        raise ValueError(f"k must be in [1, {n}]; got 0.")
    if keras.backend.backend() == "torch":
        return _kth_largest_sortable(scores, k)[0]
    return _from_sortable(_kth_largest_sortable(scores, k)[0])


def top_k_mask(scores, k: int):
    """A bool mask of the k largest scores, ties going to the lower index, in O(n).

    The result is exactly that of a stable sort by (-score, index) taking the
    first k: every score above the k-th largest value t, then the entries
    equal to t in increasing index order until there are k. -inf is just the
    smallest value (picked only when fewer than k entries are larger), and
    -0.0 equals +0.0. Works eagerly and under `jax.jit` or `tf.function`
    (with or without `jit_compile=True`); compiled is much faster on
    TensorFlow and JAX.

    Args:
      scores: 1-D float32 tensor (float16/bfloat16 are upcast exactly) of
        static length n; entries finite or -inf. NaN is not supported: with
        a NaN present the result is unspecified.
      k: Python int, 0 <= k <= n. k == 0 gives all False, k == n all True.
        May also be a scalar int tensor (its range is then not checked), so
        that a compiled caller does not retrace for every new k.

    Returns:
      A bool tensor of shape (n,) with exactly k True entries.

    Raises:
      ValueError: if `scores` is not 1-D with a static length, has more than
        2**31 - 1 entries, or k is outside [0, n].
      TypeError: if `scores` is not a float tensor of at most 32 bits or k is
        neither an int nor a scalar int tensor.
    """
    scores, k, n = _checked(scores, k)
    if isinstance(k, int):
        if k == 0:
            return ops.zeros((n,), dtype="bool")
        if k == n:
            return ops.ones((n,), dtype="bool")
    elif n == 0:
        return ops.zeros((0,), dtype="bool")
    else:  # a tensor k: the k == 0 case is masked out at the end
        return ops.logical_and(_top_k_mask(scores, ops.maximum(k, 1), n), ops.greater(k, 0))
    return _top_k_mask(scores, k, n)


def _top_k_mask(scores, k, n):
    t, s = _kth_largest_sortable(scores, k)
    at_least = ops.greater_equal(s, t)
    # Usually no surplus ties at t: one compare and one count decide it.
    exact = ops.equal(ops.sum(ops.cast(at_least, "int32")), k)

    def first_ties():
        # Entries above t, then the `need` lowest indices among those equal
        # to t: the `need` largest values of n - index.
        above = ops.greater(s, t)
        at = ops.logical_and(at_least, ops.logical_not(above))
        need = k - ops.cast(ops.sum(ops.cast(above, "int32")), "int32")  # >= 1
        reverse_index = n - ops.arange(n, dtype="int32")  # in [1, n]
        keys = ops.where(at, reverse_index, ops.zeros_like(reverse_index))
        cut = _kth_largest_key(keys, need)
        return ops.logical_or(above, ops.logical_and(at, ops.greater_equal(reverse_index, cut)))

    if _is_traced(exact):
        return ops.cond(exact, lambda: at_least, first_ties)
    return at_least if bool(ops.convert_to_numpy(exact)) else first_ties()


_COMPILED: dict = {}
#: Below this size a host-side selection beats any device kernel launch
#: sequence or compile: most layers of most models are this small.
HOST_BELOW = 1 << 20


#: Scores sampled to bound the k-th largest value on the host.
_HOST_SAMPLE = 1 << 16


def _host_candidates(s: np.ndarray, k: int, exclude=None):
    """(b, idx): at least k eligible scores are >= b, and idx are their indices (ascending).

    b comes from a strided sample so that about 1.25·k + a few scores reach
    it; if too few do, the sample bound is lowered, and at worst every
    eligible index is a candidate. Any such b gives the exact top k.
    """
    n = s.shape[0]
    stride = max(1, n // _HOST_SAMPLE)
    sample = s[::stride]
    strided = sample.shape[0]
    if exclude is not None:
        sample = sample[~exclude[::stride]]
    sample = np.sort(sample)
    m = sample.shape[0]
    rank = int(np.ceil(k * strided / n * 1.25)) + 8
    while rank < m:
        b = sample[m - rank]
        idx = np.flatnonzero(s >= b)
        if exclude is not None:
            idx = idx[~exclude[idx]]
        if idx.shape[0] >= k:
            return b, idx
        rank *= 4
    idx = np.arange(n) if exclude is None else np.flatnonzero(~exclude)
    return (np.min(s[idx]) if idx.shape[0] else np.float32(0)), idx


def host_top_k_indices(scores: np.ndarray, k: int, exclude=None) -> np.ndarray:
    """Ascending flat indices of the k largest of 1-D float32 NumPy `scores`, ties to the lower index.

    O(n) whatever the ties: the exact selection (np.partition) runs only on
    the candidates above a sampled bound (`_host_candidates`). np.partition
    over all n entries slows down 10-20x when most of them are equal (-inf
    outside a mask, zero gradients), the common case in mask updates.

    Args:
      scores: 1-D float32 array (finite or -inf).
      k: 0 <= k <= number of eligible entries.
      exclude: optional bool array of the same length; True entries are
        never picked (as if their score were below every other).

    Returns:
      An int array of k indices.
    """
    n = scores.shape[0]
    if k <= 0:
        return np.zeros((0,), dtype=np.intp)
    if exclude is None and k >= n:
        return np.arange(n)
    b, idx = _host_candidates(scores, k, exclude)
    values = scores[idx]
    above = values[values > b]
    if above.shape[0] < k:
        threshold = b  # fewer than k exceed b, at least k reach it
    else:
        threshold = np.partition(above, above.shape[0] - k)[above.shape[0] - k]
    chosen = values > threshold
    need = k - int(np.count_nonzero(chosen))
    if need:
        chosen[np.flatnonzero(values == threshold)[:need]] = True
    return idx[chosen]


def host_top_k_mask(scores, k: int) -> np.ndarray:
    """`top_k_mask` in NumPy (0 <= k <= n): the same set, ties to the lower index.

    See `host_top_k_indices` for how it stays O(n) with many ties.
    """
    s = np.asarray(scores if isinstance(scores, np.ndarray)
                   else keras.ops.convert_to_numpy(scores), dtype=np.float32).reshape(-1)
    mask = np.zeros(s.shape[0], dtype=bool)
    mask[host_top_k_indices(s, k)] = True
    return mask


def select_top_k(scores, k: int):
    """`top_k_mask` run the fastest way for its size and the backend.

    Below 2^20 entries: on the host with NumPy (`host_top_k_indices`).
    Above: JAX `jax.jit` and TensorFlow XLA, compiled once per weight shape
    (`k` is passed as a tensor, so a new k does not recompile); PyTorch eager.

    Args:
      scores: float 1-D tensor.
      k: int in [0, n].

    Returns:
      The bool mask of `top_k_mask`.
    """
    backend = keras.backend.backend()
    n = int(scores.shape[0])
    if 0 < k < n and n < HOST_BELOW:
        return ops.convert_to_tensor(host_top_k_mask(scores, k))
    if k <= 0 or k >= n or backend not in ("jax", "tensorflow"):
        return top_k_mask(scores, k)
    function = _COMPILED.get(backend)
    if function is None:
        if backend == "jax":
            import jax

            function = jax.jit(top_k_mask)
        else:
            import tensorflow as tf

            function = tf.function(top_k_mask, jit_compile=True)
        _COMPILED[backend] = function
    return function(ops.convert_to_tensor(scores), ops.convert_to_tensor(k, "int32"))
