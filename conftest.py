"""Shared pytest set-up: quiet TensorFlow, give doctests `np` and `keras`,
and on other backends collect only the training side (masks, callbacks,
schedules, converters), which must not need TensorFlow."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Sparse inference, the native op, the MNIST job, its notebook and the
# benchmarks are TensorFlow code.
TENSORFLOW_ONLY = [
    "keras_prune/cli.py",
    "keras_prune/convert.py",
    "keras_prune/experiments",
    "keras_prune/inference",
    "keras_prune/litert.py",
    "keras_prune/litert_interpreter.py",
    "keras_prune/summary.py",
    "tests/kernels.py",
    "tests/test_benchmark.py",
    "tests/test_convert.py",
    "tests/test_layers.py",
    "tests/test_litert.py",
    "tests/test_mnist.py",
    "tests/test_mnist_structured.py",
    "tests/test_lenet.py",
    "tests/test_native.py",
    "tests/test_notebook.py",
    "tests/test_summary.py",
]
collect_ignore = TENSORFLOW_ONLY if keras.backend.backend() != "tensorflow" else []

# Tests of the training side, which runs no sparse kernel: CI's run with the
# native kernel off (KERAS_PRUNE_NATIVE=0) has nothing new to find in them,
# and the TensorFlow, JAX and PyTorch runs cover them.
TRAINING_SIDE = [
    "tests/test_callbacks.py",
    "tests/test_copying.py",
    "tests/test_guard.py",
    "tests/test_keras_hub.py",
    "tests/test_masking.py",
    "tests/test_masks.py",
    "tests/test_progress.py",
    "tests/test_schedules.py",
    "tests/test_sensitivity.py",
    "tests/test_shrink.py",
    "tests/test_structured.py",
    "tests/test_variational.py",
]
if os.environ.get("KERAS_PRUNE_NATIVE") == "0":
    collect_ignore += TRAINING_SIDE

# Doctests that run keras_prune's native kernel: skipped, with the reason,
# where it is not available (no compiler, or KERAS_PRUNE_NATIVE=0).
NEEDS_NATIVE_KERNEL = {"keras_prune.inference.native.sparse_matmul"}


def pytest_collection_modifyitems(config, items):
    needing = [item for item in items if item.name in NEEDS_NATIVE_KERNEL]
    if not needing:
        return
    from keras_prune.inference import native

    if not native.available():
        skip = pytest.mark.skip(reason=f"needs the native kernel: {native.failure()}")
        for item in needing:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    doctest_namespace["np"] = np
    doctest_namespace["keras"] = keras


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)
