"""keras_prune's own CPU kernel for `SparseDense`, compiled on first use.

TensorFlow's sparse matmuls either run on one core
(`tf.sparse.sparse_dense_matmul`) or convert the matrix to CSR and transpose
both operands at every call (`SparseMatrixMatMul`). The kernel in
`kernels/sparse_matmul.cc` takes the layer's COO pairs as they are, works on
all cores, and keeps the batch in vector registers (see the source for how).

It is compiled against the installed TensorFlow by the system C++ compiler
(`$CXX`, else `c++`) the first time it is needed, in about ten seconds,
cached in `$KERAS_PRUNE_CACHE` (default `~/.cache/keras_prune`), and loaded
with `tf.load_op_library`. Where it cannot be built (no compiler, say),
`available()` is `False`, one warning says why, and `SparseDense` uses
TensorFlow's kernels. `KERAS_PRUNE_NATIVE=0` turns it off.

A graph that uses it (a SavedModel exported from a model whose `SparseDense`
layers run it) can only be loaded where the kernel is loaded: call `load()`
before `tf.saved_model.load`, or export with `compute="csr"` for a
SavedModel that plain TensorFlow serves.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path
from types import ModuleType

import tensorflow as tf

SOURCE = Path(__file__).parent / "kernels" / "sparse_matmul.cc"
OP_NAME = "KerasPruneSparseMatMul"

_library: ModuleType | None = None
_failure: str | None = None


def cache_dir() -> Path:
    """Where compiled kernels are kept: `$KERAS_PRUNE_CACHE`, else
    `~/.cache/keras_prune` (under `$XDG_CACHE_HOME` when set).

    Example:

    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"KERAS_PRUNE_CACHE": "/tmp/kernels"}):
    ...     print(cache_dir())
    /tmp/kernels
    """
    if os.environ.get("KERAS_PRUNE_CACHE"):
        return Path(os.environ["KERAS_PRUNE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "keras_prune"


def _cpu_flags() -> list[str]:
    """AVX2 and FMA when this x86 CPU has them (Linux tells in /proc)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set(cpuinfo.split())
    return ["-mavx2", "-mfma"] if {"avx2", "fma"} <= flags else []


def compile_command(output: Path) -> list[str]:
    """The command that builds the kernel into `output`.

    Example:

    >>> command = compile_command(Path("kernel.so"))
    >>> command[-2:]
    ['-o', 'kernel.so']
    """
    return [
        os.environ.get("CXX", "c++"),
        "-std=c++17",
        "-O3",
        "-shared",
        "-fPIC",
        *_cpu_flags(),
        str(SOURCE),
        *tf.sysconfig.get_compile_flags(),
        *tf.sysconfig.get_link_flags(),
        "-o",
        str(output),
    ]


def library_path() -> Path:
    """The cached library for this source, TensorFlow and CPU.

    Example:

    >>> library_path().suffix
    '.so'
    """
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(" ".join(compile_command(Path("-"))).encode())
    key.update(tf.__version__.encode())
    return cache_dir() / f"sparse_matmul-{key.hexdigest()[:16]}.so"


def _build(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: other processes never see half a
    # library, and two builds at once just both finish.
    descriptor, partial = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(descriptor)
    try:
        result = subprocess.run(
            compile_command(Path(partial)), capture_output=True, text=True
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(compile_command(path))} failed:\n{result.stderr[-2000:]}"
            )
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def load() -> ModuleType | None:
    """Builds (once per machine) and loads the kernel; `None` if it cannot.

    Returns:
        The op library, whose `keras_prune_sparse_mat_mul` is the kernel, or
        `None` when it is turned off or could not be built (a warning says
        why, once).

    Example:

    >>> library = load()
    >>> (library is None) == (failure() is not None)
    True
    """
    global _library, _failure
    if _library is not None or _failure is not None:
        return _library
    if os.environ.get("KERAS_PRUNE_NATIVE", "1") == "0":
        _failure = "KERAS_PRUNE_NATIVE=0"
        return None
    try:
        path = library_path()
        if not path.exists():
            _build(path)
        _library = tf.load_op_library(str(path))
    except (OSError, RuntimeError, tf.errors.OpError) as error:
        _failure = str(error)
        warnings.warn(
            "keras_prune could not build its sparse kernel; SparseDense uses "
            f"TensorFlow's (slower) sparse kernels instead. Reason: {error}",
            stacklevel=2,
        )
    return _library


def available() -> bool:
    """Whether the kernel is loaded (building it first if needed).

    Example:

    >>> available() == (load() is not None)
    True
    """
    return load() is not None


def failure() -> str | None:
    """Why the kernel is not available (the build error, or
    `"KERAS_PRUNE_NATIVE=0"`), or `None` when it is loaded.

    Example:

    >>> (failure() is None) == available()
    True
    """
    load()
    return _failure


def sparse_matmul(
    inputs: tf.Tensor, values: tf.Tensor, indices: tf.Tensor, units: int
) -> tf.Tensor:
    """`inputs @ W` with the kernel, `W` given as COO pairs of its transpose.

    Args:
        inputs: float32 tensor `(batch, input_dim)`.
        values: float32 tensor `(nnz,)`.
        indices: int64 tensor `(nnz, 2)` of `(unit, input)` pairs sorted by
            unit, as `sparse_dense.coo_from_kernel` makes them.
        units: Columns of `W`.

    Raises:
        RuntimeError: If the kernel is not available (see `failure()`).

    Example:

    >>> sparse_matmul(tf.ones((1, 2)), tf.constant([3.0, 2.0]),
    ...               tf.constant([[0, 1], [1, 0]], tf.int64), 2).numpy()
    array([[3., 2.]], dtype=float32)
    """
    library = load()
    if library is None:
        raise RuntimeError(
            f"keras_prune's sparse kernel is not available: {failure()}. "
            'Use compute="coo" or "csr".'
        )
    return library.keras_prune_sparse_mat_mul(inputs, values, indices, units=units)


@tf.RegisterGradient(OP_NAME)
def _sparse_matmul_gradient(op, upstream):
    """Gradients for `y = x @ W`: `dx = dy @ W.T`, and for each nonzero
    `(unit, input)`, the sum over rows of `dy[:, unit] * x[:, input]`."""
    inputs, values, indices = op.inputs
    transposed = tf.SparseTensor(
        indices,
        values,
        tf.stack([tf.shape(upstream, tf.int64)[1], tf.shape(inputs, tf.int64)[1]]),
    )
    # (W.T)^T @ dy^T = W @ dy^T, transposed back: dy @ W.T.
    d_inputs = tf.transpose(
        tf.sparse.sparse_dense_matmul(
            transposed, upstream, adjoint_a=True, adjoint_b=True
        )
    )
    d_values = tf.reduce_sum(
        tf.gather(upstream, indices[:, 0], axis=1)
        * tf.gather(inputs, indices[:, 1], axis=1),
        axis=0,
    )
    return d_inputs, d_values, None
