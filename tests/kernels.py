"""Which of `SparseDense`'s kernels this machine has, for parametrized tests.

Without a C++ compiler, or with `KERAS_PRUNE_NATIVE=0`, tests of the native
kernel skip with the reason it is missing; every other test runs on
TensorFlow's kernels.
"""

import pytest

from keras_prune.inference import native

needs_native = pytest.mark.skipif(
    not native.available(),
    reason=f"needs keras_prune's native kernel, not available: {native.failure()}",
)


def compute_paths(*paths):
    """`paths` for `pytest.mark.parametrize`, `"native"` marked `needs_native`."""
    return [
        pytest.param(path, marks=needs_native) if path == "native" else path
        for path in paths
    ]
