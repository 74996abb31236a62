"""Per-layer sparsities: uniform, Erdős–Rényi (ER) and Erdős–Rényi-Kernel (ERK).

Paper §3(1). Layers are the maskable kernel layers of a model (see
`rigl_keras.layers.maskable_layers`); biases, normalization and every other
weight stay dense and do not enter the budget.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from rigl_keras import layers as masked_layers

__all__ = ["DISTRIBUTIONS", "sparsity_distribution", "active_count"]

#: Names accepted by `sparsity_distribution` (case-insensitive).
DISTRIBUTIONS = ("uniform", "er", "erk")


def active_count(total: int, sparsity: float) -> int:
    """The exact number of active weights of a layer: round((1 − s)·N).

    Rounds half up, so the count is the same on every platform.

    Args:
      total: the number of weights N of the layer's kernel.
      sparsity: the layer's sparsity s in [0, 1].

    Returns:
      The number of weights that stay active.
    """
    return int(math.floor((1.0 - sparsity) * total + 0.5))


def validate_sparsity(sparsity, name: str = "sparsity") -> float:
    """Returns `sparsity` as a float, or raises ValueError outside [0, 1)."""
    if isinstance(sparsity, bool) or not isinstance(
        sparsity, (int, float, np.floating, np.integer)
    ):
        raise ValueError(f"`{name}` must be a number in [0, 1); got {sparsity!r}.")
    sparsity = float(sparsity)
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"`{name}` must be in [0, 1); got {sparsity}.")
    return sparsity


def _kernel_shapes(model) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for layer in masked_layers.maskable_layers(model):
        shapes[layer.name] = tuple(int(d) for d in masked_layers.kernel_of(layer).shape)
    return shapes


def _check_names(names: Iterable[str], known: Mapping, argument: str) -> None:
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(
            f"`{argument}` names layers that are not maskable layers of the "
            f"model: {unknown}. Maskable layers: {sorted(known)}."
        )


def _erk_scale(shape: tuple[int, ...], distribution: str, power: float) -> float:
    # ER uses only the two channel dimensions; ERK adds the kernel's spatial
    # dimensions (paper §3(1)). A Dense kernel is (n_in, n_out): both agree.
    dims = shape[-2:] if distribution == "er" else shape
    return (sum(dims) / float(np.prod(dims))) ** power


def sparsity_distribution(
    model,
    sparsity: float,
    distribution: str = "erk",
    *,
    custom_sparsity: Mapping[str, float] | None = None,
    dense_layers: Iterable[str] | None = None,
    erk_power_scale: float = 1.0,
) -> dict[str, float]:
    """Per-layer sparsities for the maskable layers of a built model.

    * ``"uniform"``: every layer at `sparsity`, except the first maskable
      layer, which stays dense (paper §3(1)).
    * ``"er"`` / ``"erk"``: the density of layer l is proportional to
      (Σ dims)/(Π dims) of its kernel (ER: the two channel dimensions only),
      raised to `erk_power_scale`, and scaled so that the layers not named in
      `custom_sparsity` hold exactly (1 − sparsity)·ΣN^l active weights. A
      layer whose density would exceed 1 is made dense and the scale solved
      again until none does.

    Args:
      model: a built Keras model (plain or already masked).
      sparsity: the overall sparsity S in [0, 1).
      distribution: "uniform", "er" or "erk" (case-insensitive).
      custom_sparsity: {layer name: sparsity} applied as given; these layers
        are left out of the ER/ERK budget.
      dense_layers: names of layers to keep dense. Under ER/ERK their
        weights still count in the budget, so the other layers get sparser.
      erk_power_scale: exponent on the ER/ERK scale; 0 gives uniform.

    Returns:
      {layer name: sparsity} for every maskable layer, in model order.

    Raises:
      ValueError: for a sparsity outside [0, 1), an unknown distribution, a
        name in `custom_sparsity` or `dense_layers` that is not a maskable
        layer, a custom sparsity outside [0, 1], an unbuilt model or one with
        no maskable layer, or dense layers that alone exceed the budget.
    """
    sparsity = validate_sparsity(sparsity)
    if not isinstance(distribution, str) or distribution.lower() not in DISTRIBUTIONS:
        raise ValueError(
            f"`distribution` must be one of {DISTRIBUTIONS}; got {distribution!r}."
        )
    distribution = distribution.lower()
    if isinstance(erk_power_scale, bool) or not isinstance(erk_power_scale, (int, float)) or erk_power_scale < 0:
        raise ValueError(
            f"`erk_power_scale` must be a number >= 0; got {erk_power_scale!r}."
        )
    shapes = _kernel_shapes(model)
    if not shapes:
        raise ValueError(
            f"Model {model.name!r} has no maskable layer (Dense, Conv2D or "
            "DepthwiseConv2D) with a built kernel."
        )
    custom = dict(custom_sparsity or {})
    if isinstance(dense_layers, str):
        dense_layers = [dense_layers]
    dense = set(dense_layers or ())
    _check_names(custom, shapes, "custom_sparsity")
    _check_names(dense, shapes, "dense_layers")
    for name, value in custom.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(
                f"`custom_sparsity[{name!r}]` must be in [0, 1]; got {value!r}."
            )

    result: dict[str, float] = {}
    if distribution == "uniform":
        first = next(iter(shapes))
        for name in shapes:
            result[name] = 0.0 if (name == first or name in dense) else sparsity
    else:
        result = _solve_erk(shapes, sparsity, distribution, custom, dense, erk_power_scale)
    for name, value in custom.items():
        result[name] = float(value)
    return {name: result[name] for name in shapes}


def _solve_erk(shapes, sparsity, distribution, custom, dense, power) -> dict[str, float]:
    budget_layers = [name for name in shapes if name not in custom]
    dense = set(dense)
    while True:
        # Active weights left for the sparse layers once dense ones are paid.
        target = sum((1 - sparsity) * np.prod(shapes[n]) for n in budget_layers)
        target -= sum(np.prod(shapes[n]) for n in budget_layers if n in dense)
        sparse = [n for n in budget_layers if n not in dense]
        if not sparse:
            break
        if target <= 0:
            raise ValueError(
                f"`sparsity`={sparsity} leaves no weights for the sparse layers "
                f"once the dense layers {sorted(dense)} are paid for."
            )
        scales = {n: _erk_scale(shapes[n], distribution, power) for n in sparse}
        epsilon = target / sum(scales[n] * np.prod(shapes[n]) for n in sparse)
        overfull = [n for n in sparse if epsilon * scales[n] > 1.0]
        if not overfull:
            break
        # Cap the layers with the largest scale and solve again.
        largest = max(scales[n] for n in overfull)
        dense.update(n for n in overfull if scales[n] == largest)
    result = {}
    for name in budget_layers:
        result[name] = 0.0 if name in dense else float(1.0 - epsilon * scales[name])
    return result
