"""FLOPs and parameter accounting for sparse models (paper Appendix A), and its CLI.

Counting rules (see docs/flops.md for the reasoning and the paper comparison):

* Every maskable weight (`rigl_keras.layers.maskable_weights`: plain Keras
  layers or their ``Masked*`` versions, inside nested models, Bidirectional,
  TimeDistributed, RNNs and MultiHeadAttention) is counted on its own; a
  weight of N entries used P times per sample costs ``2 · N · P`` FLOPs, one
  multiply and one add per entry and use. ``2 · MACs`` is exactly the number
  of multiplies plus adds when the bias add is counted (K multiplies, K − 1
  adds, 1 bias add per output), so biases need no separate term. P is:

  - Dense, Conv1D/2D/3D, DepthwiseConv1D/2D, and both kernels of
    SeparableConv1D/2D: output positions (output elements per sample divided
    by output channels; the depthwise step of a separable convolution has
    the same positions as its output);
  - Conv1D/2D/3DTranspose: *input* positions (each input position scatters
    through the whole kernel once);
  - EinsumDense: the product of the equation's dims that are not in the
    kernel, the batch aside (for MultiHeadAttention's projections: the
    sequence length);
  - SimpleRNN/LSTM/GRU cells: kernel and recurrent kernel are each used once
    per time step (a matrix-vector product per step), with the time steps
    taken from the RNN's input shape (its output may be the last step only);
  - Embedding: 0, a lookup has no multiply-adds (its weights are still
    counted as parameters);
  - inside TimeDistributed: the inner layer's P times the time steps; inside
    Bidirectional: both directions; a shared layer (or nested model) called
    twice counts twice.
* A sparse weight with n of its N entries active costs ``2 · n · P``, i.e.
  dense FLOPs × density.
* Batch normalization, activations, pooling, attention's score and softmax
  products (they have no weights), residual additions and the loss are not
  counted (the paper omits batch normalization and cross entropy; the rest
  does not scale with density).

Training FLOPs per sample and step follow Appendix A with f_D the dense and
f_S the sparse inference FLOPs, and are scaled by the training-steps
multiplier M; ratios are relative to dense training at M = 1.

Run ``python -m rigl_keras.flops --help`` for the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence

import keras
import numpy as np

from rigl_keras import distributions
from rigl_keras import layers as masked_layers
from rigl_keras import schedules

__all__ = [
    "METHODS",
    "PAPER_TOTAL_STEPS",
    "LayerFlops",
    "FlopsReport",
    "FlopsSummary",
    "inference_flops",
    "training_flops",
    "training_flops_ratio",
    "paper_pruning_schedule",
    "small_dense_flops",
    "flops_summary",
    "plot_layer_sparsity",
    "build_model",
    "main",
]

#: Training methods understood by `training_flops` (paper Appendix A).
METHODS = ("dense", "static", "snip", "set", "snfs", "rigl", "prune", "small_dense")

#: Steps of the paper's ResNet-50 runs (batch 4096, ~100 epochs).
PAPER_TOTAL_STEPS = 32000
# Gradual pruning of ResNet-50 as the official RigL FLOPs notebook counts it:
# prune from step 10k to 25k of 32k, every 1k steps (cubic ramp).
_PAPER_PRUNE_BEGIN, _PAPER_PRUNE_END, _PAPER_PRUNE_FREQUENCY = 10000, 25000, 1000


# --------------------------------------------------------------------------
# Inference FLOPs
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerFlops:
    """Inference cost of one maskable weight, per sample.

    Attributes:
      name: the weight's name (`MaskedWeight.name`, e.g. "fc1",
        "lstm/lstm_cell/recurrent_kernel", "sep/depthwise_kernel").
      layer_type: the owning layer's class name (e.g. "Conv2D", "MaskedDense",
        "LSTMCell").
      kernel_shape: shape of the weight.
      output_shape: the owning layer's output shape (first call), batch dim
        included; for a recurrent cell, one step's output.
      kernel_size: N, the number of entries.
      active: n, the number of active (non-pruned) entries.
      positions: P, the uses of each entry per sample, summed over the
        layer's calls (see the module docstring; 0 for Embedding).
    """

    name: str
    layer_type: str
    kernel_shape: tuple[int, ...]
    output_shape: tuple[int | None, ...]
    kernel_size: int
    active: int
    positions: int

    @property
    def density(self) -> float:
        """Fraction of active kernel weights, n / N."""
        return self.active / self.kernel_size

    @property
    def sparsity(self) -> float:
        """1 − density."""
        return 1.0 - self.density

    @property
    def dense_flops(self) -> int:
        """FLOPs per sample with every kernel weight active: 2 · N · P."""
        return 2 * self.kernel_size * self.positions

    @property
    def flops(self) -> int:
        """FLOPs per sample at this density: 2 · n · P = dense FLOPs × density."""
        return 2 * self.active * self.positions

    def to_dict(self) -> dict:
        """A JSON-friendly dict of the fields and derived numbers."""
        return {
            "name": self.name,
            "type": self.layer_type,
            "kernel_shape": list(self.kernel_shape),
            "output_shape": list(self.output_shape),
            "kernel_size": self.kernel_size,
            "active": self.active,
            "density": self.density,
            "sparsity": self.sparsity,
            "dense_flops": self.dense_flops,
            "flops": self.flops,
        }


@dataclasses.dataclass(frozen=True)
class FlopsReport:
    """Per-layer and total inference FLOPs and parameter counts of a model.

    Attributes:
      model_name: the model's name.
      layers: one `LayerFlops` per maskable layer, in model order.
      total_params: every stored weight of the model (kernels, biases,
        normalization statistics, ...) except the masks themselves.
    """

    model_name: str
    layers: tuple[LayerFlops, ...]
    total_params: int

    @property
    def dense_flops(self) -> int:
        """f_D: inference FLOPs per sample with all kernels dense."""
        return sum(layer.dense_flops for layer in self.layers)

    @property
    def flops(self) -> int:
        """f_S: inference FLOPs per sample at the report's densities."""
        return sum(layer.flops for layer in self.layers)

    @property
    def flops_ratio(self) -> float:
        """f_S / f_D (1.0 if the model has no multiply-adds, e.g. only embeddings)."""
        return self.flops / self.dense_flops if self.dense_flops else 1.0

    @property
    def kernel_params(self) -> int:
        """Kernel weights of the maskable layers."""
        return sum(layer.kernel_size for layer in self.layers)

    @property
    def active_kernel_params(self) -> int:
        """Active kernel weights of the maskable layers."""
        return sum(layer.active for layer in self.layers)

    @property
    def parameter_ratio(self) -> float:
        """Active / all kernel weights of the maskable layers (1 − overall sparsity)."""
        return self.active_kernel_params / self.kernel_params

    @property
    def active_params(self) -> int:
        """All stored weights except masks, minus the pruned kernel weights."""
        return self.total_params - (self.kernel_params - self.active_kernel_params)

    @property
    def total_parameter_ratio(self) -> float:
        """`active_params` / `total_params`: biases, BN etc. count as dense."""
        return self.active_params / self.total_params

    def sparsities(self) -> dict[str, float]:
        """{layer name: sparsity} in model order."""
        return {layer.name: layer.sparsity for layer in self.layers}

    def densities(self) -> dict[str, float]:
        """{layer name: density} in model order."""
        return {layer.name: layer.density for layer in self.layers}

    def to_dict(self) -> dict:
        """A JSON-friendly dict: totals and the per-layer entries."""
        return {
            "model": self.model_name,
            "dense_flops": self.dense_flops,
            "flops": self.flops,
            "flops_ratio": self.flops_ratio,
            "kernel_params": self.kernel_params,
            "active_kernel_params": self.active_kernel_params,
            "parameter_ratio": self.parameter_ratio,
            "total_params": self.total_params,
            "active_params": self.active_params,
            "total_parameter_ratio": self.total_parameter_ratio,
            "layers": [layer.to_dict() for layer in self.layers],
        }


# --------------------------------------------------------------------------
# Where each weight is used: shapes of the calls of its layer
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Call:
    """One call of a layer: its first input's shape, its output's shape (or
    None if not recorded), how many times it runs per sample (time steps of
    an enclosing RNN or TimeDistributed), and whether it is one step of an RNN."""

    input_shape: tuple | None
    output_shape: tuple | None
    repeat: int = 1
    per_step: bool = False
    node: object = None  # the graph node, when the call is recorded in one


def _shape(shape) -> tuple | None:
    if shape is None:
        return None
    return tuple(None if d is None else int(d) for d in shape)


def _graph_node_ids(model) -> set[int] | None:
    """Ids of the nodes of `model`'s own graph; None if it is not a graph model.

    A layer of a Sequential model loaded from a `.keras` file carries more
    inbound nodes than the model runs (the model is built more than once
    while loading); only the nodes of the model's graph are calls.
    """
    if not isinstance(model, keras.Model):
        return None
    graph = getattr(model, "_functional", None) if isinstance(model, keras.Sequential) else model
    by_depth = getattr(graph, "_nodes_by_depth", None)
    if not by_depth:
        return None
    return {id(node) for nodes in by_depth.values() for node in nodes}


def _first_shape(value) -> tuple | None:
    """The first shape in a (nested) build-shape argument."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = next(iter(value.values()), None)
        return _first_shape(value)
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple, dict)):
        return _first_shape(value[0])
    if isinstance(value, (list, tuple)):
        return _shape(value)
    shape = getattr(value, "shape", None)
    return _shape(shape) if shape is not None else None


def _build_call(layer, repeat: int = 1) -> _Call:
    """A call inferred from the shape `layer` was built with."""
    build_shapes = getattr(layer, "_build_shapes_dict", None) or {}
    input_shape = next(
        (s for s in (_first_shape(v) for v in build_shapes.values()) if s is not None), None
    )
    if input_shape is None:
        raise ValueError(
            f"Cannot tell the shapes of layer {layer.name!r}: it has never been "
            "called and has no recorded input shape."
        )
    return _Call(input_shape, None, repeat)


def _graph_calls(layer, parent) -> list[_Call] | None:
    """The calls of `layer` recorded in the graph of `parent`, or None."""
    ids = _graph_node_ids(parent)
    if ids is None:
        return None
    calls = []
    for node in getattr(layer, "_inbound_nodes", []):
        if id(node) not in ids:
            continue
        inputs = [t for t in node.input_tensors]
        outputs = [t for t in node.output_tensors]
        calls.append(
            _Call(
                _shape(inputs[0].shape) if inputs else None,
                _shape(outputs[0].shape) if outputs else None,
                node=node,
            )
        )
    return calls or None


def _time_steps(layer, shape) -> int:
    if shape is None or len(shape) < 3 or shape[1] is None:
        raise ValueError(
            f"Layer {layer.name!r} has input shape {shape} with an unknown number "
            "of time steps; FLOPs need a fixed input shape (e.g. keras.Input((T, F)))."
        )
    return int(shape[1])


def _calls(weight, model) -> list[_Call]:
    """The calls of `weight.layer`, walking its chain down from `model`.

    Layers of a graph model (functional, Sequential, nested ones) take their
    calls from the graph; a nested model called k times runs its layers k
    times. Below Bidirectional both directions see the wrapper's input;
    below TimeDistributed and RNN the inner layer or cell runs once per time
    step. Sublayers of other layers (MultiHeadAttention's projections, custom
    layers) use the shape they were built with, once per call of their parent.
    """
    calls: list[_Call] | None = None
    parent = model
    for layer in weight.chain:
        runs = 1 if calls is None else sum(c.repeat for c in calls)
        own = _graph_calls(layer, parent)
        if own is not None:
            calls = [dataclasses.replace(c, repeat=c.repeat * runs) for c in own]
        elif calls is not None and isinstance(parent, keras.layers.Bidirectional):
            calls = [_Call(c.input_shape, None, c.repeat, c.per_step) for c in calls]
        elif calls is not None and isinstance(parent, (keras.layers.TimeDistributed, keras.layers.RNN)):
            calls = [
                _Call(
                    (c.input_shape[0],) + tuple(c.input_shape[2:]),
                    None,
                    c.repeat * _time_steps(parent, c.input_shape),
                    c.per_step or isinstance(parent, keras.layers.RNN),
                )
                for c in calls
            ]
        elif calls is not None and isinstance(parent, keras.layers.MultiHeadAttention) and all(
            c.node is not None for c in calls
        ):
            calls = [_attention_call(parent, layer, c) for c in calls]
        elif calls is not None and isinstance(parent, keras.layers.StackedRNNCells):
            pass  # every cell runs once per step of the RNN
        else:
            calls = [_build_call(layer, runs)]
        parent = layer
    return calls


def _attention_call(attention, sublayer, call: _Call) -> _Call:
    """The call of one of MultiHeadAttention's projections in a call of it.

    Built from the attention's query/value/key shapes: the projections are
    built with the sequence length left open, so their own build shapes
    cannot tell it.
    """
    args, kwargs = list(call.node.arguments.args), call.node.arguments.kwargs
    query = args[0] if args else kwargs.get("query")
    value = args[1] if len(args) > 1 else kwargs.get("value")
    key = args[2] if len(args) > 2 else kwargs.get("key")
    key = value if key is None else key
    query, value, key = (_shape(t.shape) if t is not None else None for t in (query, value, key))
    inputs = {
        id(getattr(attention, "_query_dense", None)): query,
        id(getattr(attention, "_gate_dense", None)): query,
        id(getattr(attention, "_key_dense", None)): key,
        id(getattr(attention, "_value_dense", None)): value,
    }
    if query is not None:
        inputs[id(getattr(attention, "_output_dense", None))] = tuple(query[:-1]) + (
            attention._num_heads, attention._value_dim,
        )
    shape = inputs.get(id(sublayer))
    if shape is None:
        return _build_call(sublayer, call.repeat)
    return _Call(shape, None, call.repeat, call.per_step)


def _output_shape(layer, call: _Call) -> tuple:
    if call.output_shape is not None:
        return call.output_shape
    try:
        shape = layer.compute_output_shape(call.input_shape)
    except Exception as error:  # noqa: BLE001 - any failure means "unknown"
        raise ValueError(
            f"Cannot tell the output shape of layer {layer.name!r} for input "
            f"shape {call.input_shape}: {error}"
        ) from error
    if isinstance(shape, (list, tuple)) and shape and isinstance(shape[0], (list, tuple)):
        shape = shape[0]
    return _shape(shape)


def _fixed(layer, shape: tuple, what: str = "output") -> tuple:
    dims = shape[1:]
    if any(d is None for d in dims):
        raise ValueError(
            f"Layer {layer.name!r} has {what} shape {shape} with an unknown "
            "non-batch dimension; FLOPs need a fixed input shape (build the "
            "model with e.g. input_shape=(224, 224, 3))."
        )
    return dims


def _spatial_positions(layer, shape: tuple, what: str = "output") -> int:
    """Elements per sample divided by channels."""
    dims = _fixed(layer, shape, what)
    channels_first = getattr(layer, "data_format", "channels_last") == "channels_first"
    channels = dims[0] if channels_first else dims[-1]
    return int(np.prod(dims)) // int(channels)


def _einsum_letters(spec: str, rank: int) -> list[str]:
    """The letters of an einsum operand, its ellipsis expanded right-aligned."""
    if "..." not in spec:
        return list(spec)
    before, after = spec.split("...")
    n = rank - len(before) - len(after)
    return list(before) + [f"...{n - j}" for j in range(n)] + list(after)


def _einsum_positions(layer, input_shape: tuple, output_shape: tuple) -> int:
    """Uses of each EinsumDense kernel weight per sample.

    Every letter of the equation not in the kernel (the batch aside)
    multiplies the work of each kernel weight: the output dims the kernel
    does not produce (e.g. the sequence in MultiHeadAttention's projections)
    and any input dim summed without the kernel.
    """
    equation = layer.equation.replace(" ", "")
    operands, output_spec = equation.split("->")
    input_spec, kernel_spec = operands.split(",")
    sizes, batch = {}, set()
    for spec, shape in ((input_spec, input_shape), (output_spec, output_shape)):
        for i, (letter, size) in enumerate(zip(_einsum_letters(spec, len(shape)), shape)):
            if i == 0:
                batch.add(letter)
            elif letter not in sizes:
                if size is None:
                    _fixed(layer, shape, "input" if spec is input_spec else "output")
                sizes[letter] = int(size)
    return int(np.prod([s for c, s in sizes.items() if c not in kernel_spec and c not in batch]))


_TRANSPOSED = (
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
)
_CELLS = (keras.layers.SimpleRNNCell, keras.layers.LSTMCell, keras.layers.GRUCell)


def _is_lookup(layer) -> bool:
    is_embedding = getattr(masked_layers, "is_embedding", None)
    return is_embedding(layer) if is_embedding else isinstance(layer, keras.layers.Embedding)


def _reverse_call(call: _Call) -> bool:
    """A ReversibleEmbedding called with reverse=True: a matmul with the table."""
    if call.node is None:
        return False
    args, kwargs = call.node.arguments.args, call.node.arguments.kwargs
    return bool(kwargs.get("reverse", len(args) > 1 and args[1] is True))


def _uses(weight, call: _Call) -> tuple[int, tuple]:
    """(uses of each weight entry per sample, the output shape shown) for one call."""
    layer = weight.layer
    if _is_lookup(layer) and not (_reverse_call(call) and getattr(layer, "tie_weights", True)):
        return 0, call.output_shape or ()
    if call.per_step or isinstance(layer, _CELLS):
        # Kernel and recurrent kernel: one matrix-vector product per step.
        units = getattr(layer, "units", None)
        return call.repeat, (call.input_shape[0], units) if units else ()
    if isinstance(layer, _TRANSPOSED):
        # Each input position scatters through the whole kernel once.
        positions = _spatial_positions(layer, call.input_shape, "input")
        return call.repeat * positions, _output_shape(layer, call)
    output = _output_shape(layer, call)
    if isinstance(layer, keras.layers.EinsumDense):
        return call.repeat * _einsum_positions(layer, call.input_shape, output), output
    return call.repeat * _spatial_positions(layer, output), output


def _total_params(model) -> int:
    from rigl_keras.sparsify import _base_variables

    return int(sum(int(np.prod(v.shape)) for v in _base_variables(model)))


def _check_sparsities(sparsities: Mapping[str, float], names: Sequence[str]) -> None:
    if not isinstance(sparsities, Mapping):
        raise ValueError(
            f"`sparsities` must be a mapping {{weight name: sparsity}}; got "
            f"{type(sparsities).__name__}."
        )
    unknown = sorted(set(sparsities) - set(names))
    if unknown:
        raise ValueError(
            f"`sparsities` names weights that are not maskable weights of the "
            f"model: {unknown}. Maskable weights: {list(names)}."
        )
    for name, value in sparsities.items():
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float, np.integer, np.floating))
            or not 0.0 <= float(value) <= 1.0
        ):
            raise ValueError(
                f"`sparsities[{name!r}]` must be a sparsity in [0, 1]; got {value!r}."
            )


def inference_flops(model, sparsities: Mapping[str, float] | None = None) -> FlopsReport:
    """Inference FLOPs per sample of a built Keras model, per weight and in total.

    Every maskable weight (see `rigl_keras.layers.maskable_weights`; plain or
    masked, nested models and wrappers searched) costs 2 FLOPs (a multiply
    and an add) per active entry per use; the uses per sample P follow the
    layer kind (module docstring and docs/flops.md): output positions for
    Dense, convolutions, depthwise and separable kernels; input positions for
    transposed convolutions; the non-kernel dims of an EinsumDense equation;
    one per time step for recurrent cells; none for Embedding (a lookup).

    Args:
      model: a built Keras model with fixed input dimensions (batch aside).
      sparsities: {weight name: sparsity in [0, 1]} for maskable weights, e.g.
        the result of `distributions.sparsity_distribution`; weights not
        named count as dense. If None, each masked weight's density is read
        from its mask and plain weights count as dense.

    Returns:
      A `FlopsReport`: `dense_flops` is f_D, `flops` is f_S.

    Raises:
      ValueError: if the model has no built maskable weight, a needed shape
        has an unknown dimension, or `sparsities` names an unknown weight or
        holds a value outside [0, 1].
    """
    weights = masked_layers.maskable_weights(model)
    if not weights:
        raise ValueError(
            f"Model {getattr(model, 'name', model)!r} has no built maskable layer to count."
        )
    if sparsities is not None:
        _check_sparsities(sparsities, [w.name for w in weights])
    entries = []
    for w in weights:
        layer = w.layer
        stored = masked_layers._stored(layer, w.attribute)
        kernel_shape = tuple(int(d) for d in stored.shape)
        size = int(np.prod(kernel_shape))
        if sparsities is not None:
            active = distributions.active_count(size, float(sparsities.get(w.name, 0.0)))
        elif "_rk_masks" in layer.__dict__ and w.attribute in layer._rk_masks:
            active = int(np.count_nonzero(keras.ops.convert_to_numpy(w.mask)))
        else:
            active = size
        uses = [_uses(w, call) for call in _calls(w, model)]
        entries.append(
            LayerFlops(
                name=w.name,
                layer_type=type(layer).__name__,
                kernel_shape=kernel_shape,
                output_shape=tuple(uses[0][1]),
                kernel_size=size,
                active=active,
                positions=sum(n for n, _ in uses),
            )
        )
    return FlopsReport(
        model_name=getattr(model, "name", "model"),
        layers=tuple(entries),
        total_params=_total_params(model),
    )


# --------------------------------------------------------------------------
# Training FLOPs (Appendix A)
# --------------------------------------------------------------------------


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, bool
    )


def _check_method(method) -> str:
    if not isinstance(method, str) or method.lower() not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}; got {method!r}.")
    return method.lower()


def _check_delta_t(delta_t) -> int:
    if not isinstance(delta_t, (int, np.integer)) or isinstance(delta_t, bool) or delta_t < 1:
        raise ValueError(f"`delta_t` must be an int >= 1; got {delta_t!r}.")
    return int(delta_t)


def _check_multiplier(multiplier) -> float:
    if not _is_number(multiplier) or not math.isfinite(multiplier) or multiplier <= 0:
        raise ValueError(f"`multiplier` must be a finite number > 0; got {multiplier!r}.")
    return float(multiplier)


def paper_pruning_schedule(
    final_sparsity: float, total_steps: int = PAPER_TOTAL_STEPS
) -> schedules.PolynomialSchedule:
    """The paper's ResNet-50 gradual-pruning schedule, scaled to `total_steps`.

    Pruning runs from 10/32 to 25/32 of training, every 1/32 of training
    (steps 10k–25k every 1k of 32k), with the cubic ramp of Zhu & Gupta.

    Args:
      final_sparsity: the sparsity reached at the end of pruning.
      total_steps: the number of training steps (>= 32 so steps stay distinct).

    Returns:
      A `schedules.PolynomialSchedule`.

    Raises:
      ValueError: if `total_steps` is not an int >= 32 or the sparsity is
        outside [0, 1).
    """
    if not isinstance(total_steps, (int, np.integer)) or isinstance(total_steps, bool) or total_steps < 32:
        raise ValueError(f"`total_steps` must be an int >= 32; got {total_steps!r}.")
    scale = total_steps / PAPER_TOTAL_STEPS
    return schedules.PolynomialSchedule(
        final_sparsity=final_sparsity,
        begin_step=int(round(_PAPER_PRUNE_BEGIN * scale)),
        end_step=int(round(_PAPER_PRUNE_END * scale)),
        frequency=max(1, int(round(_PAPER_PRUNE_FREQUENCY * scale))),
    )


def _mean_pruned_fraction(schedule: schedules.PolynomialSchedule, total_steps: int) -> float:
    """Mean over training steps of s(t) / s_f, with s(t) the sparsity in force at t.

    Each layer is pruned towards its own final sparsity on the same ramp, so a
    layer's density at step t is 1 − s_l · s(t)/s_f and the model's FLOPs are
    f_D + (s(t)/s_f)·(f_S − f_D).
    """
    if schedule.final_sparsity == 0:
        return 0.0
    begin, end, frequency = schedule.begin_step, schedule.end_step, schedule.frequency
    # Masks are recomputed after a pruning step, so step t runs with the mask
    # of the latest pruning step before it; before `begin` it is dense.
    previous = np.arange(total_steps) - 1
    pruned = previous >= begin
    last = begin + (np.clip(previous, begin, end) - begin) // frequency * frequency
    last = np.where(previous >= end, end, last)
    steps, counts = np.unique(last[pruned], return_counts=True)
    total = sum(
        schedule.sparsity(int(step)) * int(count) for step, count in zip(steps, counts)
    )
    return float(total / schedule.final_sparsity / total_steps)


def _mean_pruning_flops(f_s: float, f_d: float, schedule, total_steps) -> float:
    """Mean inference FLOPs over gradual pruning's training steps."""
    if schedule is None:
        total_steps = PAPER_TOTAL_STEPS if total_steps is None else total_steps
        # s(t)/s_f does not depend on s_f when the ramp starts at 0.
        schedule = paper_pruning_schedule(0.5, total_steps)
    elif total_steps is None:
        raise ValueError("`total_steps` is required with a custom `pruning_schedule`.")
    if not isinstance(schedule, schedules.PolynomialSchedule):
        raise ValueError(
            "`pruning_schedule` must be a schedules.PolynomialSchedule; got "
            f"{type(schedule).__name__}."
        )
    if not isinstance(total_steps, (int, np.integer)) or isinstance(total_steps, bool) or total_steps < 1:
        raise ValueError(f"`total_steps` must be an int >= 1; got {total_steps!r}.")
    fraction = _mean_pruned_fraction(schedule, int(total_steps))
    return f_d + fraction * (f_s - f_d)


def training_flops(
    method: str,
    f_sparse: float,
    f_dense: float,
    *,
    delta_t: int = 100,
    multiplier: float = 1.0,
    pruning_schedule: schedules.PolynomialSchedule | None = None,
    total_steps: int | None = None,
) -> float:
    """Training FLOPs per sample and per step of the M = 1 schedule, times M.

    Per Appendix A (a backward pass costs twice the forward pass):

    * dense: 3·f_D; static, snip, set: 3·f_S; snfs: 2·f_S + f_D;
    * rigl: (3·f_S·ΔT + 2·f_S + f_D) / (ΔT + 1);
    * prune: the mean over training steps of 3·f(t), where f(t) moves from
      f_D to f_S as the pruning schedule's sparsity s(t) rises (dense before
      its begin step): f(t) = f_D + (s(t)/s_f)·(f_S − f_D);
    * small_dense: 3·f_S, with `f_sparse` the small dense model's FLOPs.

    The result is multiplied by `multiplier` (M): training M times longer,
    with every schedule anchor scaled by M, costs M times as much.

    Args:
      method: one of `METHODS` (case-insensitive).
      f_sparse: f_S, inference FLOPs per sample of the sparse model (for
        prune: at the end of pruning; for small_dense: of the small model).
        Ignored for dense.
      f_dense: f_D, inference FLOPs per sample of the dense model, > 0.
      delta_t: ΔT, steps between RigL's connectivity updates, >= 1.
      multiplier: M, the training-steps multiplier, > 0.
      pruning_schedule: for prune, the sparsity ramp; only its shape
        s(t)/s_f is used (f_sparse gives the end point). None uses
        `paper_pruning_schedule` over `total_steps`.
      total_steps: for prune, the number of training steps at M = 1; needed
        with a custom `pruning_schedule`, else defaults to 32000.

    Returns:
      The average FLOPs per sample of a training step, times M.

    Raises:
      ValueError: for an unknown method, delta_t < 1, multiplier <= 0, a
        negative or non-finite f_sparse, f_dense <= 0, or a custom pruning
        schedule without `total_steps`.
    """
    method = _check_method(method)
    delta_t = _check_delta_t(delta_t)
    multiplier = _check_multiplier(multiplier)
    if not _is_number(f_dense) or not math.isfinite(f_dense) or f_dense <= 0:
        raise ValueError(f"`f_dense` must be a finite number > 0; got {f_dense!r}.")
    if not _is_number(f_sparse) or not math.isfinite(f_sparse) or f_sparse < 0:
        raise ValueError(f"`f_sparse` must be a finite number >= 0; got {f_sparse!r}.")
    f_s, f_d = float(f_sparse), float(f_dense)

    if method == "dense":
        per_step = 3 * f_d
    elif method in ("static", "snip", "set", "small_dense"):
        per_step = 3 * f_s
    elif method == "snfs":
        per_step = 2 * f_s + f_d
    elif method == "rigl":
        per_step = (3 * f_s * delta_t + 2 * f_s + f_d) / (delta_t + 1)
    else:
        per_step = 3 * _mean_pruning_flops(f_s, f_d, pruning_schedule, total_steps)
    return multiplier * per_step


def training_flops_ratio(
    method: str,
    f_sparse: float,
    f_dense: float,
    *,
    delta_t: int = 100,
    multiplier: float = 1.0,
    pruning_schedule: schedules.PolynomialSchedule | None = None,
    total_steps: int | None = None,
) -> float:
    """`training_flops` divided by dense training at M = 1 (3·f_D).

    This is the "FLOPs (Train)" column of the paper's Figure 2-left table.
    Arguments, defaults and errors are those of `training_flops`.

    Returns:
      The training cost relative to dense training with the standard steps.
    """
    flops = training_flops(
        method,
        f_sparse,
        f_dense,
        delta_t=delta_t,
        multiplier=multiplier,
        pruning_schedule=pruning_schedule,
        total_steps=total_steps,
    )
    return flops / (3.0 * float(f_dense))


# --------------------------------------------------------------------------
# Small-Dense and the summary
# --------------------------------------------------------------------------


def small_dense_flops(report: FlopsReport, parameter_ratio: float | None = None) -> float:
    """FLOPs of a narrower dense model with the sparse model's kernel parameter count.

    Every layer's channel count is scaled by one width factor w, except the
    model's input channels (first layer) and output units (last layer), which
    are fixed. A kernel then scales by w² (w for the first and last layers and
    for depthwise kernels, whose size follows one channel count), and so do
    its FLOPs; w is solved so that the kernels hold `parameter_ratio` of the
    dense kernel weights. This mirrors the paper's Small-Dense baseline
    (ResNet-50 with every width scaled); rounding channels to integers is
    ignored.

    Args:
      report: a `FlopsReport` of the full-width model.
      parameter_ratio: the kernel-parameter fraction to match; None uses
        `report.parameter_ratio` (the sparse model's).

    Returns:
      The small dense model's inference FLOPs per sample.

    Raises:
      ValueError: if the ratio is outside (0, 1] or cannot be reached because
        too many weights have fixed width (e.g. a one-layer model).
    """
    ratio = report.parameter_ratio if parameter_ratio is None else parameter_ratio
    if not _is_number(ratio) or not 0 < ratio <= 1:
        raise ValueError(f"`parameter_ratio` must be in (0, 1]; got {ratio!r}.")
    last = len(report.layers) - 1
    # Coefficients of w^0, w^1, w^2 in the parameter and FLOP totals.
    params, flops = [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]
    for i, layer in enumerate(report.layers):
        scaled_channels = 1 if "Depthwise" in layer.layer_type else 2
        power = max(0, scaled_channels - (i == 0) - (i == last))
        params[power] += layer.kernel_size
        flops[power] += layer.dense_flops
    target = ratio * report.kernel_params - params[0]
    if target <= 0 or params[1] + params[2] == 0:
        raise ValueError(
            f"No width reaches parameter ratio {ratio}: too many weights of "
            f"model {report.model_name!r} have a fixed width."
        )
    a, b = params[2], params[1]
    width = target / b if a == 0 else (-b + math.sqrt(b * b + 4 * a * target)) / (2 * a)
    return flops[0] + flops[1] * width + flops[2] * width**2


@dataclasses.dataclass(frozen=True)
class FlopsSummary:
    """Inference and training cost of one method at one sparsity (a row of Figure 2-left).

    Attributes:
      method: the training method (one of `METHODS`).
      sparsity: the overall sparsity S, or None when read from masks.
      distribution: the sparsity distribution, or None when read from masks.
      delta_t: ΔT used for rigl.
      multiplier: the training-steps multiplier M.
      report: the `FlopsReport` of the sparse model (for prune, at the end of
        pruning); for dense and small_dense it still describes the sparse
        model the distribution gives, for reference.
      inference_flops: inference FLOPs per sample of the model the method
        trains (f_D for dense, the small model's for small_dense, f_S else).
      training_flops: `training_flops(...)` for the method.
      parameter_ratio: kernel parameters of the trained model / dense ones
        (1 for dense; small_dense matches the sparse model by construction).
      total_parameter_ratio: the same over all stored weights except masks.
    """

    method: str
    sparsity: float | None
    distribution: str | None
    delta_t: int
    multiplier: float
    report: FlopsReport
    inference_flops: float
    training_flops: float
    parameter_ratio: float
    total_parameter_ratio: float

    @property
    def dense_inference_flops(self) -> int:
        """f_D."""
        return self.report.dense_flops

    @property
    def inference_flops_ratio(self) -> float:
        """Inference FLOPs / f_D (the "FLOPs (Test)" column)."""
        return self.inference_flops / self.dense_inference_flops

    @property
    def dense_training_flops(self) -> int:
        """3·f_D: one dense training step per sample."""
        return 3 * self.dense_inference_flops

    @property
    def training_flops_ratio(self) -> float:
        """Training FLOPs / dense training at M = 1 (the "FLOPs (Train)" column)."""
        return self.training_flops / self.dense_training_flops

    def to_dict(self) -> dict:
        """A JSON-friendly dict of the summary and the per-layer report."""
        return {
            "model": self.report.model_name,
            "method": self.method,
            "sparsity": self.sparsity,
            "distribution": self.distribution,
            "delta_t": self.delta_t,
            "multiplier": self.multiplier,
            "dense_inference_flops": self.dense_inference_flops,
            "sparse_inference_flops": self.report.flops,
            "inference_flops": self.inference_flops,
            "inference_flops_ratio": self.inference_flops_ratio,
            "dense_training_flops": self.dense_training_flops,
            "training_flops": self.training_flops,
            "training_flops_ratio": self.training_flops_ratio,
            "parameter_ratio": self.parameter_ratio,
            "total_parameter_ratio": self.total_parameter_ratio,
            "kernel_params": self.report.kernel_params,
            "active_kernel_params": self.report.active_kernel_params,
            "total_params": self.report.total_params,
            "layer_densities": self.report.densities(),
            "layers": [layer.to_dict() for layer in self.report.layers],
        }


def flops_summary(
    model,
    sparsity: float | None = None,
    distribution: str = "erk",
    method: str = "rigl",
    *,
    delta_t: int = 100,
    multiplier: float = 1.0,
    custom_sparsity: Mapping[str, float] | None = None,
    dense_layers: Sequence[str] | None = None,
    erk_power_scale: float = 1.0,
    pruning_schedule: schedules.PolynomialSchedule | None = None,
    total_steps: int | None = None,
    small_dense_inference_flops: float | None = None,
) -> FlopsSummary:
    """Inference, training and parameter cost of training `model` sparsely.

    Args:
      model: a built Keras model with fixed input dimensions.
      sparsity: the overall sparsity S in [0, 1), spread over the layers by
        `distribution`; None reads the model's masks instead (a plain model
        is then dense).
      distribution: "uniform" (first layer dense), "er" or "erk"; see
        `distributions.sparsity_distribution`. Ignored when sparsity is None.
      method: one of `METHODS`.
      delta_t: ΔT for rigl, >= 1.
      multiplier: the training-steps multiplier M, > 0.
      custom_sparsity: passed to `sparsity_distribution`.
      dense_layers: passed to `sparsity_distribution`.
      erk_power_scale: passed to `sparsity_distribution`.
      pruning_schedule: for prune; see `training_flops`.
      total_steps: for prune; see `training_flops`.
      small_dense_inference_flops: for small_dense, the FLOPs of the actual
        small model; None estimates them with `small_dense_flops`.

    Returns:
      A `FlopsSummary`.

    Raises:
      ValueError: for a sparsity outside [0, 1), an unknown distribution or
        method, delta_t < 1, multiplier <= 0, or a model that cannot be
        counted (see `inference_flops`).
    """
    method = _check_method(method)
    delta_t = _check_delta_t(delta_t)
    multiplier = _check_multiplier(multiplier)
    if sparsity is None:
        report = inference_flops(model)
        distribution = None
    else:
        sparsity = distributions.validate_sparsity(sparsity)
        layer_sparsities = distributions.sparsity_distribution(
            model,
            sparsity,
            distribution,
            custom_sparsity=custom_sparsity,
            dense_layers=dense_layers,
            erk_power_scale=erk_power_scale,
        )
        report = inference_flops(model, layer_sparsities)
        distribution = distribution.lower()

    f_dense = report.dense_flops
    parameter_ratio = report.parameter_ratio
    total_parameter_ratio = report.total_parameter_ratio
    if method == "dense":
        f_model = float(f_dense)
        parameter_ratio = total_parameter_ratio = 1.0
    elif method == "small_dense":
        f_model = (
            small_dense_flops(report)
            if small_dense_inference_flops is None
            else float(small_dense_inference_flops)
        )
    else:
        f_model = float(report.flops)
    train = training_flops(
        method,
        f_model,
        f_dense,
        delta_t=delta_t,
        multiplier=multiplier,
        pruning_schedule=pruning_schedule,
        total_steps=total_steps,
    )
    return FlopsSummary(
        method=method,
        sparsity=sparsity,
        distribution=distribution,
        delta_t=delta_t,
        multiplier=multiplier,
        report=report,
        inference_flops=f_model,
        training_flops=train,
        parameter_ratio=parameter_ratio,
        total_parameter_ratio=total_parameter_ratio,
    )


# --------------------------------------------------------------------------
# Plot (paper Figure 3)
# --------------------------------------------------------------------------


def plot_layer_sparsity(
    sparsities: Mapping[str, float] | Mapping[str, Mapping[str, float]] | FlopsReport,
    *,
    path: str | os.PathLike | None = None,
    title: str | None = None,
    overall: float | None = None,
):
    """Bar chart of the sparsity of each layer, as in the paper's Figure 3.

    matplotlib is imported here (Agg backend), so the library does not need it.

    Args:
      sparsities: {layer name: sparsity}, a `FlopsReport`, or several series
        to compare as {label: {layer name: sparsity}} (grouped bars; layers in
        the order of the first series).
      path: if given, the figure is saved there (format from the suffix).
      title: the figure title.
      overall: if given, a dashed line marks this overall sparsity.

    Returns:
      The matplotlib `Figure`.

    Raises:
      ValueError: if there is nothing to plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    if isinstance(sparsities, FlopsReport):
        sparsities = sparsities.sparsities()
    values = list(sparsities.values()) if isinstance(sparsities, Mapping) else []
    if not values:
        raise ValueError("`sparsities` is empty; nothing to plot.")
    if isinstance(values[0], Mapping):
        series = {str(label): dict(s) for label, s in sparsities.items()}
    else:
        series = {"": dict(sparsities)}
    names = list(next(iter(series.values())))
    count = len(names)
    x = np.arange(count)
    width = 0.8 / len(series)

    figure, axes = plt.subplots(figsize=(max(8.0, 0.2 * count + 2), 4.8))
    for i, (label, values_by_name) in enumerate(series.items()):
        heights = [values_by_name.get(name, 0.0) for name in names]
        axes.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, label=label or None)
    if overall is not None:
        axes.axhline(overall, color="black", linestyle="--", linewidth=1,
                     label=f"overall S = {overall:g}")
    axes.set_xticks(x)
    axes.set_xticklabels(names, rotation=90, fontsize=7 if count > 30 else 9)
    axes.set_xlim(-0.6, count - 0.4)
    axes.set_ylim(0, 1)
    axes.set_ylabel("sparsity")
    axes.set_xlabel("layer")
    axes.grid(axis="y", alpha=0.3)
    if title:
        axes.set_title(title, loc="left")
    if len(series) > 1 or overall is not None:
        # Above the axes, right of the title, so no bar is hidden.
        axes.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=len(series) + 1,
                    fontsize=8, frameon=False)
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _application_builders() -> dict[str, object]:
    import keras

    builders = {}
    for name in dir(keras.applications):
        builder = getattr(keras.applications, name)
        # Builders are the capitalized functions; lowercase names are modules.
        if name[:1].isupper() and callable(builder):
            builders[name.lower().replace("_", "")] = builder
    return builders


def build_model(name_or_path: str, input_shape: Sequence[int] = (224, 224, 3)):
    """A keras.applications model by name, or a model loaded from a `.keras` file.

    Args:
      name_or_path: a `keras.applications` builder name, case-insensitive and
        ignoring underscores ("resnet50", "MobileNetV2", "mobilenet_v2"), or a
        path to a `.keras` file (masked layers deserialize).
      input_shape: input shape for an application model (no batch dim).
        Weights are not downloaded (`weights=None`).

    Returns:
      The built Keras model.

    Raises:
      ValueError: for an unknown name or a missing file.
    """
    import keras

    if name_or_path.endswith(".keras") or os.path.exists(name_or_path):
        if not os.path.exists(name_or_path):
            raise ValueError(f"No such model file: {name_or_path!r}.")
        return keras.models.load_model(name_or_path, compile=False)
    builders = _application_builders()
    builder = builders.get(name_or_path.lower().replace("_", ""))
    if builder is None:
        raise ValueError(
            f"Unknown model {name_or_path!r}: give a .keras file or one of "
            f"{sorted(builders)}."
        )
    return builder(weights=None, input_shape=tuple(input_shape))


def _format_table(summary: FlopsSummary) -> str:
    report = summary.report
    header = f"{'layer':<28} {'type':<22} {'kernel':<18} {'output':<18} {'sparsity':>8} {'dense MFLOPs':>13} {'MFLOPs':>10}"
    lines = [header, "-" * len(header)]
    for layer in report.layers:
        lines.append(
            f"{layer.name[:28]:<28} {layer.layer_type[:22]:<22} "
            f"{'x'.join(map(str, layer.kernel_shape)):<18} "
            f"{'x'.join(str(d) for d in layer.output_shape[1:]):<18} "
            f"{layer.sparsity:>8.3f} {layer.dense_flops / 1e6:>13.2f} {layer.flops / 1e6:>10.2f}"
        )
    lines.append("-" * len(header))
    if summary.sparsity is None:
        setting = "sparsity from masks"
    else:
        setting = f"sparsity {summary.sparsity:g} ({summary.distribution})"
    lines += [
        f"model {report.model_name}: {len(report.layers)} counted layers, {setting}",
        f"method {summary.method}, delta_t {summary.delta_t}, multiplier {summary.multiplier:g}",
        f"dense inference FLOPs   {summary.dense_inference_flops:.4g}",
        f"inference FLOPs         {summary.inference_flops:.4g}  ({summary.inference_flops_ratio:.3f}x)",
        f"training FLOPs / step   {summary.training_flops:.4g}  ({summary.training_flops_ratio:.3f}x dense training)",
        f"kernel parameters       {report.active_kernel_params} / {report.kernel_params}  ({summary.parameter_ratio:.3f}x)",
        f"all parameters          {report.active_params} / {report.total_params}  ({summary.total_parameter_ratio:.3f}x)",
    ]
    return "\n".join(lines)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m rigl_keras.flops",
        description="Inference and training FLOPs of a sparse model (RigL paper, Appendix A).",
    )
    parser.add_argument("--model", required=True,
                        help="keras.applications name (resnet50, MobileNetV2, ...) or a .keras file")
    parser.add_argument("--input-shape", default="224,224,3",
                        help="input shape of an application model, e.g. 224,224,3")
    parser.add_argument("--sparsity", type=float, default=None,
                        help="overall sparsity S in [0, 1); omitted: read the model's masks")
    parser.add_argument("--distribution", default="erk", type=str.lower,
                        choices=distributions.DISTRIBUTIONS)
    parser.add_argument("--erk-power-scale", type=float, default=1.0)
    parser.add_argument("--method", default="rigl", type=str.lower, choices=METHODS)
    parser.add_argument("--delta-t", type=int, default=100, help="RigL update interval")
    parser.add_argument("--multiplier", type=float, default=1.0, help="training-steps multiplier M")
    parser.add_argument("--total-steps", type=int, default=None,
                        help="prune: training steps at M = 1 (default 32000)")
    parser.add_argument("--prune-begin", type=int, default=None, help="prune: first pruning step")
    parser.add_argument("--prune-end", type=int, default=None, help="prune: last pruning step")
    parser.add_argument("--prune-frequency", type=int, default=None, help="prune: steps between pruning")
    parser.add_argument("--json", action="store_true", help="print a JSON object")
    parser.add_argument("--plot", default=None, metavar="PNG",
                        help="save a bar chart of per-layer sparsity")
    return parser.parse_args(argv)


def _pruning_args(args) -> tuple[schedules.PolynomialSchedule | None, int | None]:
    """The pruning schedule and total steps the prune flags ask for."""
    custom = (args.prune_begin, args.prune_end, args.prune_frequency)
    if all(value is None for value in custom):
        return None, args.total_steps
    total_steps = args.total_steps or PAPER_TOTAL_STEPS
    default = paper_pruning_schedule(0.5, total_steps)
    schedule = schedules.PolynomialSchedule(
        final_sparsity=0.5,  # only the ramp's shape is used
        begin_step=default.begin_step if args.prune_begin is None else args.prune_begin,
        end_step=default.end_step if args.prune_end is None else args.prune_end,
        frequency=default.frequency if args.prune_frequency is None else args.prune_frequency,
    )
    return schedule, total_steps


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status.

    Args:
      argv: arguments without the program name; None reads `sys.argv`.

    Returns:
      0 on success, 2 on bad input (the message goes to stderr).
    """
    args = _parse_args(argv)
    try:
        input_shape = tuple(int(d) for d in args.input_shape.split(","))
        import rigl_keras.layers  # noqa: F401  (registers masked layers for load_model)

        model = build_model(args.model, input_shape)
        pruning_schedule, total_steps = _pruning_args(args)
        summary = flops_summary(
            model,
            args.sparsity,
            args.distribution,
            args.method,
            delta_t=args.delta_t,
            multiplier=args.multiplier,
            erk_power_scale=args.erk_power_scale,
            pruning_schedule=pruning_schedule,
            total_steps=total_steps,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.plot:
        if summary.sparsity is None:
            title = f"{model.name}: per-layer sparsity (from masks)"
        else:
            title = (f"{model.name}: per-layer sparsity "
                     f"({summary.distribution.upper()}, S = {summary.sparsity:g})")
        plot_layer_sparsity(summary.report, path=args.plot, title=title,
                            overall=summary.sparsity)
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print(_format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
