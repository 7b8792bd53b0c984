"""Model converters: `make_prunable` (Dense -> MaskedDense) and
`export_sparse` (MaskedDense -> SparseDense).

Both clone the model with `keras.models.clone_model`, copy every weight
across, and leave the input model untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_prune import sparse_ops
from keras_prune.layers import MaskedDense, SparseDense, walk_layers

# Dense arguments with no MaskedDense counterpart; a Dense that uses them is
# refused rather than silently changed.
_DENSE_ONLY_KEYS = ("lora_rank", "lora_alpha", "quantization_config")


def _check_model(model: Any, function: str) -> None:
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`{function}` expects `model` to be a keras.Model. "
            f"Received: model={model!r} of type {type(model).__name__}"
        )


def _clone(
    model: keras.Model,
    replace: Callable[[keras.layers.Layer], Any],
    compiled: bool,
) -> keras.Model:
    """Clones `model`, building each layer with `replace(layer)` (or a plain
    config copy when it returns `None`), then copies the weights across.

    `keras.models.clone_model` compiles the clone like `model`; with
    `compiled=False` the result is rebuilt from its config, uncompiled, so
    that no optimizer state goes into its files."""
    pairs = []

    def clone_function(layer: keras.layers.Layer) -> keras.layers.Layer:
        new_layer = replace(layer)
        if new_layer is None:
            new_layer = layer.__class__.from_config(layer.get_config())
            pairs.append((layer, new_layer))
        return new_layer

    try:
        clone = keras.models.clone_model(
            model, clone_function=clone_function, recursive=True
        )
    except ValueError as error:
        raise ValueError(
            "Only Sequential and Functional models can be converted; build a "
            "subclassed model with `keras_prune.MaskedDense` directly. "
            f"Received: model={model.name!r} of type {type(model).__name__} "
            f"({error})"
        ) from error
    for old, new in pairs:
        if old.built and old.weights:
            new.set_weights(old.get_weights())
    if compiled or not clone.compiled:
        return clone
    plain = clone.__class__.from_config(clone.get_config())
    plain.set_weights(clone.get_weights())
    return plain


def _layer_selector(layers: Any) -> Callable[[keras.layers.Layer], bool]:
    if layers is None:
        return lambda layer: True
    if callable(layers):
        return layers
    if isinstance(layers, str):
        layers = [layers]
    if isinstance(layers, Iterable):
        names = set(layers)
        return lambda layer: layer.name in names
    raise TypeError(
        "Expected `layers` to be None, a list of layer names or a callable "
        f"`layer -> bool`. Received: layers={layers!r}"
    )


def make_prunable(model: keras.Model, layers: Any = None) -> keras.Model:
    """Returns a copy of `model` in which `Dense` layers become `MaskedDense`.

    The copy has the same weights and full masks, so its outputs equal the
    input model's; if the input model was compiled, the copy is compiled the
    same way (with a fresh optimizer). The input model is not changed.

    Args:
        model: A Sequential or Functional `keras.Model`.
        layers: Which `Dense` layers to convert: `None` for all, a list of
            layer names, or a callable `layer -> bool`. Defaults to `None`.

    Returns:
        A new `keras.Model`.

    Raises:
        TypeError: If `model` is not a `keras.Model`.
        ValueError: If a named layer is missing or is not a plain `Dense`, or
            if a `Dense` uses LoRA or quantization.

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> prunable = make_prunable(model)
    >>> type(prunable.layers[0]).__name__
    'MaskedDense'
    """
    _check_model(model, "make_prunable")
    selected = _layer_selector(layers)
    if layers is not None and not callable(layers):
        by_name = {layer.name: layer for layer in walk_layers(model)}
        for name in [layers] if isinstance(layers, str) else layers:
            if type(by_name.get(name)) is not keras.layers.Dense:
                raise ValueError(
                    "Expected every name in `layers` to be a keras.layers.Dense "
                    f"layer of the model. Received: layers={layers!r}; {name!r} "
                    + (
                        "is not in the model"
                        if name not in by_name
                        else f"is a {type(by_name[name]).__name__}"
                    )
                )

    def replace(layer: keras.layers.Layer) -> MaskedDense | None:
        if type(layer) is not keras.layers.Dense or not selected(layer):
            return None
        config = layer.get_config()
        if config.get("lora_rank") or layer.quantization_mode is not None:
            raise ValueError(
                "Cannot make a LoRA-enabled or quantized Dense prunable. "
                f"Received: layer {layer.name!r}"
            )
        for key in _DENSE_ONLY_KEYS:
            config.pop(key, None)
        masked = MaskedDense.from_config(config)
        if layer.built:
            masked.build(layer.kernel.shape[:1])
            masked.kernel.assign(layer.kernel)
            if layer.use_bias:
                masked.bias.assign(layer.bias)
        return masked

    return _clone(model, replace, compiled=True)


EXPORT_COMPUTE = ("auto", "dense", *sparse_ops.PATHS)


def export_sparse(model: keras.Model, compute: str = "auto") -> keras.Model:
    """Returns a copy of `model` with every `MaskedDense` made deployable.

    A layer sparse and large enough for the sparse kernels to pay off (at
    most `sparse_ops.DENSE_MIN_DENSITY` of its weights kept, and at least
    `sparse_ops.SPARSE_MIN_WEIGHTS` weights, ten times more without the
    native kernel; see `sparse_ops.pays_off`) becomes a `SparseDense` that
    holds only the nonzeros of `kernel * mask` and multiplies with the
    sparse kernels; any other becomes a plain
    `keras.layers.Dense` with the masked kernel, since a dense matmul is as
    fast there: an exported layer is never slower than the `Dense` it
    replaces. Every other layer keeps its
    weights, so predictions equal the masked model's up to float32
    round-off. The input model is not changed.

    Args:
        model: A Sequential or Functional `keras.Model`.
        compute: `"auto"` as above; `"native"`, `"coo"` or `"csr"` to make
            every masked layer a `SparseDense` forced to that kernel
            (`"coo"` and `"csr"` are TensorFlow's own ops: plain TensorFlow
            serves their SavedModels); `"dense"` to make every masked layer
            a `Dense`. Defaults to `"auto"`.

    Returns:
        A new, uncompiled `keras.Model`, ready for `predict`, `save` and
        `export` (no optimizer state goes into its files). Compile it to
        `evaluate` or fine-tune it.

    Raises:
        TypeError: If `model` is not a `keras.Model`.
        ValueError: If `compute` is not one of the above.

    Example:

    >>> model = keras.Sequential([keras.Input((100,)), MaskedDense(2)])
    >>> mask = np.zeros((100, 2))
    >>> mask[:5] = 1
    >>> model.layers[0].prune_to(mask)
    >>> type(export_sparse(model).layers[0]).__name__  # too small to gain
    'Dense'
    >>> sparse = export_sparse(model, compute="coo")
    >>> type(sparse.layers[0]).__name__, sparse.layers[0].nnz
    ('SparseDense', 10)
    """
    _check_model(model, "export_sparse")
    if compute not in EXPORT_COMPUTE:
        raise ValueError(
            f"Expected `compute` to be one of {list(EXPORT_COMPUTE)}. "
            f"Received: compute={compute!r}"
        )

    def replace(layer: keras.layers.Layer) -> keras.layers.Layer | None:
        if not isinstance(layer, MaskedDense):
            return None
        if not layer.built:
            raise ValueError(
                "Expected every MaskedDense to be built before export. "
                f"Received: layer {layer.name!r}, not built"
            )
        config = layer.get_config()
        kernel = ops.convert_to_numpy(layer.masked_kernel)
        bias = None if layer.bias is None else ops.convert_to_numpy(layer.bias)
        density = np.count_nonzero(kernel) / kernel.size
        if compute == "dense" or (
            compute == "auto" and not sparse_ops.pays_off(density, kernel.size)
        ):
            dense = keras.layers.Dense(
                layer.units,
                activation=config["activation"],
                use_bias=layer.use_bias,
                name=config["name"],
                dtype=config["dtype"],
            )
            dense.build((None, kernel.shape[0]))
            dense.kernel.assign(kernel)
            if bias is not None:
                dense.bias.assign(bias)
            return dense
        return SparseDense.from_kernel(
            kernel,
            bias=bias,
            activation=config["activation"],
            compute=compute,
            name=config["name"],
            dtype=config["dtype"],
        )

    return _clone(model, replace, compiled=False)
