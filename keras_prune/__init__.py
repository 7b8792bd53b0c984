"""keras_prune: iterative magnitude pruning for Keras 3, with sparse inference.

The training side (masks, callbacks, schedules, summaries, converters) runs
on every Keras backend with `keras.ops` only; sparse inference
(`SparseDense`'s kernels, `keras_prune.inference.native`) needs TensorFlow and is
imported on first use.

Example:

>>> import keras_prune as kp
>>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
>>> model.compile("adam", "mse")
>>> model = kp.make_prunable(model)
>>> history = model.fit(np.ones((16, 8)), np.ones((16, 4)), epochs=2, verbose=0,
...     callbacks=[kp.IterativePruningCallback(final_sparsity=0.75)])
>>> kp.sparsity_summary(model).sparsity
0.75
"""

from typing import Any

try:
    import keras  # noqa: F401 - Keras imports its backend here
except ImportError as error:  # Keras's backend is not installed
    _keras_error: ImportError | None = error
else:
    _keras_error = None

if _keras_error is None:
    from keras_prune.callbacks import DropoutScalingCallback, IterativePruningCallback
    from keras_prune.channels import ChannelGraph
    from keras_prune.compact import CompactStorage, compact_class
    from keras_prune.convert import (
        ConversionEntry,
        ConversionReport,
        conversion_report,
        export_sparse,
        make_prunable,
        strip_pruning,
    )
    from keras_prune.guard import AccuracyGuard, GuardEvent
    from keras_prune.inference.sparse_dense import SparseDense
    from keras_prune.litert import LiteRTReport, LiteRTWeight, export_litert
    from keras_prune.masking import (
        PRUNABLE_WEIGHTS,
        MaskedContainer,
        MaskedDense,
        MaskedLayer,
        masked_class,
        masked_layers,
    )
    from keras_prune.masks import (
        global_magnitude_masks,
        magnitude_mask,
        std_threshold_mask,
    )
    from keras_prune.registration import install as _install_registration
    from keras_prune.schedules import (
        ConstantSchedule,
        GeometricSchedule,
        ListSchedule,
        PolynomialSchedule,
        PruningSchedule,
    )
    from keras_prune.sensitivity import SensitivityScan, sensitivity_scan
    from keras_prune.shrink import shrink
    from keras_prune.summary import (
        LayerShrink,
        LayerSparsity,
        ShrinkSummary,
        SparsitySummary,
        shrink_summary,
        sparsity_summary,
    )
    from keras_prune.units import prune_units
    from keras_prune.variational import (
        add_variational_dropout,
        remove_variational_dropout,
    )

    _install_registration()
else:
    # The command line still starts (its settings and dependency checks need
    # no Keras) and says which extra to install; the library says it here.

    def __getattr__(name: str) -> Any:
        raise ImportError(
            f"keras_prune.{name} needs Keras with an installed backend, and "
            f"importing Keras failed: {_keras_error}. Install one with "
            "pip install 'keras_prune[tensorflow]' (or [jax]), or set "
            "KERAS_BACKEND to a backend you have."
        ) from _keras_error


__version__ = "0.2.0"

__all__ = [
    "PRUNABLE_WEIGHTS",
    "AccuracyGuard",
    "ConstantSchedule",
    "ChannelGraph",
    "CompactStorage",
    "ConversionEntry",
    "ConversionReport",
    "DropoutScalingCallback",
    "GeometricSchedule",
    "GuardEvent",
    "IterativePruningCallback",
    "LayerShrink",
    "LayerSparsity",
    "ListSchedule",
    "LiteRTReport",
    "LiteRTWeight",
    "MaskedContainer",
    "MaskedDense",
    "MaskedLayer",
    "PolynomialSchedule",
    "PruningSchedule",
    "SensitivityScan",
    "SparseDense",
    "ShrinkSummary",
    "SparsitySummary",
    "add_variational_dropout",
    "compact_class",
    "conversion_report",
    "export_litert",
    "export_sparse",
    "global_magnitude_masks",
    "magnitude_mask",
    "make_prunable",
    "masked_class",
    "masked_layers",
    "prune_units",
    "remove_variational_dropout",
    "sensitivity_scan",
    "shrink",
    "shrink_summary",
    "sparsity_summary",
    "std_threshold_mask",
    "strip_pruning",
]
