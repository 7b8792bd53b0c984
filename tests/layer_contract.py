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


def run_masked_layer_contract(make_stock, x, tmp_path, seed=0):
    """Checks what a masked layer owes a user, against the stock layer.

    `make_stock()` returns a new, unbuilt stock layer; `x` is an input
    batch. Checks: the masked class round-trips its config; with full masks
    it computes exactly what the stock layer computes; with random masks it
    computes what the stock layer computes with those weights zeroed;
    pruned weights get exactly zero gradient; after Adam and AdamW steps the
    raw pruned weights are exactly zero and the others moved; a `.keras`
    file restores masks and outputs without `custom_objects`.
    """
    from keras_prune import masked_class
    from tests.backend_utils import gradients, to_numpy

    stock = make_stock()
    stock(x)
    masked_cls = masked_class(type(stock))
    masked = masked_cls.from_config(stock.get_config())
    masked(x)
    masks = masked.masks
    plain = [w for w in masked.weights if not any(w is m for m in masks.values())]
    for target, source in zip(plain, stock.weights, strict=True):
        target.assign(to_numpy(source))

    # Config round trip, and full masks change nothing.
    config = masked.get_config()
    assert masked_cls.from_config(config).get_config() == config
    np.testing.assert_array_equal(to_numpy(masked(x)), to_numpy(stock(x)))

    # Random masks: equal to the stock layer with those weights zeroed.
    rng = np.random.default_rng(seed)
    chosen = {
        key: (rng.random(tuple(mask.shape)) < 0.5).astype("float32")
        for key, mask in masks.items()
    }
    masked.prune_to(chosen)
    weights = masked.prunable_weights
    stock_by_path = dict(zip([w.path for w in plain], stock.weights, strict=True))
    for key, variable in weights.items():
        raw = to_numpy(variable)
        assert np.all(raw[chosen[key] == 0] == 0), key
        stock_by_path[variable.path].assign(raw)
    np.testing.assert_allclose(
        to_numpy(masked(x)), to_numpy(stock(x)), rtol=1e-6, atol=1e-6
    )

    # Exactly zero gradient for pruned weights.
    keys = list(weights)
    grads = gradients(masked, x, [weights[k] for k in keys])
    for key, grad in zip(keys, grads, strict=True):
        assert np.all(grad[chosen[key] == 0] == 0), key
        assert np.any(grad[chosen[key] != 0] != 0), key

    # Raw pruned weights stay exactly zero under Adam and AdamW.
    inputs = keras.Input(tuple(x.shape[1:]), dtype=str(x.dtype))
    model = keras.Model(inputs, masked(inputs))
    y = np.zeros(tuple(to_numpy(masked(x)).shape), "float32")
    for optimizer in (
        keras.optimizers.Adam(0.05),
        keras.optimizers.AdamW(0.05, weight_decay=0.5),
    ):
        before = {k: to_numpy(v) for k, v in weights.items()}
        model.compile(optimizer, "mse")
        model.fit(x, y + 1.0, epochs=2, batch_size=len(x), verbose=0)
        for key, variable in weights.items():
            raw = to_numpy(variable)
            assert np.all(raw[chosen[key] == 0] == 0), (key, optimizer)
            assert np.any(raw[chosen[key] != 0] != before[key][chosen[key] != 0])

    # Save and load without custom_objects: masks and outputs restored.
    path = os.path.join(tmp_path, "masked.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    restored = [layer for layer in loaded.layers if isinstance(layer, masked_cls)][0]
    for key, mask in restored.masks.items():
        np.testing.assert_array_equal(to_numpy(mask), chosen[key])
    np.testing.assert_array_equal(
        to_numpy(loaded.predict(x, verbose=0)), to_numpy(model.predict(x, verbose=0))
    )
