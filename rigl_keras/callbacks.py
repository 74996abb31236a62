"""Sparse-training callbacks for `model.fit`: the shared machinery and RigL.

`SparseTrainingCallback` finds the masked layers, follows the optimizer step,
logs, and can audit invariants; `DynamicSparseCallback` adds the drop/grow
schedule and runs the engine; a method (RigL here, SET and SNFS in
`rigl_keras.baselines`) only says where to grow.

Growth gradients (RigL, SNFS, SNIP) are, by default, the gradient of the
batch being trained on: every masked weight captures ∂L/∂W_eff inside the
compiled train step (`rigl_keras.layers`), as the paper and the official TF1
code do. `grow_data` is an alternative side channel: a batch of given
training data drawn at each update (keyed to the optimizer step, so a resumed
run draws the same ones), at the cost of one extra forward and backward pass
per update. (The official TF2 port draws one fixed batch of 1000 training
examples once; passing a 1000-row array tuple with `grow_batch_size=1000`
comes closest.)
"""

from __future__ import annotations

import collections.abc
import contextlib
import types
import warnings

import keras
import numpy as np
from keras import ops

from rigl_keras import backend as gradients_backend
from rigl_keras import engine
from rigl_keras import layers as masked_layers
from rigl_keras import schedules
from rigl_keras.audit import check_sparsity

__all__ = [
    "SparseTrainingCallback",
    "DynamicSparseCallback",
    "RigLCallback",
    "GradientSource",
    "GrowData",
]


def _is_dataset(data) -> bool:
    try:
        import tensorflow as tf
    except ImportError:  # pragma: no cover - TF is a dependency
        return False
    return isinstance(data, tf.data.Dataset)


def _take_rows(array, rows):
    # Index host arrays on the host: converting a whole training set to a
    # tensor at every update would copy all of it.
    if array is None:
        return None
    if isinstance(array, np.ndarray):
        return array[rows]
    return ops.take(array, ops.convert_to_tensor(rows), axis=0)


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`grow_batch_size` must be an int >= 1; got {batch_size!r}.")
    return batch_size


def _rows(array) -> int:
    shape = np.shape(array)
    if not shape:
        raise ValueError("`grow_data` arrays must have a batch dimension.")
    return int(shape[0])


def restore_invariants(model) -> None:
    """Puts every weight and optimizer state entry outside its mask back to its initial value.

    Called after anything that replaces a masked model's weights without its
    optimizer state, such as `EarlyStopping(restore_best_weights=True)`:
    masks and weights then come from an earlier epoch and the momentum from
    the last one.

    Args:
      model: a model with masked weights.
    """
    weights = masked_layers.masked_weights(model)
    optimizer = getattr(model, "optimizer", None)
    slots = engine.optimizer_state_by_variable(optimizer, model.trainable_variables)
    for w in weights:
        keep = ops.not_equal(ops.convert_to_tensor(w.mask), 0)
        engine.commit(w, keep, keep, slots.get(id(w.variable), []), optimizer=optimizer)


def _check_weight_averaging(model, weights) -> None:
    """Refuses `use_ema` where Keras 3 cannot combine it with gradient capture.

    Keras gives `overwrite_with_gradient` variables (the capture variables) no
    moving average, and its TensorFlow backend (at the end of every `fit`)
    and its JAX backend (with `ema_overwrite_frequency`) then fail on them.
    """
    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)
    if not getattr(optimizer, "use_ema", False) or all(
            w.gradient is None and w.momentum_beta is None for w in weights):
        return
    backend = keras.backend.backend()
    if backend == "tensorflow" or (backend == "jax" and optimizer.ema_overwrite_frequency):
        raise ValueError(
            f"The optimizer's use_ema=True cannot be combined with gradient capture on the "
            f"{backend} backend (Keras keeps no moving average for the capture variables and "
            "fails on them). Sparsify with capture_gradients=False and without "
            "capture_momentum (static, SET, pruning; RigL, SNFS and SNIP then need "
            "grow_data), or train without use_ema."
        )


def _set_weights_keeping_invariants(model, weights):
    # Bound to a masked model by `_guard_set_weights` (as a method, so that a
    # deep copy of the model binds the copy).
    type(model).set_weights(model, weights)
    restore_invariants(model)


def _guard_set_weights(model) -> None:
    """Makes `model.set_weights` restore the invariants afterwards (idempotent)."""
    current = model.__dict__.get("set_weights")
    if getattr(current, "__func__", None) is _set_weights_keeping_invariants:
        return
    method = types.MethodType(_set_weights_keeping_invariants, model)
    object.__setattr__(model, "set_weights", method)


class GrowData:
    """A source of training batches for growth gradients.

    Accepts an `(x, y)` or `(x, y, sample_weight)` tuple of arrays (a batch of
    `batch_size` rows is drawn at random, keyed to `seed` and the step, so it
    is reproducible and resume-safe), a `tf.data.Dataset` of batches, or any
    re-iterable of batches such as a list or a `keras.utils.PyDataset` (each
    pass is restarted when exhausted). One-shot iterators (generators) are
    refused: they would run out in the middle of training.

    Args:
      data: the source, as above.
      batch_size: rows per batch drawn from an array tuple.
      seed: seed of the row draws.

    Raises:
      ValueError: for anything else, an empty source, a one-shot iterator,
        or a bad batch size.
    """

    def __init__(self, data, batch_size: int = 128, seed: int = 0):
        self.batch_size = _check_batch_size(batch_size)
        self.seed = seed
        self._iterator = None
        self._arrays = None
        self._iterable = None
        if isinstance(data, list) and len(data) in (2, 3) and not _is_dataset(data):
            raise ValueError(
                "`grow_data` must be a tuple (x, y), not a list: a list is read as an "
                "iterable of batches. Pass tuple(grow_data)."
            )
        if isinstance(data, tuple) and len(data) in (2, 3):
            leaves = [leaf for part in data for leaf in keras.tree.flatten(part)]
            if not leaves:
                raise ValueError("`grow_data` x is empty.")
            counts = {_rows(leaf) for leaf in leaves}
            if len(counts) != 1:
                raise ValueError(
                    f"`grow_data` x, y (and sample weights) must have the same number of "
                    f"rows; got {sorted(counts)}."
                )
            n = counts.pop()
            if n == 0:
                raise ValueError("`grow_data` holds no rows.")
            self._arrays, self._rows = data, n
        elif isinstance(data, collections.abc.Iterator):
            raise ValueError(
                "`grow_data` is a one-shot iterator (a generator?): it would run out during "
                "training. Pass something that can be iterated again (a list of batches, a "
                "tf.data.Dataset, a keras.utils.PyDataset) or an (x, y) tuple of arrays."
            )
        elif _is_dataset(data) or (
            isinstance(data, collections.abc.Iterable)
            and not isinstance(data, (str, bytes, dict, tuple, np.ndarray))
        ):
            if isinstance(data, collections.abc.Sized) and len(data) == 0:
                raise ValueError("`grow_data` is empty.")
            self._iterable = data
        else:
            raise ValueError(
                "`grow_data` must be an (x, y) or (x, y, sample_weight) tuple of "
                "arrays, a tf.data.Dataset of batches, or an iterable of batches; "
                f"got {type(data).__name__}."
            )

    def restart(self) -> None:
        """Starts the next iterable pass from its first batch."""
        self._iterator = None

    def batch(self, step: int):
        """The batch to use for the update at optimizer step `step`."""
        if self._arrays is not None:
            rng = np.random.default_rng([int(self.seed), int(step)])
            size = min(self.batch_size, self._rows)
            rows = np.sort(rng.choice(self._rows, size=size, replace=False))
            return keras.tree.map_structure(lambda a: _take_rows(a, rows), self._arrays)
        if self._iterator is not None:
            try:
                return next(self._iterator)
            except StopIteration:
                pass
        self._iterator = iter(self._iterable)
        try:
            return next(self._iterator)
        except StopIteration:
            raise ValueError("`grow_data` yielded no batch.") from None


class SparseTrainingCallback(keras.callbacks.Callback):
    """Shared machinery of every sparse-training callback.

    Finds the model's masked weights at the start of `fit`, calls
    `after_step(previous_step, step, logs)` whenever the optimizer has
    advanced (the step is read from `optimizer.iterations`, never counted in
    Python, so resuming from a checkpoint continues the schedule exactly), and
    writes per-epoch totals of what the method did into the epoch logs.
    Resume: everything is keyed to `optimizer.iterations` or saved with the
    model, so a fit resumed from a backup taken at an epoch end
    (`BackupAndRestore(save_freq="epoch")`, `ModelCheckpoint`) continues
    exactly, whatever the order of the callbacks. Backups taken every N
    batches are not exact (Keras restarts the epoch at batch 0), and one
    taken by a callback listed *before* this one at an update step holds the
    state before that update, which a resumed run does not redo: list
    Keras' `BackupAndRestore` after the sparse-training callback, or use
    `rigl_keras.AtomicBackupAndRestore`, which waits for every callback.

    With an optimizer whose update mixes positions (Muon; found by
    `engine.mixes_positions`), it sets the weights outside the masks back to
    0 after every training batch (every execution with
    `steps_per_execution` > 1); those entries never reach the model's output
    in between.

    On PyTorch (eager), an optimizer step that provably leaves a weight 0
    outside its mask says so, and the next forward pass skips its in-place
    AND over that weight: the optimizer moves no entry whose gradient is 0
    (`engine.optimizer_traits`; no `use_ema`), its state outside the mask
    is at its initial value, the gradient is the masked `.grad`, and the
    weight has no constraint but Keras' zero-keeping ones. Without a
    callback every step is followed by the AND.

    On PyTorch and TensorFlow, gradient capture is paused for the batches
    whose gradient the method does not read (`reads_captured_gradient`):
    RigL's between updates, all of SET's. Those steps then cost what static
    sparse training does. The capture variables read NaN while paused
    (`layers.pause_capture`), and capture is back on when `fit` ends. A
    compiled TensorFlow step is traced once more, without capture, on the
    first paused batch after each `compile`. JAX captures at every step (its
    trainer fixes the trainable variables for the whole fit), and so does an
    optimizer with `use_ema`.

    Args:
      seed: seed of everything random the method does.
      check_invariants: after every connectivity change, verify binary masks,
        exact counts and initial optimizer state outside the mask with
        `rigl_keras.check_sparsity`; raises on the first violation.
      on_nonfinite: what a non-finite weight or score does at an update:
        "skip" (default: that weight's update is skipped with a warning, the
        others go on), "stop" (also ends the fit, like `TerminateOnNaN`) or
        "raise" (`FloatingPointError` naming the weights and the step).

    Raises:
      ValueError: for a non-int seed or an unknown `on_nonfinite`.
    """

    #: Values accepted for `on_nonfinite`.
    NONFINITE = ("skip", "stop", "raise")

    #: Whether a connectivity change keeps per-weight counts constant.
    keeps_counts = True
    #: Log name of the per-update fraction (drop fraction, or target sparsity).
    fraction_key = "drop_fraction"

    def __init__(self, *, seed: int = 0, check_invariants: bool = False, on_nonfinite: str = "skip"):
        super().__init__()
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"`seed` must be an int; got {seed!r}.")
        if on_nonfinite not in self.NONFINITE:
            raise ValueError(f"`on_nonfinite` must be one of {self.NONFINITE}; got {on_nonfinite!r}.")
        self.seed = int(seed)
        self.check_invariants = bool(check_invariants)
        self.on_nonfinite = on_nonfinite
        self._project = False
        self._weights: list = []
        self._last_step = 0
        self._origin = 0
        self._epoch_changed = 0
        self._epoch_updates = 0
        self._last_fraction = 0.0
        self._counts: dict[str, int] = {}

    # -- configuration -----------------------------------------------------
    def get_config(self) -> dict:
        """The constructor arguments (data sources excluded)."""
        return {"seed": self.seed, "check_invariants": self.check_invariants,
                "on_nonfinite": self.on_nonfinite}

    @classmethod
    def from_config(cls, config: dict):
        """Rebuilds the callback from `get_config()`."""
        return cls(**config)

    # -- helpers for subclasses ---------------------------------------------
    @property
    def masked_weights(self) -> list:
        """The `MaskedWeight`s this callback manages (set at train begin)."""
        return self._weights

    @property
    def total_steps(self) -> int | None:
        """Optimizer steps of the whole fit, if known.

        With `gradient_accumulation_steps=n` the optimizer steps once per n
        batches (`optimizer.iterations` counts those steps), so a fit of B
        batches has B // n of them.
        """
        params = self.params or {}
        steps, epochs = params.get("steps"), params.get("epochs")
        if steps is None or epochs is None:
            return None
        return self._optimizer_steps(int(steps) * int(epochs))

    def _optimizer_steps(self, batches: int) -> int:
        optimizer = getattr(self.model, "optimizer", None)
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        return batches // int(getattr(inner, "gradient_accumulation_steps", None) or 1)

    def current_step(self) -> int:
        """The optimizer's step count (works for distributed variables too)."""
        return int(ops.convert_to_numpy(self.model.optimizer.iterations))

    def optimizer_slots(self, weight) -> list:
        """Optimizer state variables of a masked weight."""
        optimizer = self.model.optimizer
        key = (id(optimizer), len(optimizer.variables) if optimizer is not None else 0)
        if getattr(self, "_slots_key", None) != key:
            self._slots = engine.optimizer_state_by_variable(
                optimizer, self.model.trainable_variables
            )
            self._slots_key = key
        return self._slots.get(id(weight.variable), [])

    def layer_seed(self, step: int, index: int) -> int:
        """A 31-bit seed for weight `index` at `step`, derived from `seed`."""
        rng = np.random.default_rng([self.seed, int(step), int(index)])
        return int(rng.integers(0, 2**31 - 1))

    # -- Keras hooks ---------------------------------------------------------
    def on_train_begin(self, logs=None):
        model = self.model  # syncs backend state (JAX) before any read
        weights = masked_layers.masked_weights(model)
        if not weights:
            raise ValueError(
                f"{type(self).__name__}: model {model.name!r} has no masked weight. "
                "Pass it through rigl_keras.sparsify or build it from masked layers."
            )
        self._weights = weights
        # Keras callbacks that restore weights (EarlyStopping) go through
        # set_weights, which knows nothing of optimizer state.
        _guard_set_weights(model)
        _check_weight_averaging(model, weights)
        traits = engine.optimizer_traits(model.optimizer)
        self._project = traits.mixes_positions
        if traits.makes_nonfinite:
            warnings.warn(
                f"{type(self).__name__}: {type(model.optimizer).__name__} turns weight entries "
                "whose row and column get no gradient into NaN (a probe found it), and masked "
                "weights have such entries; training will likely diverge. For Adafactor, "
                "raise `epsilon_1` (e.g. to 1e-15): the default 1e-30 underflows.",
                RuntimeWarning,
                stacklevel=2,
            )
        # Read once: on JAX every `self.model` access syncs the whole training
        # state, which a per-batch hook must not pay for.
        self._steps_per_execution = int(getattr(model, "steps_per_execution", 1) or 1)
        self._last_step = self.current_step()
        self._origin = self._last_step
        self._unread = 0
        self._fresh = True
        self.setup()
        self._counts = self._current_counts()
        optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)
        self._pausing = _pausing(model, optimizer, weights)
        if self._pausing:
            # A fit that raised may have left capture paused: start from on.
            object.__setattr__(model, "_rk_capture_demand", {})
            _set_capture(model, weights, self._pausing, paused=False)
        _check_optimizer_tracks_capture(model, optimizer, weights, type(self).__name__)
        _keep_clean_through_steps(model, model.optimizer, traits)

    def on_train_batch_begin(self, batch, logs=None):
        if self._pausing:
            model = self.model
            demand = model.__dict__["_rk_capture_demand"]
            demand[id(self)] = self.reads_captured_gradient()
            _set_capture(model, self._weights, self._pausing, paused=not any(demand.values()))

    def on_train_end(self, logs=None):
        _unwrap_apply(getattr(self.model, "optimizer", None))  # `_keep_clean_through_steps`
        if self._pausing:
            model = self.model
            demand = model.__dict__.get("_rk_capture_demand", {})
            demand.pop(id(self), None)
            if not any(demand.values()):
                _set_capture(model, self._weights, self._pausing, paused=False)

    def on_train_batch_end(self, batch, logs=None):
        # Reading the step syncs with the device, so it is read only when an
        # event may be due. The estimate never falls behind the true step
        # (a loss-scale optimizer may skip steps, never add them).
        if self._project:
            self.model  # noqa: B018 - syncs the JAX trainer's state into the variables
            for weight in self._weights:
                engine.project(weight)
        self._unread += 1
        due = self.next_event(self._last_step)
        estimate = self._last_step + self._unread * self._steps_per_execution
        if due is None or estimate < due:
            return
        step = self.current_step()
        self._unread = 0
        if step == self._last_step:
            return  # e.g. a loss-scale optimizer skipped a non-finite step
        previous, self._last_step = self._last_step, step
        self.after_step(previous, step, logs if logs is not None else {})

    def on_epoch_begin(self, epoch, logs=None):
        # Re-sync with the optimizer: `BackupAndRestore` may have restored an
        # earlier step (and masks) in an on_train_begin that ran after ours.
        self._last_step = self.current_step()
        self._unread = 0
        if self._fresh:
            # The step at which this fit's schedule starts: a resumed fit
            # starts at epoch `initial_epoch`, not 0.
            steps = (self.params or {}).get("steps") or 0
            self._origin = max(0, self._last_step - self._optimizer_steps(int(epoch) * int(steps)))
            self.schedule_ready()
            self._counts = self._current_counts()
            self._fresh = False
        self._epoch_changed = 0
        self._epoch_updates = 0

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["connections_changed"] = self._epoch_changed
            logs["mask_updates"] = self._epoch_updates
            logs[self.fraction_key] = self._last_fraction

    # -- for subclasses ------------------------------------------------------
    def setup(self) -> None:
        """Called at train begin once `masked_weights` is known."""

    def reads_captured_gradient(self) -> bool:
        """Whether the batch about to be trained may end at an event that
        reads the captured gradients G. Capture is paused for batches for
        which no callback says so (PyTorch and TensorFlow). Default: always."""
        return True

    def schedule_ready(self) -> None:
        """Called at the first epoch begin, once this fit's first step is known."""

    def next_event(self, step: int) -> int | None:
        """The first step after `step` at which `after_step` has work, or None."""
        return None

    def after_step(self, previous: int, step: int, logs: dict) -> None:
        """Called once the optimizer has moved from `previous` to `step` >= `next_event(previous)`."""

    def record(self, logs: dict, fraction: float, results) -> None:
        """Logs one connectivity update and audits it if asked to."""
        changed = sum(r.changed for r in results)
        logs[self.fraction_key] = fraction
        logs["connections_changed"] = changed
        self._epoch_changed += changed
        self._epoch_updates += 1
        self._last_fraction = fraction
        self._handle_nonfinite(results)
        if self.check_invariants:
            check_sparsity(self.model, self._counts if self.keeps_counts else None)
        if not self.keeps_counts:
            self._counts = self._current_counts()
        summaries = getattr(self.model, "_rigl_summaries", None)  # rigl_keras.summaries
        if summaries is not None:
            summaries.on_update(self.model, self._last_step, self.fraction_key, fraction, changed)

    def _handle_nonfinite(self, results) -> None:
        bad = [r.weight for r in results if r.reason == "non-finite"]
        if not bad or self.on_nonfinite == "skip":
            return
        message = (f"{type(self).__name__}: non-finite weights or scores in {bad} at step "
                   f"{self._last_step}")
        if self.on_nonfinite == "raise":
            raise FloatingPointError(message + ".")
        warnings.warn(message + "; stopping training (on_nonfinite='stop').", RuntimeWarning, stacklevel=3)
        self.model.stop_training = True

    def _current_counts(self) -> dict[str, int]:
        return {w.name: engine.active_connections(w) for w in self._weights}


class DynamicSparseCallback(SparseTrainingCallback):
    """Drop/grow every ΔT steps on the shared engine; subclasses give grow scores.

    At every update step t (t mod ΔT = 0, begin ≤ t < T_end), each masked
    weight replaces floor(f_decay(t) · n_active) connections: the active ones
    of smallest |w| are dropped, and the same number of positions with the
    largest `grow_scores` are activated (new ones at zero with initial
    optimizer state).

    Steps are the optimizer's (`optimizer.iterations`). An int `end_step` or
    `begin_step` is an absolute optimizer step, so one schedule can span
    several `fit` calls. A float `end_step` is a fraction of *this* fit's
    steps counted from the step the fit starts at, and the cosine decays over
    that span: each `fit` call then runs a schedule of its own.

    `timing="official"` follows google-research/rigl instead: the batch that
    starts at step t = begin + i·ΔT, 0 <= t <= T_end (int), is an update
    batch; it trains as usual and the update follows it (SET, SNFS), or, for
    methods with `official_skips_step` (RigL), it only supplies the growth
    gradient: the model's trainable weights and the optimizer state are put
    back as they were before that batch, so its optimizer step is skipped.
    The step counter still counts the batch (the official global step does
    not), which keeps learning-rate schedules and resume keyed to batches.
    It needs `steps_per_execution=1`.

    Args:
      delta_t: steps between updates (ΔT), >= 1.
      alpha: initial update fraction, in (0, 1].
      end_step: last update step (exclusive): an int, or a float in (0, 1]
        giving a fraction of the fit's total steps.
      decay: "cosine" or "constant".
      begin_step: first step at which updates may happen.
      timing: "keras" (default) or "official" (above).
      seed: seed of everything random the method does.
      check_invariants: audit invariants after every update.
      on_nonfinite: what a non-finite weight or score does at an update:
        "skip" (default: that weight's update is skipped with a warning, the
        others go on), "stop" (also ends the fit, like `TerminateOnNaN`) or
        "raise" (`FloatingPointError` naming the weights and the step).

    Raises:
      ValueError: for an argument out of range (see `UpdateSchedule`), or
        (at train begin) a `steps_per_execution` that does not fit the timing.
    """

    #: Under the official timing, whether an update batch only supplies the
    #: growth gradient (its optimizer step undone), as official RigL does.
    official_skips_step = False

    def __init__(
        self,
        delta_t: int = 100,
        alpha: float = 0.3,
        end_step: int | float = 0.75,
        decay: str = "cosine",
        *,
        begin_step: int = 0,
        timing: str = "keras",
        seed: int = 0,
        check_invariants: bool = False,
        on_nonfinite: str = "skip",
    ):
        super().__init__(seed=seed, check_invariants=check_invariants, on_nonfinite=on_nonfinite)
        self.schedule = schedules.UpdateSchedule(
            delta_t=delta_t, alpha=alpha, end_step=end_step, decay=decay,
            begin_step=begin_step, timing=timing,
        )
        self._end = None
        self._snapshot = None

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            delta_t=self.schedule.delta_t,
            alpha=self.schedule.alpha,
            end_step=self.schedule.end_step,
            decay=self.schedule.decay,
            begin_step=self.schedule.begin_step,
            timing=self.schedule.timing,
        )
        return config

    def setup(self):
        spe = int(getattr(self.model, "steps_per_execution", 1) or 1)
        if spe > 1 and self.schedule.official:
            raise ValueError(
                f"{type(self).__name__}: timing='official' updates around single batches "
                f"and needs steps_per_execution=1; the model has {spe}."
            )
        optimizer = self.model.optimizer
        if self.official_skips_step and self.schedule.official and not optimizer.built:
            # The state kept before an update batch must include the slots.
            with gradients_backend.creation_scope(self.model):
                optimizer.build(self.model.trainable_variables)
        if spe > 1 and self.schedule.delta_t % spe:
            raise ValueError(
                f"{type(self).__name__}: delta_t={self.schedule.delta_t} is not a multiple of "
                f"the model's steps_per_execution={spe}; updates could only happen at "
                "execution boundaries. Choose delta_t as a multiple of steps_per_execution."
            )
        self._end = None
        self._snapshot = None

    def schedule_ready(self):
        total = self.total_steps
        if isinstance(self.schedule.end_step, float):
            self._end = self._origin + self.schedule.end(total)
        else:
            self._end = self.schedule.end(total)
        first = self.next_event(self._last_step)
        if first is None or (total is not None and first > self._origin + total):
            warnings.warn(
                f"{type(self).__name__}: no connectivity update will happen in this fit "
                f"(steps {self._last_step}..{self._origin + (total or 0)}, delta_t="
                f"{self.schedule.delta_t}, end step {self._end}).",
                RuntimeWarning,
                stacklevel=2,
            )

    def drop_fraction(self, step: int) -> float:
        """f_decay(step) under this fit's schedule."""
        origin = self._origin if isinstance(self.schedule.end_step, float) else 0
        return self.schedule.drop_fraction(step - origin, self._end - origin)

    def grow_scores(self, step: int) -> list:
        """One score tensor per masked weight; larger means grow first."""
        raise NotImplementedError

    def next_event(self, step):
        if self._end is None:
            return None
        if self.schedule.official:
            # The update batch starts at t, so its event is at t + 1.
            start = self.schedule.next_update_step(step - 1, self._end)
            return None if start is None else start + 1
        return self.schedule.next_update_step(step, self._end)

    def after_step(self, previous, step, logs):
        if self.schedule.official:
            start = step - 1  # steps_per_execution is 1
            if start >= previous and self.schedule.is_update_step(start, self._end):
                self.update(start, logs)
            return
        update_step = self.schedule.last_update_step(previous, step, self._end)
        if update_step is not None:
            self.update(update_step, logs)

    def reads_captured_gradient(self) -> bool:
        """True when the grow scores come from captured gradients and this
        batch may end at the next event (the step estimate never falls
        behind the true step, so capture may start early, never late)."""
        source = getattr(self, "source", None)
        if source is None or not source.captured or self._end is None:
            return False
        due = self.next_event(self._last_step)
        return due is not None and (
            self._last_step + (self._unread + 1) * self._steps_per_execution >= due)

    def on_train_batch_begin(self, batch, logs=None):
        super().on_train_batch_begin(batch, logs)
        # Official RigL timing: keep the state from before an update batch so
        # that the batch's optimizer step can be undone once its gradient is
        # read. The step is read (a device sync) only when one may be due.
        if not (self.official_skips_step and self.schedule.official) or self._end is None:
            return
        due = self.schedule.next_update_step(self._last_step - 1, self._end)
        if due is None or self._last_step + self._unread < due:
            return
        step = self.current_step()
        if step == due:
            self._snapshot = (step, self._training_state())

    def _training_state(self) -> list:
        """(variable, copy) for every weight and optimizer variable but the step counters."""
        optimizer = self.model.optimizer
        skip = {id(w.gradient) for w in self._weights if w.gradient is not None}
        skip.add(id(optimizer.iterations))
        inner = getattr(optimizer, "inner_optimizer", None)
        if inner is not None:
            skip.add(id(inner.iterations))
        variables = list(self.model.trainable_variables) + list(optimizer.variables)
        return [(v, ops.copy(v.value)) for v in variables if id(v) not in skip]

    def _undo_update_batch(self, step: int) -> None:
        if self._snapshot is not None and self._snapshot[0] == step:
            for variable, value in self._snapshot[1]:
                variable.assign(value)
        self._snapshot = None

    def update(self, step: int, logs: dict | None = None) -> list:
        """Runs one drop/grow update as at optimizer step `step`.

        Returns:
          One `engine.UpdateResult` per masked weight.
        """
        if self._end is None:  # called outside fit
            self._end = self.schedule.end(self.total_steps or step + 1)
        fraction = self.drop_fraction(step)
        source = getattr(self, "source", None)
        if source is not None and not source.captured:
            self._undo_update_batch(step)  # grow from the weights before the batch
        scores = self.grow_scores(step)  # the captured gradient is not part of the undo
        self._undo_update_batch(step)
        optimizer = self.model.optimizer
        results = [
            engine.drop_grow(
                w, int(fraction * engine.active_connections(w)), score,
                self.optimizer_slots(w), optimizer=optimizer,
            )
            for w, score in zip(self._weights, scores)
        ]
        self.record(logs if logs is not None else {}, fraction, results)
        return results


def _pausing(model, optimizer, weights) -> str | None:
    """How capture can be paused between the batches that read it: "eager"
    (the step reads the trainable variables at every call: PyTorch without
    `jit_compile`, TensorFlow with `run_eagerly`), "swap" (TensorFlow's
    compiled step: one traced with capture and one without, swapped in as
    `model.train_function`), or None (JAX, whose trainer fixes the trainable
    variables for the whole fit; no capture variable; `use_ema`, whose
    averages Keras matches against the trainable variables before
    `on_train_end`)."""
    if getattr(optimizer, "use_ema", False) or all(w.gradient is None for w in weights):
        return None
    backend = keras.backend.backend()
    if backend == "torch" and not getattr(model, "jit_compile", False):
        return "eager"
    if backend == "tensorflow":
        return "eager" if getattr(model, "run_eagerly", False) else "swap"
    return None


def _check_optimizer_tracks_capture(model, optimizer, weights, name: str) -> None:
    """Raises before training if a built optimizer cannot step the trainable
    capture variables (Keras would raise "Unknown variable" at the first
    captured batch, mid-fit): it was built while capture was paused, by a
    step taken after a fit that raised while paused."""
    if not getattr(optimizer, "built", False):
        return
    known = {id(v) for v in getattr(optimizer, "_trainable_variables", None) or ()}
    trainable = {id(v) for v in model.trainable_variables}
    missing = [w.gradient.path for w in weights
               if w.gradient is not None and id(w.gradient) in trainable and id(w.gradient) not in known]
    if known and missing:
        raise ValueError(
            f"{name}: the model's optimizer was built without the gradient-capture variables "
            f"{missing[:3]}, so it cannot capture gradients: it took its first step while capture "
            "was paused (a fit that raised leaves it paused). Capture is back on now: compile "
            "the model again (a new optimizer) before fitting."
        )


def _set_capture(model, weights, pausing: str, paused: bool) -> None:
    """Pauses (or resumes) capture for the coming batch (`pause_capture`).

    "swap": TensorFlow traces which variables are trainable into its step,
    so each state has its own step function, made (and traced) on first
    use and kept on the model until it is compiled again; `fit` calls
    `model.train_function` afresh for every batch.
    """
    optimizer = model.optimizer
    if paused and not optimizer.built:
        # Otherwise the first step builds it, and a paused one leaves G out.
        strategy = getattr(model, "distribute_strategy", None)
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            optimizer.build(model.trainable_variables)
    masked_layers.pause_capture(weights, paused)
    if pausing != "swap":
        return
    steps = model.__dict__.get("_rk_train_functions")
    if steps is None or model.train_function not in steps:
        # A new compile (or the first fit): Keras made this one, and `fit`
        # traces it (for its input iterator) with capture on.
        steps = [model.train_function, None]
        object.__setattr__(model, "_rk_train_functions", steps)
    if steps[paused] is None:
        model.make_train_function(force=True)
        steps[paused] = model.train_function
    if model.train_function is not steps[paused]:  # Keras' setattr tracks: only on a change
        model.train_function = steps[paused]


#: Constraints that keep a 0 entry 0 (they scale or clip).
_ZERO_KEEPING_CONSTRAINTS = (keras.constraints.MaxNorm, keras.constraints.MinMaxNorm,
                             keras.constraints.NonNeg, keras.constraints.UnitNorm)


def _keep_clean_through_steps(model, optimizer, traits) -> None:
    """PyTorch, eager: lets the optimizer steps of this fit that provably
    leave the weights 0 outside their masks say so, so that the next forward
    pass skips its in-place AND over the weight (`backend._torch_clean`;
    measured: 0.7% of a LeNet-300-100 step with every layer masked, net of
    this wrapper's ~14 µs). Without a sparse-training callback every step is
    followed by the AND.

    A step is vouched for, per weight, only if all of these hold: the
    optimizer cannot move an entry whose gradient is always 0 (`traits`, a
    probe of its class and configuration; no `use_ema`, which writes
    averages back into the weights); the weight was clean when the step
    began; its gradient is the mask hook's own `.grad`, unchanged since
    (`backend.torch_clean_before_step`); the optimizer state outside the
    mask is at its initial value (audited once per mask and fit, and again
    after any step that applied an unmasked gradient); and the weight has
    no constraint, or a Keras one that keeps zeros. `optimizer.apply` is
    wrapped on the instance for the fit (`on_train_end` unwraps it).
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if (keras.backend.backend() != "torch" or getattr(model, "jit_compile", False) or optimizer is None
            or getattr(inner, "use_ema", False) or traits.mixes_positions
            or traits.makes_nonfinite):
        _unwrap_apply(optimizer)  # left by a fit that raised
        return
    object.__setattr__(optimizer, "_rk_audited", {})  # what happened before this fit is unknown
    object.__setattr__(optimizer, "apply", types.MethodType(_apply_keeping_clean, optimizer))


def _unwrap_apply(optimizer) -> None:
    apply = getattr(optimizer, "__dict__", {}).get("apply")
    if getattr(apply, "__func__", None) is _apply_keeping_clean:
        del optimizer.__dict__["apply"]


def _apply_keeping_clean(optimizer, grads, trainable_variables=None):
    """`optimizer.apply` during a fit with `_keep_clean_through_steps`."""
    apply = type(optimizer).apply
    if trainable_variables is None:
        return apply(optimizer, grads, trainable_variables)
    grads, trainable_variables = list(grads), list(trainable_variables)
    clean, unmasked = gradients_backend.torch_clean_before_step(grads, trainable_variables)
    audited = optimizer.__dict__["_rk_audited"]
    for variable in unmasked:  # its state outside the mask may move: audit again
        audited.pop(id(variable), None)
    kept = []
    for token in clean:
        variable, mask = token[0], token[2]
        constraint = getattr(variable, "constraint", None)
        if constraint is not None and type(constraint) not in _ZERO_KEEPING_CONSTRAINTS:
            continue
        stamp = gradients_backend.torch_mask_stamp(mask)
        verdict = audited.get(id(variable))
        if verdict is None or verdict[0] != stamp:
            verdict = audited[id(variable)] = (
                stamp, _state_is_initial_outside(optimizer, variable, mask, trainable_variables))
        if verdict[1]:
            kept.append(token)
    result = apply(optimizer, grads, trainable_variables)
    gradients_backend.torch_still_clean(kept)
    return result


def _state_is_initial_outside(optimizer, variable, mask, model_variables) -> bool:
    """Whether every optimizer state tensor of `variable` holds its initial value outside `mask`."""
    if not optimizer.built:
        return True  # built by this step, at its initial values
    slots = engine.optimizer_state_by_variable(optimizer, model_variables).get(id(variable), [])
    outside = gradients_backend.to_host(mask) == 0
    return all(np.all(gradients_backend.to_host(slot)[outside] == engine.slot_initial_value(optimizer, slot))
               for slot in slots)


def _gradient_scale(optimizer) -> float:
    """The factor by which the last step's captured gradients are scaled.

    Keras overwrites capture variables before it unscales gradients, so a
    loss-scaled step leaves G multiplied by the loss scale it used.
    """
    scale = 1.0
    factor = getattr(optimizer, "loss_scale_factor", None)
    if factor:
        scale *= float(factor)
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        dynamic = float(ops.convert_to_numpy(optimizer.dynamic_scale))
        if int(ops.convert_to_numpy(optimizer.step_counter)) == 0 and int(
            ops.convert_to_numpy(optimizer.iterations)
        ) > 0:
            dynamic /= 2.0  # the scale doubled right after this step's gradient
        scale *= dynamic
    return scale


class GradientSource:
    """Where dense gradients ∂L/∂W_eff come from: the training step, or `grow_data`.

    Args:
      grow_data: None to read the gradient each masked weight captured in the
        last training step (the paper's rule: the current mini-batch), or
        training data for an extra stateless pass per use (see `GrowData`).
      grow_batch_size: rows drawn per use from an array tuple.
      seed: seed of the row draws.
    """

    def __init__(self, grow_data=None, grow_batch_size: int = 128, seed: int = 0):
        self.grow_batch_size = _check_batch_size(grow_batch_size)
        self.data = None if grow_data is None else GrowData(grow_data, grow_batch_size, seed)
        self._function = None
        self._key = None

    @property
    def captured(self) -> bool:
        """True if gradients are read from the training step."""
        return self.data is None

    def check(self, owner: str, model, weights) -> None:
        """Raises before training if the source cannot serve `weights`.

        `grow_data` is tried on the model once (one gradient pass), so that
        data of the wrong shape or type fails here, naming the argument,
        rather than at the first update.
        """
        if not self.captured:
            try:
                self.gradients(model, weights, step=0)
            except Exception as error:  # noqa: BLE001 - re-raised with the argument named
                raise ValueError(
                    f"{owner}: `grow_data` cannot be fed to the model: "
                    f"{type(error).__name__}: {error}"
                ) from error
            finally:
                self.data.restart()
        if self.captured:
            missing = [w.name for w in weights if w.gradient is None]
            if missing:
                raise ValueError(
                    f"{owner}: masked weights {missing} capture no gradient (the model was "
                    "sparsified with capture_gradients=False). Sparsify with "
                    "capture_gradients=True, or pass grow_data."
                )

    def gradients(self, model, weights, step: int) -> list:
        """One dense gradient per weight (as of the last step, or on a drawn batch)."""
        if self.captured:
            scale = _gradient_scale(model.optimizer)
            grads = [gradients_backend.captured_gradient(w.gradient) for w in weights]
            return grads if scale == 1.0 else [g / scale for g in grads]
        # Rebuilt when the model is recompiled: the loss is traced in.
        key = (id(model), tuple(id(w.variable) for w in weights), id(getattr(model, "_compile_loss", None)),
               id(model.optimizer))
        if self._key != key:
            self._function = gradients_backend.gradient_function(model, weights)
            self._key = key
        return self._function(self.data.batch(step))


class RigLCallback(DynamicSparseCallback):
    """RigL (Evci et al. 2020): grow where the dense gradient is largest.

    Every ΔT optimizer steps until `end_step`, each masked weight drops the
    k = floor(f_decay(t) · n_active) active entries of smallest magnitude and
    grows the k positions not kept (just-dropped ones included) with the
    largest |∂L/∂W_eff|, the gradient of the loss with respect to the masked
    weight. By default that is the gradient of the update step's own training
    batch, captured inside the compiled train step (paper §3(4); no extra
    pass; the model must be sparsified with `capture_gradients=True`, the
    default). With `grow_data`, a batch of that data is drawn at each update
    instead and costs one extra forward and backward pass (close to the
    official TF2 port, which draws one fixed batch of 1000 examples once).
    Newly grown weights start at 0 with initial optimizer state; a
    connection dropped and grown back keeps both. With `timing="official"`
    the update batch's optimizer step is skipped (see `DynamicSparseCallback`).

    Logs: on update batches, `drop_fraction` and `connections_changed`; at
    epoch end, the epoch's `connections_changed` total, `mask_updates` and the
    last `drop_fraction` (recorded by `History`).

    Args:
      delta_t: steps between updates (ΔT), >= 1.
      alpha: initial update fraction, in (0, 1].
      end_step: last update step (exclusive): an int optimizer step, or a
        float in (0, 1] giving a fraction of this fit's steps.
      decay: "cosine" or "constant".
      grow_data: None (captured training gradients), or training data: an
        `(x, y)` tuple of arrays, a `tf.data.Dataset` of batches, or an
        iterable of batches.
      seed: seed of the batch draws.
      grow_batch_size: rows drawn per update from an array tuple.
      begin_step: first step at which updates may happen.
      timing: "keras" (default) or "official" (see `DynamicSparseCallback`).
      check_invariants: audit invariants after every update.
      on_nonfinite: what a non-finite weight or score does at an update:
        "skip" (default: that weight's update is skipped with a warning, the
        others go on), "stop" (also ends the fit, like `TerminateOnNaN`) or
        "raise" (`FloatingPointError` naming the weights and the step).

    Raises:
      ValueError: for an argument out of range, `grow_data` of the wrong kind,
        or (at train begin) no masked weight, weights without gradient
        capture and no `grow_data`, or a `steps_per_execution` that does not
        divide `delta_t` (or is not 1 under the official timing).
    """

    official_skips_step = True

    def __init__(
        self,
        delta_t: int = 100,
        alpha: float = 0.3,
        end_step: int | float = 0.75,
        decay: str = "cosine",
        grow_data=None,
        seed: int = 0,
        *,
        grow_batch_size: int = 128,
        begin_step: int = 0,
        timing: str = "keras",
        check_invariants: bool = False,
        on_nonfinite: str = "skip",
    ):
        super().__init__(
            delta_t, alpha, end_step, decay, begin_step=begin_step, timing=timing,
            seed=seed, check_invariants=check_invariants, on_nonfinite=on_nonfinite,
        )
        self.source = GradientSource(grow_data, grow_batch_size, seed)
        self.grow_batch_size = self.source.grow_batch_size

    def get_config(self) -> dict:
        config = super().get_config()
        config["grow_batch_size"] = self.grow_batch_size
        return config

    def setup(self):
        super().setup()
        self.source.check(type(self).__name__, self.model, self._weights)

    def grow_scores(self, step):
        return [ops.abs(g) for g in self.source.gradients(self.model, self._weights, step)]
