"""The only backend-specific code: how a mask is applied, dense gradients on a side
batch, and host (NumPy) views and commits for mask updates on CPU.

Everything else in rigl_keras is `keras.ops`. The training step's own dense
gradient needs no backend code at all: it is captured by the masked weight's
G variable (`rigl_keras.layers`). `dense_gradients` is the optional side
channel (`grow_data`, close to the official TF2 port of RigL, which uses one
fixed batch of 1000 examples): one stateless
forward/backward pass on a given batch.
"""

from __future__ import annotations

import contextlib
import math
import weakref

import keras
import numpy as np
from keras import ops

__all__ = [
    "on_cpu",
    "to_host",
    "assign_masked",
    "apply_mask",
    "masked_value",
    "captured_gradient",
    "moving_averages",
    "dense_gradients",
    "gradient_function",
    "creation_scope",
]


_TF_ON_CPU: list = []


def on_cpu(tensor) -> bool:
    """Whether `tensor` (a tensor or variable) is in host memory, where NumPy reads it for free.

    TensorFlow places variables itself: there it is whether the process has
    no GPU or TPU.
    """
    backend = keras.backend.backend()
    value = _value(tensor)
    if isinstance(value, np.ndarray):
        return True
    if backend == "torch":
        return getattr(value, "device", None) is None or value.device.type == "cpu"
    if backend == "jax":
        devices = getattr(value, "devices", None)
        return devices is None or all(d.platform == "cpu" for d in devices())
    if backend == "tensorflow":
        if not _TF_ON_CPU:
            import tensorflow as tf

            _TF_ON_CPU.append(not (tf.config.list_logical_devices("GPU")
                                   or tf.config.list_logical_devices("TPU")))
        return _TF_ON_CPU[0]
    return True  # numpy


def to_host(x) -> np.ndarray:
    """`x` (tensor, variable or array) as a NumPy array, sharing memory where it can.

    On CPU a torch tensor, and usually a JAX array, is viewed without a copy
    (`keras.ops.convert_to_numpy` always copies): the caller must not write
    into the result, and must not read it after assigning to the variable.
    """
    value = _value(x)
    if isinstance(value, np.ndarray):
        return value
    backend = keras.backend.backend()
    if backend == "torch" and on_cpu(value) and "bfloat16" not in str(value.dtype):
        return value.detach().numpy()
    if backend == "jax" and on_cpu(value):
        return np.asarray(value)
    return keras.ops.convert_to_numpy(value)


def assign_masked(mask, new_mask: np.ndarray, keep: np.ndarray, resets) -> None:
    """Host-side commit of a mask update: `mask` ← `new_mask`, and each
    (variable, fill) of `resets` ← where(`keep`, variable, fill).

    On JAX, for weights of 2^20 entries or more, one compiled function does
    it from the two bool arrays (JAX copies a float array into a device
    buffer at ~1.5 GB/s, and a bool array for free; smaller weights are not
    worth a compile per shape); elsewhere NumPy over views.
    """
    if keras.backend.backend() == "jax" and new_mask.size >= 1 << 20 and on_cpu(mask):
        import jax

        values = _jax_commit(jax.device_put(new_mask), jax.device_put(keep),
                             tuple(v.value for v, _ in resets),
                             str(keras.backend.standardize_dtype(mask.dtype)),
                             tuple(float(fill) for _, fill in resets))
        mask.assign(values[0])
        for (variable, _), value in zip(resets, values[1:]):
            variable.assign(value)
        return
    mask.assign(new_mask.astype(keras.backend.standardize_dtype(mask.dtype)))
    keep_bits = None
    for variable, fill in resets:
        value = to_host(variable)  # read before the assign: it may be a view
        if keep_bits is None or keep_bits.dtype.itemsize != value.dtype.itemsize:
            keep_bits = host_keep_bits(keep, value.dtype)
        variable.assign(host_select(keep_bits, value, fill))


def host_keep_bits(keep: np.ndarray, dtype) -> np.ndarray:
    """-1 (all bits set) where bool `keep` is True, else 0, as the signed
    integer type of `dtype`'s size (for `host_select`)."""
    return -keep.view(np.int8).astype(np.dtype(f"i{np.dtype(dtype).itemsize}"))


def host_select(keep_bits: np.ndarray, value: np.ndarray, fill) -> np.ndarray:
    """`np.where(keep, value, fill)` for a float array, bit for bit, from
    `host_keep_bits(keep, value.dtype)`: two or three integer passes without
    branches (np.where measured 4-12x slower, the more so the more random
    the pattern)."""
    int_type = keep_bits.dtype
    out = value.view(int_type) & keep_bits
    fill_bits = np.asarray(fill, value.dtype).view(int_type)
    if fill_bits != 0:
        out |= fill_bits & ~keep_bits
    return out.view(value.dtype)


_JAX_COMMIT: list = []


def _jax_commit(new_mask, keep, values, mask_dtype, fills):
    if not _JAX_COMMIT:
        import jax
        import jax.numpy as jnp

        def commit(new_mask, keep, values, mask_dtype, fills):
            return (new_mask.astype(mask_dtype),) + tuple(
                jnp.where(keep, v, jnp.asarray(f, v.dtype)) for v, f in zip(values, fills))

        _JAX_COMMIT.append(jax.jit(commit, static_argnums=(3, 4)))
    return _JAX_COMMIT[0](new_mask, keep, values, mask_dtype, fills)


def _value(variable):
    # JAX cannot trace a Keras variable inside ops.where: read its value.
    return variable.value if isinstance(variable, keras.Variable) else variable


def apply_mask(weight, mask):
    """`weight` where `mask` is non-zero, else exactly 0, forward and backward.

    A NaN or Inf stored (or back-propagated) outside the mask never passes:
    on TensorFlow `multiply_no_nan` does this at the cost of a multiply (a
    select measured ~20% slower per step on CPU); on PyTorch a bitwise AND
    (`_torch_masked`); on JAX a select.
    """
    weight, mask = _value(weight), _value(mask)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        weight = tf.convert_to_tensor(weight)
        return tf.math.multiply_no_nan(weight, tf.cast(mask, weight.dtype))
    if backend == "torch":
        return _torch_masked(weight, mask)
    return ops.where(ops.not_equal(mask, 0), weight, ops.zeros_like(weight))


def masked_value(weight, mask, grad=None, momentum=None, beta: float = 0.0):
    """The effective weight `apply_mask(weight, mask) + (G − stop_gradient(G))`.

    The second term is 0 in the forward pass and routes ∂L/∂W_eff into G,
    which the optimizer then overwrites with it. G never holds a non-finite
    value for long enough to matter: a loss-scale optimizer skips (and does
    not overwrite) non-finite steps, and without one a non-finite gradient
    has already reached the weights.

    With `momentum` M (SNFS's moving average, a variable the optimizer also
    overwrites with its gradient), a third term, 0 in the forward pass, has
    the gradient β·M + (1 − β)·∂L/∂W_eff with respect to M: the optimizer
    step itself moves the average (entries whose gradient is not finite keep
    their M).
    """
    if keras.backend.backend() == "torch":
        return _torch_effective(weight, mask, grad, momentum, beta)
    effective = apply_mask(weight, mask)
    if grad is not None:
        g = ops.cast(_value(grad), effective.dtype)
        if keras.backend.backend() == "tensorflow":  # graph ops are not fused: fewer is faster
            effective = _with_capture(effective, g)
        else:  # XLA fuses the add and subtract (a custom VJP measured slower on JAX)
            effective = effective + (g - ops.stop_gradient(g))
    if momentum is not None:
        # A tensor, not the variable: tf.custom_gradient treats variables used
        # inside it as captured state and would give them no gradient.
        m = ops.convert_to_tensor(_value(momentum))
        effective = _with_moving_average(effective, m, float(beta))
    return effective


def _average(m, upstream, beta: float):
    """β·m + (1 − β)·upstream, keeping m where upstream is not finite."""
    upstream = ops.cast(upstream, m.dtype)
    return ops.where(ops.isfinite(upstream), beta * m + (1.0 - beta) * upstream, m)


def _with_capture(effective, g):
    """`effective`, with the upstream gradient passed to `g` too: the gradient of
    `effective + (g − stop_gradient(g))` without its two elementwise ops."""

    @ops.custom_gradient
    def identity(effective, g):
        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            return upstream, upstream

        return ops.copy(effective), grad  # an identity (elided when compiled)

    return identity(effective, g)


def _with_moving_average(effective, m, beta: float):
    """`effective`, whose gradient with respect to `m` is `_average(m, upstream, beta)`."""

    @ops.custom_gradient
    def identity(effective, m):
        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            return upstream, _average(m, upstream, beta)

        return ops.copy(effective), grad  # an identity (elided when compiled)

    return identity(effective, m)


_TORCH: list = []
# False sends eager torch through the autograd function too (for
# benchmarks/mask_cost.py to compare the two).
_TORCH_IN_PLACE = True


def _torch():
    """The torch functions `masked_value` uses, made on first use (so that
    torch is imported only under the torch backend), looked up once: eager
    torch runs every layer's `masked_value` in Python at every step."""
    if not _TORCH:
        import types

        import torch
        from keras.src.backend.common.stateless_scope import in_stateless_scope

        int_types = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

        def keep_bits(mask, dtype):
            """-1 (all bits set) where `mask` is non-zero, else 0, as the
            integer type of `dtype`'s size; None where `mask` is non-zero
            everywhere (a weight kept dense, such as the first layer under
            "uniform"): there is nothing to mask, and every AND is skipped.

            Cached on the mask tensor and remade when its version or storage
            changes: every in-place write (a Keras `assign`, a user's
            `copy_`) bumps a torch tensor's version, and a move replaces its
            storage, so a stale pattern is never used. Costs one integer copy
            of each mask. Not cached while torch.compile traces (the compiler
            fuses the comparison into the AND).
            """
            int_type = int_types[dtype.itemsize]
            if torch.compiler.is_compiling():
                return (mask != 0).to(int_type).neg()
            stamp = (mask._version, mask.data_ptr())
            cache = getattr(mask, "_rk_keep_bits", None)
            if cache is None or cache[0] != stamp:
                cache = mask._rk_keep_bits = (stamp, {})
            if int_type not in cache[1]:
                with torch.no_grad():
                    keep = mask != 0
                    cache[1][int_type] = None if bool(keep.all()) else keep.to(int_type).neg_()
            return cache[1][int_type]

        def select(value, bits):
            return value if bits is None else (value.view(bits.dtype) & bits).view(value.dtype)

        class Masked(torch.autograd.Function):
            @staticmethod
            def forward(ctx, weight, mask, grad, momentum, beta, clean):
                # An intermediate, not an input: kept on ctx (cheaper than
                # save_for_backward); a new mask makes a new pattern.
                ctx.bits = bits = keep_bits(mask, weight.dtype)
                if momentum is not None:
                    ctx.save_for_backward(momentum)
                    ctx.beta = beta
                # A weight already exactly 0 outside the mask passes as it is
                # (autograd makes the view): no kernel-sized copy.
                return weight if clean else select(weight, bits)

            @staticmethod
            def backward(ctx, upstream):
                bits = ctx.bits
                weight_grad = average = None
                if ctx.needs_input_grad[0]:
                    weight_grad = select(upstream, bits)
                if ctx.needs_input_grad[3]:
                    (m,) = ctx.saved_tensors
                    average = _torch_average(m, upstream.to(m.dtype), ctx.beta)
                grad = upstream if ctx.needs_input_grad[2] else None
                return weight_grad, None, grad, average, None, None

        _TORCH.append(types.SimpleNamespace(
            tensor=torch.Tensor, strided=torch.strided, masked=Masked.apply, keep_bits=keep_bits, select=select,
            is_compiling=torch.compiler.is_compiling,
            in_stateless_scope=in_stateless_scope))
    return _TORCH[0]


def _torch_masked(weight, mask, grad=None, momentum=None, beta: float = 0.0, clean=False):
    """PyTorch: `masked_value` as one autograd function (eager torch pays
    Python time for every op and function).

    The select is a bitwise AND of the weight's bits with an all-ones or
    all-zeros integer pattern per entry: exactly the select's result (NaN
    and Inf outside the mask give +0), but a vectorized integer op, where
    CPU builds of torch run `where` and comparisons one entry at a time
    (~10x slower on a 784x300 kernel). Backward: the same AND on the
    upstream gradient for the weight; the upstream gradient itself for G
    (what `+ (G − G.detach())` gives, without its two elementwise ops); the
    moving average for M. `clean`: the weight is known to be exactly 0
    outside the mask (`_torch_clean`), so the forward select is skipped.
    """
    t = _torch()
    # Layers pass torch tensors; only arrays (the public function's other
    # inputs) need converting, which costs Python time on every step.
    weight, mask, grad, momentum = (
        x if x is None or isinstance(x, t.tensor) else ops.convert_to_tensor(x)
        for x in (weight, mask, grad, momentum))
    if grad is not None:
        grad = grad.to(weight.dtype)
    return t.masked(weight, mask, grad, momentum, float(beta), clean)


def _torch_clean(t, variable, mask):
    """PyTorch, eager: the variable's value with every entry outside the mask
    set to exactly 0 *in its storage*, or None where that cannot be done
    (torch.compile tracing, a stateless call, a symbolic call, not a Keras
    variable).

    Then the forward pass reads the weight as it is. A kernel-sized masked
    copy per weight and step costs eager CPU torch several % of a
    LeNet-300-100 step; the in-place AND runs only when the weight, its mask
    or their storage changed since the last one (the optimizer step, unless
    a sparse-training callback has established that it kept the weight
    clean: `torch_still_clean`; an `assign`; a mask update), and allocates
    nothing; never for a mask without zeros. The stored values
    outside the mask are never read: a position grows with value 0, and
    saving keeps active values only.
    """
    param, mask_value = getattr(variable, "_value", None), getattr(mask, "_value", None)
    if (not isinstance(param, t.tensor) or not isinstance(mask_value, t.tensor)
            or t.is_compiling() or t.in_stateless_scope()):
        return None
    value = variable.value  # the parameter itself, or its autocast copy
    if value.is_meta or param.is_meta:  # a symbolic call
        return None
    stamp = (param._version, mask_value._version, param.data_ptr(), mask_value.data_ptr())
    if getattr(param, "_rk_clean", None) != stamp:
        bits = t.keep_bits(mask_value, param.dtype)
        # `detach` shares the version counter (the write is seen) and needs
        # no `no_grad` block (~7 µs of Python).
        if bits is not None:
            param.detach().view(bits.dtype).bitwise_and_(bits)
        param._rk_clean = (param._version,) + stamp[1:]
        if value is not param:  # cast before the AND: cast again
            value = variable.value
    return value


def _torch_effective(weight, mask, grad, momentum, beta: float):
    """`masked_value` on PyTorch.

    Eager, with nothing captured: the clean weight itself (`_torch_clean`),
    whose `.grad` is masked in place as autograd accumulates it
    (`_torch_mask_grad`). No node in the graph, no Python in the backward
    pass but that hook, no kernel-sized copy: static sparse training costs
    what dense does plus two in-place ANDs per weight and step. With G or M:
    the autograd function, which skips its forward select on a clean weight.
    Elsewhere (torch.compile, stateless calls): the autograd function.
    """
    t = _torch()
    value = _torch_clean(t, weight, mask) if _TORCH_IN_PLACE else None
    if value is None:
        return _torch_masked(*(None if x is None else _value(x)
                               for x in (weight, mask, grad, momentum)), beta)
    if grad is not None or momentum is not None:
        return _torch_masked(value, mask._value, None if grad is None else _value(grad),
                             None if momentum is None else _value(momentum), beta, clean=True)
    if value.requires_grad:
        _torch_mask_grad(t, weight._value, mask._value)
    return value


def _torch_mask_grad(t, param, mask_value) -> None:
    """Makes autograd mask `param.grad` in place (an AND with the mask's bit
    pattern) each time it accumulates into it: what `loss.backward()`, and so
    Keras' torch trainer, gives. A hook on the parameter, registered once
    (a masked weight stays masked); it reads the mask when it runs.

    `torch.autograd.grad` with respect to the stored variable itself does not
    accumulate, so it returns ∂L/∂W_eff unmasked: the graph reads the clean
    weight as it is.
    """
    if getattr(param, "_rk_grad_mask", None) is mask_value:
        return
    if not hasattr(param, "_rk_grad_mask"):
        keep_bits, select = t.keep_bits, t.select

        def mask_grad(param):
            grad, mask = param.grad, param._rk_grad_mask
            bits = keep_bits(mask, grad.dtype)
            if bits is None:
                pass  # nothing masked
            elif grad.layout == t.strided:
                grad.view(bits.dtype).bitwise_and_(bits)  # the parameter's own gradient
            else:
                grad = param.grad = select(grad.to_dense(), bits)
            # Which gradient, as of which write, is masked by which mask
            # (`torch_clean_before_step`).
            param._rk_masked_grad = (weakref.ref(grad), grad._version, mask._version, mask.data_ptr())

        param.register_post_accumulate_grad_hook(mask_grad)
    param._rk_grad_mask = mask_value


def torch_clean_before_step(grads, variables) -> tuple[list, list]:
    """PyTorch, eager: which masked weights an optimizer step about to apply
    `grads` to `variables` starts clean from, with masked gradients.

    Returns:
      (clean, unmasked): `clean` holds a token per masked weight whose
      stored value is exactly 0 outside its mask now (the forward pass's
      in-place AND is current: `_torch_clean`) and whose gradient is its own
      `.grad` exactly as the mask hook left it, ANDed with that same mask
      and not written since; `unmasked` holds the variables of the other
      masked weights (a gradient from `torch.autograd.grad`, or changed
      after the hook). Pass `clean` to `torch_still_clean` after the step.
    """
    clean, unmasked = [], []
    for grad, variable in zip(grads, variables):
        param = getattr(variable, "_value", None)
        mask = getattr(param, "_rk_grad_mask", None)
        if mask is None:
            continue  # not a masked weight on the in-place path
        record = getattr(param, "_rk_masked_grad", None)
        mask_stamp = (mask._version, mask.data_ptr())
        if (grad is None or record is None or grad is not param.grad or record[0]() is not grad
                or record[1:] != (grad._version,) + mask_stamp):
            unmasked.append(variable)
        elif getattr(param, "_rk_clean", None) == (param._version, mask._version,
                                                    param.data_ptr(), mask.data_ptr()):
            clean.append((variable, param, mask))
    return clean, unmasked


def torch_mask_stamp(mask) -> tuple:
    """PyTorch: an identity of a mask tensor's current contents (any write or
    move changes it)."""
    return (mask._version, mask.data_ptr())


def torch_still_clean(clean) -> None:
    """Records that the weights of `clean` (from `torch_clean_before_step`)
    are still exactly 0 outside their masks after the step, so that the next
    forward pass skips its AND: the caller has established that the step
    cannot have moved an entry whose gradient is 0 (`engine.optimizer_traits`,
    state outside the mask at its initial value, no constraint that could).
    """
    for _, param, mask in clean:
        param._rk_clean = (param._version, mask._version, param.data_ptr(), mask.data_ptr())


def _torch_average(m, up, beta: float):
    """`_average` for torch tensors.

    On CPU, where torch runs `isfinite` and `where` one entry at a time
    (~20x slower than the rest of this), one `lerp` and one sum: the select
    runs only when the sum is not finite (an entry of `up` is not, or the sum
    overflowed). Elsewhere the select always runs: reading the sum would
    synchronize with the device.
    """
    import torch

    average = torch.lerp(m, up, 1.0 - beta)
    if average.device.type != "cpu" or not math.isfinite(average.sum().item()):
        average = torch.where(torch.isfinite(up), average, m)
    return average


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
