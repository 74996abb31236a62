"""The one connectivity-update engine every method runs on.

A method supplies scores; the engine turns them into a new mask with exact
counts and commits it: the mask is assigned, and the kernel and every
optimizer state tensor of the kernel are zeroed at every position that is not
a surviving connection. Nothing outside the mask is ever non-zero, and
connections that stay active keep their weight and optimizer state.

All tensor work uses `keras.ops`, so it runs on the device of any backend.
"""

from __future__ import annotations

import dataclasses
import warnings

import keras
from keras import ops

__all__ = [
    "UpdateResult",
    "drop_grow_masks",
    "prune_mask",
    "commit",
    "drop_grow",
    "prune",
    "active_connections",
    "scores_are_finite",
    "optimizer_state_for",
]


@dataclasses.dataclass(frozen=True)
class UpdateResult:
    """What one layer update did.

    Attributes:
      layer: the layer's name.
      active: active connections after the update (unchanged by drop/grow).
      changed: connections that were replaced (grown at a position that was
        not active before); 0 for a skipped update.
      skipped: True if the update was skipped because scores were not finite.
    """

    layer: str
    active: int
    changed: int
    skipped: bool = False


def _flat(x):
    return ops.reshape(x, (-1,))


def _indicator(indices, size):
    """A bool vector of `size` that is True at `indices`."""
    if int(indices.shape[0]) == 0:
        return ops.zeros((size,), dtype="bool")
    ones = ops.ones((int(indices.shape[0]),), dtype="int32")
    hits = ops.scatter(ops.expand_dims(indices, -1), ones, (size,))
    return ops.greater(hits, 0)


def _top(scores, k):
    """Indices of the k largest scores; ties go to the lower index."""
    # tf.math.top_k and jax.lax.top_k both return equal values in index order.
    return ops.top_k(scores, k, sorted=True)[1]


def drop_grow_masks(mask, drop_score, grow_score, n_drop: int, n_grow: int | None = None):
    """The RigL/SET/SNFS mask update on one kernel (paper §3(3)–(4)).

    Keeps the `n_active − n_drop` active positions with the largest
    `drop_score`, then activates the `n_grow` positions with the largest
    `grow_score` among all positions not kept (just-dropped ones included).

    Args:
      mask: 0/1 tensor of the kernel's shape.
      drop_score: tensor of the kernel's shape (|w| for every method here).
      grow_score: tensor of the kernel's shape.
      n_drop: connections to drop, 0 <= n_drop <= active count.
      n_grow: connections to grow; defaults to `n_drop`, which keeps the
        count exact. At most the number of positions not kept.

    Returns:
      (new_mask, keep): bool tensors of the kernel's shape. `keep` marks the
      surviving connections; `new_mask` is `keep` plus the grown ones.

    Raises:
      ValueError: if a count is out of range.
    """
    n_grow = n_drop if n_grow is None else n_grow
    shape = tuple(mask.shape)
    size = int(ops.size(mask))
    active = ops.not_equal(_flat(mask), 0)
    n_active = int(ops.sum(ops.cast(active, "int32")))
    if not 0 <= n_drop <= n_active:
        raise ValueError(f"n_drop must be in [0, {n_active}]; got {n_drop}.")
    if not 0 <= n_grow <= size - (n_active - n_drop):
        raise ValueError(
            f"n_grow must be in [0, {size - (n_active - n_drop)}]; got {n_grow}."
        )
    neg_inf = float("-inf")
    drop_score = ops.where(active, ops.cast(_flat(drop_score), "float32"), neg_inf)
    keep = _indicator(_top(drop_score, n_active - n_drop), size)
    grow_score = ops.where(keep, neg_inf, ops.cast(_flat(grow_score), "float32"))
    grown = _indicator(_top(grow_score, n_grow), size)
    new_mask = ops.logical_or(keep, grown)
    return ops.reshape(new_mask, shape), ops.reshape(keep, shape)


def prune_mask(mask, score, n_keep: int):
    """Keeps the `n_keep` active positions with the largest `score`.

    Args:
      mask: 0/1 tensor of the kernel's shape.
      score: tensor of the kernel's shape (|w| for magnitude pruning).
      n_keep: connections to keep, 0 <= n_keep <= active count.

    Returns:
      The new mask as a bool tensor; it is a subset of `mask`.
    """
    active = ops.not_equal(_flat(mask), 0)
    n_active = int(ops.sum(ops.cast(active, "int32")))
    if not 0 <= n_keep <= n_active:
        raise ValueError(f"n_keep must be in [0, {n_active}]; got {n_keep}.")
    score = ops.where(active, ops.cast(_flat(score), "float32"), float("-inf"))
    keep = _indicator(_top(score, n_keep), int(ops.size(mask)))
    return ops.reshape(keep, tuple(mask.shape))


def _slot_owner(optimizer_variable, prefixes: dict[str, object]):
    """The model variable an optimizer slot was created from, or None.

    Keras 3 names a slot `<variable path with '/' -> '_'>_<slot name>`; the
    longest matching prefix wins so that `dense/kernel` does not claim the
    slots of `dense/kernel_x`.
    """
    name = optimizer_variable.name
    best = None
    for prefix, variable in prefixes.items():
        if name.startswith(prefix) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, variable)
    return None if best is None else best[1]


def optimizer_state_for(optimizer, variable, model_variables=None) -> list:
    """Every optimizer state tensor of `variable` (momentum, Adam m and v, EMA, …).

    Works for any Keras 3 optimizer (and a LossScaleOptimizer around one):
    states are matched to their model variable by the name Keras gives them
    and by shape.

    Args:
      optimizer: a Keras optimizer, or None.
      variable: the model variable (e.g. a layer's raw kernel).
      model_variables: all trainable variables of the model, to disambiguate
        names; defaults to [variable].

    Returns:
      The matching optimizer variables (empty before the optimizer is built).
    """
    if optimizer is None:
        return []
    candidates = list(model_variables or [variable])
    if not any(v is variable for v in candidates):
        candidates.append(variable)
    prefixes = {v.path.replace("/", "_") + "_": v for v in candidates}
    shape = tuple(variable.shape)
    return [
        slot
        for slot in optimizer.variables
        if tuple(slot.shape) == shape and _slot_owner(slot, prefixes) is variable
    ]


def commit(layer, new_mask, keep, slots=()) -> None:
    """Assigns `new_mask` to `layer` and zeroes weights and `slots` outside `keep`.

    Args:
      layer: a masked layer.
      new_mask: bool tensor, the layer's next mask.
      keep: bool tensor, the connections whose weight and optimizer state
        survive; everything else (dropped and newly grown positions) is 0.
      slots: the optimizer state variables of the layer's kernel.
    """
    kernel = layer.raw_kernel
    layer.mask.assign(ops.cast(new_mask, layer.mask.dtype))
    kernel.assign(ops.where(keep, kernel, ops.zeros_like(kernel)))
    for slot in slots:
        slot.assign(ops.where(keep, slot, ops.zeros_like(slot)))


def _all_finite(*tensors) -> bool:
    return all(bool(ops.all(ops.isfinite(ops.cast(t, "float32")))) for t in tensors)


def active_connections(layer) -> int:
    """The number of ones in `layer`'s mask."""
    return int(ops.sum(ops.cast(ops.not_equal(layer.mask, 0), "int32")))


def scores_are_finite(layer, grow_score, drop_score=None) -> bool:
    """False (with a warning) if a grow score or an active weight is not finite."""
    if drop_score is None:
        drop_score = ops.where(ops.not_equal(layer.mask, 0), layer.raw_kernel, 0)
    if _all_finite(drop_score, grow_score):
        return True
    warnings.warn(
        f"rigl_keras: non-finite weights or growth scores in layer "
        f"{layer.name!r}; its connectivity update is skipped.",
        RuntimeWarning,
        stacklevel=3,
    )
    return False


def drop_grow(layer, n_drop: int, grow_score, slots=(), *, n_grow: int | None = None,
              drop_score=None) -> UpdateResult:
    """Drops `n_drop` connections of `layer` and grows `n_grow` (default: as many).

    Drops the active connections of smallest |w| (or smallest `drop_score`)
    and grows where `grow_score` is largest; grown weights and the optimizer
    state of dropped and grown positions are zeroed. If a score or an active
    weight is not finite, the layer is left unchanged and a warning issued.

    Args:
      layer: a masked layer.
      n_drop: connections to drop (see `drop_grow_masks`).
      grow_score: tensor of the kernel's shape.
      slots: the optimizer state variables of the layer's kernel.
      n_grow: connections to grow; defaults to `n_drop`.
      drop_score: defaults to |kernel|.

    Returns:
      An `UpdateResult`.
    """
    mask = layer.mask
    n_active = active_connections(layer)
    if n_active == int(ops.size(mask)) and (n_grow is None or n_grow == n_drop):
        # A dense layer (the first one under "uniform", or one capped by
        # ERK) has nowhere else to grow: it stays dense and untouched.
        return UpdateResult(layer.name, n_active, 0)
    if drop_score is None:
        drop_score = ops.abs(ops.where(ops.not_equal(mask, 0), layer.raw_kernel, 0))
    if not scores_are_finite(layer, grow_score, drop_score):
        return UpdateResult(layer.name, n_active, 0, skipped=True)
    n_grow = n_drop if n_grow is None else n_grow
    if n_drop == 0 and n_grow == 0:
        return UpdateResult(layer.name, n_active, 0)
    new_mask, keep = drop_grow_masks(mask, drop_score, grow_score, n_drop, n_grow)
    changed = int(
        ops.sum(ops.cast(ops.logical_and(new_mask, ops.equal(mask, 0)), "int32"))
    )
    commit(layer, new_mask, keep, slots)
    return UpdateResult(layer.name, n_active - n_drop + n_grow, changed)


def prune(layer, n_keep: int, slots=(), score=None) -> UpdateResult:
    """Shrinks `layer`'s mask to its `n_keep` largest-|w| connections.

    Args:
      layer: a masked layer.
      n_keep: connections to keep (<= the current count).
      slots: the optimizer state variables of the layer's kernel.
      score: defaults to |kernel|.

    Returns:
      An `UpdateResult` whose `changed` counts removed connections.
    """
    mask = layer.mask
    n_active = active_connections(layer)
    if score is None:
        score = ops.abs(layer.raw_kernel)
    if not _all_finite(ops.where(ops.not_equal(mask, 0), score, 0)):
        warnings.warn(
            f"rigl_keras: non-finite weights in layer {layer.name!r}; its "
            "pruning step is skipped.",
            RuntimeWarning,
            stacklevel=2,
        )
        return UpdateResult(layer.name, n_active, 0, skipped=True)
    n_keep = min(n_keep, n_active)
    if n_keep == n_active:
        return UpdateResult(layer.name, n_active, 0)
    keep = prune_mask(mask, score, n_keep)
    commit(layer, keep, keep, slots)
    return UpdateResult(layer.name, n_keep, n_active - n_keep)
