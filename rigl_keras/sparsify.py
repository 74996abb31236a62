"""Turn a Keras model into a masked one, back again, and report its sparsity."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import keras
import numpy as np

from rigl_keras import distributions
from rigl_keras import layers as masked_layers

__all__ = [
    "sparsify",
    "strip_masks",
    "sparsity_report",
    "random_mask",
    "LayerSparsity",
    "SparsityReport",
]

_UNMASKED = {masked: base for base, masked in masked_layers.MASKED_EQUIVALENTS.items()}


def random_mask(shape, n_active: int, rng: np.random.Generator) -> np.ndarray:
    """A float32 0/1 array of `shape` with exactly `n_active` ones at random."""
    size = int(np.prod(shape))
    flat = np.zeros(size, dtype="float32")
    flat[rng.permutation(size)[:n_active]] = 1.0
    return flat.reshape(shape)


def _clone(model, clone_function):
    if not isinstance(model, keras.Model):
        raise ValueError(f"`model` must be a keras.Model; got {type(model).__name__}.")
    try:
        return keras.models.clone_model(
            model, clone_function=clone_function, recursive=True
        )
    except ValueError as error:
        raise ValueError(
            f"Cannot rebuild model {getattr(model, 'name', model)!r}: only "
            f"Sequential and functional models can be transformed ({error})."
        ) from error


def _own_variables(layer) -> list:
    # Only the layer's own variables: a nested model's weights belong to its
    # sublayers, which are visited (and copied) on their own.
    return list(layer._trainable_variables) + list(layer._non_trainable_variables)


def _copy_own_variables(old, new) -> None:
    for source, target in zip(_own_variables(old), _own_variables(new)):
        target.assign(source)


def _paired_layers(old_model, new_model):
    # Input layers hold no weights, and cloning renames them.
    def weighted(model):
        return [
            layer for layer in masked_layers.iter_layers(model)
            if not isinstance(layer, keras.layers.InputLayer)
        ]

    old, new = weighted(old_model), weighted(new_model)
    if [l.name for l in old] != [l.name for l in new]:
        raise RuntimeError("Internal error: the cloned model's layers do not line up.")
    return old, new


def sparsify(
    model: keras.Model,
    sparsity: float,
    distribution: str = "erk",
    *,
    custom_sparsity: Mapping[str, float] | None = None,
    dense_layers: Iterable[str] | None = None,
    seed: int = 0,
    erk_power_scale: float = 1.0,
) -> keras.Model:
    """A copy of `model` whose Dense, Conv2D and DepthwiseConv2D layers are masked.

    Weights are copied; each masked layer gets a random mask with exactly
    `active_count(N, s_l)` ones, s_l from `sparsity_distribution`, and its
    kernel is zeroed outside the mask. The input model is not modified.

    Args:
      model: a built Sequential or functional Keras model (nested models are
        handled recursively; shared layers stay shared).
      sparsity: the overall sparsity S in [0, 1).
      distribution: "uniform", "er" or "erk" (see `sparsity_distribution`).
      custom_sparsity: {layer name: sparsity} overrides.
      dense_layers: names of layers to keep dense (their mask is all ones).
      seed: seed of the random masks.
      erk_power_scale: exponent of the ER/ERK scale.

    Returns:
      A new model with the same architecture, names and weights, in which
      every maskable layer is a `Masked*` layer.

    Raises:
      ValueError: for bad arguments (see `sparsity_distribution`), a model
        that is not Sequential/functional, or a non-integer seed.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"`seed` must be an int; got {seed!r}.")
    if not isinstance(model, keras.Model):
        raise ValueError(f"`model` must be a keras.Model; got {type(model).__name__}.")
    sparsities = distributions.sparsity_distribution(
        model,
        sparsity,
        distribution,
        custom_sparsity=custom_sparsity,
        dense_layers=dense_layers,
        erk_power_scale=erk_power_scale,
    )

    def to_masked(layer):
        cls = masked_layers.MASKED_EQUIVALENTS.get(type(layer), type(layer))
        return cls.from_config(layer.get_config())

    new_model = _clone(model, to_masked)
    old_layers, new_layers = _paired_layers(model, new_model)
    for index, (old, new) in enumerate(zip(old_layers, new_layers)):
        if not masked_layers.is_masked(new):
            _copy_own_variables(old, new)
            continue
        kernel = keras.ops.convert_to_numpy(old.kernel)
        n_active = distributions.active_count(kernel.size, sparsities[new.name])
        rng = np.random.default_rng([int(seed), index])
        mask = random_mask(kernel.shape, n_active, rng)
        new.mask.assign(mask)
        new.raw_kernel.assign(kernel * mask)
        if old.bias is not None:
            new.bias.assign(old.bias)
    return new_model


def strip_masks(model: keras.Model) -> keras.Model:
    """An ordinary Keras model with the masked weights zeroed.

    Every `Masked*` layer becomes its plain Keras layer, with the effective
    (masked) kernel as its kernel, so predictions are identical and the model
    loads anywhere without rigl_keras.

    Args:
      model: a Sequential or functional model, masked or not.

    Returns:
      A new model; the input is not modified.

    Raises:
      ValueError: for a model that is not Sequential/functional.
    """

    def to_plain(layer):
        cls = _UNMASKED.get(type(layer), type(layer))
        return cls.from_config(layer.get_config())

    new_model = _clone(model, to_plain)
    old_layers, new_layers = _paired_layers(model, new_model)
    for old, new in zip(old_layers, new_layers):
        if masked_layers.is_masked(old):
            new.kernel.assign(keras.ops.convert_to_numpy(old.kernel))
            if old.bias is not None:
                new.bias.assign(old.bias)
        else:
            _copy_own_variables(old, new)
    return new_model


@dataclasses.dataclass(frozen=True)
class LayerSparsity:
    """One row of a `SparsityReport`.

    Attributes:
      name: the layer's name.
      kind: the layer's class name.
      total: number of kernel weights N.
      active: number of active weights (mask ones; N for unmasked layers).
      note: why a layer is dense, if it is ("not masked", "cannot be masked").
    """

    name: str
    kind: str
    total: int
    active: int
    note: str = ""

    @property
    def density(self) -> float:
        """active / total."""
        return self.active / self.total if self.total else 1.0

    @property
    def sparsity(self) -> float:
        """1 − density."""
        return 1.0 - self.density


@dataclasses.dataclass(frozen=True)
class SparsityReport:
    """Per-layer kernel sparsity of a model; `str()` gives a table.

    Attributes:
      layers: one `LayerSparsity` per layer with a kernel.
    """

    layers: tuple[LayerSparsity, ...]

    @property
    def total(self) -> int:
        """Kernel weights of all reported layers."""
        return sum(row.total for row in self.layers)

    @property
    def active(self) -> int:
        """Active kernel weights of all reported layers."""
        return sum(row.active for row in self.layers)

    @property
    def density(self) -> float:
        """Overall density of the reported kernels."""
        return self.active / self.total if self.total else 1.0

    def __getitem__(self, name: str) -> LayerSparsity:
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(name)

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)

    def __str__(self) -> str:
        width = max([len(r.name) for r in self.layers] + [5])
        lines = [f"{'layer':<{width}}  {'kind':<22} {'total':>10} {'active':>10} {'density':>8}  note"]
        for r in self.layers:
            lines.append(
                f"{r.name:<{width}}  {r.kind:<22} {r.total:>10} {r.active:>10} {r.density:>8.4f}  {r.note}"
            )
        lines.append(f"{'total':<{width}}  {'':<22} {self.total:>10} {self.active:>10} {self.density:>8.4f}")
        return "\n".join(lines)


def _plain_kernel(layer):
    kernel = getattr(layer, "_kernel", None)
    if kernel is None:
        kernel = getattr(layer, "kernel", None)
    return kernel if isinstance(kernel, keras.Variable) else None


def sparsity_report(model: keras.Model) -> SparsityReport:
    """Per-layer total weights, active weights and density of a model's kernels.

    Masked layers report their mask; maskable layers that are not masked
    report all weights active with the note "not masked"; other layers with a
    `kernel` variable (Conv1D, Conv3D, ...) are left dense and noted
    "cannot be masked".

    Args:
      model: any built Keras model.

    Returns:
      A `SparsityReport`.
    """
    rows = []
    for layer in masked_layers.iter_layers(model):
        if masked_layers.is_masked(layer) and layer.built:
            total = int(np.prod(layer.mask.shape))
            active = int(np.sum(keras.ops.convert_to_numpy(layer.mask) != 0))
            note = ""
        elif masked_layers.is_maskable(layer) and layer.built:
            total = active = int(np.prod(layer.kernel.shape))
            note = "not masked"
        elif layer.built and _plain_kernel(layer) is not None:
            total = active = int(np.prod(_plain_kernel(layer).shape))
            note = "cannot be masked"
        else:
            continue
        rows.append(LayerSparsity(layer.name, type(layer).__name__, total, active, note))
    return SparsityReport(tuple(rows))
