"""Which Keras backend runs, and a clear error where TensorFlow is needed.

The training side of keras_prune (masks, callbacks, schedules, summaries,
`make_prunable`) uses `keras.ops` only and runs on every backend. Sparse
inference (`SparseDense`, `export_sparse`'s sparse kernels, the native op)
is TensorFlow code: it is imported on first use, through
`tensorflow_module`.
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

import keras


def tensorflow_module(feature: str) -> ModuleType:
    """Returns the `tensorflow` module for `feature`, or raises a clear error.

    Args:
        feature: What needs TensorFlow, named in the error message.

    Returns:
        The imported `tensorflow` module.

    Raises:
        RuntimeError: If Keras does not run on the TensorFlow backend, or
            TensorFlow is not installed.

    Example:

    >>> tensorflow_module("SparseDense").__name__  # on the TensorFlow backend
    'tensorflow'
    """
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise RuntimeError(
            f"{feature} needs the TensorFlow backend of Keras: its sparse kernels "
            f"are TensorFlow ops. Received: KERAS_BACKEND={backend!r}. Train and "
            "prune on any backend; export and serve with KERAS_BACKEND=tensorflow."
        )
    if importlib.util.find_spec("tensorflow") is None:
        raise RuntimeError(
            f"{feature} needs TensorFlow, which is not installed: "
            "pip install 'keras_prune[tensorflow]' (or any TensorFlow >= 2.16)."
        )
    import tensorflow

    return tensorflow
