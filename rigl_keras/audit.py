"""Invariant checks for masked models."""

from __future__ import annotations

from collections.abc import Mapping

import keras
import numpy as np

from rigl_keras import engine
from rigl_keras import layers as masked_layers

__all__ = ["SparsityInvariantError", "check_sparsity"]


class SparsityInvariantError(AssertionError):
    """A masked weight broke an invariant; the message names the weight."""


def check_sparsity(model, expected_counts: Mapping[str, int] | None = None) -> None:
    """Verifies every sparsity invariant of `model`; raises on the first broken one.

    Checks, for every masked weight: the mask holds only 0 and 1; the stored
    weight is exactly 0 outside the mask; every optimizer state tensor of the
    weight (if the model has a built optimizer) holds the optimizer's initial
    value outside the mask (0 for momentum, Adagrad's initial accumulator,
    ...); and, if `expected_counts` is given, the number of active entries
    equals it.

    Args:
      model: a Keras model with masked weights.
      expected_counts: optional {weight name: active count}.

    Raises:
      SparsityInvariantError: naming the weight and the broken invariant.
    """
    optimizer = getattr(model, "optimizer", None)
    slots = engine.optimizer_state_by_variable(optimizer, model.trainable_variables)
    for w in masked_layers.masked_weights(model):
        mask = keras.ops.convert_to_numpy(w.mask)
        if not np.all((mask == 0) | (mask == 1)):
            raise SparsityInvariantError(f"{w.name!r}: mask is not binary.")
        outside = mask == 0
        values = keras.ops.convert_to_numpy(w.variable)
        if np.any(values[outside] != 0):
            raise SparsityInvariantError(
                f"{w.name!r}: {int(np.sum(values[outside] != 0))} weights outside the "
                "mask are non-zero."
            )
        for slot in slots.get(id(w.variable), []):
            state = keras.ops.convert_to_numpy(slot)
            initial = engine.slot_initial_value(optimizer, slot)
            if np.any(state[outside] != initial):
                raise SparsityInvariantError(
                    f"{w.name!r}: optimizer state {slot.path!r} differs from its initial "
                    f"value {initial} outside the mask."
                )
        if expected_counts is not None and w.name in expected_counts:
            active = int(mask.sum())
            if active != expected_counts[w.name]:
                raise SparsityInvariantError(
                    f"{w.name!r}: {active} active weights, expected {expected_counts[w.name]}."
                )
