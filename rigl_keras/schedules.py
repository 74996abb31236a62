"""When connectivity updates happen and how many connections they change.

`UpdateSchedule` is the drop/grow timetable of RigL, SET and SNFS (paper
§3(2)); `PolynomialSchedule` is the gradual-pruning sparsity ramp of Zhu &
Gupta (2018). Both are pure functions of the optimizer step, so a resumed
run recomputes exactly where it was.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

__all__ = ["DECAYS", "TIMINGS", "UpdateSchedule", "PolynomialSchedule"]

#: Names accepted for `decay` (f_decay of the paper).
DECAYS = ("cosine", "constant")
#: Names accepted for `timing` (see `UpdateSchedule`).
TIMINGS = ("keras", "official")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, bool
    )


def resolve_step(value, total_steps: int | None, name: str) -> int:
    """An int step, or a float fraction of `total_steps`, as an int step.

    Raises:
      ValueError: if a fraction is given and `total_steps` is unknown.
    """
    if _is_int(value):
        return int(value)
    if total_steps is None:
        raise ValueError(
            f"`{name}`={value} is a fraction of the fit's total steps, but the "
            "number of steps is unknown (a dataset of unknown length?). Pass an "
            f"int `{name}` or `steps_per_epoch` to fit."
        )
    return int(round(float(value) * total_steps))


@dataclasses.dataclass(frozen=True)
class UpdateSchedule:
    """The drop/grow schedule: every `delta_t` steps from `begin_step` until `end_step`.

    Two timings are offered. "keras" (the default): an update follows the
    optimizer step that brings the step count to t, for t mod ΔT = 0 and
    0 < t < T_end, with f_decay evaluated at t measured from the schedule's
    origin. "official" (google-research/rigl's `SparseSETOptimizerBase`): the
    batch that starts at step t is an update batch for t = begin + i·ΔT,
    0 <= t <= T_end (step 0 and the end step included), T_end is an absolute
    int step, and f_decay is the cosine over [0, T_end − begin] evaluated at
    the absolute step t. Whether the update batch also trains (SET, SNFS) or
    only supplies the growth gradient (RigL) is the callback's business.

    Attributes:
      delta_t: steps between connectivity updates (ΔT), >= 1.
      alpha: initial fraction of active connections updated, in (0, 1].
      end_step: T_end, last step (exclusive) of updates: an int step >= 1, or
        a float in (0, 1] giving a fraction of the fit's total steps.
      decay: "cosine" (α/2·(1 + cos(π t / T_end))) or "constant" (α).
      begin_step: first step at which updates may happen, >= 0.
      timing: "keras" or "official" (above); "official" needs an int
        `end_step`, as the official code's is.
    """

    delta_t: int = 100
    alpha: float = 0.3
    end_step: int | float = 0.75
    decay: str = "cosine"
    begin_step: int = 0
    timing: str = "keras"

    def __post_init__(self):
        if not _is_int(self.delta_t) or self.delta_t < 1:
            raise ValueError(f"`delta_t` must be an int >= 1; got {self.delta_t!r}.")
        if not _is_number(self.alpha) or not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"`alpha` must be in (0, 1]; got {self.alpha!r}.")
        if _is_int(self.end_step):
            if self.end_step <= 0:
                raise ValueError(f"`end_step` must be > 0; got {self.end_step!r}.")
        elif not _is_number(self.end_step) or not 0.0 < self.end_step <= 1.0:
            raise ValueError(
                "`end_step` must be an int step > 0 or a float fraction of the "
                f"total steps in (0, 1]; got {self.end_step!r}."
            )
        if not isinstance(self.decay, str) or self.decay.lower() not in DECAYS:
            raise ValueError(f"`decay` must be one of {DECAYS}; got {self.decay!r}.")
        if not _is_int(self.begin_step) or self.begin_step < 0:
            raise ValueError(f"`begin_step` must be an int >= 0; got {self.begin_step!r}.")
        if self.timing not in TIMINGS:
            raise ValueError(f"`timing` must be one of {TIMINGS}; got {self.timing!r}.")
        if self.official and not _is_int(self.end_step):
            raise ValueError(
                "`timing='official'` takes an int `end_step` (an absolute optimizer step, "
                f"as in the official code); got {self.end_step!r}."
            )
        if self.official and self.end_step < self.begin_step:
            raise ValueError(
                f"`end_step` ({self.end_step}) must not precede `begin_step` ({self.begin_step})."
            )

    @property
    def official(self) -> bool:
        """True under the official timing."""
        return self.timing == "official"

    def end(self, total_steps: int | None) -> int:
        """T_end as a step count, given the fit's total number of steps."""
        return resolve_step(self.end_step, total_steps, "end_step")

    def is_update_step(self, step: int, end: int) -> bool:
        """True if `step` is an update step (keras: t mod ΔT = 0, 0 < t < T_end;
        official: (t − begin) mod ΔT = 0, begin <= t <= T_end)."""
        if self.official:
            return (
                self.begin_step <= step <= end
                and (step - self.begin_step) % self.delta_t == 0
            )
        return (
            step > 0
            and step >= self.begin_step
            and step < end
            and step % self.delta_t == 0
        )

    def last_update_step(self, first: int, last: int, end: int) -> int | None:
        """The latest update step in (first, last], or None.

        Several optimizer steps can pass between two callback calls
        (`steps_per_execution` > 1); an update that falls inside is done
        once, at the end of that run of steps. (Keras timing only.)
        """
        candidate = min(last, end - 1)
        candidate -= candidate % self.delta_t
        if candidate > first and self.is_update_step(candidate, end):
            return candidate
        return None

    def next_update_step(self, step: int, end: int) -> int | None:
        """The first update step after `step`, or None if there is none before `end`."""
        if self.official:
            candidate = max(step + 1, self.begin_step)
            candidate += -(candidate - self.begin_step) % self.delta_t
            return candidate if candidate <= end else None
        candidate = max(step + 1, self.begin_step, 1)
        candidate += -candidate % self.delta_t
        return candidate if candidate < end else None

    def drop_fraction(self, step: int, end: int) -> float:
        """f_decay(t): the fraction of each layer's active connections to update."""
        if self.decay.lower() == "constant":
            return float(self.alpha)
        if self.official:  # TF's cosine_decay(α, t, T_end − begin): clamped, not shifted
            span = max(end - self.begin_step, 1)
            return float(self.alpha / 2.0 * (1.0 + math.cos(math.pi * min(step, span) / span)))
        return float(self.alpha / 2.0 * (1.0 + math.cos(math.pi * step / end)))


@dataclasses.dataclass(frozen=True)
class PolynomialSchedule:
    """Zhu & Gupta's gradual pruning: s_t = s_f + (s_i − s_f)(1 − (t − t_0)/(t_e − t_0))^p.

    Sparsity is raised every `frequency` steps in [begin_step, end_step] and
    stays at `final_sparsity` afterwards; before `begin_step` nothing is
    pruned. Values match `tfmot.sparsity.keras.PolynomialDecay`.

    Attributes:
      final_sparsity: s_f in [0, 1).
      begin_step: t_0, the first pruning step, >= 0.
      end_step: t_e, the step at which s_f is reached, > begin_step.
      frequency: steps between pruning events, >= 1.
      initial_sparsity: s_i in [0, s_f].
      exponent: p, >= 1 in the paper (3); any number > 0 is accepted.
    """

    final_sparsity: float
    begin_step: int
    end_step: int
    frequency: int = 100
    initial_sparsity: float = 0.0
    exponent: float = 3.0

    def __post_init__(self):
        for name in ("final_sparsity", "initial_sparsity"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1); got {value!r}.")
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                "`initial_sparsity` must not exceed `final_sparsity`; got "
                f"{self.initial_sparsity} > {self.final_sparsity}."
            )
        if not _is_int(self.begin_step) or self.begin_step < 0:
            raise ValueError(f"`begin_step` must be an int >= 0; got {self.begin_step!r}.")
        if not _is_int(self.end_step) or self.end_step <= self.begin_step:
            raise ValueError(
                f"`end_step` must be an int > begin_step ({self.begin_step}); got "
                f"{self.end_step!r}."
            )
        if not _is_int(self.frequency) or self.frequency < 1:
            raise ValueError(f"`frequency` must be an int >= 1; got {self.frequency!r}.")
        if not _is_number(self.exponent) or self.exponent <= 0:
            raise ValueError(f"`exponent` must be > 0; got {self.exponent!r}.")

    def sparsity(self, step: int) -> float:
        """Target sparsity at `step` (clamped to the [begin, end] ramp)."""
        progress = (min(max(step, self.begin_step), self.end_step) - self.begin_step) / (
            self.end_step - self.begin_step
        )
        return float(
            self.final_sparsity
            + (self.initial_sparsity - self.final_sparsity) * (1.0 - progress) ** self.exponent
        )

    def next_prune_step(self, step: int) -> int | None:
        """The first pruning step after `step`, or None after `end_step`."""
        if step >= self.end_step:
            return None
        candidate = max(step + 1, self.begin_step)
        candidate += -(candidate - self.begin_step) % self.frequency
        return min(candidate, self.end_step)

    def last_prune_step(self, first: int, last: int) -> int | None:
        """The latest pruning step in (first, last], or None."""
        if last <= self.begin_step - 1 or first >= self.end_step:
            return None
        candidate = min(last, self.end_step)
        if candidate != self.end_step:
            candidate -= (candidate - self.begin_step) % self.frequency
        return candidate if candidate > first and candidate >= self.begin_step else None

    def is_prune_step(self, step: int) -> bool:
        """True if masks are recomputed after optimizer step `step`."""
        return (
            self.begin_step <= step <= self.end_step
            and (step - self.begin_step) % self.frequency == 0
        ) or step == self.end_step
