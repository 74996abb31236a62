"""Masked weights: one mechanism that masks any named weight of any Keras layer.

A *masked weight* is a layer's stored variable plus a 0/1 ``mask`` of the
same shape and dtype (a same-dtype mask is applied with one multiply, no
cast; on disk it is stored as packed bits) and, optionally, a
gradient-capture variable ``G``.
The layer reads the weight through a property that returns::

    W_eff = where(mask, W, 0) + (G − stop_gradient(G))

The second term is exactly zero in the forward pass, and because ``G`` is a
trainable variable with ``overwrite_with_gradient = True``, the optimizer
overwrites it at every step with ∂L/∂W_eff of the batch just trained on: the
*dense* gradient RigL grows by, captured inside the compiled train step on
every backend (`rigl_keras.backend`).

Supporting a layer class is a declaration of which attributes are maskable:

* leaf layers that read the weight themselves in ``call`` (Dense: ``kernel``;
  LSTMCell: ``kernel`` and ``recurrent_kernel``; SeparableConv2D:
  ``depthwise_kernel`` and ``pointwise_kernel``; Embedding: ``embeddings``);
* containers whose maskable sublayers are created internally (LSTM's cell,
  MultiHeadAttention's EinsumDense projections): after ``build`` every
  declared sublayer is masked in place.

`Bidirectional`, `TimeDistributed` and nested models need nothing: their
configs hold the inner layer, which `rigl_keras.sparsify` replaces.

Your own layer declares its maskable weights with the `maskable` decorator
(see docs/custom_layers.md).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
from collections.abc import Iterable, Iterator

import keras
import numpy as np

from rigl_keras import backend

__all__ = [
    "MASK_DTYPE",
    "declare",
    "is_embedding",
    "MaskedWeight",
    "MaskedWeightsMixin",
    "maskable",
    "masked_class",
    "declared_weights",
    "is_masked",
    "masked_weights",
    "maskable_weights",
    "unmaskable_weights",
    "iter_layers",
    "select_weights",
]

#: dtype of masks in `.keras` files before bit packing, and of masks set by
#: `set_random_masks`; in memory a mask has its weight's dtype.
MASK_DTYPE = "uint8"

_LAYERS = keras.layers

#: Built-in leaf layers and the attributes they read their matrices from.
_BUILTIN_LEAVES: dict[type, tuple[str, ...]] = {
    _LAYERS.Dense: ("kernel",),
    _LAYERS.EinsumDense: ("kernel",),
    _LAYERS.Conv1D: ("kernel",),
    _LAYERS.Conv2D: ("kernel",),
    _LAYERS.Conv3D: ("kernel",),
    _LAYERS.Conv1DTranspose: ("kernel",),
    _LAYERS.Conv2DTranspose: ("kernel",),
    _LAYERS.Conv3DTranspose: ("kernel",),
    _LAYERS.DepthwiseConv1D: ("kernel",),
    _LAYERS.DepthwiseConv2D: ("kernel",),
    _LAYERS.SeparableConv1D: ("depthwise_kernel", "pointwise_kernel"),
    _LAYERS.SeparableConv2D: ("depthwise_kernel", "pointwise_kernel"),
    _LAYERS.Embedding: ("embeddings",),
    _LAYERS.ReversibleEmbedding: ("embeddings",),
    _LAYERS.SimpleRNNCell: ("kernel", "recurrent_kernel"),
    _LAYERS.LSTMCell: ("kernel", "recurrent_kernel"),
    _LAYERS.GRUCell: ("kernel", "recurrent_kernel"),
}

#: Built-in layers that create maskable sublayers themselves.
_BUILTIN_CONTAINERS: tuple[type, ...] = (
    _LAYERS.SimpleRNN,
    _LAYERS.LSTM,
    _LAYERS.GRU,
    _LAYERS.MultiHeadAttention,
    _LAYERS.GroupQueryAttention,
)


#: Declarations of classes rigl_keras cannot decorate (`declare`), keyed by
#: class or by "module.QualName" (so that their package need not be imported).
_DECLARED: dict = {
    "keras_hub.src.layers.modeling.position_embedding.PositionEmbedding": ("position_embeddings",),
}
#: Kinds left dense by default (lookups): see `sparsity_distribution`.
_EMBEDDINGS: set = {
    _LAYERS.Embedding,
    "keras_hub.src.layers.modeling.position_embedding.PositionEmbedding",
}


def _qualname(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def declare(layer_class, *attributes: str, embedding: bool = False) -> None:
    """Declares the maskable weights of a layer class you cannot decorate.

    The role of tfmot's `PrunableLayer` for third-party classes; for your own
    classes prefer the `maskable` decorator. The class must read each weight
    as ``self.<attribute>`` in ``call``.

    Args:
      layer_class: the class, or its "module.QualName" string.
      *attributes: attribute names of its maskable weights.
      embedding: True for lookup tables, which stay dense unless asked for.

    Raises:
      ValueError: if no attribute is named.
    """
    if not attributes:
        raise ValueError("`declare` needs at least one attribute name.")
    _DECLARED[layer_class] = tuple(attributes)
    if embedding:
        _EMBEDDINGS.add(layer_class)


def is_embedding(layer) -> bool:
    """True for lookup-table layers or classes (dense unless asked for)."""
    cls = _base_class(layer if isinstance(layer, type) else type(layer))
    return any(
        (isinstance(kind, type) and issubclass(cls, kind)) or kind == _qualname(cls)
        for kind in _EMBEDDINGS
    )


def declared_weights(layer_or_class) -> tuple[str, ...]:
    """The maskable attribute names a layer (class) declares; () if none.

    Built-in leaves are matched by exact class (a user's subclass of Dense may
    read its kernel differently, so it must declare itself with `maskable`).
    """
    cls = layer_or_class if isinstance(layer_or_class, type) else type(layer_or_class)
    own = cls.__dict__.get("rigl_maskable_weights")
    if own is not None:
        return tuple(own)
    if issubclass(cls, MaskedWeightsMixin):
        return tuple(getattr(cls, "rigl_maskable_weights", ()))
    return _BUILTIN_LEAVES.get(cls) or _DECLARED.get(cls) or _DECLARED.get(_qualname(cls), ())


def _is_container_class(cls) -> bool:
    return cls in _BUILTIN_CONTAINERS or bool(cls.__dict__.get("rigl_masks_sublayers"))


# ---------------------------------------------------------------------------
# The masked weight handle
# ---------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class MaskedWeight:
    """One masked weight of a model: the handle the engine and callbacks use.

    Attributes:
      layer: the layer that owns the weight (for an LSTM, its cell).
      attribute: the attribute the layer reads it from ("kernel", ...).
      name: a key unique within the model: the chain of layer names from the
        model down to `layer`, plus "/attribute" when the layer has more than
        one maskable weight (e.g. "fc1", "lstm/lstm_cell/recurrent_kernel",
        "mha/query").
      chain: the layers from the model's top-level layer down to `layer`.
    """

    layer: keras.layers.Layer
    attribute: str
    name: str = ""
    chain: tuple = ()

    @property
    def variable(self) -> keras.Variable:
        """The stored (trainable) variable, without the mask applied."""
        return _stored(self.layer, self.attribute)

    @property
    def mask(self) -> keras.Variable:
        """The 0/1 mask variable (of the weight's dtype)."""
        return self.layer._rk_masks[self.attribute]

    @property
    def gradient(self) -> keras.Variable | None:
        """The capture variable G (∂L/∂W_eff of the last batch), or None.

        NaN while capture is paused (`pause_capture`: on PyTorch and
        TensorFlow, by RigL and SET between the batches they read G from),
        and after a fit that ended paused until the next training step."""
        return self.layer._rk_grads.get(self.attribute)

    @property
    def momentum(self) -> keras.Variable | None:
        """SNFS's moving average of dense gradients, if created."""
        return self.layer._rk_momenta.get(self.attribute)

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape."""
        return tuple(int(d) for d in self.variable.shape)

    @property
    def size(self) -> int:
        """The number of entries N."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    def ensure_momentum(self, trainable: bool = False) -> keras.Variable:
        """SNFS's moving average of dense gradients, created on first use.

        It lives with the layer, so checkpoints and `.keras` files carry it.

        Args:
          trainable: create it trainable (for `capture_momentum`); an
            existing one is returned as it is.
        """
        existing = self.momentum
        if existing is not None:
            return existing
        momentum = _add_untracked_weight(
            self.layer, f"{self.attribute}_momentum", self.shape, "zeros", trainable, "float32"
        )
        self.layer._rk_momenta[self.attribute] = momentum
        return momentum

    @property
    def momentum_beta(self) -> float | None:
        """β of the moving average the training step updates (`capture_momentum`), or None."""
        return self.layer._rk_momentum_beta.get(self.attribute)

    def capture_momentum(self, beta: float) -> keras.Variable:
        """Makes the training step itself update SNFS's moving average (see `rigl_keras.capture_momentum`)."""
        existing = self.momentum
        if existing is not None and not existing.trainable:
            # A plain momentum (loaded, or made by the callback): replace it by
            # a trainable one holding its value (TensorFlow's tape only
            # watches variables created trainable).
            value = existing.value
            self.layer._untrack_variable(existing)
            del self.layer._rk_momenta[self.attribute]
            self.ensure_momentum(trainable=True).assign(value)
        momentum = self.ensure_momentum(trainable=True)
        momentum.overwrite_with_gradient = True
        self.layer._rk_momentum_beta[self.attribute] = float(beta)
        return momentum

    def effective(self):
        """The masked value `where(mask, W, 0)` as a tensor."""
        return backend.apply_mask(self.variable, self.mask)

    def __repr__(self) -> str:
        return f"MaskedWeight({self.name!r}, shape={self.shape})"


def pause_capture(weights, paused: bool) -> None:
    """Takes the capture variables G of `weights` out of the training step, or
    puts them back.

    Paused, G gets no gradient and is not trainable (so no optimizer sees a
    missing gradient), and the step costs what it does without capture. G
    is filled with NaN when paused, so that a read of it before the next
    captured step is loudly wrong instead of silently stale. A compiled step
    bakes in when traced which variables are trainable: the sparse-training
    callbacks keep one TensorFlow step per state (`SparseTrainingCallback`).

    Args:
      weights: `MaskedWeight`s (those without G are skipped).
      paused: True to pause, False to capture again.
    """
    for w in weights:
        g = w.gradient
        if g is None or g.trainable != paused:
            continue
        g.trainable = not paused
        if paused:
            g.assign(keras.ops.full(w.shape, float("nan"), dtype=g.dtype))


def _add_untracked_weight(layer, name, shape, initializer, trainable, dtype, autocast=False):
    # Layers lock their variable tracker after build; masks, capture and
    # momentum variables are added to built layers.
    tracker = layer._tracker
    locked = tracker.locked
    tracker.unlock()
    try:
        return layer.add_weight(
            name=name, shape=shape, initializer=initializer, trainable=trainable,
            dtype=dtype, autocast=autocast,
        )
    finally:
        if locked:
            tracker.lock()


# ---------------------------------------------------------------------------
# The mixin every masked class is made of
# ---------------------------------------------------------------------------


def _masked_property(attribute: str) -> property:
    storage = "_" + attribute

    def getter(self):
        value = self.__dict__.get(storage)
        if value is None:
            value = getattr(self, storage, None)
        masks = self.__dict__.get("_rk_masks")
        if value is None or not masks or attribute not in masks:
            return value  # during the base class's build
        beta = self._rk_momentum_beta.get(attribute)
        grad = self._rk_grads.get(attribute)
        if grad is not None and not grad.trainable:  # capture paused (`pause_capture`)
            grad = None
        return backend.masked_value(
            value, masks[attribute], grad,
            None if beta is None else self._rk_momenta[attribute], beta or 0.0)

    def setter(self, value):
        setattr(self, storage, value)

    return property(getter, setter, doc=f"The effective (masked) `{attribute}`.")


class MaskedWeightsMixin:
    """Adds masks (and gradient capture) to the declared weights of a layer.

    Mixed in before a Keras layer class by `masked_class`; do not use it
    directly. A leaf class reads each declared attribute through a property
    returning the effective weight; a container masks its declared sublayers
    in place after its own build.

    Args (extra constructor argument of every masked class):
      capture_gradients: create a capture variable G per masked weight, so
        RigL, SNFS and SNIP can read ∂L/∂W_eff of the training batch. Static
        sparse training and SET do not need it (it costs one extra add and
        one assignment per weight and step).
    """

    rigl_maskable_weights: tuple[str, ...] = ()

    def __init__(self, *args, capture_gradients: bool = True, capture_momentum=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.capture_gradients = bool(capture_gradients)
        object.__setattr__(self, "capture_momentum",
                           None if capture_momentum is None else float(capture_momentum))

    def get_config(self):
        config = super().get_config()
        config["capture_gradients"] = self.capture_gradients
        if self.capture_momentum is not None:  # set by rigl_keras.capture_momentum
            config["capture_momentum"] = self.capture_momentum
        return config

    def build(self, *args, **kwargs):
        # `masked_class` gives each masked class a copy with the base class's
        # signature: Keras passes shapes to `build` by parameter name.
        super().build(*args, **kwargs)
        if getattr(self, "lora_enabled", False) or getattr(self, "quantization_mode", None):
            raise ValueError(
                f"Layer {self.name!r}: masked layers do not support LoRA or quantization."
            )
        _attach(self, self.capture_gradients)
        for sublayer in _maskable_sublayers(self):
            mask_in_place(sublayer, self.capture_gradients)
        if self.capture_momentum is not None:  # a loaded `capture_momentum` model
            for layer in [self] + [s for s in self._flatten_layers(include_self=False)
                                   if is_masked(s)]:
                for attribute in declared_weights(layer):
                    MaskedWeight(layer, attribute).capture_momentum(self.capture_momentum)

    # -- saving -------------------------------------------------------------
    def _saved_variables(self) -> list:
        # The capture variable is overwritten at every step: not saved.
        # Momenta go last whether trainable (`capture_momentum`) or not, so
        # that files load either way.
        momenta = list(getattr(self, "_rk_momenta", {}).values())
        skip = {id(g) for g in getattr(self, "_rk_grads", {}).values()} | {id(m) for m in momenta}
        own = list(self._trainable_variables) + list(self._non_trainable_variables)
        return [v for v in own if id(v) not in skip] + momenta

    def save_own_variables(self, store):
        # Compact on disk: a mask as packed bits, a masked weight as its
        # active values only (it is exactly 0 elsewhere). Keras' Dense/Conv
        # would save only their own kernel and bias.
        if not self.built:
            return
        masks = {id(self._rk_masks[a]): a for a in self._rk_masks}
        weights = {id(_stored(self, a)): a for a in self._rk_masks}
        for i, variable in enumerate(self._saved_variables()):
            value = keras.ops.convert_to_numpy(variable)
            if id(variable) in masks:
                value = np.packbits(value.reshape(-1) != 0)
            elif id(variable) in weights:
                mask = keras.ops.convert_to_numpy(self._rk_masks[weights[id(variable)]])
                value = value.reshape(-1)[mask.reshape(-1) != 0]
            store[str(i)] = value

    def load_own_variables(self, store):
        if not self.built:
            return
        variables = self._saved_variables()
        names = declared_weights(self)
        if len(store.keys()) == len(variables) + len(names) and not self._rk_momenta:
            # Saved during SNFS training: recreate the momenta to load them.
            for name in names:
                MaskedWeight(self, name).ensure_momentum()
            variables = self._saved_variables()
        if len(store.keys()) != len(variables):
            raise ValueError(
                f"Layer {self.name!r} ({type(self).__name__}) expected "
                f"{len(variables)} variables ({[v.name for v in variables]}) but the "
                f"saved file holds {len(store.keys())}. Was it saved from a plain "
                "Keras layer? Load the dense model and pass it to rigl_keras.sparsify."
            )
        index = {id(v): str(i) for i, v in enumerate(variables)}
        masks = {}
        for attribute, mask in self._rk_masks.items():
            size = int(np.prod(mask.shape))
            bits = np.unpackbits(np.asarray(store[index[id(mask)]], dtype=np.uint8))[:size]
            masks[attribute] = bits.reshape(tuple(mask.shape)).astype(mask.dtype)
            mask.assign(masks[attribute])
        weights = {id(_stored(self, a)): a for a in self._rk_masks}
        for variable in variables:
            if id(variable) in {id(m) for m in self._rk_masks.values()}:
                continue
            value = np.asarray(store[index[id(variable)]])
            if id(variable) in weights:
                mask = masks[weights[id(variable)]].reshape(-1) != 0
                full = np.zeros(mask.shape, dtype=value.dtype)
                full[mask] = value
                value = full.reshape(tuple(variable.shape))
            variable.assign(value)


def _attach(layer, capture: bool) -> None:
    """Creates masks (and capture variables) for a built layer's declared weights."""
    if "_rk_masks" in layer.__dict__:
        return
    masks, grads = {}, {}
    for attribute in declared_weights(layer):
        storage = "_" + attribute
        if attribute in layer.__dict__:  # a plain attribute shadowed by our property
            object.__setattr__(layer, storage, layer.__dict__.pop(attribute))
        variable = getattr(layer, storage, None)
        if not isinstance(variable, keras.Variable):
            raise ValueError(
                f"Layer {layer.name!r} ({type(layer).__name__}) declares maskable "
                f"weight {attribute!r}, but has no such variable after build."
            )
        shape = tuple(variable.shape)
        masks[attribute] = _add_untracked_weight(
            layer, f"{attribute}_mask", shape, "ones", False, variable.dtype
        )
        if capture:
            g = _add_untracked_weight(
                layer, f"{attribute}_grad", shape, "zeros", True, variable.dtype, autocast=True
            )
            g.overwrite_with_gradient = True
            grads[attribute] = g
    # Plain dicts, set past Keras' attribute tracking (the variables are
    # tracked by add_weight already).
    object.__setattr__(layer, "_rk_masks", masks)
    object.__setattr__(layer, "_rk_grads", grads)
    object.__setattr__(layer, "_rk_momenta", {})
    object.__setattr__(layer, "_rk_momentum_beta", {})


def _maskable_sublayers(container) -> list:
    if not _is_container_class(_base_class(type(container))):
        return []
    return [
        layer
        for layer in container._flatten_layers(include_self=False, recursive=True)
        if declared_weights(layer) and not is_masked(layer)
    ]


def _base_class(cls):
    """The Keras class a masked class was made from (or `cls`)."""
    return getattr(cls, "rigl_base_class", cls)


_MASKED_CLASSES: dict[type, type] = {}


def masked_class(base: type) -> type:
    """The masked version of a layer class, made and registered once.

    Args:
      base: a built-in maskable layer class, a container (LSTM, GRU,
        SimpleRNN, MultiHeadAttention, GroupQueryAttention), or a class
        decorated with `maskable`.

    Returns:
      A subclass of `base` named ``Masked<Base>``, registered for `.keras`
      serialization, taking `base`'s constructor arguments plus
      `capture_gradients`.

    Raises:
      ValueError: if `base` declares nothing maskable.
    """
    if issubclass(base, MaskedWeightsMixin):
        return base
    if base in _MASKED_CLASSES:
        return _MASKED_CLASSES[base]
    names = declared_weights(base)
    if not names and not _is_container_class(base):
        raise ValueError(
            f"{base.__name__} declares no maskable weight; decorate it with "
            "rigl_keras.maskable('attribute', ...)."
        )
    namespace = {
        "__module__": __name__,
        "__doc__": (
            f"`{base.__module__}.{base.__name__}` with binary masks on "
            f"{', '.join(names) or 'the weights of its maskable sublayers'}.\n\n"
            "Takes the base class's constructor arguments plus `capture_gradients`."
        ),
        "rigl_maskable_weights": names,
        "rigl_base_class": base,
    }
    for attribute in names:
        namespace[attribute] = _masked_property(attribute)

    @functools.wraps(base.build)
    def build(self, *args, **kwargs):
        MaskedWeightsMixin.build(self, *args, **kwargs)

    namespace["build"] = build
    name = "Masked" + base.__name__
    cls = type(name, (MaskedWeightsMixin, base), namespace)
    cls.__qualname__ = name
    package = "rigl_keras" if base in _BUILTIN_LEAVES or base in _BUILTIN_CONTAINERS else (
        "rigl_keras_custom"
    )
    registered = name if package == "rigl_keras" else f"{base.__module__}.{base.__qualname__}"
    keras.saving.register_keras_serializable(package=package, name=registered)(cls)
    _MASKED_CLASSES[base] = cls
    return cls


def maskable(*attributes: str):
    """Class decorator: declares which weights of your own layer can be masked.

    The layer must create each weight with ``self.<attribute> = self.add_weight(...)``
    (or store it as ``self._<attribute>`` behind a property) and read it as
    ``self.<attribute>`` in ``call``. A masked subclass (``Masked<Name>``) is
    made and registered for `.keras` loading when the decorated class is
    defined, so models saved with it load once your module is imported.

    Args:
      *attributes: the attribute names of the maskable weights.

    Returns:
      The decorator; the class is returned unchanged apart from a
      ``rigl_maskable_weights`` attribute.

    Raises:
      ValueError: if no attribute is named, or a name is not an identifier.
    """
    if not attributes or not all(isinstance(a, str) and a.isidentifier() for a in attributes):
        raise ValueError(f"`maskable` needs attribute names; got {attributes!r}.")

    def decorate(cls):
        if not (isinstance(cls, type) and issubclass(cls, keras.layers.Layer)):
            raise ValueError(f"`maskable` decorates keras.layers.Layer subclasses; got {cls!r}.")
        cls.rigl_maskable_weights = tuple(attributes)
        masked_class(cls)
        return cls

    return decorate


def mask_in_place(layer, capture_gradients: bool = True) -> None:
    """Turns a built layer of a maskable class into its masked class, in place.

    Its variables are kept; masks start all ones. Used for sublayers that a
    container creates itself (an LSTM's cell, MultiHeadAttention's
    projections) and by `rigl_keras.sparsify` for models whose configuration
    does not list their layers.

    Raises:
      ValueError: if the layer is not built or declares nothing maskable.
    """
    if is_masked(layer):
        return
    if not layer.built:
        raise ValueError(f"Layer {layer.name!r} must be built before it is masked.")
    cls = masked_class(type(layer))
    layer.__class__ = cls
    object.__setattr__(layer, "capture_gradients", bool(capture_gradients))
    object.__setattr__(layer, "capture_momentum", None)
    _attach(layer, capture_gradients)
    for sublayer in _maskable_sublayers(layer):
        mask_in_place(sublayer, capture_gradients)


def is_masked(layer) -> bool:
    """True if `layer` carries rigl_keras masks (directly or as a masked container)."""
    return isinstance(layer, MaskedWeightsMixin)


# ---------------------------------------------------------------------------
# Finding weights in a model
# ---------------------------------------------------------------------------


def iter_layers(model) -> Iterator[tuple[keras.layers.Layer, tuple]]:
    """Every layer below `model` with its chain of enclosing layers, each once.

    Yields:
      (layer, chain): `chain` runs from the top-level layer down to `layer`.
      Shared layers are yielded once, at their first position.
    """
    seen = {id(model)}

    def walk(parent, chain):
        for child in parent._flatten_layers(include_self=False, recursive=False):
            if id(child) in seen or isinstance(child, keras.layers.InputLayer):
                continue
            seen.add(id(child))
            yield child, chain + (child,)
            yield from walk(child, chain + (child,))

    yield from walk(model, ())


def _weight_name(chain, attribute, n_declared) -> str:
    # A wrapper such as `SparseModel` adds nothing to names.
    name = "/".join(layer.name for layer in chain if not getattr(layer, "rigl_transparent", False))
    return f"{name}/{attribute}" if n_declared > 1 else name


def _unique(weights: list) -> list:
    counts: dict[str, int] = {}
    for w in weights:
        counts[w.name] = counts.get(w.name, 0) + 1
        if counts[w.name] > 1:
            w.name = f"{w.name}#{counts[w.name]}"
    return weights


def maskable_weights(model) -> list[MaskedWeight]:
    """Every maskable weight of a built model, masked or not, in model order.

    For a weight that is not masked yet, `MaskedWeight.mask` is unavailable;
    use it for its `name`, `layer`, `attribute` and shape.
    """
    weights = []
    for layer, chain in iter_layers(model):
        names = declared_weights(layer)
        if not names or not layer.built:
            continue
        for attribute in names:
            if not isinstance(_stored(layer, attribute), keras.Variable):
                raise ValueError(
                    f"Layer {layer.name!r} ({type(layer).__name__}) declares maskable weight "
                    f"{attribute!r}, but has no such variable."
                )
            weights.append(MaskedWeight(layer, attribute, _weight_name(chain, attribute, len(names)), chain))
    return _unique(weights)


def masked_weights(model) -> list[MaskedWeight]:
    """The masked weights of `model` (those with a mask), in model order, each once."""
    return [w for w in maskable_weights(model) if is_masked(w.layer) and "_rk_masks" in w.layer.__dict__]


def _stored(layer, attribute):
    # A plain attribute (Conv1DTranspose.kernel) before masking; the storage
    # behind the property (Dense._kernel, or ours after masking) otherwise.
    value = layer.__dict__.get(attribute)
    if not isinstance(value, keras.Variable):
        value = getattr(layer, "_" + attribute, None)
    return value


def unmaskable_weights(model) -> list[tuple[keras.layers.Layer, keras.Variable, tuple]]:
    """Weight matrices (trainable, ≥ 2 dimensions) of layers that declare nothing.

    A layer that declares maskable weights keeps its other variables (biases,
    including an EinsumDense's 2-D bias) dense by design; they are not listed.

    Returns:
      (layer, variable, chain) for each, in model order: weights of layer
      classes rigl_keras does not know; they stay dense.
    """
    found = []
    for layer, chain in iter_layers(model):
        if declared_weights(layer):
            continue
        for variable in layer._trainable_variables:
            if len(variable.shape) >= 2 and not getattr(variable, "overwrite_with_gradient", False):
                found.append((layer, variable, chain))
    return found


# ---------------------------------------------------------------------------
# Choosing weights: by name, pattern or class
# ---------------------------------------------------------------------------


def _matches(selector, weight: MaskedWeight) -> bool:
    if isinstance(selector, type):
        return any(isinstance(layer, selector) for layer in weight.chain)
    if selector == weight.name or any(layer.name == selector for layer in weight.chain):
        return True
    return any(ch in selector for ch in "*?[") and fnmatch.fnmatchcase(weight.name, selector)


def select_weights(selector, weights: Iterable[MaskedWeight]) -> list[MaskedWeight]:
    """The weights a selector picks.

    A selector is a weight name, a layer name (all weights of that layer and
    its sublayers), a glob pattern over weight names ("*attention*"), or a
    layer class (matching any layer on the weight's chain, e.g.
    keras.layers.Embedding).
    """
    return [w for w in weights if _matches(selector, w)]


# The built-in masked classes, importable by name (MaskedDense, MaskedLSTM, ...).
for _cls in list(_BUILTIN_LEAVES) + list(_BUILTIN_CONTAINERS):
    globals()["Masked" + _cls.__name__] = masked_class(_cls)
    __all__.append("Masked" + _cls.__name__)
del _cls
