"""keras_prune: iterative magnitude pruning for Keras 3, with sparse inference.

Example:

>>> import keras_prune as kp
>>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
>>> model.compile("adam", "mse")
>>> model = kp.make_prunable(model)
>>> history = model.fit(np.ones((16, 8)), np.ones((16, 4)), epochs=2, verbose=0,
...     callbacks=[kp.IterativePruningCallback(final_sparsity=0.75)])
>>> deployable = kp.export_sparse(model)
>>> kp.sparsity_summary(deployable).sparsity
0.75
"""

from keras_prune.callbacks import DropoutScalingCallback, IterativePruningCallback
from keras_prune.convert import export_sparse, make_prunable
from keras_prune.layers import MaskedDense, SparseDense, masked_layers
from keras_prune.masks import magnitude_mask
from keras_prune.schedules import (
    ConstantSchedule,
    GeometricSchedule,
    ListSchedule,
    PolynomialSchedule,
    PruningSchedule,
)
from keras_prune.summary import LayerSparsity, SparsitySummary, sparsity_summary

__version__ = "0.1.0"

__all__ = [
    "DropoutScalingCallback",
    "ConstantSchedule",
    "GeometricSchedule",
    "IterativePruningCallback",
    "LayerSparsity",
    "ListSchedule",
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
