"""The only backend-specific code: how a mask is applied, and dense gradients on a side batch.

Everything else in rigl_keras is `keras.ops`. The training step's own dense
gradient needs no backend code at all: it is captured by the masked weight's
G variable (`rigl_keras.layers`). `dense_gradients` is the optional side
channel (`grow_data`, close to the official TF2 port of RigL, which uses one
fixed batch of 1000 examples): one stateless
forward/backward pass on a given batch.
"""

from __future__ import annotations

import contextlib

import keras
from keras import ops

__all__ = [
    "apply_mask",
    "masked_value",
    "captured_gradient",
    "moving_averages",
    "dense_gradients",
    "gradient_function",
    "creation_scope",
]


def _value(variable):
    # JAX cannot trace a Keras variable inside ops.where: read its value.
    return variable.value if isinstance(variable, keras.Variable) else variable


def apply_mask(weight, mask):
    """`weight` where `mask` is non-zero, else exactly 0, forward and backward.

    A NaN or Inf stored (or back-propagated) outside the mask never passes:
    on TensorFlow `multiply_no_nan` does this at the cost of a multiply (a
    select measured ~20% slower per step on CPU); elsewhere a select.
    """
    weight, mask = _value(weight), _value(mask)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        weight = tf.convert_to_tensor(weight)
        return tf.math.multiply_no_nan(weight, tf.cast(mask, weight.dtype))
    return ops.where(ops.not_equal(mask, 0), weight, ops.zeros_like(weight))


def masked_value(weight, mask, grad=None):
    """The effective weight `apply_mask(weight, mask) + (G − stop_gradient(G))`.

    The second term is 0 in the forward pass and routes ∂L/∂W_eff into G,
    which the optimizer then overwrites with it. G never holds a non-finite
    value for long enough to matter: a loss-scale optimizer skips (and does
    not overwrite) non-finite steps, and without one a non-finite gradient
    has already reached the weights.
    """
    effective = apply_mask(weight, mask)
    if grad is None:
        return effective
    g = ops.cast(_value(grad), effective.dtype)
    return effective + (g - ops.stop_gradient(g))


def captured_gradient(variable):
    """The value of a capture variable, summed over replicas.

    Under a `tf.distribute` strategy each replica overwrites its copy of G
    with its own gradient of the (already replica-scaled) loss; their sum is
    the global gradient the optimizer applies.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        inner = getattr(variable, "_value", None)
        if isinstance(inner, tf.distribute.DistributedValues) or hasattr(inner, "_distribute_strategy"):
            strategy = getattr(inner, "_distribute_strategy", None)
            if strategy is not None and strategy.num_replicas_in_sync > 1:
                parts = strategy.experimental_local_results(inner)
                return tf.add_n([tf.convert_to_tensor(p) for p in parts])
    return ops.stop_gradient(variable.value)


def _moving_averages(momenta, grads, beta):
    out = []
    for m, g in zip(momenta, grads):
        g = ops.cast(g, "float32")
        # A non-finite gradient is skipped for this step, never stored.
        out.append(ops.where(ops.all(ops.isfinite(g)), beta * m + (1.0 - beta) * g, m))
    return out


_COMPILED_AVERAGES: dict = {}


def moving_averages(momenta, grads, beta: float) -> list:
    """β·m + (1 − β)·g for each pair, skipping (keeping m) where g is not finite.

    Compiled once on TensorFlow and JAX (SNFS runs it after every step).

    Args:
      momenta: the moving-average variables.
      grads: one gradient tensor per variable.
      beta: the decay β.

    Returns:
      The new values, one tensor per variable.
    """
    name = keras.backend.backend()
    values = [ops.stop_gradient(_value(m)) for m in momenta]
    function = _COMPILED_AVERAGES.get(name)
    if function is None:
        if name == "tensorflow":
            import tensorflow as tf

            function = tf.function(_moving_averages)
        elif name == "jax":
            import jax

            function = jax.jit(_moving_averages)
        else:
            function = _moving_averages
        _COMPILED_AVERAGES[name] = function
    return function(values, list(grads), ops.convert_to_tensor(beta, "float32"))


def _substituted_values(model, weights, effective):
    """Trainable and non-trainable value lists with masked weights swapped for free ones."""
    index = {id(w.variable): i for i, w in enumerate(weights)}
    masks = {id(w.mask) for w in weights}
    trainable = [
        effective[index[id(v)]] if id(v) in index else v.value
        for v in model.trainable_variables
    ]
    non_trainable = [
        ops.ones_like(v.value) if id(v) in masks else v.value
        for v in model.non_trainable_variables
    ]
    return trainable, non_trainable


def _loss(model, weights, effective, x, y, sample_weight):
    trainable, non_trainable = _substituted_values(model, weights, effective)
    kwargs = {"training": True} if _accepts_training(model) else {}
    y_pred, non_trainable = model.stateless_call(trainable, non_trainable, x, **kwargs)
    metrics = [v.value for v in model.metrics_variables]
    loss, _ = model.stateless_compute_loss(
        trainable, non_trainable, metrics, x, y, y_pred, sample_weight, training=True
    )
    return loss


def _accepts_training(model) -> bool:
    import inspect

    try:
        parameters = inspect.signature(model.call).parameters
    except (TypeError, ValueError):
        return True
    return "training" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


def dense_gradients(model, weights, data) -> list:
    """∂L/∂W_eff of every masked weight on one batch, by a stateless pass.

    Each mask is replaced by ones and each weight by its masked value, so the
    gradient is dense; no variable (BatchNorm statistics, RNG state, metrics)
    changes.

    Args:
      model: a compiled Keras model.
      weights: `MaskedWeight`s of `model`.
      data: a batch `(x, y)` or `(x, y, sample_weight)`.

    Returns:
      One gradient tensor per weight, of its shape.

    Raises:
      ValueError: if the model is not compiled with a loss.
    """
    if getattr(model, "compiled_loss", None) is None and getattr(model, "loss", None) is None:
        raise ValueError("The model must be compiled with a loss to compute growth gradients.")
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    name = keras.backend.backend()
    effective = [w.effective() for w in weights]
    if name == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(effective)
            loss = _loss(model, weights, effective, x, y, sample_weight)
        return tape.gradient(loss, effective)
    if name == "jax":
        import jax

        return jax.grad(lambda e: _loss(model, weights, e, x, y, sample_weight))(effective)
    if name == "torch":
        import torch

        effective = [e.detach().requires_grad_(True) for e in effective]
        with torch.enable_grad():
            loss = _loss(model, weights, effective, x, y, sample_weight)
            return list(torch.autograd.grad(loss, effective, allow_unused=True))
    raise NotImplementedError(
        f"Gradients on a side batch (`grow_data`) are not implemented for the "
        f"{name!r} backend; use the captured training gradients (no `grow_data`)."
    )


def gradient_function(model, weights):
    """A reusable `data -> dense_gradients(model, weights, data)`.

    On TensorFlow the pass is traced once into a graph (variables are read by
    reference, so it sees later masks and weights). Rebuild it when the model
    is recompiled: the loss is traced in.
    """
    if keras.backend.backend() != "tensorflow":
        return lambda data: dense_gradients(model, weights, data)
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def compiled(data):
        return dense_gradients(model, weights, data)

    def call(data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        return compiled(tuple(item for item in (x, y, sample_weight) if item is not None))

    return call


def creation_scope(model):
    """A context in which new variables belong with `model`'s (distribution strategy)."""
    strategy = getattr(model, "distribute_strategy", None)
    if strategy is not None and keras.backend.backend() == "tensorflow":
        return strategy.scope()
    return contextlib.nullcontext()
