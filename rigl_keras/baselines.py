"""The baselines of the RigL paper, each a small class over the shared engine.

| method | initial mask | drop | grow | when |
|---|---|---|---|---|
| Static | random | — | — | never |
| SNIP | top |g·w| of the dense net at step 0 | — | — | once |
| SET | random | smallest |w| | random | every ΔT |
| RigL | random | smallest |w| | largest |∂L/∂W| | every ΔT (`rigl_keras.RigLCallback`) |
| SNFS | random | smallest |w| | largest |momentum of ∂L/∂W| | every ΔT |
| Pruning | dense | smallest |w| | — | every `frequency` steps |
| Small-Dense | dense, narrower | — | — | — |

`get(name)` returns a `Method` that builds the model and callbacks of a
method by name, for example scripts and sweeps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import keras
import numpy as np
from keras import ops

from rigl_keras import backend as gradients_backend
from rigl_keras import distributions, engine, schedules
from rigl_keras.callbacks import (
    DynamicSparseCallback,
    GradientSource,
    RigLCallback,
    SparseTrainingCallback,
)
from rigl_keras.layers import masked_weights
from rigl_keras.sparsify import sparsify

__all__ = [
    "StaticCallback",
    "SETCallback",
    "SNFSCallback",
    "SNIPCallback",
    "MagnitudePruningCallback",
    "small_dense_width",
    "SMALL_DENSE_RULES",
    "Method",
    "METHODS",
    "get",
]


class StaticCallback(SparseTrainingCallback):
    """Static sparse training: the random mask of `sparsify` never changes.

    Masked layers already keep their connectivity without any callback (the
    gradient outside the mask is zero); this callback makes the choice
    explicit, checks that the model is masked, and can audit invariants at
    every epoch end. On PyTorch it also lets optimizer steps that provably
    keep the weights 0 outside their masks skip the in-place AND the next
    forward pass would otherwise run over each weight (as every
    sparse-training callback does; see `SparseTrainingCallback`).

    Args:
      seed: unused; accepted for a uniform interface.
      check_invariants: check binary masks, unchanged counts and zeros
        outside the mask at the end of every epoch.
      on_nonfinite: accepted for a uniform interface (static training has no
        update to skip).
    """

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if self.check_invariants:
            from rigl_keras.audit import check_sparsity

            check_sparsity(self.model, self._counts)


class SETCallback(DynamicSparseCallback):
    """SET (Mocanu et al. 2018): drop the smallest |w|, grow uniformly at random.

    Random draws are keyed to the seed, the update step and the layer, so
    the same seed gives the same run, and a resumed run continues it.

    Args:
      delta_t: steps between updates (ΔT), >= 1.
      alpha: initial update fraction, in (0, 1].
      end_step: last update step (exclusive): an int, or a float in (0, 1]
        giving a fraction of the fit's total steps.
      decay: "cosine" or "constant".
      seed: seed of the random growth.
      begin_step: first step at which updates may happen.
      timing: "keras" (default) or "official": the update follows the batch
        that starts at t = begin + i·ΔT, 0 <= t <= end (see
        `DynamicSparseCallback`).
      check_invariants: audit invariants after every update.
      on_nonfinite: what a non-finite weight or score does at an update:
        "skip" (default: that weight's update is skipped with a warning, the
        others go on), "stop" (also ends the fit, like `TerminateOnNaN`) or
        "raise" (`FloatingPointError` naming the weights and the step).

    Raises:
      ValueError: for an argument out of range.
    """

    def __init__(self, delta_t=100, alpha=0.3, end_step=0.75, decay="cosine", seed=0,
                 *, begin_step=0, timing="keras", check_invariants=False, on_nonfinite="skip"):
        super().__init__(delta_t, alpha, end_step, decay, begin_step=begin_step,
                         timing=timing, seed=seed, check_invariants=check_invariants,
                         on_nonfinite=on_nonfinite)

    def grow_scores(self, step):
        # NumPy draws: cheap, and the same on every backend.
        return [
            np.random.default_rng(self.layer_seed(step, i)).random(w.shape, dtype=np.float32)
            for i, w in enumerate(self.masked_weights)
        ]


class SNFSCallback(RigLCallback):
    """SNFS (Dettmers & Zettlemoyer 2019): grow where the momentum of dense gradients is largest.

    After every optimizer step the dense gradient of each masked weight
    updates an exponential moving average m ← β·m + (1 − β)·g, stored with
    the layer (`MaskedWeight.momentum`) so that checkpoints carry it. Every
    ΔT steps the smallest-|w| connections are dropped and the same number
    grown where |m| is largest. Where g comes from:

    * a model prepared with `rigl_keras.capture_momentum(model, β)` (as
      `baselines.get("snfs").build` does): the training step itself moves m
      (SNFS's cost is the dense backward of the step, 2·f_S + f_D, and the
      callback does nothing between updates); entries with a non-finite
      gradient keep their m;
    * otherwise the gradient the step captured in G (`capture_gradients`),
      read by this callback after every batch; a non-finite gradient is
      skipped for that step;
    * with `grow_data`, a drawn batch (an extra pass per step).

    With `redistribute=True`, the connections dropped in all weights are
    regrown across weights in proportion to each one's mean |m| over its
    active entries (as SNFS does), capped by its free positions; weights
    that are dense (by the distribution, `dense_layers` or a custom sparsity
    of 0) neither give nor take. The total count stays exact, per-weight
    counts move.

    Args:
      delta_t: steps between updates (ΔT), >= 1.
      alpha: initial update fraction, in (0, 1].
      end_step: last update step (exclusive): an int, or a float in (0, 1].
      decay: "cosine" or "constant".
      momentum: β in [0, 1).
      grow_data: None (captured training gradients) or training data (see
        `RigLCallback`).
      redistribute: move the budget between layers by mean momentum.
      seed: seed of the batch draws.
      grow_batch_size: rows drawn per step from an array tuple.
      begin_step: first step at which updates may happen.
      timing: "keras" (default) or "official": the update follows the batch
        that starts at t = begin + i·ΔT, 0 <= t <= end; unlike RigL's, that
        batch trains, as in the official SNFS (see `DynamicSparseCallback`).
      check_invariants: audit invariants after every update.
      on_nonfinite: what a non-finite weight or score does at an update:
        "skip" (default: that weight's update is skipped with a warning, the
        others go on), "stop" (also ends the fit, like `TerminateOnNaN`) or
        "raise" (`FloatingPointError` naming the weights and the step).

    Raises:
      ValueError: for an argument out of range, or (at train begin) weights
        without gradient capture and no `grow_data`,
        `steps_per_execution` > 1 with gradients read after each batch, or a
        captured momentum it cannot use (see `capture_momentum`).
    """

    official_skips_step = False

    def __init__(self, delta_t=100, alpha=0.3, end_step=0.75, decay="cosine",
                 momentum=0.9, grow_data=None, redistribute=False, seed=0, *,
                 grow_batch_size=128, begin_step=0, timing="keras", check_invariants=False,
                 on_nonfinite="skip"):
        super().__init__(delta_t, alpha, end_step, decay, grow_data, seed,
                         grow_batch_size=grow_batch_size, begin_step=begin_step,
                         timing=timing, check_invariants=check_invariants,
                         on_nonfinite=on_nonfinite)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"`momentum` must be in [0, 1); got {momentum!r}.")
        self.momentum = float(momentum)
        self.redistribute = bool(redistribute)
        self.keeps_counts = not self.redistribute

    def get_config(self):
        config = super().get_config()
        config.update(momentum=self.momentum, redistribute=self.redistribute)
        return config

    def setup(self):
        self._in_step = self._check_in_step()
        if self._in_step:  # RigL's setup less its check for capture variables G: unused here
            DynamicSparseCallback.setup(self)
        else:
            super().setup()
        if (self.source.captured and not self._in_step
                and int(getattr(self.model, "steps_per_execution", 1) or 1) > 1):
            raise ValueError(
                "SNFSCallback: the momentum needs every step's gradient, but with "
                "steps_per_execution > 1 only the last step of each execution is seen. "
                "Use steps_per_execution=1, rigl_keras.capture_momentum, or grow_data."
            )
        with gradients_backend.creation_scope(self.model):
            for w in self.masked_weights:
                w.ensure_momentum()

    def _check_in_step(self) -> bool:
        """Whether the training step moves the momentum (`capture_momentum`); raises
        if it does for only some weights, with another β, or where it cannot."""
        weights = self.masked_weights
        betas = {w.name: w.momentum_beta for w in weights}
        if all(b is None for b in betas.values()):
            return False
        problem = None
        if any(b is None for b in betas.values()):
            problem = (f"only some masked weights capture their momentum "
                       f"({[n for n, b in betas.items() if b is not None]})")
        elif any(b != self.momentum for b in betas.values()):
            problem = (f"the model captures momentum with β = {sorted(set(betas.values()))} "
                       f"but the callback has momentum={self.momentum}")
        elif not self.source.captured:
            problem = "with grow_data the momentum follows the drawn batches, not the training step"
        else:
            optimizer = self.model.optimizer
            if (isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
                    or getattr(optimizer, "loss_scale_factor", None)):
                problem = "loss scaling scales the gradient the step would average"
            elif getattr(optimizer, "gradient_accumulation_steps", None):
                problem = ("with gradient_accumulation_steps Keras keeps the elementwise "
                           "maximum of the steps' values, not their mean")
        if problem is not None:
            raise ValueError(
                f"SNFSCallback: cannot use the momentum captured by the training step: "
                f"{problem}. Build the model without rigl_keras.capture_momentum (the "
                "callback then updates the momentum after every step) or fix the mismatch."
            )
        return True

    def next_event(self, step):
        if self._in_step:
            return super().next_event(step)
        return step + 1  # the momentum moves after every step

    def after_step(self, previous, step, logs):
        if not self._in_step:
            weights = self.masked_weights
            grads = self.source.gradients(self.model, weights, step)
            momenta = gradients_backend.moving_averages(
                [w.momentum for w in weights], grads, self.momentum
            )
            for w, m in zip(weights, momenta):
                w.momentum.assign(m)
        super().after_step(previous, step, logs)

    def grow_scores(self, step):
        return [ops.abs(w.momentum.value) for w in self.masked_weights]

    def update(self, step, logs=None):
        if not self.redistribute:
            return super().update(step, logs)
        fraction = self.drop_fraction(step)
        weights = self.masked_weights
        scores = self.grow_scores(step)
        active = [engine.active_connections(w) for w in weights]
        # Dense weights (by the distribution or the user) neither give nor take.
        problems = [engine.score_problem(w, s) if a < w.size else None
                    for w, s, a in zip(weights, scores, active)]
        usable = [a < w.size and p is None for w, a, p in zip(weights, active, problems)]
        drops = [int(fraction * a) if ok else 0 for a, ok in zip(active, usable)]
        capacity = [(w.size - (a - d)) if ok else 0 for w, a, d, ok in zip(weights, active, drops, usable)]
        means = []
        for w, score, ok in zip(weights, scores, usable):
            on = ops.not_equal(w.mask.value, 0)
            mean = ops.sum(ops.where(on, score, 0)) / ops.maximum(ops.sum(ops.cast(on, "float32")), 1.0)
            means.append(float(mean) if ok else 0.0)
        grows = _allocate(sum(drops), means, capacity)
        optimizer = self.model.optimizer
        results = [
            engine.drop_grow(w, d, s, self.optimizer_slots(w), n_grow=g, optimizer=optimizer)
            if ok else engine.UpdateResult(w.name, a, 0, skipped=p is not None, reason=p)
            for w, s, d, g, ok, a, p in zip(weights, scores, drops, grows, usable, active, problems)
        ]
        self.record(logs if logs is not None else {}, fraction, results)
        return results


def capture_momentum(model: keras.Model, momentum: float = 0.9) -> None:
    """Lets every training step update SNFS's moving average itself (SNFS's fast path).

    Each masked weight gets a trainable moving-average variable M that the
    optimizer overwrites at every step with β·M + (1 − β)·∂L/∂W_eff of the
    batch (a term of the effective weight that is 0 in the forward pass;
    `rigl_keras.backend.masked_value`). `SNFSCallback(momentum=β)` then has
    nothing to do between updates; without this it reads the gradient and
    updates M after every batch, which on a small model costs more than the
    step itself (and on JAX syncs the whole training state). Entries whose
    gradient is not finite keep their M. It also works with
    `steps_per_execution` > 1. `SNFSCallback` refuses it at fit start with a
    loss-scale optimizer or `gradient_accumulation_steps` (where Keras does
    not pass the plain gradient through), with `grow_data`, or with another β.

    The masked layers record it in their configs (`capture_momentum=β`), so
    a `.keras` file loads with it and with the momenta's values. A model
    whose momenta were made by the callback can be switched later: compile
    it (again) and call this; the values are kept.

    Args:
      model: a sparsified model (`rigl_keras.sparsify`) whose optimizer is
        not built yet (before the first fit).
      momentum: β in [0, 1).

    Raises:
      ValueError: if the model has no masked weight, β is out of range, or
        its optimizer is already built (the new variables would be unknown
        to it).
    """
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise ValueError(f"`momentum` must be in [0, 1); got {momentum!r}.")
    weights = masked_weights(model)
    if not weights:
        raise ValueError(f"capture_momentum: model {model.name!r} has no masked weight.")
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and getattr(optimizer, "built", False):
        raise ValueError(
            "capture_momentum: the model's optimizer is already built, and would not know "
            "the new momentum variables. Call capture_momentum before the first fit (a "
            "loaded model comes with a built optimizer: compile it again first)."
        )
    from rigl_keras.layers import MaskedWeightsMixin

    with gradients_backend.creation_scope(model):
        for w in weights:
            w.capture_momentum(float(momentum))
            for layer in w.chain + (w.layer,):  # recorded in the configs: files keep it
                if isinstance(layer, MaskedWeightsMixin):
                    object.__setattr__(layer, "capture_momentum", float(momentum))
    model.train_function = None  # traced without the momentum term


def _allocate(total: int, weights, capacity) -> list[int]:
    """Splits `total` into integers ∝ `weights`, each <= its capacity, summing to `total`.

    Largest-remainder rounding; what a full layer cannot take goes to the
    others by the same rule.
    """
    counts = [0] * len(weights)
    remaining = total
    open_ = [i for i, c in enumerate(capacity) if c > 0]
    while remaining > 0 and open_:
        w = np.array([max(weights[i], 0.0) for i in open_], dtype="float64")
        w = w / w.sum() if w.sum() > 0 else np.full(len(open_), 1.0 / len(open_))
        share = w * remaining
        base = np.floor(share).astype(int)
        leftover = remaining - int(base.sum())
        for j in np.argsort(-(share - base), kind="stable")[:leftover]:
            base[j] += 1
        for j, i in enumerate(open_):
            take = min(int(base[j]), capacity[i] - counts[i])
            counts[i] += take
            remaining -= take
        open_ = [i for i in open_ if counts[i] < capacity[i]]
    if remaining:
        raise ValueError("Not enough free positions to regrow the dropped connections.")
    return counts


class SNIPCallback(SparseTrainingCallback):
    """SNIP (Lee et al. 2019): one-shot pruning at initialization by |g·w|.

    At the start of training (optimizer step 0 only; a resumed run keeps its
    mask), every masked weight is made dense again (entries that `sparsify`
    zeroed are re-drawn from the layer's initializer) and its connection
    sensitivity |∂L/∂W · W| at initialization is measured on one batch; each
    weight then keeps exactly its top `active_count(N, s_l)` connections,
    s_l from the distribution, and the mask is fixed afterwards.

    The batch is, by default, the first training batch: its gradient is
    captured by the first training step, after which the kept weights are
    restored to their initial values and all optimizer state is reset, so
    training proper starts from the pruned initialization at step 1. With
    `grow_data`, a drawn batch is used before the first step instead.

    Args:
      sparsity: overall sparsity S in [0, 1).
      distribution: "uniform", "er" or "erk".
      grow_data: None (the first training batch) or training data (see
        `RigLCallback`).
      custom_sparsity: {selector: sparsity} overrides.
      dense_layers: selectors of weights to keep dense.
      seed: seed of the re-drawn weights and the batch draw.
      grow_batch_size: rows drawn from an array tuple.
      erk_power_scale: exponent of the ERK scale.
      check_invariants: audit invariants after the pruning.
      on_nonfinite: what a non-finite weight or score does at an update:
        "skip" (default: that weight's update is skipped with a warning, the
        others go on), "stop" (also ends the fit, like `TerminateOnNaN`) or
        "raise" (`FloatingPointError` naming the weights and the step).

    Raises:
      ValueError: for a bad sparsity or distribution, or (at train begin) a
        selector that matches no masked weight, or weights without gradient
        capture and no `grow_data`.
    """

    keeps_counts = False

    def __init__(self, sparsity, distribution="erk", grow_data=None, *, custom_sparsity=None,
                 dense_layers=None, seed=0, grow_batch_size=128, erk_power_scale=1.0,
                 check_invariants=False, on_nonfinite="skip"):
        super().__init__(seed=seed, check_invariants=check_invariants, on_nonfinite=on_nonfinite)
        self.sparsity = distributions.validate_sparsity(sparsity)
        if not isinstance(distribution, str) or distribution.lower() not in distributions.DISTRIBUTIONS:
            raise ValueError(
                f"`distribution` must be one of {distributions.DISTRIBUTIONS}; got {distribution!r}."
            )
        self.distribution = distribution.lower()
        self.custom_sparsity = dict(custom_sparsity or {})
        self.dense_layers = list(dense_layers or [])
        self.erk_power_scale = erk_power_scale
        self.source = GradientSource(grow_data, grow_batch_size, seed)
        self.grow_batch_size = self.source.grow_batch_size
        self._pending = None

    def get_config(self):
        config = super().get_config()
        config.update(
            sparsity=self.sparsity, distribution=self.distribution,
            custom_sparsity=self.custom_sparsity, dense_layers=self.dense_layers,
            grow_batch_size=self.grow_batch_size, erk_power_scale=self.erk_power_scale,
        )
        return config

    def setup(self):
        self.source.check(type(self).__name__, self.model, self.masked_weights)
        sparsities = distributions.sparsity_distribution(
            self.model, self.sparsity, self.distribution, custom_sparsity=self.custom_sparsity,
            dense_layers=self.dense_layers, erk_power_scale=self.erk_power_scale,
            sparse_embeddings=True,
        )
        self._pending = None
        self._targets = {w.name: distributions.active_count(w.size, sparsities[w.name])
                         for w in self.masked_weights}
        if self.current_step() != 0:
            return  # resumed: the mask was chosen at step 0 and is restored
        initial = self._densify()
        if self.source.captured:
            self._pending = (sparsities, initial)  # pruned after the first step
        else:
            grads = self.source.gradients(self.model, self.masked_weights, 0)
            self._prune(sparsities, initial, grads)

    def _densify(self) -> list:
        """Re-draws masked-out entries from the initializer; returns the dense initial values."""
        values = []
        for index, w in enumerate(self.masked_weights):
            initializer = keras.initializers.get(
                getattr(w.layer, f"{w.attribute}_initializer", None)
                or getattr(w.layer, "kernel_initializer", "glorot_uniform")
            )
            if hasattr(initializer, "seed"):
                initializer = initializer.__class__.from_config(
                    {**initializer.get_config(), "seed": self.layer_seed(0, index)}
                )
            fresh = initializer(w.shape, dtype=w.variable.dtype)
            on = ops.not_equal(w.mask.value, 0)
            w.variable.assign(ops.where(on, w.variable.value, fresh))
            w.mask.assign(ops.ones_like(w.mask.value))
            values.append(ops.convert_to_numpy(w.variable))
        return values

    def schedule_ready(self):
        # Every callback has restored what it restores by now. A state from
        # after step 0 whose sparse weights are all still dense was saved
        # between the dense first step and the pruning (a step-level backup
        # listed before this callback): SNIP cannot score that batch again.
        step = self.current_step()
        if step == 0 or self._pending is not None:
            return
        sparse = [w for w in self.masked_weights if self._targets[w.name] < w.size]
        if sparse and all(engine.active_connections(w) == w.size for w in sparse):
            raise ValueError(
                f"{type(self).__name__}: the model was restored at step {step} from a state "
                "saved before SNIP's pruning step (a step-level BackupAndRestore listed before "
                "this callback?), so its masks are still dense and the first batch's scores are "
                "gone. List BackupAndRestore after SNIPCallback (or use save_freq='epoch') and "
                "start again from scratch."
            )

    def next_event(self, step):
        return 1 if self._pending is not None and step < 1 else None

    def after_step(self, previous, step, logs):
        if self._pending is None:
            return
        sparsities, initial = self._pending
        self._pending = None
        grads = self.source.gradients(self.model, self.masked_weights, 0)
        # Training proper starts from the pruned initialization: undo the
        # dense first step everywhere (weights and every optimizer state).
        for w, value in zip(self.masked_weights, initial):
            w.variable.assign(value)
        self._prune(sparsities, initial, grads)
        optimizer = self.model.optimizer
        for w in self.masked_weights:
            for slot in self.optimizer_slots(w):
                slot.assign(ops.full_like(slot.value, engine.slot_initial_value(optimizer, slot)))

    def _prune(self, sparsities, initial, grads) -> None:
        optimizer = self.model.optimizer
        results = []
        for w, value, grad in zip(self.masked_weights, initial, grads):
            sensitivity = ops.abs(ops.multiply(ops.cast(grad, "float32"), ops.cast(value, "float32")))
            n_keep = distributions.active_count(w.size, sparsities[w.name])
            results.append(engine.prune(w, n_keep, self.optimizer_slots(w), score=sensitivity,
                                        optimizer=optimizer))
        self.record({}, 0.0, results)


class MagnitudePruningCallback(SparseTrainingCallback):
    """Gradual magnitude pruning (Zhu & Gupta 2018): dense to sparse.

    Every `frequency` steps in [begin_step, end_step], each masked weight keeps
    its round((1 − s_t)·N) largest-|w| connections, with
    s_t = s_f + (s_i − s_f)(1 − (t − t_0)/(t_e − t_0))^exponent. Masks only
    shrink; at `end_step` every weight is exactly at its final sparsity. A
    float `final_sparsity` applies to every masked weight (uniform per layer,
    as the official pruning runs and tfmot do).
    Start from a dense mask (`sparsify(model, 0.0)`).

    Args:
      final_sparsity: s_f, a float in [0, 1) for every weight, a
        {weight name: sparsity} map (e.g. from `sparsity_distribution`), or a
        tfmot `PolynomialDecay`/`ConstantSparsity` schedule (then the other
        schedule arguments are taken from it).
      begin_step: t_0, an int step or a float fraction of the fit's steps.
      end_step: t_e, an int step or a float fraction of the fit's steps.
      frequency: steps between pruning events, >= 1.
      initial_sparsity: s_i.
      exponent: the polynomial's exponent (3 in the paper).
      check_invariants: audit invariants after every pruning step.
      on_nonfinite: what a non-finite weight or score does at an update:
        "skip" (default: that weight's update is skipped with a warning, the
        others go on), "stop" (also ends the fit, like `TerminateOnNaN`) or
        "raise" (`FloatingPointError` naming the weights and the step).

    Raises:
      ValueError: for an argument out of range, or (at train begin) a map
        naming weights that are not masked.
    """

    keeps_counts = False
    fraction_key = "target_sparsity"

    def __init__(self, final_sparsity=None, begin_step=0, end_step=0.75, frequency=100,
                 initial_sparsity=0.0, exponent=3, *, check_invariants=False,
                 on_nonfinite="skip"):
        super().__init__(seed=0, check_invariants=check_invariants, on_nonfinite=on_nonfinite)
        tfmot_args = _from_tfmot_schedule(final_sparsity)
        if tfmot_args is not None:
            final_sparsity = tfmot_args.pop("final_sparsity")
            begin_step, end_step = tfmot_args["begin_step"], tfmot_args["end_step"]
            frequency, initial_sparsity = tfmot_args["frequency"], tfmot_args["initial_sparsity"]
            exponent = tfmot_args["exponent"]
        if isinstance(final_sparsity, Mapping):
            for name, value in final_sparsity.items():
                distributions.validate_sparsity(value, f"final_sparsity[{name!r}]")
            self.final_sparsity = dict(final_sparsity)
        else:
            self.final_sparsity = distributions.validate_sparsity(final_sparsity, "final_sparsity")
        for name, value in (("begin_step", begin_step), ("end_step", end_step)):
            if isinstance(value, float) and not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` as a fraction must be in [0, 1]; got {value!r}.")
        self.begin_step, self.end_step = begin_step, end_step
        self.frequency, self.initial_sparsity, self.exponent = frequency, initial_sparsity, exponent
        # Validate now what does not depend on the fit's length: steps as
        # given when both are ints, every other argument on a stand-in ramp.
        both_ints = not isinstance(begin_step, float) and not isinstance(end_step, float)
        finals = (self.final_sparsity.values() if isinstance(self.final_sparsity, Mapping)
                  else [self.final_sparsity])
        for final in finals:
            self._schedule_for(begin_step if both_ints else 0, end_step if both_ints else 1, final)
        self._schedules: dict[str, schedules.PolynomialSchedule] = {}

    def _schedule_for(self, begin, end, final):
        # A layer whose final sparsity is below the common initial one starts there.
        initial = self.initial_sparsity
        if isinstance(initial, (int, float)) and not isinstance(initial, bool):
            initial = min(initial, final)
        return schedules.PolynomialSchedule(
            final_sparsity=final, begin_step=begin, end_step=end, frequency=self.frequency,
            initial_sparsity=initial, exponent=self.exponent,
        )

    def get_config(self):
        return {
            "final_sparsity": self.final_sparsity, "begin_step": self.begin_step,
            "end_step": self.end_step, "frequency": self.frequency,
            "initial_sparsity": self.initial_sparsity, "exponent": self.exponent,
            "check_invariants": self.check_invariants, "on_nonfinite": self.on_nonfinite,
        }

    def setup(self):
        total = self.total_steps
        begin = schedules.resolve_step(self.begin_step, total, "begin_step")
        end = schedules.resolve_step(self.end_step, total, "end_step")
        names = [w.name for w in self.masked_weights]
        if isinstance(self.final_sparsity, Mapping):
            unknown = sorted(set(self.final_sparsity) - set(names))
            if unknown:
                raise ValueError(
                    f"`final_sparsity` names weights that are not masked: {unknown}. "
                    f"Masked weights: {names}."
                )
            finals = {n: float(self.final_sparsity.get(n, 0.0)) for n in names}
        else:
            finals = {n: self.final_sparsity for n in names}
        self._schedules = {n: self._schedule_for(begin, end, finals[n]) for n in names}

    def sparsity_at(self, step: int) -> dict[str, float]:
        """Target sparsity of every masked weight at `step` (after train begin)."""
        return {name: s.sparsity(step) for name, s in self._schedules.items()}

    def next_event(self, step):
        schedule = next(iter(self._schedules.values()), None)
        return None if schedule is None else schedule.next_prune_step(step)

    def after_step(self, previous, step, logs):
        schedule = next(iter(self._schedules.values()))
        due = schedule.last_prune_step(previous, step)
        if due is not None:
            self.prune(due, logs)

    def prune(self, step: int, logs: dict | None = None) -> list:
        """Prunes every masked weight to its target sparsity at `step`."""
        results = []
        optimizer = self.model.optimizer
        for w in self.masked_weights:
            target = self._schedules[w.name].sparsity(step)
            n_keep = distributions.active_count(w.size, target)
            results.append(engine.prune(w, n_keep, self.optimizer_slots(w), optimizer=optimizer))
        # Logged: the overall target sparsity of the masked kernels.
        sizes = {w.name: w.size for w in self.masked_weights}
        target = sum(self._schedules[n].sparsity(step) * sizes[n] for n in sizes) / sum(sizes.values())
        self.record(logs if logs is not None else {}, target, results)
        return results


def _from_tfmot_schedule(schedule):
    """Schedule arguments from a tfmot PruningSchedule, without importing tfmot."""
    if schedule is None or isinstance(schedule, (int, float, Mapping)):
        return None
    kind = type(schedule).__name__
    if not hasattr(schedule, "get_config") or kind not in ("PolynomialDecay", "ConstantSparsity"):
        raise ValueError(
            "`final_sparsity` must be a float, a {layer: sparsity} map or a tfmot "
            f"PolynomialDecay/ConstantSparsity schedule; got {kind}."
        )
    config = schedule.get_config()["config"]
    end = config["end_step"]
    if end == -1:
        end = 2**62  # tfmot: prune forever
    if kind == "ConstantSparsity":
        target = float(config["target_sparsity"])
        return dict(final_sparsity=target, initial_sparsity=target, begin_step=config["begin_step"],
                    end_step=end, frequency=config["frequency"], exponent=1)
    return dict(final_sparsity=float(config["final_sparsity"]),
                initial_sparsity=float(config["initial_sparsity"]),
                begin_step=config["begin_step"], end_step=end,
                frequency=config["frequency"], exponent=config["power"])


#: Rules accepted by `small_dense_width`.
SMALL_DENSE_RULES = ("params", "storage")


def small_dense_width(build_fn: Callable[[float], keras.Model], sparsity: float,
                      rule: str = "params", *, distribution: str | None = None,
                      custom_sparsity: Mapping | None = None, dense_layers=None,
                      param_bits: int = 32) -> float:
    """The width multiplier of a dense model as large as the sparse one (Small-Dense).

    The sparse model is `build_fn(1.0)` with its maskable weights at the
    per-weight sparsities s_l of `distribution` (None: every maskable weight
    at `sparsity`), `custom_sparsity` and `dense_layers`, each keeping
    a_l = N_l − ⌊s_l·N_l⌋ of its N_l entries, every other parameter (biases,
    ...) kept. The returned multiplier w is the one for which
    `build_fn(w).count_params()` is closest to the target P*:

    * ``"params"`` (the default): the sparse model's parameter count,
      P* = P_other + Σ a_l. Masks are not counted.
    * ``"storage"``: the official ImageNet rule (the Small-Dense widths of
      google-research/rigl's ResNet-50 / MobileNet colabs, counted with the
      MicroNet storage counter): equal storage bits, every parameter stored
      in `param_bits` bits and every sparse weight (s_l > 0) also storing a
      1-bit mask of N_l entries, so
      P*·b = (P_other + Σ a_l)·b + Σ_{s_l>0} N_l, i.e.
      P* = P_other + Σ a_l + Σ_{s_l>0} N_l / b.

    Some official experiments fix the small model's hidden sizes instead
    (rigl_tf2/mlp_configs/small_dense.gin: LeNet-300-100 at S = 0.98 as
    hidden sizes (8, 8)); build such a model directly (see
    `examples/fashion_mnist.py`, `--small_dense_rule=fixed`).

    Args:
      build_fn: width multiplier -> built dense Keras model; widths should be
        rounded inside, e.g. `max(1, round(300 * w))`, and the parameter
        count should grow with w.
      sparsity: overall sparsity S in [0, 1).
      rule: "params" or "storage".
      distribution: None, "uniform", "er" or "erk": the per-weight
        sparsities of the sparse model (see `sparsity_distribution`).
      custom_sparsity: {selector: sparsity} overrides, as in `sparsify`.
      dense_layers: selectors of weights kept dense (no mask bits).
      param_bits: bits per stored parameter for "storage" (32: float32).

    Returns:
      The multiplier w > 0: at most 1 for "params"; above 1 for "storage"
      when the masks make the sparse model larger than the dense one
      (S < 1/param_bits).

    Raises:
      ValueError: for a `build_fn` that is not callable, a sparsity outside
        [0, 1), an unknown `rule` or `distribution`, a `param_bits` that is
        not a positive int, or selectors that match no maskable weight.
    """
    if not callable(build_fn):
        raise ValueError(f"`build_fn` must be callable (width -> model); got {build_fn!r}.")
    sparsity = distributions.validate_sparsity(sparsity)
    if not isinstance(rule, str) or rule not in SMALL_DENSE_RULES:
        raise ValueError(f"`rule` must be one of {SMALL_DENSE_RULES}; got {rule!r}.")
    if isinstance(param_bits, bool) or not isinstance(param_bits, (int, np.integer)) or param_bits < 1:
        raise ValueError(f"`param_bits` must be a positive int; got {param_bits!r}.")
    if distribution is not None and (
            not isinstance(distribution, str) or distribution.lower() not in distributions.DISTRIBUTIONS):
        raise ValueError(
            f"`distribution` must be None or one of {distributions.DISTRIBUTIONS}; "
            f"got {distribution!r}.")
    reference = build_fn(1.0)
    weights, custom, dense = distributions.plan(
        reference, custom_sparsity=custom_sparsity, dense_layers=dense_layers)
    if distribution is None:
        per_weight = {w.name: custom.get(w.name, 0.0 if w.name in dense else sparsity)
                      for w in weights}
    else:
        per_weight = distributions.sparsity_distribution(
            reference, sparsity, distribution, custom_sparsity=custom_sparsity,
            dense_layers=dense_layers)
    kernels = sum(w.size for w in weights)
    active = sum(distributions.active_count(w.size, per_weight[w.name]) for w in weights)
    target = float(reference.count_params() - kernels + active)
    if rule == "storage":
        target += sum(w.size for w in weights if per_weight[w.name] > 0) / float(param_bits)

    def count(width):
        return build_fn(width).count_params()

    low, high = 1e-4, 1.0
    while count(high) < target and high < 2.0 ** 20:  # storage rule, S < 1/param_bits
        low, high = high, 2.0 * high
    for _ in range(40):  # parameter count grows with width: bisect
        middle = (low + high) / 2
        if count(middle) < target:
            low = middle
        else:
            high = middle
    return min((low, high), key=lambda w: abs(count(w) - target))


@dataclasses.dataclass(frozen=True)
class Method:
    """A training method by name: how to build its model and callbacks.

    Attributes:
      name: one of `METHODS`.
      uses_gradients: whether the method reads dense gradients (the model is
        then sparsified with gradient capture).
    """

    name: str
    uses_gradients: bool = False

    def build(
        self,
        build_fn: Callable[[float], keras.Model],
        sparsity: float,
        *,
        distribution: str | None = None,
        seed: int = 0,
        delta_t: int = 100,
        alpha: float = 0.3,
        end_step: int | float = 0.75,
        decay: str = "cosine",
        timing: str = "keras",
        grow_data=None,
        prune_begin_step: int | float = 0.0,
        prune_end_step: int | float = 0.75,
        prune_frequency: int = 100,
    ) -> tuple[keras.Model, list[keras.callbacks.Callback]]:
        """The (uncompiled) model and the callbacks of this method.

        Args:
          build_fn: width multiplier -> built dense Keras model.
          sparsity: overall sparsity S in [0, 1).
          distribution: "uniform", "er" or "erk"; None means "erk" for the
            sparse-from-scratch methods and, for pruning, S on every weight
            (the official pruning runs).
          seed: seed of masks and of the method's randomness.
          delta_t, alpha, end_step, decay, timing: the drop/grow schedule
            (see `rigl_keras.UpdateSchedule`).
          grow_data: None (gradients of the training batches) or training
            data for RigL, SNFS and SNIP (see `RigLCallback`).
          prune_begin_step, prune_end_step, prune_frequency: the pruning
            schedule (int steps or float fractions of the fit).

        Returns:
          (model, callbacks).

        Raises:
          ValueError: for bad arguments.
        """
        sparsity = distributions.validate_sparsity(sparsity)
        schedule = dict(delta_t=delta_t, alpha=alpha, end_step=end_step, decay=decay,
                        timing=timing, seed=seed)
        if self.name == "dense":
            return build_fn(1.0), []
        if self.name == "small_dense":
            return build_fn(small_dense_width(build_fn, sparsity)), []
        dense = build_fn(1.0)
        if self.name == "prune":
            finals = (sparsity if distribution is None
                      else distributions.sparsity_distribution(dense, sparsity, distribution))
            model = sparsify(dense, 0.0, "uniform", seed=seed, capture_gradients=False)
            return model, [MagnitudePruningCallback(
                finals, prune_begin_step, prune_end_step, prune_frequency)]
        distribution = distribution or "erk"
        # SNFS reads no G: its step moves the momentum itself (capture_momentum).
        model = sparsify(dense, sparsity, distribution, seed=seed,
                         capture_gradients=(self.uses_gradients and grow_data is None
                                            and self.name != "snfs"))
        if self.name == "static":
            return model, [StaticCallback()]
        if self.name == "snip":
            return model, [SNIPCallback(sparsity, distribution, grow_data, seed=seed)]
        if self.name == "set":
            return model, [SETCallback(**schedule)]
        if self.name == "snfs":
            callback = SNFSCallback(grow_data=grow_data, **schedule)
            if grow_data is None:
                capture_momentum(model, callback.momentum)
            return model, [callback]
        return model, [RigLCallback(grow_data=grow_data, **schedule)]


#: Method names accepted by `get`.
METHODS = ("dense", "static", "snip", "set", "snfs", "rigl", "prune", "small_dense")
_GRADIENTS = {"snip", "snfs", "rigl"}


def get(name: str) -> Method:
    """The `Method` called `name` (case-insensitive).

    Args:
      name: one of `METHODS`.

    Returns:
      A `Method`.

    Raises:
      ValueError: for an unknown name.
    """
    key = str(name).lower().replace("-", "_")
    if key not in METHODS:
        raise ValueError(f"Unknown method {name!r}; choose one of {METHODS}.")
    return Method(key, key in _GRADIENTS)
