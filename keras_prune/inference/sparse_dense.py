"""`SparseDense`: a Dense layer that stores only its nonzeros and computes
the fastest way for its shape and density.

The layer works on every backend: where the sparse kernels do not pay (or
off TensorFlow) it multiplies a dense kernel rebuilt once from the nonzeros
when it is built or loaded. Its sparse kernels
(`keras_prune.inference.sparse_ops`, `keras_prune.inference.native`) need
TensorFlow and are imported on first use.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import activations, ops

from keras_prune import storage
from keras_prune.inference.backend import tensorflow_module

# The sparse kernels a `SparseDense` can run (see
# `keras_prune.inference.sparse_ops`), and every value of `compute`.
PATHS = ("native", "coo", "csr")
COMPUTE = ("auto", "tensorflow", "dense", *PATHS)
# Dtypes the native kernel takes (it computes in float32).
NATIVE_DTYPES = ("float32", "float16", "bfloat16")


def _sparse_ops() -> Any:
    """`keras_prune.inference.sparse_ops`, imported on first use (it needs
    TensorFlow)."""
    tensorflow_module("SparseDense")
    from keras_prune.inference import sparse_ops

    return sparse_ops


def coo_from_kernel(kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns `(values, indices)`: the nonzeros of `kernel.T` in row-major order.

    Args:
        kernel: A 2-D array of shape `(input_dim, units)`.

    Returns:
        `values`, shape `(nnz,)`, and `indices`, int64 `(nnz, 2)` pairs of
        `(unit, input)`.

    Example:

    >>> values, indices = coo_from_kernel(np.array([[0.0, 2.0], [3.0, 0.0]]))
    >>> values, indices.tolist()
    (array([3., 2.]), [[0, 1], [1, 0]])
    """
    transposed = np.asarray(kernel).T
    units, inputs = np.nonzero(transposed)
    indices = np.stack([units, inputs], axis=1).astype(np.int64).reshape(-1, 2)
    return transposed[units, inputs], indices


def kernel_from_coo(
    values: np.ndarray, indices: np.ndarray, input_dim: int, units: int
) -> np.ndarray:
    """Rebuilds the dense `(input_dim, units)` kernel from COO pairs of its
    transpose.

    Example:

    >>> kernel_from_coo(np.array([3.0, 2.0]), np.array([[0, 1], [1, 0]]), 2, 2)
    array([[0., 2.],
           [3., 0.]])
    """
    kernel = np.zeros((input_dim, units), dtype=np.asarray(values).dtype)
    indices = np.asarray(indices).reshape(-1, 2)
    kernel[indices[:, 1], indices[:, 0]] = values
    return kernel


def csr_from_coo(indices: np.ndarray, units: int) -> tuple[np.ndarray, np.ndarray]:
    """int32 CSR of COO pairs sorted by unit: what the native kernel takes.

    Args:
        indices: `(nnz, 2)` pairs of `(unit, input)`, sorted by unit.
        units: Number of units (rows of the transposed kernel).

    Returns:
        `row_splits`, int32 `(units + 1,)` (unit `u`'s nonzeros are entries
        `row_splits[u]` to `row_splits[u + 1] - 1`), and `columns`, int32
        `(nnz,)` (the input of each).

    Example:

    >>> row_splits, columns = csr_from_coo(np.array([[0, 1], [2, 0], [2, 2]]), 3)
    >>> row_splits.tolist(), columns.tolist()
    ([0, 1, 1, 3], [1, 0, 2])
    """
    indices = np.asarray(indices).reshape(-1, 2)
    row_splits = np.searchsorted(indices[:, 0], np.arange(units + 1))
    return row_splits.astype(np.int32), indices[:, 1].astype(np.int32)


def _coo_from_csr(row_splits: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """COO pairs from the CSR arrays of keras_prune 0.1 and 0.2 files."""
    units = np.repeat(np.arange(len(row_splits) - 1), np.diff(row_splits))
    return np.stack([units, np.asarray(columns)], axis=1).astype(np.int64)


class _KeepPattern:
    """Constraint of the dense-path kernel: weights outside the stored
    pattern stay zero under fine-tuning (`scatter(gather(kernel))`)."""

    def __init__(self, layer: Any):
        self.layer = layer

    def __call__(self, kernel: Any) -> Any:
        indices = ops.flip(self.layer.indices, axis=1)  # (input, unit) pairs
        kept = ops.take(ops.reshape(kernel, (-1,)), _flat_positions(self.layer))
        return ops.scatter(indices, kept, ops.shape(kernel))


def _flat_positions(layer: Any) -> Any:
    """Flat positions of the stored weights in the `(input_dim, units)`
    kernel."""
    return layer.indices[:, 1] * layer.units + layer.indices[:, 0]


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


def _sparse_pays(layer: Any) -> bool:
    """Whether `compute="auto"` (or `"tensorflow"`) runs a sparse kernel for
    `layer`: on TensorFlow, where `sparse_ops.pays_off` says so for its size
    and density (with TensorFlow's own kernels only for `"tensorflow"`)."""
    if keras.backend.backend() != "tensorflow":
        return False
    weights = layer.input_dim * layer.units
    native_kernel = None if layer.compute == "auto" else False
    return bool(weights) and _sparse_ops().pays_off(
        layer.nnz / weights, weights, native_kernel
    )


@keras.saving.register_keras_serializable(package="keras_prune")
class SparseDense(keras.layers.Layer):
    """A `Dense` layer that stores only its nonzero weights and computes the
    fastest way for its shape and density.

    The layer computes `activation(inputs @ kernel + bias)`, for inputs of
    any rank >= 2. Its file holds only the nonzeros: in a `.keras` file the
    kernel is its nonzero values plus a bitmask or 8/16-bit gaps (see
    `keras_prune.storage`), about 13% of the dense kernel at 10% kept and
    1.5% at 0.23%. It is usually made by `export_sparse`, or from a dense
    kernel with `from_kernel`.

    How it computes (`compute`):

    - `"dense"`: a plain matmul on a dense kernel rebuilt from the nonzeros
      once, when the layer is built or loaded (never per call). Works on
      every backend.
    - `"native"`: keras_prune's own multi-threaded sparse kernel (compiled
      on first use, see `keras_prune.inference.native`; the fastest sparse
      kernel at every batch size). TensorFlow only.
    - `"coo"` and `"csr"`: TensorFlow's `sparse_dense_matmul` (best for
      small batches) and `SparseMatrixMatMul` (best for larger ones), both
      TensorFlow's own ops, so plain TensorFlow serves their SavedModels.
    - `"auto"` (default): the sparse kernels where they beat a dense matmul
      for this size and density (`sparse_ops.pays_off`: at most 5% kept
      and at least 100,000 weights with the native kernel), choosing the
      kernel by batch size; `"dense"` otherwise and on backends other than
      TensorFlow. So the layer is never slower than the `Dense` it replaces.
    - `"tensorflow"`: the same choice among TensorFlow's own kernels (COO
      or CSR, by batch size, at run time for an unknown batch size) and a
      dense matmul: a SavedModel of it is served by plain TensorFlow (TF
      Serving) without keras_prune.

    `layer.compute_path(batch_size)` says which runs. In memory a sparse
    path holds `values` (the nonzeros) and `indices` (int64 `(unit, input)`
    pairs sorted by unit, which TensorFlow's sparse kernels take as they
    are), and where the native kernel may run (`compute="auto"` or
    `"native"`) the same pattern as int32 CSR, `row_splits` `(units + 1,)`
    and `columns` `(nnz,)`, derived when the weights are set (not per call);
    the dense path holds `kernel` (dense) and `indices`, and a constraint
    keeps the weights outside `indices` at zero when it is fine-tuned.

    XLA cannot compile sparse ops, so a layer on a sparse path sets
    `supports_jit = False`; Keras then runs the model without XLA.

    Args:
        units: Positive integer, dimensionality of the output space.
        nnz: Number of stored kernel weights. Defaults to `0`.
        activation: Activation function, or `None` for linear. Defaults to
            `None`.
        use_bias: Whether the layer adds a bias vector. Defaults to `True`.
        compute: `"auto"`, `"tensorflow"`, `"dense"`, `"native"`, `"coo"`
            or `"csr"`. Defaults to `"auto"`.
        **kwargs: Base layer arguments, such as `name` and `dtype`.

    Input shape:
        N-D tensor with shape `(batch_size, ..., input_dim)`.

    Output shape:
        N-D tensor with shape `(batch_size, ..., units)`.

    Raises:
        ValueError: For a bad `units`, `nnz` or `compute`, or
            `compute="native"` with a dtype other than float32, float16 or
            bfloat16.
        RuntimeError: When a sparse path runs off the TensorFlow backend.

    Example:

    >>> layer = SparseDense.from_kernel(np.array([[0.0, 2.0], [3.0, 0.0]]))
    >>> keras.ops.convert_to_numpy(layer(np.array([[1.0, 1.0]])))
    array([[3., 2.]], dtype=float32)
    >>> layer.compute_path(batch_size=1)  # 4 weights: a dense matmul wins
    'dense'
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
        if compute not in COMPUTE:
            raise ValueError(
                f"Expected `compute` to be one of {list(COMPUTE)}. "
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
        self.supports_jit = compute == "dense"

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

        Raises:
            ValueError: If `kernel` is not 2-D.

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
        values, indices = coo_from_kernel(kernel)
        layer = cls(
            units=kernel.shape[1],
            nnz=int(values.size),
            activation=activation,
            use_bias=bias is not None,
            **kwargs,
        )
        layer.build((None, kernel.shape[0]))
        layer._assign(values, indices)
        if layer.bias is not None and bias is not None:
            layer.bias.assign(np.asarray(bias))
        return layer

    def build(self, input_shape: tuple) -> None:
        self.input_dim = int(input_shape[-1])
        self.computes_dense = self.compute == "dense" or (
            self.compute in ("auto", "tensorflow") and not _sparse_pays(self)
        )
        self.supports_jit = self.computes_dense
        if self.computes_dense:
            self.kernel = self.add_weight(
                name="kernel",
                shape=(self.input_dim, self.units),
                initializer="zeros",
                constraint=_KeepPattern(self),
            )
        else:
            self._values = self.add_weight(
                name="values", shape=(self.nnz,), initializer="zeros"
            )
        self.indices = self.add_weight(
            name="indices",
            shape=(self.nnz, 2),
            initializer="zeros",
            dtype="int64",
            trainable=False,
        )
        # The native kernel's CSR form of `indices` (all zeros is a valid
        # empty pattern, like the zero `indices`, until weights are set).
        self.csr = None
        if not self.computes_dense and self.compute in ("auto", "native"):
            self.csr = tuple(
                self.add_weight(
                    name=name,
                    shape=(size,),
                    initializer="zeros",
                    dtype="int32",
                    trainable=False,
                )
                for name, size in (
                    ("row_splits", self.units + 1),
                    ("columns", self.nnz),
                )
            )
        self.bias = (
            self.add_weight(name="bias", shape=(self.units,), initializer="zeros")
            if self.use_bias
            else None
        )
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: self.input_dim})

    def _assign(self, values: np.ndarray, indices: np.ndarray) -> None:
        """Sets the stored weights from COO pairs of the kernel's transpose."""
        if len(values) != self.nnz:
            raise ValueError(
                f"Layer {self.name!r} holds nnz={self.nnz} weights. "
                f"Received: {len(values)} values"
            )
        self.indices.assign(indices)
        if self.csr is not None:
            for variable, array in zip(
                self.csr, csr_from_coo(indices, self.units), strict=True
            ):
                variable.assign(array)
        if self.computes_dense:
            self.kernel.assign(
                kernel_from_coo(values, indices, self.input_dim, self.units)
            )
        else:
            self._values.assign(values)

    @property
    def values(self) -> Any:
        """The stored kernel weights, `(nnz,)`, in the order of `indices`
        (the variable itself on a sparse path, read from `kernel` on the
        dense path)."""
        if self.computes_dense:
            return ops.take(ops.reshape(self.kernel, (-1,)), _flat_positions(self))
        return self._values

    def save_own_variables(self, store: Any) -> None:
        indices = ops.convert_to_numpy(self.indices)
        parts = storage.encode_nonzeros(
            ops.convert_to_numpy(self.values),
            indices[:, 0] * self.input_dim + indices[:, 1],
            (self.units, self.input_dim),
        )
        for part, array in parts.items():
            store[part] = array
        if self.bias is not None:
            store["bias"] = ops.convert_to_numpy(self.bias)

    def load_own_variables(self, store: Any) -> None:
        keys = set(store.keys())
        bias = {"bias"} if self.use_bias else set()
        if keys == {"values", "row_splits", "columns"} | bias:
            # A file of keras_prune 0.1 or 0.2: CSR with 16/32-bit columns.
            values = np.asarray(store["values"])
            indices = _coo_from_csr(
                np.asarray(store["row_splits"]), np.asarray(store["columns"])
            )
        else:
            parts = {key: store[key] for key in keys - bias}
            try:
                values, positions, shape = storage.decode_nonzeros(parts)
            except ValueError as error:
                raise ValueError(
                    f"Layer {self.name!r} cannot read its saved arrays "
                    f"{sorted(keys)}: {error}"
                ) from error
            if shape != (self.units, self.input_dim):
                raise ValueError(
                    f"Layer {self.name!r} has a ({self.input_dim}, {self.units}) "
                    f"kernel. Received: a saved kernel of shape {shape[::-1]}"
                )
            indices = np.stack(np.divmod(positions, self.input_dim), axis=1)
        self._assign(values, indices)
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
        """How a call with `batch_size` rows computes: `"dense"`, or the
        sparse kernel (`"native"`, `"coo"` or `"csr"`; `"auto"`: decided per
        call, for an unknown batch size without the native kernel)."""
        if self.computes_dense:
            return "dense"
        if self.compute not in ("auto", "tensorflow"):
            return self.compute
        return _sparse_ops().choose_path(
            batch_size, self.compute_dtype, native_kernel=self.compute == "auto"
        )

    def dense_kernel(self) -> np.ndarray:
        """Returns the kernel as a dense numpy array `(input_dim, units)`."""
        if self.computes_dense:
            return ops.convert_to_numpy(self.kernel)
        return kernel_from_coo(
            ops.convert_to_numpy(self.values),
            ops.convert_to_numpy(self.indices),
            self.input_dim,
            self.units,
        )

    def call(self, inputs: Any) -> Any:
        if self.computes_dense:
            return _add_bias_and_activate(self, ops.matmul(inputs, self.kernel))
        values, bias = self._values, self.bias
        if self.compute_dtype != values.dtype:
            # Mixed precision: read them cast to the compute dtype.
            values = ops.convert_to_tensor(values)
            bias = None if bias is None else ops.convert_to_tensor(bias)
        # Else the variables themselves: the native kernel reads them
        # without a graph node each.
        outputs = _sparse_ops().sparse_matmul(
            inputs,
            values,
            self.indices,
            self.input_dim,
            self.units,
            path=self.compute,
            csr=self.csr,
            bias=bias,
        )
        return outputs if self.activation is None else self.activation(outputs)

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
