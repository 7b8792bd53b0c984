"""Sparse kernel formats and the TensorFlow sparse matmul behind `SparseDense`.

The stored format is compressed sparse rows over the *output units* of a
Dense kernel `W` of shape `(input_dim, units)`, i.e. CSR of `W.T`:
`values[row_splits[u]:row_splits[u + 1]]` are the nonzeros that feed unit
`u`, and `indices[...]` their input features. Indices are int32, which
stores a nonzero in 8 bytes instead of the 20 of float32 values with int64
COO pairs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf


def csr_from_kernel(kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Splits a dense `(input_dim, units)` kernel into CSR arrays of its transpose.

    Args:
        kernel: A 2-D array.

    Returns:
        `(values, indices, row_splits)`: float values, int32 input indices
        and int32 row splits of length `units + 1`.

    Example:

    >>> csr_from_kernel(np.array([[0.0, 2.0], [3.0, 0.0]]))
    (array([3., 2.]), array([1, 0], dtype=int32), array([0, 1, 2], dtype=int32))
    """
    transposed = np.asarray(kernel).T
    units, input_dim = transposed.shape
    if max(units, input_dim, transposed.size) > np.iinfo(np.int32).max:
        raise ValueError(
            "Expected a kernel with fewer than 2**31 entries. "
            f"Received: kernel.shape={kernel.shape}"
        )
    rows, cols = np.nonzero(transposed)
    row_splits = np.zeros(units + 1, dtype=np.int32)
    np.cumsum(np.bincount(rows, minlength=units), out=row_splits[1:])
    return transposed[rows, cols], cols.astype(np.int32), row_splits


def kernel_from_csr(
    values: np.ndarray, indices: np.ndarray, row_splits: np.ndarray, input_dim: int
) -> np.ndarray:
    """Rebuilds the dense `(input_dim, units)` kernel from its CSR arrays.

    Example:

    >>> kernel_from_csr(np.array([3.0, 2.0]), np.array([1, 0]), np.array([0, 1, 2]), 2)
    array([[0., 2.],
           [3., 0.]])
    """
    units = len(row_splits) - 1
    kernel = np.zeros((input_dim, units), dtype=np.asarray(values).dtype)
    rows = np.repeat(np.arange(units), np.diff(row_splits))
    kernel[indices, rows] = values
    return kernel


def sparse_matmul(
    inputs: Any, values: Any, indices: Any, row_splits: Any, input_dim: int
) -> tf.Tensor:
    """Computes `inputs @ kernel` for a kernel given as CSR arrays of its transpose.

    Inputs of any rank >= 2 are flattened to `(-1, input_dim)` and the
    result is reshaped back to `(..., units)`.

    Example:

    >>> sparse_matmul(np.ones((1, 2), "float32"), np.array([3.0, 2.0], "float32"),
    ...               np.array([1, 0]), np.array([0, 1, 2]), 2).numpy()
    array([[3., 2.]], dtype=float32)
    """
    inputs = tf.convert_to_tensor(inputs)
    values = tf.convert_to_tensor(values)
    row_splits = tf.cast(row_splits, tf.int64)
    units = tf.shape(row_splits, out_type=tf.int64)[0] - 1
    rows = tf.repeat(tf.range(units), row_splits[1:] - row_splits[:-1])
    coo = tf.stack([rows, tf.cast(indices, tf.int64)], axis=1)
    transposed = tf.SparseTensor(coo, values, dense_shape=[units, input_dim])
    flat = tf.reshape(tf.cast(inputs, values.dtype), [-1, input_dim])
    outputs = tf.transpose(
        tf.sparse.sparse_dense_matmul(transposed, flat, adjoint_b=True)
    )
    out_shape = tf.concat([tf.shape(inputs)[:-1], [tf.cast(units, tf.int32)]], 0)
    return tf.reshape(outputs, out_shape)
