"""`sparsity_summary`: how many weights each layer of a model keeps;
`shrink_summary`: what `shrink` removed, with parameters and FLOPs."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_prune.inference.sparse_dense import SparseDense
from keras_prune.masking import (  # noqa: F401 - MaskedDense: doctest
    MaskedDense,
    MaskedLayer,
    find_prunable_weights,
    is_graph_model,
    is_prunable,
    layer_labels,
    stock_class,
)


@dataclasses.dataclass(frozen=True)
class LayerSparsity:
    """One row of a `SparsitySummary`: a layer's kernel and its nonzeros."""

    name: str
    kind: str
    shape: tuple[int, ...]
    size: int
    nonzeros: int
    compute: str

    @property
    def sparsity(self) -> float:
        """Fraction of the kernel that is zero."""
        return 1.0 - self.nonzeros / self.size if self.size else 0.0


@dataclasses.dataclass(frozen=True)
class SparsitySummary:
    """Per-layer kernel sizes and nonzeros of a model, with totals.

    `str(summary)` is a table; `summary.rows` holds the data.
    """

    rows: tuple[LayerSparsity, ...]

    @property
    def size(self) -> int:
        """Total kernel weights over all rows."""
        return sum(row.size for row in self.rows)

    @property
    def nonzeros(self) -> int:
        """Total nonzero kernel weights over all rows."""
        return sum(row.nonzeros for row in self.rows)

    @property
    def sparsity(self) -> float:
        """Fraction of all rows' kernel weights that are zero."""
        return 1.0 - self.nonzeros / self.size if self.size else 0.0

    def __getitem__(self, name: str) -> LayerSparsity:
        return _named(self.rows, name)

    def __str__(self) -> str:
        header = ("layer", "type", "kernel shape", "compute", "size", "nonzeros",
                  "sparsity")  # fmt: skip
        body = [
            (
                r.name,
                r.kind,
                "x".join(map(str, r.shape)),
                r.compute,
                f"{r.size:,}",
                f"{r.nonzeros:,}",
                f"{r.sparsity:.2%}",
            )  # fmt: skip
            for r in self.rows
        ]
        total = ("total", "", "", "", f"{self.size:,}", f"{self.nonzeros:,}",
                 f"{self.sparsity:.2%}")  # fmt: skip
        return _table(header, body, total, text_columns=4)


def sparsity_summary(model: keras.Model) -> SparsitySummary:
    """Counts the prunable weights and nonzeros of every layer that has them.

    A masked layer counts its masks' ones, one row per prunable weight
    (`"lstm/recurrent_kernel"` where a layer has several); a `SparseDense`
    its stored nonzeros; a stock layer of a covered class (a plain `Dense`,
    `Conv2D`, ...) the nonzeros of its prunable weights. Layers are found
    wherever they live (nested models, wrappers, custom layers). The
    `compute` column says how each layer multiplies: `"dense"`, or the
    sparse kernel a `SparseDense` uses (`"native"`, or TensorFlow's by batch
    size where the native kernel is not available).

    Args:
        model: A `keras.Model`; unbuilt layers are left out.

    Returns:
        A `SparsitySummary`; print it for a table.

    Raises:
        TypeError: If `model` is not a `keras.Model`.

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), MaskedDense(2, name="fc")])
    >>> print(sparsity_summary(model))  # doctest: +NORMALIZE_WHITESPACE
    layer  type         kernel shape  compute  size  nonzeros  sparsity
    -----  -----------  ------------  -------  ----  --------  --------
    fc     MaskedDense  4x2           dense       8         8     0.00%
    -----  -----------  ------------  -------  ----  --------  --------
    total                                         8         8     0.00%
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            "`sparsity_summary` expects `model` to be a keras.Model. "
            f"Received: model={model!r} of type {type(model).__name__}"
        )
    rows = []
    covered: set[int] = set()  # sublayers of a layer already counted
    every = model._flatten_layers(include_self=False)
    labels = dict(zip(map(id, every), layer_labels(every), strict=True))
    for layer in every:
        kind = type(layer).__name__
        label = labels[id(layer)]
        if not layer.built or id(layer) in covered:
            continue
        if isinstance(layer, MaskedLayer | SparseDense) or is_prunable(layer):
            covered.update(id(sub) for sub in layer._flatten_layers(include_self=False))
        if isinstance(layer, MaskedLayer):
            masks = layer.masks
            for key, mask in masks.items():
                name = label if len(masks) == 1 else f"{label}/{key}"
                nonzeros = int(np.count_nonzero(ops.convert_to_numpy(mask)))
                rows.append(_row(name, kind, tuple(mask.shape), nonzeros, "dense"))
        elif isinstance(layer, SparseDense):
            compute = layer.compute_path(None)
            if compute == "auto":
                from keras_prune.inference import sparse_ops

                compute = f"coo to batch {sparse_ops.COO_MAX_BATCH}, then csr"
            shape = (layer.input_dim, layer.units)
            rows.append(_row(label, kind, shape, layer.nnz, compute))
        elif is_prunable(layer):
            weights = find_prunable_weights(layer)
            for variable in weights:
                name = label if len(weights) == 1 else f"{label}/{variable.name}"
                nonzeros = int(np.count_nonzero(ops.convert_to_numpy(variable)))
                rows.append(_row(name, kind, tuple(variable.shape), nonzeros, "dense"))
    return SparsitySummary(tuple(rows))


def _row(
    name: str, kind: str, shape: tuple[int, ...], nonzeros: int, compute: str
) -> LayerSparsity:
    return LayerSparsity(name, kind, shape, int(np.prod(shape)), nonzeros, compute)


@dataclasses.dataclass(frozen=True)
class LayerShrink:
    """One row of a `ShrinkSummary`: a layer before and after `shrink`.

    `units_*` count units (`Dense`), filters (convolutions) or channels
    (depthwise convolutions, normalization); `params_*` its weights;
    `flops_*` its floating-point operations per example (2 per
    multiply-add of a kernel; 0 for layers without one).
    """

    name: str
    kind: str
    units_before: int
    units_after: int
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int


@dataclasses.dataclass(frozen=True)
class ShrinkSummary:
    """What `shrink` removed, per layer, with the totals of both models.

    `str(summary)` is a table of the layers that changed; `summary.rows`
    holds every layer with weights.
    """

    rows: tuple[LayerShrink, ...]

    @property
    def params_before(self) -> int:
        """All weights of the original model (masks not counted)."""
        return sum(row.params_before for row in self.rows)

    @property
    def params_after(self) -> int:
        """All weights of the shrunk model."""
        return sum(row.params_after for row in self.rows)

    @property
    def flops_before(self) -> int:
        """Floating-point operations per example of the original model."""
        return sum(row.flops_before for row in self.rows)

    @property
    def flops_after(self) -> int:
        """Floating-point operations per example of the shrunk model."""
        return sum(row.flops_after for row in self.rows)

    def __getitem__(self, name: str) -> LayerShrink:
        return _named(self.rows, name)

    def __str__(self) -> str:
        header = ("layer", "type", "units", "params", "FLOPs")
        changed = [
            r
            for r in self.rows
            if (r.units_before, r.params_before, r.flops_before)
            != (r.units_after, r.params_after, r.flops_after)
        ]
        body = [
            (
                r.name,
                r.kind,
                f"{r.units_before} -> {r.units_after}",
                f"{r.params_before:,} -> {r.params_after:,}",
                f"{r.flops_before:,} -> {r.flops_after:,}",
            )
            for r in changed
        ]
        total = (
            "total",
            "",
            "",
            f"{self.params_before:,} -> {self.params_after:,} "
            f"({_fraction(self.params_after, self.params_before)})",
            f"{self.flops_before:,} -> {self.flops_after:,} "
            f"({_fraction(self.flops_after, self.flops_before)})",
        )
        unchanged = len(self.rows) - len(changed)
        table = _table(header, body, total, text_columns=2)
        return f"{table}\n({unchanged} layers with weights unchanged)"


def _named(rows: Sequence[Any], name: str) -> Any:
    """The row of the layer `name`; `KeyError` if none."""
    for row in rows:
        if row.name == name:
            return row
    raise KeyError(name)


def _table(
    header: tuple[str, ...],
    body: Sequence[tuple[str, ...]],
    total: tuple[str, ...],
    text_columns: int,
) -> str:
    """A plain-text table: the header, the rows and the total between
    rules; the first `text_columns` left-aligned, numbers right-aligned."""
    widths = [
        max(map(len, column)) for column in zip(header, *body, total, strict=True)
    ]

    def fmt(row: tuple[str, ...]) -> str:
        cells = [
            cell.ljust(width) if i < text_columns else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([fmt(header), rule, *map(fmt, body), rule, fmt(total)])


def _fraction(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "n/a"


def shrink_summary(original: keras.Model, shrunk: keras.Model) -> ShrinkSummary:
    """Units, parameters and FLOPs of each layer, before and after `shrink`.

    Layers are matched by name (`shrink` keeps names); the layers of a nested
    Sequential or Functional model count as the model's. FLOPs are counted per
    example as 2 per multiply-add of the kernels of `Dense`, `EinsumDense`,
    convolutions (transposed, depthwise and separable too), from the layers'
    output shapes; normalization, activation and pooling are not counted.
    Masks are not counted as parameters.

    Args:
        original: The model given to `shrink` (masked or not).
        shrunk: The model `shrink` returned.

    Returns:
        A `ShrinkSummary`; print it for a table of the layers that changed.

    Raises:
        ValueError: For a subclassed model (no layer graph to read shapes
            from), or layers of one model missing from the other.

    Example:

    >>> from keras_prune.shrink import shrink
    >>> model = keras.Sequential([keras.Input((3,)),
    ...     keras.layers.Dense(4, name="hidden"), keras.layers.Dense(2, name="out")])
    >>> _ = model.get_layer("out").kernel.assign(np.zeros((4, 2)))
    >>> summary = shrink_summary(model, shrink(model))  # "hidden" keeps 1 unit
    >>> summary["hidden"].units_after, summary.flops_before, summary.flops_after
    (1, 40, 10)
    """
    before, after = _layer_costs(original), _layer_costs(shrunk)
    if set(before) != set(after):
        raise ValueError(
            "Expected the two models to have the same layer names (`shrink` "
            "keeps them). Received layers only in `original`: "
            f"{sorted(set(before) - set(after))}, only in `shrunk`: "
            f"{sorted(set(after) - set(before))}"
        )
    rows = []
    for name, (kind, units, params, flops) in before.items():
        _, units_after, params_after, flops_after = after[name]
        if params or params_after:
            rows.append(
                LayerShrink(
                    name,
                    kind,
                    units,
                    units_after,
                    params,
                    params_after,
                    flops,
                    flops_after,
                )  # fmt: skip
            )
    return ShrinkSummary(tuple(rows))


def _layer_costs(model: keras.Model) -> dict[str, tuple[str, int, int, int]]:
    """`{layer name: (stock class name, units, parameters, FLOPs per
    example)}` for every layer of a graph model, the layers of nested graph
    models included (named `"<model>/<layer>"` where a name repeats)."""
    if not is_graph_model(model):
        raise ValueError(
            "Expected a Sequential or Functional model: FLOPs are read from its "
            f"layer graph. Received: {type(model).__name__} {model.name!r}"
        )
    masks = {
        id(variable)
        for layer in model._flatten_layers()
        if isinstance(layer, MaskedLayer)
        for variable in layer.masks.values()
    }
    costs: dict[str, tuple[str, int, int, int]] = {}
    _add_costs(model, masks, costs)
    return costs


def _add_costs(
    model: keras.Model, masks: set[int], costs: dict[str, tuple[str, int, int, int]]
) -> None:
    graph = getattr(model, "_functional", None) or model
    names = {}
    for layer in graph.layers:
        if is_graph_model(layer):
            _add_costs(layer, masks, costs)
            continue
        name = layer.name if layer.name not in costs else f"{model.name}/{layer.name}"
        names[id(layer)] = name
        params = sum(int(np.prod(v.shape)) for v in layer.weights if id(v) not in masks)
        output = layer.output if layer._inbound_nodes else None
        units = int(output.shape[-1]) if output is not None and output.shape else 0
        costs[name] = (stock_class(type(layer)).__name__, units, params, 0)
    for depth in graph._nodes_by_depth.values():
        for node in depth:
            name = names.get(id(node.operation))
            if node.is_input or name is None:
                continue
            kind, units, params, flops = costs[name]
            costs[name] = (kind, units, params, flops + 2 * _multiply_adds(node))


def _multiply_adds(node: object) -> int:
    """Multiply-adds per example of one call of a layer with a kernel."""
    layer = node.operation  # type: ignore[attr-defined]
    L = keras.layers
    out_shape = node.outputs[0].shape[1:]  # type: ignore[attr-defined]
    in_shape = node.input_tensors[0].shape[1:]  # type: ignore[attr-defined]
    if any(d is None for d in (*out_shape, *in_shape)):
        return 0
    outputs = int(np.prod(out_shape))
    if isinstance(layer, L.SeparableConv1D | L.SeparableConv2D):
        spatial = int(np.prod(out_shape[:-1]))
        depthwise = layer.depthwise_kernel.shape
        inner = depthwise[-2] * depthwise[-1]
        return spatial * (int(np.prod(depthwise)) + inner * out_shape[-1])
    kernel = getattr(layer, "kernel", None)
    if kernel is None or isinstance(layer, L.Embedding):
        return 0
    size = int(np.prod(kernel.shape))
    if isinstance(layer, L.Conv1DTranspose | L.Conv2DTranspose | L.Conv3DTranspose):
        return int(np.prod(in_shape[:-1])) * size
    if isinstance(layer, L.DepthwiseConv1D | L.DepthwiseConv2D):
        return outputs * size // (kernel.shape[-2] * kernel.shape[-1])
    if isinstance(layer, L.Dense | L.EinsumDense | L.Conv1D | L.Conv2D | L.Conv3D):
        return outputs * size // int(out_shape[-1])
    return 0
