"""Helpers that differ by Keras backend, for tests that run on all of them."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest

BACKEND = keras.backend.backend()

tensorflow_only = pytest.mark.skipif(
    BACKEND != "tensorflow", reason="needs the TensorFlow backend (sparse kernels)"
)

# Slow tests of code that runs no sparse kernel: CI's second TensorFlow run,
# with the native kernel off, has nothing new to find in them.
same_without_native_kernel = pytest.mark.skipif(
    os.environ.get("KERAS_PRUNE_NATIVE") == "0",
    reason="runs no sparse kernel: the run with the native kernel covers it",
)

# End-to-end runs of a minute or more (the notebook, a stopped and resumed
# job, the deployment benchmark): the run with the native kernel off would
# repeat them for little, since what it changes, TensorFlow's own sparse
# kernels, it tests layer by layer (and the quick MNIST job still runs).
end_to_end_once = pytest.mark.skipif(
    os.environ.get("KERAS_PRUNE_NATIVE") == "0",
    reason="end-to-end run: the run with the native kernel covers it",
)


def to_numpy(x):
    return np.array(keras.ops.convert_to_numpy(x))


def gradients(layer, x, variables):
    """Gradients of `sum(layer(x))` with respect to `variables`, as numpy."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.cast(layer(x), "float32"))
        return [to_numpy(g) for g in tape.gradient(loss, [v.value for v in variables])]
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        trainable = [v.value for v in layer.trainable_variables]
        frozen = [v.value for v in layer.non_trainable_variables]

        def loss(values):
            outputs, _ = layer.stateless_call(values, frozen, x)
            return jnp.sum(outputs.astype("float32"))

        grads = jax.grad(loss)(trainable)
        by_id = {
            id(v): g for v, g in zip(layer.trainable_variables, grads, strict=True)
        }
        return [np.asarray(by_id[id(v)]) for v in variables]
    if BACKEND == "torch":
        for v in variables:
            v.value.grad = None
        layer(x).float().sum().backward()
        return [to_numpy(v.value.grad) for v in variables]
    raise NotImplementedError(BACKEND)
