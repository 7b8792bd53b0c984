"""`sparsity_summary`: how many weights each layer of a model keeps."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
from keras import ops

from keras_prune.inference.sparse_dense import SparseDense
from keras_prune.masking import (  # noqa: F401 - MaskedDense: doctest
    MaskedDense,
    MaskedLayer,
    find_prunable_weights,
    is_prunable,
    layer_labels,
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
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(name)

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
        widths = [
            max(map(len, column)) for column in zip(header, *body, total, strict=True)
        ]

        def fmt(row: tuple[str, ...]) -> str:
            cells = [
                cell.ljust(width) if i < 4 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(row, widths, strict=True))
            ]
            return "  ".join(cells).rstrip()

        rule = "  ".join("-" * width for width in widths)
        return "\n".join([fmt(header), rule, *map(fmt, body), rule, fmt(total)])


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
