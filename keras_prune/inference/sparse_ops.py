"""Sparse kernel formats and the TensorFlow sparse matmuls behind `SparseDense`.

In memory a sparse kernel `W` of shape `(input_dim, units)` is held as COO
pairs of its transpose, `indices[k] = (unit, input)` in row-major order with
int64 entries, plus `values[k]`: exactly what TensorFlow's sparse kernels
take, so nothing is rebuilt per call (`SparseDense` stores it on disk in
the compact formats of `keras_prune.storage`). For the native kernel the
layer also holds the same pattern as int32 CSR (`row_splits`, `columns`),
derived once when its weights are set.

Three kernels compute `x @ W`:
- `"native"`: keras_prune's own kernel (see `keras_prune.inference.native`), compiled
  on first use; the fastest at every batch size, used whenever it loads.
- `"coo"`: `tf.sparse.sparse_dense_matmul`; lowest overhead, single-threaded,
  TensorFlow's fastest for small batches.
- `"csr"`: `SparseMatrixMatMul` on a CSR matrix made from the COO pairs at
  each call; multi-threaded, TensorFlow's fastest for larger batches.
The last two are TensorFlow's own ops: a SavedModel that uses only them is
served by plain TensorFlow.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from keras_prune.inference import native

PATHS = ("native", "coo", "csr")
# The native kernel computes in float32; half-precision layers (mixed
# precision) are cast to it and back, float64 ones stay on TensorFlow's.
NATIVE_DTYPES = (tf.float32, tf.float16, tf.bfloat16)

# Measured by benchmarks/sparse_dense.py on a 2-core CPU (TensorFlow 2.21),
# 3136x1024 at 1% and 0.23% density: without the native kernel, COO's
# matrix-vector product is the fastest for up to this many rows, each row a
# separate op so that the cores share them; above it CSR wins (it pays a
# per-call conversion, ~3 ns a nonzero, and the transposes of its operands).
COO_MAX_BATCH = 4
# CSR splits batches this large in two halves that run on both cores.
CSR_SPLIT_BATCH = 128
# `export_sparse` keeps a layer `Dense` above this density, where a dense
# matmul is as fast as the sparse kernels at some batch size (native kernel:
# 784x300 at 10% is 0.6x of Dense at batch 1, at 5% 1.1x; 3136x1024 at 30%
# 0.4-0.6x, at 10% 1.1-2x), and below this many weights, where the kernels'
# fixed cost per call eats what they save (1024x10 at 3%: 0.8x at batch 1;
# 784x300, 235k weights, at 5% or less: 1.1-9x). TensorFlow's kernels need
# more weights: 784x300 at 0.23% is 0.9x of Dense at batch 32.
DENSE_MIN_DENSITY = 0.05
SPARSE_MIN_WEIGHTS = 100_000
SPARSE_MIN_WEIGHTS_WITHOUT_NATIVE = 1_000_000


def pays_off(density: float, weights: int, native_kernel: bool | None = None) -> bool:
    """Whether a sparse kernel beats a dense matmul for a layer with
    `weights` weights of which a fraction `density` is kept (with the
    native kernel where it is available, or as `native_kernel` says).

    Example:

    >>> pays_off(0.01, 3136 * 1024), pays_off(0.3, 3136 * 1024)
    (True, False)
    """
    if native_kernel is None:
        native_kernel = native.available()
    minimum = SPARSE_MIN_WEIGHTS if native_kernel else SPARSE_MIN_WEIGHTS_WITHOUT_NATIVE
    return density <= DENSE_MIN_DENSITY and weights >= minimum


def choose_path(
    batch_size: int | None, dtype: Any = "float32", native_kernel: bool = True
) -> str:
    """The sparse kernel for a call with `batch_size` rows of `dtype`.

    `"native"` when keras_prune's kernel is loaded, `native_kernel` allows
    it and `dtype` is float32, float16 or bfloat16 (it computes in float32);
    else TensorFlow's `"coo"` up to `COO_MAX_BATCH` rows and `"csr"` above,
    or `"auto"` for an unknown batch size (decided at run time).

    Example:

    >>> choose_path(1, "float64"), choose_path(256, "float64")
    ('coo', 'csr')
    >>> choose_path(1) == ("native" if native.available() else "coo")
    True
    """
    if native_kernel and tf.as_dtype(dtype) in NATIVE_DTYPES and native.available():
        return "native"
    if batch_size is None:
        return "auto"
    return "coo" if batch_size <= COO_MAX_BATCH else "csr"


def sparse_matmul(
    inputs: Any,
    values: Any,
    indices: Any,
    input_dim: int,
    units: int,
    path: str = "auto",
    csr: tuple[Any, Any] | None = None,
    bias: Any = None,
) -> tf.Tensor:
    """Computes `inputs @ W (+ bias)` for `W` given as COO pairs of its
    transpose.

    Inputs of any rank >= 2 are flattened to `(-1, input_dim)` and the result
    is reshaped back to `(..., units)`.

    Args:
        inputs: Tensor `(..., input_dim)`.
        values: Tensor `(nnz,)`.
        indices: int64 tensor `(nnz, 2)` of `(unit, input)` pairs, row-major.
        input_dim: Rows of `W`.
        units: Columns of `W`.
        path: `"native"`, `"coo"`, `"csr"`, `"auto"` for `choose_path`'s
            choice (at trace time; between `"coo"` and `"csr"` at run time
            when the batch size is unknown), or `"tensorflow"` for the same
            choice among TensorFlow's own kernels only. Defaults to `"auto"`.
        csr: `(row_splits, columns)`, the same pattern as int32 CSR
            (`sparse_dense.csr_from_coo`), for the native kernel; derived
            from `indices` at every call when `None` (slower). Defaults to
            `None`.
        bias: Tensor `(units,)` to add, or `None`. The native kernel adds it
            as it writes the outputs (one graph node less, which counts for
            a matrix-vector product of a few microseconds). Defaults to
            `None`.

    Example:

    >>> sparse_matmul(np.ones((1, 2), "float32"), np.array([3.0, 2.0], "float32"),
    ...               np.array([[0, 1], [1, 0]]), 2, 2).numpy()
    array([[3., 2.]], dtype=float32)
    """
    inputs = tf.convert_to_tensor(inputs)
    dtype = tf.as_dtype(getattr(values, "dtype", None) or tf.float32)
    flat = tf.cast(inputs, dtype)
    if inputs.shape.rank != 2:
        flat = tf.reshape(flat, [-1, input_dim])
    batch = flat.shape[0]
    if path in ("auto", "tensorflow"):
        path = choose_path(batch, dtype, native_kernel=path == "auto")
    if path == "native":
        if dtype not in NATIVE_DTYPES:
            raise ValueError(
                'The "native" kernel computes in float32, from float32, float16 '
                f"or bfloat16. Received: values.dtype={dtype.name}"
            )
        row_splits, columns = csr if csr is not None else _csr_of(indices, units)
        # Variables go to the kernel as they are (it reads them itself);
        # half precision is cast to float32.
        outputs = native.sparse_matmul(
            tf.cast(flat, tf.float32),
            _float32(values),
            row_splits,
            columns,
            None if bias is None else _float32(bias),
        )
        return _restore_shape(tf.cast(outputs, dtype), inputs, units)
    values = tf.convert_to_tensor(values)
    if values.dtype in (tf.float16, tf.bfloat16):
        # TensorFlow's CSR kernel has no half-precision version (and its COO
        # one is slow there): compute in float32 and cast back, as the
        # native kernel does.
        outputs = sparse_matmul(
            tf.cast(flat, tf.float32),
            tf.cast(values, tf.float32),
            indices,
            input_dim,
            units,
            path,
            bias=None if bias is None else tf.cast(bias, tf.float32),
        )
        return _restore_shape(tf.cast(outputs, values.dtype), inputs, units)
    transposed = tf.SparseTensor(indices, values, dense_shape=[units, input_dim])
    if path == "coo":
        outputs = _coo_matmul(flat, transposed, batch)
    elif path == "csr":
        outputs = _csr_matmul(flat, transposed, batch)
    else:
        outputs = tf.cond(
            tf.shape(flat)[0] <= COO_MAX_BATCH,
            lambda: _coo_matmul(flat, transposed, None),
            lambda: _csr_matmul(flat, transposed, None),
        )
    if bias is not None:
        outputs = tf.nn.bias_add(outputs, tf.cast(bias, outputs.dtype))
    return _restore_shape(outputs, inputs, units)


def _float32(operand: Any) -> Any:
    """`operand` as it is when float32 (a variable stays a variable, which
    the native kernel reads itself), else cast to float32."""
    if tf.as_dtype(operand.dtype) == tf.float32:
        return operand
    return tf.cast(operand, tf.float32)


def _csr_of(indices: Any, units: int) -> tuple[tf.Tensor, tf.Tensor]:
    """int32 `(row_splits, columns)` of COO pairs sorted by unit."""
    indices = tf.convert_to_tensor(indices, tf.int64)
    row_splits = tf.searchsorted(
        indices[:, 0], tf.range(units + 1, dtype=tf.int64), out_type=tf.int32
    )
    return row_splits, tf.cast(indices[:, 1], tf.int32)


def _restore_shape(outputs: tf.Tensor, inputs: tf.Tensor, units: int) -> tf.Tensor:
    """`(batch, units)` outputs back to `inputs`' leading dimensions."""
    if inputs.shape.rank == 2:
        return outputs
    out_shape = tf.concat([tf.shape(inputs)[:-1], [units]], axis=0)
    return tf.reshape(outputs, out_shape)


def _coo_matmul(
    flat: tf.Tensor, transposed: tf.SparseTensor, batch: int | None
) -> tf.Tensor:
    """`flat @ W` as `(W.T @ flat.T).T`; small static batches row by row."""
    if batch is not None and 1 < batch <= COO_MAX_BATCH:
        rows = tf.split(flat, batch, axis=0)
        return tf.concat([_coo_matmul(row, transposed, 1) for row in rows], 0)
    product = tf.sparse.sparse_dense_matmul(transposed, tf.transpose(flat))
    return tf.transpose(product)


def _csr_matmul(
    flat: tf.Tensor, transposed: tf.SparseTensor, batch: int | None
) -> tf.Tensor:
    """`flat @ W` with CSR `SparseMatrixMatMul`; large static batches in two
    halves, one per core."""
    matrix = tf.raw_ops.SparseTensorToCSRSparseMatrix(
        indices=transposed.indices,
        values=transposed.values,
        dense_shape=transposed.dense_shape,
    )
    halves = (
        tf.split(flat, 2, axis=0)
        if batch is not None and batch >= CSR_SPLIT_BATCH and batch % 2 == 0
        else [flat]
    )
    products = [
        tf.transpose(tf.raw_ops.SparseMatrixMatMul(a=matrix, b=tf.transpose(half)))
        for half in halves
    ]
    return products[0] if len(products) == 1 else tf.concat(products, 0)
