"""Masked kernel layers: drop-in replacements for Keras Dense and convolutions.

Each masked layer keeps its trainable weight in ``_kernel`` and a non-trainable
0/1 ``mask`` variable of the same shape; ``layer.kernel`` returns
``where(mask, _kernel, 0)``. Because the mask is a variable read inside the
compiled train function, assigning a new mask from a callback takes effect on
the next step without retracing.

The mask is applied so that a non-finite value stored at a masked-out
position (or flowing back through the gradient there) can never leak into
the outputs or into the kernel's gradient (`backend.apply_mask`).
"""

from __future__ import annotations

import keras

from rigl_keras import backend

__all__ = [
    "MaskedKernelMixin",
    "MaskedDense",
    "MaskedConv2D",
    "MaskedDepthwiseConv2D",
    "is_masked",
    "MASKED_EQUIVALENTS",
    "kernel_of",
    "is_maskable",
    "iter_layers",
    "maskable_layers",
    "masked_layers_of",
]


class MaskedKernelMixin:
    """Gives a Keras kernel layer a fixed-shape binary ``mask`` on its kernel.

    Mix in *before* the Keras layer class. The mixin owns the ``kernel``
    property: it stores whatever the base class's ``build`` assigns as the
    kernel (either ``self._kernel = ...`` or ``self.kernel = ...``) in
    ``_kernel``, adds a ``mask`` variable after the base build, and returns
    the masked kernel to the base class's ``call``.

    Quantization and LoRA of masked layers are not supported.
    """

    @property
    def kernel(self):
        """The effective kernel: the stored kernel where the mask is 1, else 0."""
        if not self.built and getattr(self, "_kernel", None) is None:
            raise AttributeError(
                "You must build the layer before accessing `kernel`."
            )
        kernel = self._kernel
        mask = getattr(self, "mask", None)
        if mask is None:  # during the base class's build
            return kernel
        return backend.apply_mask(kernel, mask)

    @kernel.setter
    def kernel(self, value):
        # DepthwiseConv2D.build assigns `self.kernel = add_weight(...)`.
        self._kernel = value

    @property
    def raw_kernel(self) -> keras.Variable:
        """The stored (trainable) kernel variable, without the mask applied."""
        return self._kernel

    def build(self, input_shape):
        self._kernel = None
        self.grow_momentum = None
        super().build(input_shape)
        if getattr(self, "lora_enabled", False) or getattr(
            self, "quantization_mode", None
        ):
            raise ValueError(
                f"Layer {self.name!r}: masked layers do not support LoRA or "
                "quantization."
            )
        self.mask = self.add_weight(
            name="mask",
            shape=tuple(self._kernel.shape),
            initializer="ones",
            trainable=False,
            dtype=self._kernel.dtype,
            autocast=False,
        )

    def ensure_grow_momentum(self) -> keras.Variable:
        """The layer's moving average of dense gradients (SNFS), created on first use.

        It lives with the layer, not the callback, so that checkpoints,
        `BackupAndRestore` and `.keras` files carry it.
        """
        if self.grow_momentum is None:
            locked = self._tracker.locked
            self._tracker.unlock()
            try:
                self.grow_momentum = self.add_weight(
                    name="grow_momentum",
                    shape=tuple(self._kernel.shape),
                    initializer="zeros",
                    trainable=False,
                    dtype="float32",
                    autocast=False,
                )
            finally:
                if locked:
                    self._tracker.lock()
        return self.grow_momentum

    def _saved_variables(self) -> list:
        variables = [self._kernel]
        if getattr(self, "bias", None) is not None:
            variables.append(self.bias)
        variables.append(self.mask)
        if self.grow_momentum is not None:
            variables.append(self.grow_momentum)
        return variables

    def save_own_variables(self, store):
        # Keras' Dense/Conv save kernel and bias only; the mask must travel too.
        if not self.built:
            return
        for i, variable in enumerate(self._saved_variables()):
            store[str(i)] = variable

    def load_own_variables(self, store):
        if not self.built:
            return
        variables = self._saved_variables()
        if len(store.keys()) == len(variables) + 1 and self.grow_momentum is None:
            # Saved during SNFS training: recreate the momentum to load it.
            self.ensure_grow_momentum()
            variables = self._saved_variables()
        if len(store.keys()) != len(variables):
            raise ValueError(
                f"Layer {self.name!r} ({type(self).__name__}) expected "
                f"{len(variables)} variables (kernel, bias, mask[, grow_momentum]) but the "
                f"saved file holds {len(store.keys())}. Was it saved from a "
                "plain Keras layer? Use rigl_keras.sparsify on the loaded "
                "dense model instead."
            )
        for i, variable in enumerate(variables):
            variable.assign(store[str(i)])


@keras.saving.register_keras_serializable(package="rigl_keras")
class MaskedDense(MaskedKernelMixin, keras.layers.Dense):
    """`keras.layers.Dense` with a binary mask on its kernel.

    Takes exactly the constructor arguments of `keras.layers.Dense`. The bias
    stays dense. The mask starts all ones; `rigl_keras.sparsify` and the
    sparse-training callbacks set it.
    """


@keras.saving.register_keras_serializable(package="rigl_keras")
class MaskedConv2D(MaskedKernelMixin, keras.layers.Conv2D):
    """`keras.layers.Conv2D` with a binary mask on its kernel.

    Takes exactly the constructor arguments of `keras.layers.Conv2D`. The bias
    stays dense.
    """


@keras.saving.register_keras_serializable(package="rigl_keras")
class MaskedDepthwiseConv2D(MaskedKernelMixin, keras.layers.DepthwiseConv2D):
    """`keras.layers.DepthwiseConv2D` with a binary mask on its kernel.

    Takes exactly the constructor arguments of `keras.layers.DepthwiseConv2D`.
    The bias stays dense.
    """


#: Keras layer class -> its masked replacement (exact types only: a user's
#: subclass of Dense may change `call`, so it is not silently replaced).
MASKED_EQUIVALENTS: dict[type, type] = {
    keras.layers.Dense: MaskedDense,
    keras.layers.Conv2D: MaskedConv2D,
    keras.layers.DepthwiseConv2D: MaskedDepthwiseConv2D,
}


def is_masked(layer) -> bool:
    """Returns True if `layer` carries a rigl_keras kernel mask."""
    return isinstance(layer, MaskedKernelMixin)


def kernel_of(layer):
    """The kernel variable of a maskable layer (the stored one if masked)."""
    return layer._kernel if is_masked(layer) else layer.kernel


def is_maskable(layer) -> bool:
    """True for masked layers and for exact Dense/Conv2D/DepthwiseConv2D."""
    return is_masked(layer) or type(layer) in MASKED_EQUIVALENTS


def iter_layers(model):
    """All layers of `model`, nested models flattened, each layer once."""
    seen = set()
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if id(layer) not in seen:
            seen.add(id(layer))
            yield layer


def maskable_layers(model) -> list:
    """The built maskable layers of `model` in order, each once.

    Shared layers appear once; nested models are searched recursively.
    Unbuilt layers are skipped (their kernel shape is unknown).
    """
    return [
        layer
        for layer in iter_layers(model)
        if is_maskable(layer) and layer.built
    ]


def masked_layers_of(model) -> list:
    """The layers of `model` that carry a mask, in order, each once."""
    return [layer for layer in iter_layers(model) if is_masked(layer)]
