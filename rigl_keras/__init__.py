"""rigl_keras: sparse training from scratch with RigL and its baselines, on Keras 3.

Wrap a model with `sparsify`, add `RigLCallback` (or a baseline from
`rigl_keras.baselines`) to `model.fit`, and every masked weight trains with a
fixed number of active entries while its connectivity is updated. Works on
the TensorFlow, JAX and PyTorch backends.
"""

from rigl_keras.audit import SparsityInvariantError, check_sparsity
from rigl_keras.backup import AtomicBackupAndRestore
from rigl_keras.callbacks import (
    DynamicSparseCallback,
    GradientSource,
    GrowData,
    RigLCallback,
    SparseTrainingCallback,
    restore_invariants,
)
from rigl_keras.distributions import active_count, sparsity_distribution
from rigl_keras.layers import (
    MaskedConv1D,
    MaskedConv1DTranspose,
    MaskedConv2D,
    MaskedConv2DTranspose,
    MaskedConv3D,
    MaskedConv3DTranspose,
    MaskedDense,
    MaskedDepthwiseConv1D,
    MaskedDepthwiseConv2D,
    MaskedEinsumDense,
    MaskedEmbedding,
    MaskedGRU,
    MaskedLSTM,
    MaskedMultiHeadAttention,
    MaskedSeparableConv1D,
    MaskedSeparableConv2D,
    MaskedSimpleRNN,
    MaskedWeight,
    mask_in_place,
    maskable,
    masked_class,
    masked_weights,
)
from rigl_keras import baselines
from rigl_keras.baselines import capture_momentum
from rigl_keras.summaries import SparsitySummaries
from rigl_keras.schedules import PolynomialSchedule, UpdateSchedule
from rigl_keras.sparsify import (
    SparsityReport,
    WeightSparsity,
    set_random_masks,
    sparsify,
    sparsity_report,
    strip_masks,
)

__version__ = "0.2.0"

__all__ = [
    "AtomicBackupAndRestore",
    "MaskedDense",
    "MaskedEinsumDense",
    "MaskedConv1D",
    "MaskedConv2D",
    "MaskedConv3D",
    "MaskedConv1DTranspose",
    "MaskedConv2DTranspose",
    "MaskedConv3DTranspose",
    "MaskedDepthwiseConv1D",
    "MaskedDepthwiseConv2D",
    "MaskedSeparableConv1D",
    "MaskedSeparableConv2D",
    "MaskedEmbedding",
    "MaskedSimpleRNN",
    "MaskedLSTM",
    "MaskedGRU",
    "MaskedMultiHeadAttention",
    "MaskedWeight",
    "maskable",
    "masked_class",
    "mask_in_place",
    "masked_weights",
    "sparsify",
    "capture_momentum",
    "set_random_masks",
    "strip_masks",
    "sparsity_report",
    "sparsity_distribution",
    "active_count",
    "WeightSparsity",
    "SparsityReport",
    "RigLCallback",
    "SparseTrainingCallback",
    "DynamicSparseCallback",
    "GradientSource",
    "GrowData",
    "restore_invariants",
    "UpdateSchedule",
    "PolynomialSchedule",
    "check_sparsity",
    "SparsityInvariantError",
    "SparsitySummaries",
    "baselines",
]
