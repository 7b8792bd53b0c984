"""keras_prune: iterative magnitude pruning for Keras 3, with sparse inference.

Example:

>>> import keras_prune as kp  # doctest: +SKIP
>>> model = kp.make_prunable(model)  # doctest: +SKIP
>>> model.fit(x, y, epochs=20,  # doctest: +SKIP
...           callbacks=[kp.IterativePruningCallback(final_sparsity=0.99)])
>>> deployable = kp.export_sparse(model)  # doctest: +SKIP
"""

from keras_prune.callbacks import IterativePruningCallback
from keras_prune.convert import export_sparse, make_prunable
from keras_prune.layers import MaskedDense, SparseDense, masked_layers
from keras_prune.masks import magnitude_mask
from keras_prune.schedules import (
    ConstantSchedule,
    GeometricSchedule,
    PolynomialSchedule,
    PruningSchedule,
)
from keras_prune.summary import LayerSparsity, SparsitySummary, sparsity_summary

__version__ = "0.1.0"

__all__ = [
    "ConstantSchedule",
    "GeometricSchedule",
    "IterativePruningCallback",
    "LayerSparsity",
    "MaskedDense",
    "PolynomialSchedule",
    "PruningSchedule",
    "SparseDense",
    "SparsitySummary",
    "export_sparse",
    "magnitude_mask",
    "make_prunable",
    "masked_layers",
    "sparsity_summary",
]
