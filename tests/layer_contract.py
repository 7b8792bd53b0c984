"""One shared check of what every keras_prune layer owes a Keras user.

Modelled on keras-hub's `run_layer_test`: config round trip, weight counts,
symbolic and eager calls, one training step, and a `.keras` save/load that
restores every weight and the same outputs.
"""

from __future__ import annotations

import os

import keras
import numpy as np


def run_layer_contract(
    layer: keras.layers.Layer,
    input_shape: tuple[int, ...],
    expected_output_shape: tuple[int, ...],
    expected_trainable_weights: int,
    expected_non_trainable_weights: int,
    tmp_path: os.PathLike,
) -> None:
    """Checks `layer` (unbuilt, or built for `input_shape`) end to end."""
    # Config round trip: every constructor argument survives.
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config

    # Symbolic call.
    inputs = keras.Input(input_shape[1:], batch_size=None)
    symbolic = layer(inputs)
    assert tuple(symbolic.shape)[1:] == expected_output_shape[1:]
    assert len(layer.trainable_weights) == expected_trainable_weights
    assert len(layer.non_trainable_weights) == expected_non_trainable_weights

    # Eager call.
    x = np.random.default_rng(0).normal(size=input_shape).astype("float32")
    eager = keras.ops.convert_to_numpy(layer(x))
    assert eager.shape == expected_output_shape

    # One fit step through a model.
    model = keras.Model(inputs, symbolic)
    model.compile(keras.optimizers.SGD(0.01), "mse")
    y = np.zeros(expected_output_shape, "float32")
    history = model.fit(x, y, epochs=1, batch_size=len(x), verbose=0)
    assert np.isfinite(history.history["loss"][0])

    # Save and load without custom_objects.
    path = os.path.join(tmp_path, "contract.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    for saved, restored in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(saved), keras.ops.convert_to_numpy(restored)
        )
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=0, atol=0
    )
