"""Exact top-k selection (placeholder until the O(n) version lands)."""

from keras import ops


def top_k_mask(scores, k: int):
    """True at the k largest of 1-D `scores`; ties go to the lower index."""
    n = int(scores.shape[0])
    if k <= 0:
        return ops.zeros((n,), dtype="bool")
    if k >= n:
        return ops.ones((n,), dtype="bool")
    values, _ = ops.top_k(scores, k, sorted=False)
    t = ops.min(values)
    above = ops.greater(scores, t)
    ties = ops.equal(scores, t)
    room = k - ops.sum(ops.cast(above, "int32"))
    return ops.logical_or(above, ops.logical_and(ties, ops.less_equal(ops.cumsum(ops.cast(ties, "int32")), room)))
