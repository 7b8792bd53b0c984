"""Model converters: `make_prunable` (stock layers -> masked layers),
`strip_pruning` (masked layers -> stock layers holding `weight * mask`) and
`export_sparse` (pruned layers -> `SparseDense` or compactly stored stock
layers).

None of them mutates its input unless asked to (`inplace=True`). Copies are
made through Keras's own saving format with the model's live functions and
classes in scope, so the user's unregistered activations, losses and layer
classes need no registration; a copy owns its buffers (on JAX too).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_prune.compact import compact_in_place
from keras_prune.copying import clone_layer, copy_model, live_objects
from keras_prune.masking import (  # noqa: F401 - MaskedDense: doctests
    MaskedContainer,
    MaskedDense,
    MaskedLayer,
    carries_sublayer_configs,
    is_plain_graph_model,
    is_prunable,
    layer_labels,
    mask_in_place,
    masked_layers,
    masked_paths,
    unmask_in_place,
)

_NORMALIZATION = (
    keras.layers.BatchNormalization,
    keras.layers.LayerNormalization,
    keras.layers.GroupNormalization,
    keras.layers.UnitNormalization,
)


_NORMALIZATION_REASON = "normalization weights are not pruned"


def _check_model(model: Any, function: str) -> None:
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`{function}` expects `model` to be a keras.Model. "
            f"Received: model={model!r} of type {type(model).__name__}"
        )


@dataclasses.dataclass(frozen=True)
class ConversionEntry:
    """One layer that `make_prunable` looked at.

    Attributes:
        name: The layer's name.
        kind: Its class name before conversion.
        status: `"masked"` (converted), `"already masked"`, or `"left"`.
        reason: Why a layer was left (empty when masked).
        weights: The layer's own trainable weight count.
        masked_weights: How many of them the masks cover.
    """

    name: str
    kind: str
    status: str
    reason: str
    weights: int
    masked_weights: int


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    """What `make_prunable` converted and what it left, and why.

    `str(report)` is a table; `report.entries` holds the rows. Made by
    `conversion_report(model)`.

    Example:

    >>> model = make_prunable(keras.Sequential([keras.Input((4,)),
    ...     keras.layers.Dense(3, name="fc")]))
    >>> print(conversion_report(model))
    layer  type         status          weights  masked  reason
    fc     MaskedDense  already masked       15      12
    """

    entries: tuple[ConversionEntry, ...]

    @property
    def masked(self) -> list[str]:
        """Names of the layers whose weights are masked."""
        return [e.name for e in self.entries if e.status != "left"]

    @property
    def left(self) -> list[ConversionEntry]:
        """The layers left unmasked, with their reasons."""
        return [e for e in self.entries if e.status == "left"]

    def __str__(self) -> str:
        rows = [("layer", "type", "status", "weights", "masked", "reason")]
        rows += [
            (
                e.name,
                e.kind,
                e.status,
                f"{e.weights:,}",
                f"{e.masked_weights:,}",
                e.reason,
            )  # fmt: skip
            for e in self.entries
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(6)]
        return "\n".join(
            "  ".join(
                cell.rjust(w) if i in (3, 4) else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
            for row in rows
        )


def _own_trainable_count(layer: Any) -> int:
    """Trainable weights held by `layer` itself (not by its sublayers)."""
    return sum(int(np.prod(v.shape)) for v in layer._trainable_variables)


def _all_trainable_count(layer: Any) -> int:
    return sum(int(np.prod(v.shape)) for v in layer.trainable_weights)


def _leave_reason(layer: Any) -> str:
    # Other libraries' normalization layers (keras-hub's `RMSNormalization`,
    # `LlamaLayerNorm`, ...) are told by their names.
    name = type(layer).__name__
    if isinstance(layer, _NORMALIZATION) or name.endswith(("Norm", "Normalization")):
        return _NORMALIZATION_REASON
    return (
        f"no pruning rule for {type(layer).__name__}: give it a "
        "`get_prunable_weights()` method"
    )


def _why_not(layer: Any) -> str | None:
    """Why a prunable layer cannot be masked now, or `None`."""
    if getattr(layer, "quantization_mode", None) is not None:
        return (
            f"quantized ({layer.quantization_mode}): prune before "
            "`quantize`, after `strip_pruning`"
        )
    return None


def _layer_selector(layers: Any) -> Callable[[keras.layers.Layer], bool]:
    if layers is None:
        return lambda layer: True
    if callable(layers):
        return layers
    if isinstance(layers, str):
        layers = [layers]
    if isinstance(layers, Iterable):
        names = set(layers)
        if not all(isinstance(name, str) for name in names):
            raise TypeError(
                "Expected `layers` to be None, a list of layer names or a callable "
                f"`layer -> bool`. Received: layers={layers!r} (pass layer names, "
                "not layer objects: the conversion works on a copy)"
            )
        return lambda layer: layer.name in names
    raise TypeError(
        "Expected `layers` to be None, a list of layer names or a callable "
        f"`layer -> bool`. Received: layers={layers!r}"
    )


_FROZEN_REASON = "frozen (trainable=False): pass prune_frozen=True to mask it"
_UNUSED_REASON = (
    "not built in a built model: the model never calls it (it has no weights)"
)


def _convert(
    model: keras.Model,
    selected: Callable[[Any], bool],
    apply: bool = True,
    prune_frozen: bool = False,
) -> ConversionReport:
    """Walks `model` and masks every selected prunable layer in place (or,
    with `apply=False`, only reports); frozen layers only with
    `prune_frozen`."""
    entries: list[ConversionEntry] = []
    seen: set[int] = set()
    every = model._flatten_layers(include_self=False)
    labels = dict(zip(map(id, every), layer_labels(every), strict=True))

    def entry(layer: Any, kind: str, status: str, reason: str = "") -> None:
        masked = 0
        if isinstance(layer, MaskedLayer) and layer.built:
            masked = sum(int(np.prod(w.shape)) for w in layer.prunable_weights.values())
        weights = _own_trainable_count(layer)
        if isinstance(layer, MaskedLayer) or is_prunable(layer):
            weights = _all_trainable_count(layer)
        if not layer.trainable and (
            isinstance(layer, MaskedLayer) or is_prunable(layer)
        ):
            # A frozen layer: what it would train unfrozen.
            weights = sum(int(np.prod(v.shape)) for v in layer.weights)
            weights -= masked if isinstance(layer, MaskedLayer) else 0
        label = labels.get(id(layer), layer.name)
        entries.append(ConversionEntry(label, kind, status, reason, weights, masked))

    def visit(parent: Any) -> None:
        for layer in parent._flatten_layers(include_self=False, recursive=False):
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            kind = type(layer).__name__
            if isinstance(layer, MaskedLayer):
                entry(layer, kind, "already masked")
            elif is_prunable(layer):
                reason = _why_not(layer)
                if reason is None and model.built and not layer.built:
                    # A layer made but never called (keras-hub's EfficientNet
                    # makes squeeze-and-excite layers it skips at ratio 0).
                    reason = _UNUSED_REASON
                if not apply:
                    frozen = not layer.trainable
                    reason = reason or (_FROZEN_REASON if frozen else "not masked")
                elif not selected(layer):
                    reason = "not selected by `layers`"
                elif not layer.trainable and not prune_frozen:
                    reason = _FROZEN_REASON
                if reason is None:
                    mask_in_place(layer)
                    entry(layer, kind, "masked")
                else:
                    entry(layer, kind, "left", reason)
            else:
                if _own_trainable_count(layer):
                    entry(layer, kind, "left", _leave_reason(layer))
                visit(layer)

    visit(model)
    if apply:
        # Layers that make their (now masked) sublayers themselves record
        # them in their config, so that loading masks them again.
        for layer in model._flatten_layers(include_self=True):
            if (
                not isinstance(layer, MaskedLayer | MaskedContainer)
                and not carries_sublayer_configs(layer)
                and masked_paths(layer)
            ):
                mask_in_place(layer)
    return ConversionReport(tuple(entries))


def _reset_compiled_functions(model: keras.Model) -> None:
    # Functions traced before the conversion called the unmasked layers.
    for name in ("train_function", "test_function", "predict_function"):
        if getattr(model, name, None) is not None:
            setattr(model, name, None)


def make_prunable(
    model: keras.Model,
    layers: Any = None,
    *,
    inplace: bool = False,
    prune_frozen: bool = False,
    verbose: bool = True,
) -> keras.Model:
    """Returns `model` with a pruning mask on every prunable weight.

    Each selected layer of a covered class (Dense, EinsumDense, every
    convolution, Embedding, SimpleRNN/LSTM/GRU and their cells, and custom
    layers with `get_prunable_weights()`) becomes its masked class
    (`masked_class`), wherever it lives: in Sequential, Functional and
    subclassed models, nested models, wrappers (`TimeDistributed`,
    `Bidirectional`) and custom layers; a shared layer is masked once. The
    masks start at ones, so the outputs are unchanged. An unbuilt layer gets
    its masks when it is built.

    By default the conversion runs on a copy (`copy_model`): the input model
    is untouched, and the copy is compiled like it. With `inplace=True` the
    layers of `model` itself change class (for models that cannot be copied
    through their config).

    Nothing is skipped silently: layers that hold trainable weights and stay
    unmasked for a reason other than design (quantized layers, classes
    without a rule) are listed with their reasons in a warning
    (`verbose=False` silences it), and `conversion_report(model)` gives the
    whole table, normalization layers included. Biases and normalization
    weights are never masked.

    Args:
        model: A `keras.Model` of any kind.
        layers: Which prunable layers to mask: `None` for all, a list of
            layer names, or a callable `layer -> bool`. Defaults to `None`.
        inplace: Convert `model` itself instead of a copy. Defaults to
            `False`.
        prune_frozen: Whether to mask layers that are frozen
            (`trainable = False`, as the backbone of the Keras
            transfer-learning guide): pruning them cannot be retrained.
            `False` leaves them unmasked, named in the warning and in
            `conversion_report`; unfreeze them and call `make_prunable`
            again (on the masked model) to mask them later. Defaults to
            `False`.
        verbose: Warn about layers with weights left unmasked. Defaults to
            `True`.

    Returns:
        The converted model (a new one unless `inplace=True`).

    Raises:
        TypeError: If `model` is not a `keras.Model`.
        ValueError: If a name in `layers` is not in the model or cannot be
            masked (the message says why), or the model cannot be copied.

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> prunable = make_prunable(model)
    >>> type(prunable.layers[0]).__name__
    'MaskedDense'
    """
    _check_model(model, "make_prunable")
    if isinstance(layers, Iterable) and not isinstance(layers, str):
        layers = list(layers)
    selected = _layer_selector(layers)
    if layers is not None and not callable(layers):
        _check_names(model, [layers] if isinstance(layers, str) else list(layers))
    if not isinstance(prune_frozen, bool):
        raise ValueError(
            "Expected `prune_frozen` to be True or False. "
            f"Received: prune_frozen={prune_frozen!r}"
        )
    target = model if inplace else copy_model(model)
    report = _convert(target, selected, prune_frozen=prune_frozen)
    _reset_compiled_functions(target)
    frozen = [e for e in report.left if e.reason == _FROZEN_REASON]
    unused = [e for e in report.left if e.reason == _UNUSED_REASON]
    left = [
        e
        for e in report.left
        if e.reason
        not in (
            "not selected by `layers`",
            _NORMALIZATION_REASON,
            _FROZEN_REASON,
            _UNUSED_REASON,
        )
    ]
    lines = [f"  {e.name} ({e.kind}, {e.weights:,} weights): {e.reason}" for e in left]
    if unused:
        lines.append(
            f"  {len(unused)} layer(s) the model never calls (not built while "
            "the model is, so without weights): "
            + ", ".join(f"{e.name} ({e.kind})" for e in unused)
        )
    if frozen:
        names = [e.name for e in frozen]
        shown = ", ".join(names[:8]) + (
            f" and {len(names) - 8} more" if len(names) > 8 else ""
        )
        lines.append(
            f"  {len(frozen)} frozen layer(s) (trainable=False; pruning them "
            f"could not be retrained): {shown}. Pass prune_frozen=True to mask "
            "them; conversion_report(model) lists them all."
        )
    if verbose and lines:
        kind = (
            "" if unused else "with weights " if frozen else "with trainable weights "
        )
        warnings.warn(
            f"make_prunable left {len(left) + len(frozen) + len(unused)} layer(s) "
            f"{kind}unmasked:\n" + "\n".join(lines),
            stacklevel=2,
        )
    return target


def _check_names(model: keras.Model, names: list[str]) -> None:
    by_name = {layer.name: layer for layer in model._flatten_layers(include_self=False)}
    for name in names:
        layer = by_name.get(name)
        reason: str | None
        if layer is None:
            reason = "is not in the model"
        elif not is_prunable(layer):
            reason = f"is a {type(layer).__name__}, which has no pruning rule"
        else:
            reason = _why_not(layer)
        if reason is not None:
            raise ValueError(
                "Expected every name in `layers` to be a prunable layer of the "
                f"model. Received: layers={names!r}; {name!r} {reason}"
            )


def conversion_report(model: keras.Model) -> ConversionReport:
    """Lists every layer of `model` with trainable weights: masked or not,
    and why not.

    Args:
        model: A `keras.Model`.

    Returns:
        A `ConversionReport`; print it for a table.

    Example:

    >>> model = make_prunable(keras.Sequential([keras.Input((4,)),
    ...     keras.layers.Dense(3, name="fc"),
    ...     keras.layers.LayerNormalization(name="norm")]), verbose=False)
    >>> [(e.name, e.status) for e in conversion_report(model).entries]
    [('fc', 'already masked'), ('norm', 'left')]
    """
    _check_model(model, "conversion_report")
    return _convert(model, lambda layer: False, apply=False)


def strip_pruning(model: keras.Model, *, inplace: bool = False) -> keras.Model:
    """Returns `model` with every masked layer back to its stock class.

    Each layer keeps `weight * mask` as its weights, so predictions do not
    change; the masks are gone. Use it before Keras features that need the
    stock classes, such as `model.quantize("int8")`, or to hand the model to
    code that does not know keras_prune.

    Args:
        model: A `keras.Model` of any kind.
        inplace: Change `model` itself instead of a copy. Defaults to `False`.

    Returns:
        The stripped model (a new one unless `inplace=True`).

    Example:

    >>> model = make_prunable(keras.Sequential([keras.Input((4,)),
    ...     keras.layers.Dense(2)]))
    >>> type(strip_pruning(model).layers[0]).__name__
    'Dense'

    Reference:
        TFMOT's `strip_pruning`
        (tensorflow/model-optimization, `prune.py`).
    """
    _check_model(model, "strip_pruning")
    target = model if inplace else copy_model(model)
    for layer in target._flatten_layers(include_self=True, recursive=True):
        unmask_in_place(layer)
    _reset_compiled_functions(target)
    return target


def _clone_functional(
    model: keras.Model,
    replace: Callable[[keras.layers.Layer], Any],
    fill: Callable[[Any, Any], None] | None = None,
) -> keras.Model:
    """Clones a Sequential/Functional `model`, building each layer with
    `replace(layer)` (or a plain copy when it returns `None`), uncompiled;
    `fill(old, new)` then sets the weights of each replaced layer once the
    clone is built. Nested Sequential and Functional models are cloned the
    same way; a nested model that its class rebuilds from constructor
    arguments (a keras-hub backbone) is copied whole (`copy_model`), its
    layers not replaced."""
    pairs, replaced = [], []
    objects = live_objects(model)

    def clone_function(layer: keras.layers.Layer) -> keras.layers.Layer:
        new_layer = replace(layer)
        if new_layer is not None:
            replaced.append((layer, new_layer))
        elif is_plain_graph_model(layer):
            new_layer = _clone_functional(layer, replace, fill)
        elif isinstance(layer, keras.Model):
            # A model that its class rebuilds from constructor arguments (a
            # keras-hub backbone): copied whole, its layers left as they are.
            new_layer = copy_model(layer, compile=False)
        else:
            new_layer = clone_layer(layer, objects)
            pairs.append((layer, new_layer))
        return new_layer

    with keras.saving.custom_object_scope(objects.by_name):
        clone = keras.models.clone_model(
            _uncompiled_view(model), clone_function=clone_function, recursive=False
        )
        for old, new in pairs:  # operations of keras.ops have no weights
            if getattr(old, "built", False) and old.weights:
                new.set_weights([np.array(w) for w in old.get_weights()])
        if fill is not None:
            for old, new in replaced:
                fill(old, new)
    return clone


def _uncompiled_view(model: keras.Model) -> keras.Model:
    """`model` as `keras.models.clone_model` should see it: the same layers
    and graph, not compiled. `clone_model` compiles its clone from the
    model's serialized compile config, which Keras refuses to read where it
    holds a lambda loss, and the converters want the clone uncompiled
    anyway. A second object over the same attributes: `model` is not
    changed."""
    if not model.compiled:
        return model
    view = object.__new__(type(model))
    vars(view).update(vars(model))
    vars(view)["compiled"] = False
    return view


EXPORT_COMPUTE = ("auto", "tensorflow", "dense", "native", "coo", "csr")


def export_sparse(model: keras.Model, compute: str = "auto") -> keras.Model:
    """Returns a copy of `model` made deployable: masks gone, every pruned
    layer stored as its nonzeros, each computing the fastest way it can.

    - A pruned `Dense` of a Sequential or Functional graph becomes a
      `SparseDense`: it holds only the nonzeros and runs the sparse kernels
      where they beat a dense matmul for its size and density, else a
      dense matmul on a kernel rebuilt once at load (`compute="auto"`,
      TensorFlow's kernels only on the TensorFlow backend); so an exported
      layer is never slower than the `Dense` it replaces.
    - Every other pruned layer (convolutions, embeddings, recurrent and
      attention layers, layers inside wrappers or custom layers, and all
      layers of a subclassed model) becomes its stock class with compact
      storage (`keras_prune.compact`): it computes as the stock layer, and
      its `.keras` entry holds only the nonzeros.
    - Masked layers with nothing pruned become their stock class.

    The `.keras` file of the export therefore shrinks with the kept
    fraction of every pruned layer (about 13% of the dense size at 10%
    kept). Predictions equal the masked model's up to float32 round-off.
    The input model is not changed. Loading the file needs keras_prune
    (imported) for the `SparseDense` and `Compact*` classes.

    Args:
        model: A `keras.Model` of any kind.
        compute: How the `SparseDense` layers compute: `"auto"` as above;
            `"tensorflow"` the same choice among TensorFlow's own ops only,
            for a SavedModel that plain TensorFlow (TF Serving) loads
            without keras_prune (`model.export(path)`); `"dense"` always a
            dense matmul (any backend); `"native"`, `"coo"` or `"csr"` to
            force that sparse kernel (TensorFlow only). Defaults to
            `"auto"`.

    Returns:
        A new, uncompiled `keras.Model`, ready for `predict`, `save` and
        `export` (no optimizer state goes into its files). Compile it to
        `evaluate` or fine-tune it.

    Raises:
        TypeError: If `model` is not a `keras.Model`.
        ValueError: If `compute` is not one of the above, or a masked layer
            is not built.
        RuntimeError: If `compute` forces a sparse kernel off the
            TensorFlow backend.

    Warns:
        UserWarning: Naming each pruned `Dense` that would run a sparse
            kernel but cannot become a `SparseDense` (inside a wrapper, a
            custom layer or a subclassed model): it computes dense.

    Example:

    >>> model = keras.Sequential([keras.Input((100,)), MaskedDense(2)])
    >>> mask = np.zeros((100, 2))
    >>> mask[:5] = 1
    >>> model.layers[0].prune_to(mask)
    >>> layer = export_sparse(model).layers[0]
    >>> type(layer).__name__, layer.nnz, layer.compute_path(1)  # too small to gain
    ('SparseDense', 10, 'dense')
    >>> export_sparse(model, compute="coo").layers[0].compute_path(1)
    'coo'
    """
    _check_model(model, "export_sparse")
    if compute not in EXPORT_COMPUTE:
        raise ValueError(
            f"Expected `compute` to be one of {list(EXPORT_COMPUTE)}. "
            f"Received: compute={compute!r}"
        )
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, MaskedLayer) and not layer.built:
            raise ValueError(
                "Expected every masked layer to be built before export. "
                f"Received: layer {layer.name!r}, not built"
            )
    if compute not in ("auto", "dense"):  # TensorFlow's kernels, or ours
        from keras_prune.inference.backend import tensorflow_module

        tensorflow_module(f"export_sparse(compute={compute!r})")
    graph = _replaceable(model)
    dense = [
        layer
        for layer in _pruned(model)
        if isinstance(layer, keras.layers.Dense)
        and not layer.lora_enabled
        and layer.quantization_mode is None
    ]
    sparse = {id(layer) for layer in dense if id(layer) in graph}
    slower = [
        layer.name
        for layer in dense
        if id(layer) not in sparse and _would_run_sparse(layer, compute)
    ]
    if slower:
        warnings.warn(
            f"export_sparse stores {slower} compactly but computes them dense: "
            "SparseDense replaces layers of a Sequential or Functional graph, "
            "not layers inside wrappers, custom layers or subclassed models.",
            stacklevel=2,
        )
    from keras_prune.inference.sparse_dense import SparseDense

    def replace(layer: keras.layers.Layer) -> keras.layers.Layer | None:
        if id(layer) not in sparse:
            return None
        config = layer.get_config()
        return SparseDense.from_kernel(
            ops.convert_to_numpy(layer.masked_kernel),
            bias=None if layer.bias is None else ops.convert_to_numpy(layer.bias),
            activation=layer.activation,
            compute=compute,
            name=config["name"],
            dtype=config["dtype"],
        )

    if graph:
        exported = _clone_functional(model, replace)
    else:
        exported = copy_model(model, compile=False)
    # The copy holds the other masked layers, masked: compact the pruned
    # ones (or the layers that make them), then strip every mask.
    targets = _compact_targets(exported, {id(layer) for layer in _pruned(exported)})
    strip_pruning(exported, inplace=True)
    for target in targets:
        compact_in_place(target)
    return exported


def _replaceable(model: Any) -> set[int]:
    """The ids of the layers that `_clone_functional` can replace: those of
    a Sequential or Functional model built from its graph config, and of
    such models nested in it (not those of a model rebuilt from its
    constructor's arguments, such as a keras-hub backbone, which is copied
    whole)."""
    if not is_plain_graph_model(model):
        return set()
    found = set()
    for layer in model.layers:
        found.add(id(layer))
        found |= _replaceable(layer)
    return found


def _pruned(model: keras.Model) -> list[MaskedLayer]:
    """The masked layers of `model` with at least one weight pruned."""
    return [layer for layer in masked_layers(model) if layer.sparsity > 0]


def _would_run_sparse(layer: MaskedLayer, compute: str) -> bool:
    """Whether a `SparseDense` made from `layer` would run a sparse kernel."""
    if compute == "dense" or keras.backend.backend() != "tensorflow":
        return False
    if compute not in ("auto", "tensorflow"):
        return True
    from keras_prune.inference import sparse_ops

    mask = ops.convert_to_numpy(layer.masks["kernel"])
    native_kernel = None if compute == "auto" else False
    return sparse_ops.pays_off(
        np.count_nonzero(mask) / mask.size, mask.size, native_kernel
    )


def _compact_targets(model: keras.Model, pruned: set[int]) -> list[Any]:
    """The layers to give compact storage so that every pruned layer is
    stored compactly and reads back: each pruned layer that its parent's
    config recreates (graph models, wrappers, `RNN` with its cell), else the
    highest layer that makes it itself (an `LSTM`'s cell, attention
    projections, a custom block's layers, a subclassed model's)."""

    def holds(layer: Any) -> bool:
        return any(
            id(sublayer) in pruned
            for sublayer in layer._flatten_layers(include_self=True, recursive=True)
        )

    if not carries_sublayer_configs(model):
        return [model] if holds(model) else []
    targets = []
    for child in model._flatten_layers(include_self=False, recursive=False):
        if id(child) in pruned or (
            holds(child) and not carries_sublayer_configs(child)
        ):
            targets.append(child)
        elif holds(child):
            targets.extend(_compact_targets(child, pruned))
    return targets
