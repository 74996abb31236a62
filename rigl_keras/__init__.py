"""rigl_keras: sparse training from scratch with RigL and its baselines, on Keras 3.

Wrap a model with `sparsify`, add `RigLCallback` (or a baseline from
`rigl_keras.baselines`) to `model.fit`, and every masked layer trains with a
fixed number of active weights while its connectivity is updated.
"""

from rigl_keras.audit import SparsityInvariantError, check_sparsity
from rigl_keras.callbacks import (
    DynamicSparseCallback,
    GrowData,
    RigLCallback,
    SparseTrainingCallback,
)
from rigl_keras.distributions import active_count, sparsity_distribution
from rigl_keras.layers import (
    MaskedConv2D,
    MaskedDense,
    MaskedDepthwiseConv2D,
    MaskedKernelMixin,
)
from rigl_keras import baselines
from rigl_keras.schedules import PolynomialSchedule, UpdateSchedule
from rigl_keras.sparsify import (
    LayerSparsity,
    SparsityReport,
    sparsify,
    sparsity_report,
    strip_masks,
)

__version__ = "0.1.0"

__all__ = [
    "MaskedDense",
    "MaskedConv2D",
    "MaskedDepthwiseConv2D",
    "MaskedKernelMixin",
    "sparsify",
    "strip_masks",
    "sparsity_report",
    "sparsity_distribution",
    "active_count",
    "LayerSparsity",
    "SparsityReport",
    "RigLCallback",
    "SparseTrainingCallback",
    "DynamicSparseCallback",
    "GrowData",
    "UpdateSchedule",
    "PolynomialSchedule",
    "check_sparsity",
    "SparsityInvariantError",
    "baselines",
]
