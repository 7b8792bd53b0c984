"""`SparseDense`: a Dense layer that stores and multiplies only its nonzeros.

The layer class is importable on any backend (so that `.keras` files that
hold it can be read), but computing with it needs TensorFlow: its kernels
(`keras_prune.inference.sparse_ops`, `keras_prune.inference.native`) are
imported on first use.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import activations, ops

from keras_prune.inference.backend import tensorflow_module

# The kernels a `SparseDense` can run (see `keras_prune.inference.sparse_ops`).
PATHS = ("native", "coo", "csr")
# Dtypes the native kernel takes (it computes in float32).
NATIVE_DTYPES = ("float32", "float16", "bfloat16")


def _sparse_ops() -> Any:
    """`keras_prune.inference.sparse_ops`, imported on first use (it needs
    TensorFlow)."""
    tensorflow_module("SparseDense")
    from keras_prune.inference import sparse_ops

    return sparse_ops


def _validate_units(units: Any) -> int:
    if isinstance(units, bool) or not isinstance(units, int) or units <= 0:
        raise ValueError(
            f"Expected `units` to be a positive integer. Received: units={units!r}"
        )
    return units


def _add_bias_and_activate(layer: Any, outputs: Any) -> Any:
    """The end of a Dense-like call: `activation(outputs + bias)`."""
    if layer.bias is not None:
        outputs = ops.add(outputs, layer.bias)
    if layer.activation is not None:
        outputs = layer.activation(outputs)
    return outputs


@keras.saving.register_keras_serializable(package="keras_prune")
class SparseDense(keras.layers.Layer):
    """A `Dense` layer that stores and multiplies only its nonzero weights.

    The layer computes `activation(inputs @ kernel + bias)`, for inputs of
    any rank >= 2, with sparse kernels. No dense copy of the kernel exists:
    in memory it is `values` (the nonzeros) and `indices` (int64
    `(unit, input)` pairs sorted by unit, which every kernel takes as they
    are); in a
    `.keras` file it is compressed sparse rows with 16- or 32-bit columns, 6
    bytes a nonzero. It is usually made by `export_sparse`, or from a dense
    kernel with `from_kernel`.

    Three kernels are available: `"native"`, keras_prune's own multi-threaded
    kernel (compiled on first use, see `keras_prune.inference.native`; the fastest at
    every batch size), and TensorFlow's `"coo"` (`sparse_dense_matmul`,
    best for small batches) and `"csr"` (`SparseMatrixMatMul`, best for
    larger ones). With `compute="auto"` the layer uses `"native"` when it is
    available, else picks between TensorFlow's by batch size;
    `layer.compute_path(batch_size)` says which. Force `"coo"` or `"csr"`
    for a SavedModel that plain TensorFlow (without keras_prune) serves.

    XLA cannot compile sparse ops, so the layer sets `supports_jit = False`;
    Keras then runs the model without XLA.

    Args:
        units: Positive integer, dimensionality of the output space.
        nnz: Number of nonzero kernel weights. Defaults to `0`.
        activation: Activation function, or `None` for linear. Defaults to
            `None`.
        use_bias: Whether the layer adds a bias vector. Defaults to `True`.
        compute: `"auto"`, `"native"`, `"coo"` or `"csr"`. Defaults to
            `"auto"`.
        **kwargs: Base layer arguments, such as `name` and `dtype`.

    Input shape:
        N-D tensor with shape `(batch_size, ..., input_dim)`.

    Output shape:
        N-D tensor with shape `(batch_size, ..., units)`.

    Example:

    >>> layer = SparseDense.from_kernel(np.array([[0.0, 2.0], [3.0, 0.0]]))
    >>> layer(np.array([[1.0, 1.0]])).numpy()
    array([[3., 2.]], dtype=float32)
    >>> layer.compute_path(batch_size=1) in ("native", "coo")
    True
    """

    def __init__(
        self,
        units: int,
        nnz: int = 0,
        activation: Any = None,
        use_bias: bool = True,
        compute: str = "auto",
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.units = _validate_units(units)
        if isinstance(nnz, bool) or not isinstance(nnz, int) or nnz < 0:
            raise ValueError(
                f"Expected `nnz` to be an integer >= 0. Received: nnz={nnz!r}"
            )
        if compute not in ("auto", *PATHS):
            raise ValueError(
                f"Expected `compute` to be one of {['auto', *PATHS]}. "
                f"Received: compute={compute!r}"
            )
        if compute == "native" and self.compute_dtype not in NATIVE_DTYPES:
            raise ValueError(
                "Expected a float32, float16 or bfloat16 layer for "
                'compute="native" (the kernel computes in float32). '
                f"Received: dtype={self.compute_dtype}"
            )
        self.nnz = nnz
        self.activation = activations.get(activation)
        self.use_bias = use_bias
        self.compute = compute
        self.input_spec = keras.layers.InputSpec(min_ndim=2)
        self.supports_masking = True
        self.supports_jit = False

    @classmethod
    def from_kernel(
        cls,
        kernel: np.ndarray,
        bias: np.ndarray | None = None,
        activation: Any = None,
        **kwargs: Any,
    ) -> SparseDense:
        """Builds a `SparseDense` that holds the nonzeros of `kernel`.

        Args:
            kernel: A 2-D array of shape `(input_dim, units)`.
            bias: A 1-D array of shape `(units,)`, or `None` for no bias.
                Defaults to `None`.
            activation: Activation function. Defaults to `None`.
            **kwargs: Other `SparseDense` arguments, such as `compute` and
                `name`.

        Returns:
            A built `SparseDense` layer.

        Example:

        >>> layer = SparseDense.from_kernel(np.eye(3), bias=np.ones(3))
        >>> layer.nnz
        3
        """
        kernel = np.asarray(kernel)
        if kernel.ndim != 2:
            raise ValueError(
                "Expected `kernel` to be 2-D (input_dim, units). "
                f"Received: kernel.shape={kernel.shape}"
            )
        values, indices = _sparse_ops().coo_from_kernel(kernel)
        layer = cls(
            units=kernel.shape[1],
            nnz=int(values.size),
            activation=activation,
            use_bias=bias is not None,
            **kwargs,
        )
        layer.build((None, kernel.shape[0]))
        layer.values.assign(values)
        layer.indices.assign(indices)
        if layer.bias is not None and bias is not None:
            layer.bias.assign(np.asarray(bias))
        return layer

    def build(self, input_shape: tuple) -> None:
        self.input_dim = int(input_shape[-1])
        self.values = self.add_weight(
            name="values", shape=(self.nnz,), initializer="zeros"
        )
        self.indices = self.add_weight(
            name="indices",
            shape=(self.nnz, 2),
            initializer="zeros",
            dtype="int64",
            trainable=False,
        )
        self.bias = (
            self.add_weight(name="bias", shape=(self.units,), initializer="zeros")
            if self.use_bias
            else None
        )
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: self.input_dim})

    def save_own_variables(self, store: Any) -> None:
        row_splits, columns = _sparse_ops().compress(
            ops.convert_to_numpy(self.indices), self.input_dim, self.units
        )
        store["values"] = ops.convert_to_numpy(self.values)
        store["row_splits"] = row_splits
        store["columns"] = columns
        if self.bias is not None:
            store["bias"] = ops.convert_to_numpy(self.bias)

    def load_own_variables(self, store: Any) -> None:
        expected = {"values", "row_splits", "columns"} | (
            {"bias"} if self.use_bias else set()
        )
        if set(store.keys()) != expected:
            raise ValueError(
                f"Layer {self.name!r} expects the saved arrays {sorted(expected)}. "
                f"Received: {sorted(store.keys())}"
            )
        self.values.assign(store["values"])
        self.indices.assign(
            _sparse_ops().decompress(
                np.asarray(store["row_splits"]), np.asarray(store["columns"])
            )
        )
        if self.bias is not None:
            self.bias.assign(store["bias"])

    @property
    def density(self) -> float:
        """Fraction of the (virtual) dense kernel that is stored."""
        return self.nnz / (self.input_dim * self.units)

    @property
    def sparsity(self) -> float:
        """Fraction of the (virtual) dense kernel that is zero."""
        return 1.0 - self.density

    def compute_path(self, batch_size: int | None) -> str:
        """The kernel (`"native"`, `"coo"` or `"csr"`) a call with
        `batch_size` rows uses (`"auto"`: decided per call, for an unknown
        batch size without the native kernel)."""
        if self.compute != "auto":
            return self.compute
        return _sparse_ops().choose_path(batch_size, self.compute_dtype)

    def dense_kernel(self) -> np.ndarray:
        """Returns the kernel as a dense numpy array `(input_dim, units)`."""
        return _sparse_ops().kernel_from_coo(
            ops.convert_to_numpy(self.values),
            ops.convert_to_numpy(self.indices),
            self.input_dim,
            self.units,
        )

    def call(self, inputs: Any) -> Any:
        outputs = _sparse_ops().sparse_matmul(
            inputs,
            self.values,
            self.indices,
            self.input_dim,
            self.units,
            path=self.compute,
        )
        return _add_bias_and_activate(self, outputs)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (*input_shape[:-1], self.units)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "units": self.units,
            "nnz": self.nnz,
            "activation": activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "compute": self.compute,
        }
