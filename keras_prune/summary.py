"""`sparsity_summary`: how many weights each layer of a model keeps."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
from keras import ops

from keras_prune import sparse_ops
from keras_prune.layers import MaskedDense, SparseDense, walk_layers


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
    """Counts the kernel weights and nonzeros of every Dense-like layer.

    `MaskedDense` counts the mask's ones, `SparseDense` its stored nonzeros,
    and a plain `keras.layers.Dense` the nonzeros of its kernel. The
    `compute` column says how each layer multiplies: `"dense"`, or the
    sparse kernel a `SparseDense` uses (`"native"`, or TensorFlow's by batch
    size where the native kernel is not available).

    Args:
        model: A built `keras.Model`.

    Returns:
        A `SparsitySummary`; print it for a table.

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
    for layer in walk_layers(model):
        if isinstance(layer, MaskedDense):
            shape = tuple(layer.mask.shape)
            nonzeros = int(np.count_nonzero(ops.convert_to_numpy(layer.mask)))
            compute = "dense"
        elif isinstance(layer, SparseDense):
            shape = (layer.input_dim, layer.units)
            nonzeros = layer.nnz
            compute = layer.compute_path(None)
            if compute == "auto":
                compute = f"coo to batch {sparse_ops.COO_MAX_BATCH}, then csr"
        elif isinstance(layer, keras.layers.Dense) and layer.built:
            shape = tuple(layer.kernel.shape)
            nonzeros = int(np.count_nonzero(ops.convert_to_numpy(layer.kernel)))
            compute = "dense"
        else:
            continue
        rows.append(
            LayerSparsity(
                layer.name,
                type(layer).__name__,
                shape,
                int(np.prod(shape)),
                nonzeros,
                compute,
            )
        )
    return SparsitySummary(tuple(rows))
