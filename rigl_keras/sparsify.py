"""Turn a Keras model into a masked one, back again, and report its sparsity."""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from collections.abc import Iterable, Mapping

import keras
import numpy as np

from rigl_keras import distributions
from rigl_keras import layers as masked_layers

__all__ = [
    "SparseModel",
    "sparsify",
    "set_random_masks",
    "strip_masks",
    "sparsity_report",
    "random_mask",
    "WeightSparsity",
    "SparsityReport",
]


def random_mask(shape, n_active: int, rng: np.random.Generator) -> np.ndarray:
    """A uint8 0/1 array of `shape` with exactly `n_active` ones at random."""
    size = int(np.prod(shape))
    flat = np.zeros(size, dtype=masked_layers.MASK_DTYPE)
    flat[rng.permutation(size)[:n_active]] = 1
    return flat.reshape(shape)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"`seed` must be an int; got {seed!r}.")
    return int(seed)


# ---------------------------------------------------------------------------
# Rebuilding a model with masked (or plain) layer classes
# ---------------------------------------------------------------------------


def _class_of(entry: dict):
    registered = entry.get("registered_name")
    if registered:
        found = keras.saving.get_registered_object(registered)
        if found is not None:
            return found
    module = entry.get("module")
    if isinstance(module, str) and module.startswith("keras"):
        try:
            return getattr(importlib.import_module(module), entry["class_name"], None)
        except ImportError:
            return None
    return None


def _rewrite(config, convert):
    """`config` with every layer entry for which `convert(entry, cls)` gives a new class replaced."""
    if isinstance(config, list):
        return [_rewrite(item, convert) for item in config]
    if not isinstance(config, dict):
        return config
    config = {key: _rewrite(value, convert) for key, value in config.items()}
    if "class_name" in config and isinstance(config.get("config"), dict):
        cls = _class_of(config)
        target = convert(config, cls) if isinstance(cls, type) else None
        if target is not None and target is not cls:
            inner = dict(config["config"])
            if issubclass(target, masked_layers.MaskedWeightsMixin):
                inner["capture_gradients"] = convert.capture
                config["module"] = target.__module__
                config["registered_name"] = keras.saving.get_registered_name(target)
            else:
                inner.pop("capture_gradients", None)
                builtin = target.__module__.startswith("keras")
                config["module"] = "keras.layers" if builtin else target.__module__
                config["registered_name"] = None if builtin else keras.saving.get_registered_name(target)
            config["class_name"] = target.__name__
            config["config"] = inner
    return config


def _is_graph_model(model) -> bool:
    """True for plain Sequential/functional models, whose configs list their layers."""
    return type(model) is keras.Sequential or type(model).__name__ == "Functional"


def _copy_model(model):
    try:
        return keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(model))
    except Exception as error:  # noqa: BLE001 - re-raised with context
        raise ValueError(
            f"Cannot copy model {model.name!r} ({type(model).__name__}) from its "
            f"configuration ({error}). For a subclassed model without get_config, build "
            "it from masked layers (rigl_keras.MaskedDense, ..., or rigl_keras.masked_class) "
            "and draw its masks with rigl_keras.set_random_masks."
        ) from error


@keras.saving.register_keras_serializable(package="rigl_keras")
class SparseModel(keras.Model):
    """A masked model whose configuration does not list its layers.

    `sparsify` returns one for models that are neither Sequential nor plain
    functional (keras-hub backbones, subclassed models with a `get_config`):
    their layers are masked in place inside a copy, and this wrapper records
    which ones so that `.keras` files rebuild the masks. It calls the wrapped
    model unchanged.

    Args:
      model: the wrapped model, or its serialized config.
      masked: positions (in `rigl_keras.layers.iter_layers` order) of the
        wrapped model's layers to mask.
      capture_gradients: as in `sparsify`.
    """

    rigl_transparent = True  # adds nothing to weight names

    def __init__(self, model, masked=(), capture_gradients: bool = True, **kwargs):
        super().__init__(**kwargs)
        if isinstance(model, dict):
            model = keras.saving.deserialize_keras_object(model)
        self.model = model
        # Weight names are those of the wrapped model's own layers, as if unwrapped.
        object.__setattr__(model, "rigl_transparent", True)
        self.masked = [int(i) for i in masked]
        self.capture_gradients = bool(capture_gradients)
        layers = [layer for layer, _ in masked_layers.iter_layers(model)]
        for index in self.masked:
            masked_layers.mask_in_place(layers[index], self.capture_gradients)
        self.built = True

    def call(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "model": keras.saving.serialize_keras_object(self.model),
            "masked": self.masked,
            "capture_gradients": self.capture_gradients,
        }


def _rebuild(model, convert):
    if not _is_graph_model(model):
        raise ValueError(
            f"Cannot rebuild model {model.name!r} ({type(model).__name__}): only Sequential "
            "and functional models can be transformed."
        )
    config = _rewrite(keras.saving.serialize_keras_object(model), convert)
    try:
        return keras.saving.deserialize_keras_object(config)
    except Exception as error:  # noqa: BLE001 - re-raised with context
        raise ValueError(
            f"Cannot rebuild model {model.name!r} from its configuration ({error}). Are "
            "all its custom layers registered with keras.saving.register_keras_serializable?"
        ) from error


def _rigl_variable_ids(model) -> set[int]:
    ids = set()
    for layer, _ in masked_layers.iter_layers(model):
        for group in ("_rk_masks", "_rk_grads", "_rk_momenta"):
            ids.update(id(v) for v in layer.__dict__.get(group, {}).values())
    return ids


def _base_variables(model) -> list:
    rigl = _rigl_variable_ids(model)
    return [v for v in model.weights if id(v) not in rigl]


def _copy_variables(source, target, value=lambda v: v) -> None:
    old, new = _base_variables(source), _base_variables(target)
    if len(old) != len(new) or any(tuple(a.shape) != tuple(b.shape) for a, b in zip(old, new)):
        raise RuntimeError("Internal error: the rebuilt model's variables do not line up.")
    for a, b in zip(old, new):
        b.assign(keras.ops.convert_to_numpy(value(a)))


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def set_random_masks(
    model: keras.Model,
    sparsity: float | Mapping[str, float],
    distribution: str = "erk",
    *,
    custom_sparsity: Mapping | None = None,
    dense_layers: Iterable | None = None,
    seed: int = 0,
    erk_power_scale: float = 1.0,
    sparse_embeddings: bool = True,
) -> dict[str, float]:
    """Draws random masks with exact counts on a model's masked weights, in place.

    Works on any model whose layers are masked (a Sequential or functional
    model from `sparsify`, a subclassed model built from `Masked*` layers).
    Each masked weight gets exactly `active_count(N, s)` ones at random
    (keyed to `seed` and its position), and is zeroed outside its mask.

    Args:
      model: a built model with masked layers.
      sparsity: the overall sparsity S, or a {weight name: sparsity} map
        (e.g. from `sparsity_distribution`) that names every masked weight.
      distribution, custom_sparsity, dense_layers, erk_power_scale,
      sparse_embeddings: as in `sparsity_distribution`, over the masked weights.
      seed: seed of the random masks.

    Returns:
      {weight name: sparsity} that was applied.

    Raises:
      ValueError: for a model without masked weights or bad arguments (see
        `sparsity_distribution`); nothing is changed then.
    """
    seed = _check_seed(seed)
    weights = masked_layers.masked_weights(model)
    if not weights:
        raise ValueError(
            f"Model {getattr(model, 'name', model)!r} has no masked weight: build it "
            "from rigl_keras masked layers or use rigl_keras.sparsify."
        )
    if isinstance(sparsity, Mapping):
        missing = sorted({w.name for w in weights} - set(sparsity))
        if missing:
            raise ValueError(f"`sparsity` does not name the masked weights {missing}.")
        sparsities = {w.name: float(sparsity[w.name]) for w in weights}
    else:
        sparsities = distributions.sparsity_distribution(
            model, sparsity, distribution, custom_sparsity=custom_sparsity,
            dense_layers=dense_layers, erk_power_scale=erk_power_scale,
            sparse_embeddings=sparse_embeddings,
        )
    empty = [w.name for w in weights if distributions.active_count(w.size, sparsities.get(w.name, 0.0)) == 0]
    if empty:
        warnings.warn(
            f"rigl_keras: these masked weights get no active entry at all and cut their "
            f"layer's signal: {empty}. Lower the sparsity or keep them dense.",
            UserWarning,
            stacklevel=2,
        )
    for index, w in enumerate(weights):
        s = sparsities.get(w.name, 0.0)
        mask = random_mask(w.shape, distributions.active_count(w.size, s),
                           np.random.default_rng([seed, index]))
        w.mask.assign(mask)
        w.variable.assign(keras.ops.convert_to_numpy(w.variable) * mask)
    return {w.name: sparsities.get(w.name, 0.0) for w in weights}


def sparsify(
    model: keras.Model,
    sparsity: float,
    distribution: str = "erk",
    *,
    custom_sparsity: Mapping | None = None,
    dense_layers: Iterable | None = None,
    seed: int = 0,
    erk_power_scale: float = 1.0,
    sparse_embeddings: bool = False,
    capture_gradients: bool = True,
) -> keras.Model:
    """A copy of `model` whose weight matrices are masked, with exact random masks.

    Every layer of a supported kind (Dense, EinsumDense and so
    MultiHeadAttention, Conv1D/2D/3D and their transposes, depthwise and
    separable convolutions, SimpleRNN/LSTM/GRU, Embedding when asked, and
    your own layers declared with `rigl_keras.maskable`) becomes its masked
    class, inside Bidirectional, TimeDistributed, nested models and
    shared-layer graphs too. Weights are copied; each masked weight gets
    `active_count(N, s)` ones, s from `sparsity_distribution`. The input
    model is not modified. Weight matrices of layers that cannot be masked
    stay dense, are named in a warning and listed in `sparsity_report`.

    Args:
      model: a built Sequential or functional Keras model.
      sparsity: the overall sparsity S in [0, 1).
      distribution: "uniform", "er" or "erk" (see `sparsity_distribution`).
      custom_sparsity: {selector: sparsity} overrides (weight or layer name,
        glob pattern, or layer class).
      dense_layers: selectors of weights to keep dense (masked, all ones).
      seed: seed of the random masks.
      erk_power_scale: exponent of the ERK scale.
      sparse_embeddings: mask Embedding weights too (dense by default).
      capture_gradients: give each masked weight a capture variable holding
        ∂L/∂W_eff of the last training batch, which RigL, SNFS and SNIP read.
        Static sparse training and SET can pass False to save its small cost.

    Returns:
      A new model with the same architecture, names and weights. Models
      whose configuration does not list their layers (keras-hub backbones,
      subclassed models with `get_config`) come back as a `SparseModel`
      wrapping a masked copy (weight names are unchanged).

    Raises:
      ValueError: for bad arguments (see `sparsity_distribution`), a model
        that cannot be copied from its configuration, a model that is already
        masked, or a non-integer seed.
    """
    seed = _check_seed(seed)
    if not isinstance(model, keras.Model):
        raise ValueError(f"`model` must be a keras.Model; got {type(model).__name__}.")
    if not model.built:
        raise ValueError(f"Model {model.name!r} must be built before it is sparsified.")
    if masked_layers.masked_weights(model):
        raise ValueError(
            f"Model {model.name!r} is already masked. Use rigl_keras.set_random_masks to "
            "draw new masks, or strip_masks to get a dense model back."
        )
    sparsities = distributions.sparsity_distribution(
        model, sparsity, distribution, custom_sparsity=custom_sparsity,
        dense_layers=dense_layers, erk_power_scale=erk_power_scale,
        sparse_embeddings=sparse_embeddings,
    )
    embeddings = {
        w.layer.name for w in masked_layers.maskable_weights(model)
        if w.name in sparsities and masked_layers.is_embedding(w.layer)
    }

    def to_masked(entry, cls):
        if masked_layers.declared_weights(cls):
            if masked_layers.is_embedding(cls) and entry["config"].get("name") not in embeddings:
                return None
            return masked_layers.masked_class(cls)
        if masked_layers._is_container_class(cls):
            return masked_layers.masked_class(cls)
        return None

    to_masked.capture = bool(capture_gradients)
    if _is_graph_model(model):
        new_model = _rebuild(model, to_masked)
        _copy_variables(model, new_model)
    else:
        # Layers that the configuration does not list: mask a copy in place.
        copy = _copy_model(model)
        _copy_variables(model, copy)
        chosen = {id(w.layer) for w in distributions.plan(
            copy, custom_sparsity=custom_sparsity, dense_layers=dense_layers,
            sparse_embeddings=sparse_embeddings)[0]}
        leaves = [i for i, (layer, _) in enumerate(masked_layers.iter_layers(copy)) if id(layer) in chosen]
        new_model = SparseModel(copy, leaves, capture_gradients, name=model.name)
    set_random_masks(new_model, sparsities, seed=seed)
    left = masked_layers.unmaskable_weights(new_model)
    if left:
        warnings.warn(
            "rigl_keras.sparsify: these weight matrices cannot be masked and stay dense: "
            + ", ".join(f"{'/'.join(l.name for l in chain)}:{v.name} ({type(layer).__name__})"
                        for layer, v, chain in left),
            UserWarning,
            stacklevel=2,
        )
    return new_model


def strip_masks(model: keras.Model) -> keras.Model:
    """An ordinary, uncompiled Keras model with the masked weights zeroed.

    Every masked layer becomes its plain Keras class with the effective
    (masked) weights, so predictions are identical and the model loads
    anywhere without rigl_keras. No optimizer state is carried.

    Args:
      model: a Sequential or functional model, masked or not.

    Returns:
      A new model; the input is not modified.

    Raises:
      ValueError: for a model that is not Sequential/functional.
    """

    def to_plain(entry, cls):
        return masked_layers._base_class(cls) if issubclass(cls, masked_layers.MaskedWeightsMixin) else None

    to_plain.capture = False
    effective = {id(w.variable): w for w in masked_layers.masked_weights(model)}

    def value(variable):
        w = effective.get(id(variable))
        return variable if w is None else keras.ops.convert_to_numpy(w.effective())

    if isinstance(model, SparseModel):
        new_model = _copy_model(model.model)
        source = model.model
    else:
        new_model = _rebuild(model, to_plain)
        source = model
    _copy_variables(source, new_model, value)
    return new_model


@dataclasses.dataclass(frozen=True)
class WeightSparsity:
    """One row of a `SparsityReport`: one weight matrix.

    Attributes:
      name: the weight's name (see `rigl_keras.layers.MaskedWeight.name`).
      kind: the class name of the layer that owns it.
      total: number of entries N.
      active: active entries (mask ones; non-zero entries if not masked).
      note: why a weight is not masked, if it is not ("not masked",
        "embedding: dense by default", "cannot be masked: no declaration for
        <class>").
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
    """Per-weight sparsity of a model; `str()` gives a table.

    Attributes:
      weights: one `WeightSparsity` per weight matrix (masked, maskable or not).
    """

    weights: tuple[WeightSparsity, ...]

    @property
    def total(self) -> int:
        """Entries of all reported weights."""
        return sum(row.total for row in self.weights)

    @property
    def active(self) -> int:
        """Active entries of all reported weights."""
        return sum(row.active for row in self.weights)

    @property
    def density(self) -> float:
        """Overall density of the reported weights."""
        return self.active / self.total if self.total else 1.0

    def __getitem__(self, name: str) -> WeightSparsity:
        for row in self.weights:
            if row.name == name:
                return row
        raise KeyError(name)

    def __iter__(self):
        return iter(self.weights)

    def __len__(self):
        return len(self.weights)

    def __str__(self) -> str:
        width = max([len(r.name) for r in self.weights] + [6])
        lines = [f"{'weight':<{width}}  {'kind':<22} {'total':>10} {'active':>10} {'density':>8}  note"]
        for r in self.weights:
            lines.append(
                f"{r.name:<{width}}  {r.kind:<22} {r.total:>10} {r.active:>10} {r.density:>8.4f}  {r.note}"
            )
        lines.append(f"{'total':<{width}}  {'':<22} {self.total:>10} {self.active:>10} {self.density:>8.4f}")
        return "\n".join(lines)


def sparsity_report(model: keras.Model) -> SparsityReport:
    """Total and active entries of every weight matrix of a model.

    Masked weights report their mask. Maskable weights that are not masked
    report their non-zero entries with a note ("not masked", or for an
    embedding "embedding: dense by default"); weight matrices that no
    declaration covers are listed with "cannot be masked: ...".

    Args:
      model: any built Keras model.

    Returns:
      A `SparsityReport`.
    """
    rows = []
    for w in masked_layers.maskable_weights(model):
        kind = type(w.layer).__name__
        if "_rk_masks" in w.layer.__dict__:
            mask = keras.ops.convert_to_numpy(w.mask)
            rows.append(WeightSparsity(w.name, kind, int(mask.size), int(np.count_nonzero(mask))))
            continue
        value = keras.ops.convert_to_numpy(masked_layers._stored(w.layer, w.attribute))
        note = ("embedding: dense by default"
                if masked_layers.is_embedding(w.layer) else "not masked")
        rows.append(WeightSparsity(w.name, kind, int(value.size), int(np.count_nonzero(value)), note))
    for layer, variable, chain in masked_layers.unmaskable_weights(model):
        size = int(np.prod(variable.shape))
        name = "/".join([l.name for l in chain] + [variable.name])
        rows.append(WeightSparsity(name, type(layer).__name__, size, size,
                                   f"cannot be masked: no declaration for {type(layer).__name__}"))
    return SparsityReport(tuple(rows))
