"""The one connectivity-update engine every method runs on.

A method supplies scores; the engine turns them into a new mask with exact
counts and commits it, per masked weight (`rigl_keras.layers.MaskedWeight`):
the mask is assigned, and the weight and every optimizer state tensor of the
weight are reset at every position that is not an active connection that
stays active. Weights are reset to 0 and optimizer state to the value the
optimizer initialises it with (0 for momentum and Adam moments, Adagrad's
`initial_accumulator_value`, ...). As in the official code, a connection that
was active, is dropped and is grown back in the same update is not new: it
keeps its weight and state.

All tensor work uses `keras.ops`, so it runs on the device of any backend.
"""

from __future__ import annotations

import dataclasses
import warnings

import keras
import numpy as np
from keras import ops

from rigl_keras import backend as backend_lib
from rigl_keras.selection import HOST_BELOW, host_top_k_indices, host_top_k_mask, select_top_k

__all__ = [
    "UpdateResult",
    "drop_grow_masks",
    "prune_mask",
    "commit",
    "drop_grow",
    "prune",
    "active_connections",
    "scores_are_finite",
    "score_problem",
    "optimizer_state_for",
    "optimizer_state_by_variable",
    "slot_initial_value",
    "OptimizerTraits",
    "optimizer_traits",
    "mixes_positions",
    "is_derived_slot",
    "project",
]


@dataclasses.dataclass(frozen=True)
class UpdateResult:
    """What one update did to one masked weight.

    Attributes:
      weight: the weight's name.
      active: active connections after the update.
      changed: connections grown at positions that were inactive before the
        update (for pruning: connections removed); 0 for a skipped update.
      skipped: True if the update was skipped (non-finite or constant scores).
      reason: why it was skipped: "non-finite" or "constant", else None.
    """

    weight: str
    active: int
    changed: int
    skipped: bool = False
    reason: str | None = None


class _HostOps:
    """NumPy stand-ins for the `keras.ops` the engine uses.

    Weights in host memory (every weight when training on CPU) and weights
    below `selection.HOST_BELOW` entries (most layers of most models) are
    updated with NumPy: on CPU it reads them without a copy and beats eager
    backend ops (np.partition selects 10x faster than torch.kthvalue), and
    on an accelerator a few transfers beat hundreds of small device ops (or,
    on JAX, their compiles).
    """

    not_equal, logical_not = staticmethod(np.not_equal), staticmethod(np.logical_not)
    logical_or, logical_and = staticmethod(np.logical_or), staticmethod(np.logical_and)
    abs, isfinite, all = staticmethod(np.abs), staticmethod(np.isfinite), staticmethod(np.all)
    max, min, sum = staticmethod(np.max), staticmethod(np.min), staticmethod(np.sum)
    reshape, where = staticmethod(np.reshape), staticmethod(np.where)
    zeros_like, count_nonzero = staticmethod(np.zeros_like), staticmethod(np.count_nonzero)

    @staticmethod
    def cast(x, dtype):
        return np.asarray(x).astype(dtype, copy=False)

    @staticmethod
    def top_k(scores, k):
        n = scores.shape[0]
        if k <= 0 or k >= n:
            return np.full((n,), k > 0)
        return host_top_k_mask(scores, k)


class _DeviceOps:
    """`keras.ops`, plus the engine's selection."""

    def __getattr__(self, name):
        return getattr(ops, name)

    @staticmethod
    def top_k(scores, k):
        return select_top_k(scores, k)


_HOST, _DEVICE = _HostOps(), _DeviceOps()


def _ops_for(x):
    """The ops for tensor or variable `x`: NumPy on the host (see `_HostOps`) or `keras.ops`."""
    size = int(np.prod(x.shape))
    return _HOST if size < HOST_BELOW or backend_lib.on_cpu(x) else _DEVICE


def _count(xp, mask) -> int:
    """Non-zero entries of `mask`."""
    return int(xp.count_nonzero(mask))


def _on(xp, x):
    """`x` (tensor, variable or array) as an array of `xp`'s kind."""
    if xp is _HOST:
        return backend_lib.to_host(x)  # may be a view: read it before assigning to x
    return ops.stop_gradient(x.value) if isinstance(x, keras.Variable) else x


def drop_grow_masks(mask, drop_score, grow_score, n_drop: int, n_grow: int | None = None):
    """The RigL/SET/SNFS mask update on one weight (paper §3(3)–(4)).

    Keeps the `n_active − n_drop` active positions with the largest
    `drop_score`, then activates the `n_grow` positions with the largest
    `grow_score` among all positions not kept (just-dropped ones included).
    Ties go to the lower flat index, on every backend.

    Args:
      mask: 0/1 tensor of the weight's shape.
      drop_score: tensor of the weight's shape (|w| for every method here).
      grow_score: tensor of the weight's shape.
      n_drop: connections to drop, 0 <= n_drop <= active count.
      n_grow: connections to grow; defaults to `n_drop`, which keeps the
        count exact. At most the number of positions not kept.

    Returns:
      (new_mask, keep): bool tensors of the weight's shape. `keep` marks the
      surviving connections; `new_mask` is `keep` plus the grown ones.

    Raises:
      ValueError: if a count is out of range.
    """
    n_grow = n_drop if n_grow is None else n_grow
    shape = tuple(mask.shape)
    xp = _ops_for(mask)
    if xp is _HOST:
        active = _flat(mask) != 0
        act_idx = np.flatnonzero(active)
        _check_counts(act_idx.shape[0], active.shape[0], n_drop, n_grow)
        new_mask, keep, _ = _host_drop_grow(
            active, act_idx, _flat(drop_score)[act_idx], _flat(grow_score), n_drop, n_grow)
        return new_mask.reshape(shape), keep.reshape(shape)
    active = xp.not_equal(xp.reshape(_on(xp, mask), (-1,)), 0)
    _check_counts(_count(xp, active), int(np.prod(shape)), n_drop, n_grow)
    n_active = _count(xp, active)
    neg_inf = float("-inf")
    drop_score = xp.where(active, xp.cast(xp.reshape(_on(xp, drop_score), (-1,)), "float32"), neg_inf)
    keep = xp.top_k(drop_score, n_active - n_drop)
    grow_score = xp.where(keep, neg_inf, xp.cast(xp.reshape(_on(xp, grow_score), (-1,)), "float32"))
    grown = xp.top_k(grow_score, n_grow)
    new_mask = xp.logical_or(keep, grown)
    return xp.reshape(new_mask, shape), xp.reshape(keep, shape)


def _check_counts(n_active: int, size: int, n_drop: int, n_grow: int) -> None:
    if not 0 <= n_drop <= n_active:
        raise ValueError(f"n_drop must be in [0, {n_active}]; got {n_drop}.")
    if not 0 <= n_grow <= size - (n_active - n_drop):
        raise ValueError(f"n_grow must be in [0, {size - (n_active - n_drop)}]; got {n_grow}.")


def _flat(x) -> np.ndarray:
    """`x` as a flat float32 (or its own dtype if bool/int) NumPy array, a view where possible."""
    value = backend_lib.to_host(x).reshape(-1)
    return value.astype(np.float32, copy=False) if value.dtype.kind == "f" else value


def _host_drop_grow(active, act_idx, drop_values, grow, n_drop: int, n_grow: int):
    """`drop_grow_masks` in NumPy over flat arrays, touching n-sized arrays few times.

    Args:
      active: bool (n,), the current mask.
      act_idx: `np.flatnonzero(active)`.
      drop_values: float32 drop scores of the active entries, in index order.
      grow: float32 (n,) grow scores.
      n_drop, n_grow: as in `drop_grow_masks` (checked by the caller).

    Returns:
      (new_mask, keep, grown): bool (n,), bool (n,), and the grown indices.
    """
    keep = active.copy()
    if n_drop:
        kept = host_top_k_indices(drop_values, act_idx.shape[0] - n_drop)
        dropped = np.ones(act_idx.shape[0], dtype=bool)
        dropped[kept] = False
        keep[act_idx[dropped]] = False
    grown = host_top_k_indices(grow, n_grow, exclude=keep)
    new_mask = keep.copy()
    new_mask[grown] = True
    return new_mask, keep, grown


def prune_mask(mask, score, n_keep: int):
    """Keeps the `n_keep` active positions with the largest `score`.

    Args:
      mask: 0/1 tensor of the weight's shape.
      score: tensor of the weight's shape (|w| for magnitude pruning).
      n_keep: connections to keep, 0 <= n_keep <= active count.

    Returns:
      The new mask as a bool tensor; it is a subset of `mask`.

    Raises:
      ValueError: if `n_keep` is out of range.
    """
    shape = tuple(mask.shape)
    xp = _ops_for(mask)
    active = xp.not_equal(xp.reshape(_on(xp, mask), (-1,)), 0)
    n_active = _count(xp, active)
    if not 0 <= n_keep <= n_active:
        raise ValueError(f"n_keep must be in [0, {n_active}]; got {n_keep}.")
    score = xp.where(active, xp.cast(xp.reshape(_on(xp, score), (-1,)), "float32"), float("-inf"))
    return xp.reshape(xp.top_k(score, n_keep), shape)


# ---------------------------------------------------------------------------
# Optimizer state
# ---------------------------------------------------------------------------


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


def optimizer_state_by_variable(optimizer, model_variables) -> dict[int, list]:
    """{id(model variable): its optimizer state variables} for all of `model_variables`.

    Works for any Keras 3 optimizer (and a LossScaleOptimizer around one):
    states are matched to their model variable by the name Keras gives them
    and by shape. State the optimizer recomputes everywhere at each step
    (`OptimizerTraits.derived_slots`) is left out: it is not kept per entry.
    Empty lists before the optimizer is built.
    """
    result = {id(v): [] for v in model_variables}
    if optimizer is None or not optimizer.variables:
        return result
    prefixes = {v.path.replace("/", "_") + "_": v for v in model_variables}
    for slot in optimizer.variables:
        owner = _slot_owner(slot, prefixes)
        if (owner is not None and tuple(slot.shape) == tuple(owner.shape)
                and not is_derived_slot(optimizer, slot)):
            result[id(owner)].append(slot)
    return result


def optimizer_state_for(optimizer, variable, model_variables=None) -> list:
    """Every optimizer state tensor of `variable` (momentum, Adam m and v, EMA, …).

    Args:
      optimizer: a Keras optimizer, or None.
      variable: the model variable (e.g. a masked weight's stored variable).
      model_variables: all trainable variables of the model, to disambiguate
        names; defaults to [variable].

    Returns:
      The matching optimizer variables (empty before the optimizer is built).
    """
    candidates = list(model_variables or [variable])
    if not any(v is variable for v in candidates):
        candidates.append(variable)
    return optimizer_state_by_variable(optimizer, candidates)[id(variable)]


_INITIAL_VALUES: dict = {}


def slot_initial_value(optimizer, slot) -> float:
    """The value `optimizer` initialises the state tensor `slot` with.

    Found generically: a fresh optimizer of the same class and configuration
    is built on a one-element stand-in variable, and its state of the same
    kind (name suffix) is read. Cached per optimizer configuration.
    """
    inner, key = _probe_key(optimizer)
    table = _INITIAL_VALUES.get(key)
    if table is None:
        probe_var = keras.Variable(np.zeros((1,), "float32"), name="rigl_probe")
        probe = type(inner).from_config(inner.get_config())
        probe.build([probe_var])
        prefix = probe_var.path.replace("/", "_") + "_"
        table = {
            v.name[len(prefix):]: float(np.ravel(keras.ops.convert_to_numpy(v))[0])
            for v in probe.variables
            if v.name.startswith(prefix)
        }
        _INITIAL_VALUES[key] = table
    best = max((s for s in table if slot.name.endswith("_" + s) or slot.name == s), key=len, default=None)
    return 0.0 if best is None else table[best]


@dataclasses.dataclass(frozen=True)
class OptimizerTraits:
    """How an optimizer treats entries whose gradient is always zero.

    Attributes:
      mixes_positions: such an entry of the weight can change (Muon
        orthogonalises the whole momentum matrix; elementwise optimizers such
        as SGD, Adam or Adagrad leave it alone).
      makes_nonfinite: such entries can become NaN or inf.
      derived_slots: kinds (name suffixes) of state the optimizer recomputes
        for every entry at every step from other state, so that they are not
        at their initial value outside a mask (Adafactor's factored
        `velocity`); they are neither reset nor audited.
    """

    mixes_positions: bool
    makes_nonfinite: bool = False
    derived_slots: frozenset = frozenset()


_TRAITS: dict = {}


def _probe_key(optimizer):
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return inner, (type(inner), repr(sorted(inner.get_config().items(), key=lambda kv: kv[0])))


def optimizer_traits(optimizer) -> OptimizerTraits:
    """The `OptimizerTraits` of `optimizer`, found by a probe.

    A fresh optimizer of the same class and configuration takes a few steps
    on small 2-D and 4-D stand-ins whose gradients are zero outside a fixed
    pattern that leaves a row and a column empty, as a sparse layer does.
    Cached per configuration; an optimizer that cannot be probed counts as
    mixing positions (its weights are then projected, which is always safe).
    """
    if optimizer is None:
        return OptimizerTraits(False)
    inner, key = _probe_key(optimizer)
    if key not in _TRAITS:
        try:
            _TRAITS[key] = _probe(inner)
        except Exception:  # noqa: BLE001 - unknown optimizers are projected, to be safe
            _TRAITS[key] = OptimizerTraits(True)
    return _TRAITS[key]


def _probe(inner) -> OptimizerTraits:
    rng = np.random.default_rng(0)
    probe = type(inner).from_config(inner.get_config())
    shapes = [(8, 8), (2, 2, 4, 4)]
    patterns = [rng.random(s) < 0.5 for s in shapes]
    for p in patterns:
        p[..., 0, :] = False
        p[..., :, 0] = False
    variables = [keras.Variable((rng.normal(size=s) * p).astype("float32"), name=f"rigl_probe{i}")
                 for i, (s, p) in enumerate(zip(shapes, patterns))]
    probe.build(variables)
    slots = []  # (kind, slot, entries with no gradient, initial value)
    for var, p in zip(variables, patterns):
        prefix = var.path.replace("/", "_") + "_"
        slots += [(slot.name[len(prefix):], slot, ~p, keras.ops.convert_to_numpy(slot).copy())
                  for slot in probe.variables
                  if slot.name.startswith(prefix) and tuple(slot.shape) == tuple(var.shape)]
    # Enough steps for three updates under gradient accumulation.
    for _ in range(3 * int(getattr(inner, "gradient_accumulation_steps", None) or 1)):
        grads = [keras.ops.convert_to_tensor((rng.normal(size=s) * p).astype("float32"))
                 for s, p in zip(shapes, patterns)]
        probe.apply_gradients(zip(grads, variables))
    values = [keras.ops.convert_to_numpy(v) for v in variables]
    return OptimizerTraits(
        mixes_positions=any(bool(np.any(v[~p] != 0)) for v, p in zip(values, patterns)),
        makes_nonfinite=not all(bool(np.all(np.isfinite(v))) for v in values),
        derived_slots=frozenset(
            kind for kind, slot, outside, initial in slots
            if np.any(keras.ops.convert_to_numpy(slot)[outside] != initial[outside])
        ),
    )


def mixes_positions(optimizer) -> bool:
    """Whether `optimizer` can move a weight entry whose gradient is always zero
    (see `optimizer_traits`); such weights are projected onto their masks after each step."""
    return optimizer_traits(optimizer).mixes_positions


def is_derived_slot(optimizer, slot) -> bool:
    """Whether `slot` is state `optimizer` recomputes everywhere at each step (see `OptimizerTraits`)."""
    derived = optimizer_traits(optimizer).derived_slots
    return any(slot.name.endswith("_" + kind) for kind in derived)


def project(weight) -> None:
    """Sets `weight`'s entries outside its mask to 0 (after an optimizer that mixes positions)."""
    xp = _ops_for(weight.variable)
    value = _on(xp, weight.variable)
    weight.variable.assign(
        xp.where(xp.not_equal(_on(xp, weight.mask), 0), value, xp.zeros_like(value))
    )


def commit(weight, new_mask, keep, slots=(), optimizer=None) -> None:
    """Assigns `new_mask` and resets the weight and `slots` outside `keep`.

    Args:
      weight: a `MaskedWeight`.
      new_mask: bool tensor, the next mask.
      keep: bool tensor, the positions whose weight and optimizer state
        survive; elsewhere the weight becomes 0 and each slot its initial value.
      slots: the optimizer state variables of the weight.
      optimizer: the optimizer owning `slots` (for their initial values).
    """
    xp = _ops_for(weight.variable)
    resets = [(weight.variable, 0.0)] + [
        (slot, slot_initial_value(optimizer, slot) if optimizer is not None else 0.0)
        for slot in slots
    ]
    if xp is _HOST:
        backend_lib.assign_masked(
            weight.mask, np.reshape(_flat(new_mask), weight.shape),
            np.reshape(_flat(keep), weight.shape), resets)
        return
    keep = xp.reshape(_on(xp, keep), weight.shape)
    weight.mask.assign(xp.cast(xp.reshape(_on(xp, new_mask), weight.shape), weight.mask.dtype))
    for variable, fill in resets:
        variable.assign(xp.where(keep, _on(xp, variable), fill))


def _all_finite(xp, *tensors) -> bool:
    # A finite sum proves every entry finite in one cheap reduction; only an
    # overflowing sum needs the entrywise check.
    return all(bool(xp.isfinite(xp.sum(t))) or bool(xp.all(xp.isfinite(t)))
               for t in (xp.cast(t, "float32") for t in tensors))


def active_connections(weight) -> int:
    """The number of ones in `weight`'s mask."""
    xp = _ops_for(weight.variable)
    return _count(xp, _on(xp, weight.mask))


def score_problem(weight, grow_score, drop_score=None) -> str | None:
    """Why `weight` cannot be updated (with a warning), or None if it can.

    Returns:
      "non-finite" if a grow score or an active entry is not finite,
      "constant" if the grow scores are all equal (growth would follow index
      order), else None.
    """
    xp = _ops_for(weight.variable)
    grow_score = _on(xp, grow_score)
    if drop_score is None:
        drop_score = xp.where(xp.not_equal(_on(xp, weight.mask), 0), _on(xp, weight.variable), 0)
    if not _all_finite(xp, _on(xp, drop_score), grow_score):
        reason = "non-finite"
    elif float(xp.max(grow_score)) == float(xp.min(grow_score)):
        reason = "constant"
    else:
        return None
    _warn_skipped(weight, reason, stacklevel=4)
    return reason


_SKIP_TEXT = {
    "non-finite": "non-finite weights or growth scores",
    "constant": "constant growth scores (growth would follow index order)",
}


def _warn_skipped(weight, reason: str, stacklevel: int) -> None:
    warnings.warn(
        f"rigl_keras: {_SKIP_TEXT[reason]} in {weight.name!r}; its connectivity update is "
        "skipped.", RuntimeWarning, stacklevel=stacklevel,
    )


def scores_are_finite(weight, grow_score, drop_score=None) -> bool:
    """True unless `score_problem` finds one (then with a warning)."""
    return score_problem(weight, grow_score, drop_score) is None


def drop_grow(weight, n_drop: int, grow_score, slots=(), *, n_grow: int | None = None,
              drop_score=None, optimizer=None) -> UpdateResult:
    """Drops `n_drop` connections of `weight` and grows `n_grow` (default: as many).

    Drops the active connections of smallest |w| (or smallest `drop_score`)
    and grows where `grow_score` is largest. Newly grown positions (inactive
    before) start at 0 with initial optimizer state; dropped positions that
    stay inactive are reset the same way; a connection dropped and grown back
    keeps its weight and state. If a score or an active entry is not finite,
    or all grow scores are equal, the weight is left unchanged with a warning.

    Args:
      weight: a `MaskedWeight`.
      n_drop: connections to drop (see `drop_grow_masks`).
      grow_score: tensor of the weight's shape.
      slots: the optimizer state variables of the weight.
      n_grow: connections to grow; defaults to `n_drop`.
      drop_score: defaults to |w|.
      optimizer: the optimizer owning `slots`.

    Returns:
      An `UpdateResult`.
    """
    n_grow = n_drop if n_grow is None else n_grow
    xp = _ops_for(weight.variable)
    if xp is _HOST:
        return _host_drop_grow_weight(weight, n_drop, n_grow, grow_score, drop_score, slots,
                                      optimizer)
    mask = _on(xp, weight.mask)
    n_active = _count(xp, mask)
    if (n_active == weight.size and n_grow == n_drop) or (n_drop == 0 and n_grow == 0):
        # A dense weight (the first layer under "uniform", one capped by ERK)
        # has nowhere else to grow: it stays dense and untouched.
        return UpdateResult(weight.name, n_active, 0)
    active = xp.not_equal(mask, 0)
    grow_score = _on(xp, grow_score)
    if drop_score is None:
        drop_score = xp.abs(xp.where(active, _on(xp, weight.variable), 0))
    drop_score = _on(xp, drop_score)
    reason = score_problem(weight, grow_score, drop_score)
    if reason is not None:
        return UpdateResult(weight.name, n_active, 0, skipped=True, reason=reason)
    new_mask, _ = drop_grow_masks(mask, drop_score, grow_score, n_drop, n_grow)
    survives = xp.logical_and(new_mask, active)
    changed = _count(xp, xp.logical_and(new_mask, xp.logical_not(active)))
    commit(weight, new_mask, survives, slots, optimizer)
    return UpdateResult(weight.name, n_active - n_drop + n_grow, changed)


def _host_drop_grow_weight(weight, n_drop, n_grow, grow_score, drop_score, slots, optimizer):
    """`drop_grow` for a weight in host memory: NumPy over views, few n-sized passes."""
    active = _flat(weight.mask) != 0
    act_idx = np.flatnonzero(active)
    n_active = act_idx.shape[0]
    if (n_active == weight.size and n_grow == n_drop) or (n_drop == 0 and n_grow == 0):
        return UpdateResult(weight.name, n_active, 0)  # see drop_grow
    _check_counts(n_active, weight.size, n_drop, n_grow)
    grow = _flat(grow_score)
    if drop_score is None:
        drop_values = np.abs(_flat(weight.variable)[act_idx])
    else:
        drop_values = _flat(drop_score)[act_idx]
    if not (_host_finite(drop_values) and _host_finite(grow)):
        reason = "non-finite"
    elif _host_constant(grow):
        reason = "constant"
    else:
        new_mask, keep, grown = _host_drop_grow(active, act_idx, drop_values, grow, n_drop, n_grow)
        regrown = grown[active[grown]]
        survives = keep
        survives[regrown] = True  # keep is not needed any more
        commit(weight, new_mask, survives, slots, optimizer)
        return UpdateResult(weight.name, n_active - n_drop + n_grow,
                            int(grown.shape[0] - regrown.shape[0]))
    _warn_skipped(weight, reason, stacklevel=4)
    return UpdateResult(weight.name, n_active, 0, skipped=True, reason=reason)


def _host_finite(x: np.ndarray) -> bool:
    return bool(np.isfinite(np.sum(x))) or bool(np.all(np.isfinite(x)))  # see _all_finite


def _host_constant(x: np.ndarray) -> bool:
    sample = x[:: max(1, x.shape[0] // 4096)]
    if sample.shape[0] and np.max(sample) != np.min(sample):
        return False  # two different values in a sample settle it without a full pass
    return bool(np.max(x) == np.min(x))


def prune(weight, n_keep: int, slots=(), score=None, optimizer=None) -> UpdateResult:
    """Shrinks `weight`'s mask to its `n_keep` largest-|w| connections.

    Args:
      weight: a `MaskedWeight`.
      n_keep: connections to keep (<= the current count).
      slots: the optimizer state variables of the weight.
      score: defaults to |w|.
      optimizer: the optimizer owning `slots`.

    Returns:
      An `UpdateResult` whose `changed` counts removed connections.
    """
    xp = _ops_for(weight.variable)
    if xp is _HOST:
        return _host_prune_weight(weight, n_keep, score, slots, optimizer)
    mask = _on(xp, weight.mask)
    n_active = _count(xp, mask)
    score = xp.abs(_on(xp, weight.variable)) if score is None else _on(xp, score)
    if not _all_finite(xp, xp.where(xp.not_equal(mask, 0), score, 0)):
        return _skip_pruning(weight, n_active)
    n_keep = min(n_keep, n_active)
    if n_keep == n_active:
        return UpdateResult(weight.name, n_active, 0)
    keep = prune_mask(mask, score, n_keep)
    commit(weight, keep, keep, slots, optimizer)
    return UpdateResult(weight.name, n_keep, n_active - n_keep)


def _host_prune_weight(weight, n_keep, score, slots, optimizer) -> UpdateResult:
    """`prune` for a weight in host memory: the selection runs on the active
    entries only (ties to the lower index, as `prune_mask`)."""
    active = _flat(weight.mask) != 0
    act_idx = np.flatnonzero(active)
    n_active = act_idx.shape[0]
    values = np.abs(_flat(weight.variable)[act_idx]) if score is None else _flat(score)[act_idx]
    if not _host_finite(values):
        return _skip_pruning(weight, n_active, stacklevel=4)
    n_keep = min(n_keep, n_active)
    if n_keep == n_active:
        return UpdateResult(weight.name, n_active, 0)
    keep = np.zeros(active.shape, dtype=bool)
    keep[act_idx[host_top_k_indices(values, n_keep)]] = True
    commit(weight, keep, keep, slots, optimizer)
    return UpdateResult(weight.name, n_keep, n_active - n_keep)


def _skip_pruning(weight, n_active: int, stacklevel: int = 3) -> UpdateResult:
    warnings.warn(
        f"rigl_keras: non-finite weights in {weight.name!r}; its pruning step is skipped.",
        RuntimeWarning,
        stacklevel=stacklevel,
    )
    return UpdateResult(weight.name, n_active, 0, skipped=True, reason="non-finite")
