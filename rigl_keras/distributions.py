"""Per-weight sparsities: uniform, Erdős–Rényi (ER) and Erdős–Rényi-Kernel (ERK).

Paper §3(1), with the official code's integer budget. The unit is the masked
*weight* (a Dense kernel; an LSTM's kernel and recurrent kernel; a separable
convolution's depthwise and pointwise kernels; ...), named as in
`rigl_keras.layers.MaskedWeight.name`. Biases, normalisation and every other
weight stay dense and do not enter the budget.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from rigl_keras import layers as masked_layers

__all__ = ["DISTRIBUTIONS", "sparsity_distribution", "active_count", "validate_sparsity", "fan_in_out"]

#: Names accepted by `sparsity_distribution` (case-insensitive).
DISTRIBUTIONS = ("uniform", "er", "erk")


def active_count(total: int, sparsity: float) -> int:
    """The exact number of active weights of a mask: N − ⌊s·N⌋.

    This is the official code's rule (`get_mask_random`: ⌊s·N⌋ zeros), in
    float64 as numpy computes it.

    Args:
      total: the number of entries N of the weight.
      sparsity: its sparsity s in [0, 1].

    Returns:
      The number of entries that stay active.
    """
    return int(total) - int(math.floor(float(sparsity) * int(total)))


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


def fan_in_out(weight) -> tuple[int, int]:
    """The two "channel" sizes of a weight that ER uses.

    * Dense, recurrent kernels and embeddings: the two dimensions.
    * Convolutions (any rank, transposed and depthwise included): the last
      two dimensions (input and output channels; for a depthwise kernel, the
      channels and the depth multiplier), as the official code does.
    * EinsumDense: fan-in is the product of the kernel dimensions contracted
      with the input (letters shared with the input in the equation), fan-out
      the product of the others.
    """
    shape = weight.shape
    equation = getattr(weight.layer, "equation", None)
    if isinstance(equation, str) and "->" in equation and "," in equation:
        inputs, kernel = equation.split("->")[0].split(",")
        n_in = int(np.prod([d for d, c in zip(shape, kernel) if c in inputs] or [1]))
        return n_in, max(1, int(np.prod(shape)) // n_in)
    if len(shape) == 1:
        return shape[0], 1
    return shape[-2], shape[-1]


def _erk_scale(weight, distribution: str, power: float) -> float:
    if distribution == "er":
        # The official ER ignores `erk_power_scale`.
        n_in, n_out = fan_in_out(weight)
        return (n_in + n_out) / float(n_in * n_out)
    shape = weight.shape
    return (sum(shape) / float(np.prod(shape))) ** power


def _is_embedding(weight) -> bool:
    return masked_layers.is_embedding(weight.layer)


def _resolve(selectors, weights, argument) -> dict:
    """{selector: [weights]} for each selector, raising for ones that match nothing."""
    resolved = {}
    for selector in selectors:
        if not isinstance(selector, (str, type)):
            raise ValueError(
                f"`{argument}` keys must be weight or layer names, name patterns or "
                f"layer classes; got {selector!r}."
            )
        picked = masked_layers.select_weights(selector, weights)
        if not picked:
            raise ValueError(
                f"`{argument}` names {selector!r}, which matches no maskable weight of "
                f"the model. Maskable weights: {[w.name for w in weights]}."
            )
        resolved[selector] = picked
    return resolved


def _specificity(selector, weight) -> int:
    # Classes < patterns < layer names < exact weight names: the most specific wins.
    if isinstance(selector, type):
        return 0
    if selector == weight.name:
        return 3
    if any(layer.name == selector for layer in weight.chain):
        return 2
    return 1


def plan(
    model,
    *,
    custom_sparsity: Mapping | None = None,
    dense_layers: Iterable | None = None,
    sparse_embeddings: bool = False,
):
    """Which weights are masked and which are given fixed sparsities.

    Returns:
      (weights, custom, dense): the weights to mask (in model order),
      {weight name: sparsity} from `custom_sparsity`, and the names of the
      weights to keep dense.

    Raises:
      ValueError: for selectors that match no maskable weight, names of
        layers that cannot be masked, or custom values outside [0, 1].
    """
    candidates = masked_layers.maskable_weights(model)
    if custom_sparsity is not None and not isinstance(custom_sparsity, Mapping):
        raise ValueError(f"`custom_sparsity` must be a mapping; got {type(custom_sparsity).__name__}.")
    if isinstance(dense_layers, (str, type)):
        dense_layers = [dense_layers]
    custom_map = dict(custom_sparsity or {})
    dense_list = list(dense_layers or ())
    _reject_unmaskable(model, list(custom_map) + dense_list, candidates)
    for key, value in custom_map.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not 0 <= value <= 1:
            raise ValueError(f"`custom_sparsity[{key!r}]` must be in [0, 1]; got {value!r}.")
    custom: dict[str, float] = {}
    best: dict[str, int] = {}
    for selector, picked in _resolve(custom_map, candidates, "custom_sparsity").items():
        for w in picked:
            rank = _specificity(selector, w)
            if rank >= best.get(w.name, -1):
                best[w.name] = rank
                custom[w.name] = float(custom_map[selector])
    dense = {w.name for picked in _resolve(dense_list, candidates, "dense_layers").values() for w in picked}
    weights = [
        w for w in candidates
        if sparse_embeddings or not _is_embedding(w) or w.name in custom or w.name in dense
    ]
    return weights, custom, dense


def _reject_unmaskable(model, selectors, candidates):
    known = {w.name for w in candidates} | {l.name for w in candidates for l in w.chain}
    for layer, _, _ in masked_layers.unmaskable_weights(model):
        if layer.name in selectors and layer.name not in known:
            raise ValueError(
                f"Layer {layer.name!r} ({type(layer).__name__}) cannot be masked: "
                "rigl_keras has no declaration for its class. Declare its weights with "
                "rigl_keras.maskable (see docs/custom_layers.md) or leave it out."
            )


def sparsity_distribution(
    model,
    sparsity: float,
    distribution: str = "erk",
    *,
    custom_sparsity: Mapping | None = None,
    dense_layers: Iterable | None = None,
    erk_power_scale: float = 1.0,
    sparse_embeddings: bool = False,
) -> dict[str, float]:
    """Per-weight sparsities for the maskable weights of a built model.

    * ``"uniform"``: every weight at `sparsity`, except the weights of the
      first maskable layer, which stay dense (paper §3(1)).
    * ``"erk"``: the density of weight l is ε·((Σ dims)/(Π dims))^p over all
      its dimensions (p = `erk_power_scale`); ``"er"``: ε·(n_in + n_out)/(n_in·n_out)
      with the channel sizes of `fan_in_out` (no power, as in the official
      code). ε is solved so that the weights not named in `custom_sparsity`
      hold Σ_l (N_l − ⌊S·N_l⌋) active weights (the official integer budget);
      a weight whose density would exceed 1 is made dense (it then costs
      N_l − ⌊S·N_l⌋ + ⌊S·N_l⌋ = N_l) and ε solved again until none does.
      Each mask then gets `active_count(N_l, s_l)` = N_l − ⌊s_l·N_l⌋ ones.

    Weights are selected in `custom_sparsity` and `dense_layers` by weight
    name ("lstm/lstm_cell/recurrent_kernel"), by layer name (all weights of
    that layer and of its sublayers: "lstm", "mha"), by a glob pattern over
    weight names ("*attention*"), or by layer class (keras.layers.Embedding);
    a more specific key wins (class < pattern < layer name < weight name).
    Embedding weights are left dense and unmasked unless `sparse_embeddings`
    is True or they are selected explicitly: a lookup's cost does not scale
    with density, and ERK would make a large vocabulary very sparse.

    Args:
      model: a built Keras model (plain or already masked).
      sparsity: the overall sparsity S in [0, 1).
      distribution: "uniform", "er" or "erk" (case-insensitive).
      custom_sparsity: {selector: sparsity} applied as given; these weights
        are left out of the ER/ERK budget.
      dense_layers: selectors of weights to keep dense. Under ER/ERK their
        weights still count in the budget, so the others get sparser.
      erk_power_scale: exponent on the ERK scale; 0 gives uniform.
      sparse_embeddings: include Embedding weights in the distribution.

    Returns:
      {weight name: sparsity} for every weight to be masked, in model order.

    Raises:
      ValueError: for a sparsity outside [0, 1), an unknown distribution, a
        selector that matches no maskable weight or names a layer that cannot
        be masked, a custom sparsity outside [0, 1], a model with no maskable
        weight, or dense weights that alone exceed the budget.
    """
    sparsity = validate_sparsity(sparsity)
    if not isinstance(distribution, str) or distribution.lower() not in DISTRIBUTIONS:
        raise ValueError(f"`distribution` must be one of {DISTRIBUTIONS}; got {distribution!r}.")
    distribution = distribution.lower()
    if isinstance(erk_power_scale, bool) or not isinstance(erk_power_scale, (int, float)) or erk_power_scale < 0:
        raise ValueError(f"`erk_power_scale` must be a number >= 0; got {erk_power_scale!r}.")
    weights, custom, dense = plan(
        model, custom_sparsity=custom_sparsity, dense_layers=dense_layers,
        sparse_embeddings=sparse_embeddings,
    )
    if not weights:
        raise ValueError(
            f"Model {getattr(model, 'name', model)!r} has no maskable layer with a built "
            "weight (see rigl_keras.layers for the supported layers)."
        )
    result: dict[str, float] = {}
    if distribution == "uniform":
        first = weights[0].layer
        for w in weights:
            result[w.name] = 0.0 if (w.layer is first or w.name in dense) else sparsity
    else:
        budget = [w for w in weights if w.name not in custom]
        result = _solve_erk(budget, sparsity, distribution, dense, erk_power_scale)
    result.update(custom)
    return {w.name: result[w.name] for w in weights}


def _solve_erk(weights, sparsity, distribution, dense, power) -> dict[str, float]:
    dense = set(dense)
    scales = {w.name: _erk_scale(w, distribution, power) for w in weights}
    epsilon = 0.0
    while True:
        sparse = [w for w in weights if w.name not in dense]
        if not sparse:
            break
        # Official budget: sparse weights bring N − ⌊S·N⌋ ones, dense ones
        # take back the ⌊S·N⌋ zeros they would have had.
        target = 0
        for w in weights:
            zeros = int(math.floor(w.size * sparsity))
            target += -zeros if w.name in dense else w.size - zeros
        if target <= 0:
            raise ValueError(
                f"`sparsity`={sparsity} leaves no weights for the sparse layers "
                f"once the dense weights {sorted(dense)} are paid for."
            )
        epsilon = target / sum(scales[w.name] * w.size for w in sparse)
        largest = max(scales[w.name] for w in sparse)
        if largest * epsilon <= 1.0:
            break
        dense.update(w.name for w in sparse if scales[w.name] == largest)
    return {
        w.name: 0.0 if w.name in dense else float(1.0 - epsilon * scales[w.name])
        for w in weights
    }
