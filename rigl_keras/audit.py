"""Invariant checks for masked models."""

from __future__ import annotations

from collections.abc import Mapping

import keras
import numpy as np

from rigl_keras import engine
from rigl_keras import layers as masked_layers

__all__ = ["SparsityInvariantError", "check_sparsity"]


class SparsityInvariantError(AssertionError):
    """A masked layer broke an invariant; the message names the layer."""


def check_sparsity(model, expected_counts: Mapping[str, int] | None = None) -> None:
    """Verifies every sparsity invariant of `model`; raises on the first broken one.

    Checks, for every masked layer: the mask holds only 0 and 1; the stored
    kernel is exactly 0 outside the mask; every optimizer state tensor of the
    kernel (if the model has a built optimizer) is 0 outside the mask; and,
    if `expected_counts` is given, the number of active weights equals it.

    Args:
      model: a Keras model with masked layers.
      expected_counts: optional {layer name: active count}.

    Raises:
      SparsityInvariantError: naming the layer and the broken invariant.
    """
    optimizer = getattr(model, "optimizer", None)
    for layer in masked_layers.masked_layers_of(model):
        mask = keras.ops.convert_to_numpy(layer.mask)
        if not np.all((mask == 0) | (mask == 1)):
            raise SparsityInvariantError(f"Layer {layer.name!r}: mask is not binary.")
        outside = mask == 0
        kernel = keras.ops.convert_to_numpy(layer.raw_kernel)
        if np.any(kernel[outside] != 0):
            raise SparsityInvariantError(
                f"Layer {layer.name!r}: {int(np.sum(kernel[outside] != 0))} kernel "
                "weights outside the mask are non-zero."
            )
        for slot in engine.optimizer_state_for(optimizer, layer.raw_kernel, model.trainable_variables):
            values = keras.ops.convert_to_numpy(slot)
            if np.any(values[outside] != 0):
                raise SparsityInvariantError(
                    f"Layer {layer.name!r}: optimizer state {slot.path!r} is non-zero "
                    "outside the mask."
                )
        if expected_counts is not None and layer.name in expected_counts:
            active = int(mask.sum())
            if active != expected_counts[layer.name]:
                raise SparsityInvariantError(
                    f"Layer {layer.name!r}: {active} active weights, expected "
                    f"{expected_counts[layer.name]}."
                )
