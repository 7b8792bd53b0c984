"""keras_prune's own CPU kernel for `SparseDense`, compiled on first use.

TensorFlow's sparse matmuls either run on one core
(`tf.sparse.sparse_dense_matmul`) or convert the matrix to CSR and transpose
both operands at every call (`SparseMatrixMatMul`). The kernel in
`kernels/sparse_matmul.cc` takes an int32 CSR form of the layer's nonzeros
that `SparseDense` derives once (not per call), works on all cores, and keeps
the batch in vector registers (see the source for how).

For batches of up to 4 rows the kernel loads the inputs that eight nonzeros
need either with the CPU's gather instruction or with eight scalar loads:
gathers win on recent Intel cores and lose on AMD Zen cores. The first time
the kernel loads on a machine it times both (a few milliseconds, like FFTW's
planner), keeps the faster, and caches the choice beside the library;
`plan()` says which and why, `KERAS_PRUNE_LOADS=gather|scalar` or
`set_loads` forces one.

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

import ctypes
import functools
import hashlib
import json
import os
import platform
import subprocess
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import keras
import tensorflow as tf

try:  # what a variable read calls (TensorFlow's, not public API)
    from tensorflow.python.ops.resource_variable_ops import (
        variable_accessed as _variable_accessed,
    )
except ImportError:  # then the kernel takes the variables' values as tensors
    _variable_accessed = None

SOURCE = Path(__file__).parent / "kernels" / "sparse_matmul.cc"
OP_NAME = "KerasPruneCsrMatMul"
LOADS = ("scalar", "gather")  # in the kernel's numbering: 0, 1
SMALL_BATCH = 4  # the most rows the small-batch loop takes (kGatherMaxBatch)
# The products timed to choose the loads: the seed network's fc1 at 1% and
# 0.23% kept, one row (the serving case), each the fastest of REPEATS.
PLAN_PROBLEMS = ((3136, 1024, 0.01), (3136, 1024, 0.0023))
PLAN_REPEATS = 100

_library: ModuleType | None = None
_failure: str | None = None
_functions: ctypes.CDLL | None = None
_measured: Plan | None = None
_plan: Plan | None = None


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


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (Linux), else `{}`;
    read once a process."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in lines:  # "key<tabs>: value"
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_description() -> str:
    """The CPU's model name and the vector flags the kernel cares about
    (Linux), or the architecture alone elsewhere.

    Example:

    >>> cpu_description()  # doctest: +SKIP
    'AMD EPYC (avx2 fma avx512f avx512vl)'
    """
    fields = _cpuinfo()
    flags = set(fields.get("flags", "").split())
    wanted = ("avx2", "fma", "avx512f", "avx512vl")
    vector = " ".join(flag for flag in wanted if flag in flags) or "no AVX2"
    return f"{fields.get('model name') or platform.machine()} ({vector})"


def _cpu_flags() -> list[str]:
    """AVX2 and FMA when this x86 CPU has them (Linux tells in /proc)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    flags = set(_cpuinfo().get("flags", "").split())
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

    Loading also chooses the small-batch loads (see `plan()`).

    Returns:
        The op library, whose `keras_prune_csr_mat_mul` is the kernel, or
        `None` when it is turned off or could not be built (a warning says
        why, once).

    Raises:
        ValueError: If `KERAS_PRUNE_LOADS` is set to something other than
            `"gather"` or `"scalar"`, or to loads this build lacks.

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
        library = tf.load_op_library(str(path))
    except (OSError, RuntimeError, tf.errors.OpError) as error:
        _failure = str(error)
        warnings.warn(
            "keras_prune could not build its sparse kernel; SparseDense uses "
            f"TensorFlow's (slower) sparse kernels instead. Reason: {error}",
            stacklevel=2,
        )
        return None
    _start_plan(path)
    _library = library
    return _library


@dataclass(frozen=True)
class Plan:
    """How the kernel's small-batch loop (1 to 4 rows) loads its inputs.

    Attributes:
        loads: `"gather"` (the CPU's gather instruction, eight inputs at a
            time) or `"scalar"` (eight scalar loads).
        chosen_by: `"measurement"` (the faster on `PLAN_PROBLEMS` on this
            CPU), `"KERAS_PRUNE_LOADS"`, `"set_loads"`, or why only one was
            possible.
        built: The loads this build of the kernel has (`"gather"` needs
            AVX2).
        timings: Microseconds per planning product (the sum over
            `PLAN_PROBLEMS` of the fastest of `PLAN_REPEATS`) by loads;
            empty where they were not measured.
        cpu: `cpu_description()` of the CPU measured.

    Example:

    >>> example = Plan("scalar", "measurement", ("scalar", "gather"),
    ...                {"scalar": 14.5, "gather": 18.0}, "AMD EPYC (avx2 fma)")
    >>> print(example)
    scalar loads (measurement: scalar 14.5 us, gather 18.0 us; AMD EPYC (avx2 fma))
    """

    loads: str
    chosen_by: str
    built: tuple[str, ...]
    timings: dict[str, float] = field(default_factory=dict)
    cpu: str = ""

    def __str__(self) -> str:
        timings = ", ".join(f"{name} {us:.1f} us" for name, us in self.timings.items())
        return f"{self.loads} loads ({self.chosen_by}: {timings}; {self.cpu})"


def plan_path() -> Path:
    """Where the loads timed on this CPU are cached: beside the library,
    named after it and the CPU's model and flags (delete it to measure
    again).

    Example:

    >>> plan_path().name.startswith(library_path().stem)
    True
    """
    return _plan_path(library_path())


def _plan_path(library: Path) -> Path:
    cpu = hashlib.sha256(_cpuinfo().get("flags", "").encode())
    cpu.update(cpu_description().encode())
    return library.with_name(f"{library.stem}-{cpu.hexdigest()[:12]}.plan.json")


def _measure(functions: ctypes.CDLL, built: tuple[str, ...]) -> dict[str, float]:
    """Microseconds per planning product for each of `built`, timed in
    turns (three rounds, the fastest of each) so that a slow spell of the
    machine does not land on one only."""
    timings = dict.fromkeys(built, 0.0)
    for problem in PLAN_PROBLEMS:
        best = dict.fromkeys(built, float("inf"))
        for _ in range(3):
            for name in built:
                nanos = functions.keras_prune_time_loads(
                    LOADS.index(name), *problem, PLAN_REPEATS
                )
                if nanos < 0:
                    raise RuntimeError(f"the kernel refused to time {problem}")
                best[name] = min(best[name], nanos)
        for name in built:
            timings[name] += best[name] / 1e3
    return timings


def _start_plan(library: Path) -> None:
    """Opens the library's plain C functions, reads or measures the plan of
    this CPU (caching it beside the library) and applies it, with
    `KERAS_PRUNE_LOADS` overriding the measurement."""
    global _functions, _measured
    functions = ctypes.CDLL(str(library))
    functions.keras_prune_time_loads.restype = ctypes.c_double
    functions.keras_prune_time_loads.argtypes = [
        ctypes.c_int,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_double,
        ctypes.c_int,
    ]
    built = LOADS if functions.keras_prune_gather_loads_built() else LOADS[:1]
    forced = os.environ.get("KERAS_PRUNE_LOADS")
    if forced is not None and forced not in built:
        raise ValueError(
            f"Expected KERAS_PRUNE_LOADS to be one of {list(built)} (the loads "
            f"this build of the kernel has). Received: KERAS_PRUNE_LOADS={forced!r}"
        )
    _functions = functions
    path = _plan_path(library)
    cpu = cpu_description()
    try:
        cached = json.loads(path.read_text())
        timings = {name: float(cached["timings"][name]) for name in built}
    except (OSError, ValueError, KeyError, TypeError):
        timings = _measure(functions, built)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        try:  # a read-only cache only costs measuring again next time
            partial.write_text(json.dumps({"cpu": cpu, "timings": timings}))
            os.replace(partial, path)
        except OSError:
            pass
    if len(built) == 1:
        _measured = Plan(
            "scalar", "the only loads built (no AVX2)", built, timings, cpu
        )
    else:
        fastest = min(built, key=timings.__getitem__)
        _measured = Plan(fastest, "measurement", built, timings, cpu)
    _apply(_chosen_at_load())


def _chosen_at_load() -> Plan:
    """The measured plan, or the loads `KERAS_PRUNE_LOADS` forces."""
    forced = os.environ.get("KERAS_PRUNE_LOADS")
    assert _measured is not None
    return _measured if forced is None else _forced(forced, "KERAS_PRUNE_LOADS")


def _forced(loads: str, by: str) -> Plan:
    """The measured plan with `loads` forced `by` an override."""
    assert _measured is not None
    return Plan(loads, by, _measured.built, _measured.timings, _measured.cpu)


def _apply(plan: Plan) -> None:
    global _plan
    assert _functions is not None
    _functions.keras_prune_set_loads(LOADS.index(plan.loads))
    _plan = plan


def plan() -> Plan | None:
    """How the kernel's small-batch loop loads its inputs on this machine
    (building and loading the kernel first if needed); `None` without the
    kernel.

    Example:

    >>> current = plan()
    >>> current is None or current.loads in current.built
    True
    """
    load()
    return _plan


def set_loads(loads: str | None) -> None:
    """Forces the kernel's small-batch loads for this process: `"gather"`
    or `"scalar"`, or `None` for the plan chosen at load (measured, or
    `KERAS_PRUNE_LOADS`). Calls already running keep theirs.

    Raises:
        RuntimeError: If the kernel is not available (see `failure()`).
        ValueError: If `loads` is not one this build has (`plan().built`).

    Example:

    >>> if available():
    ...     set_loads("scalar")
    ...     assert (plan().loads, plan().chosen_by) == ("scalar", "set_loads")
    ...     set_loads(None)
    """
    current = plan()
    if current is None:
        raise RuntimeError(f"keras_prune's sparse kernel is not available: {failure()}")
    if loads is None:
        _apply(_chosen_at_load())
    elif loads in current.built:
        _apply(_forced(loads, "set_loads"))
    else:
        raise ValueError(
            f"Expected `loads` to be one of {list(current.built)} or None. "
            f"Received: loads={loads!r}"
        )


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
    inputs: Any,
    values: Any,
    row_splits: Any,
    columns: Any,
    bias: Any = None,
) -> tf.Tensor:
    """`inputs @ W + bias` with the kernel, `W` given as int32 CSR of its
    transpose.

    When `values`, `row_splits`, `columns` and `bias` (if any) are all
    variables (float32, int32, int32, float32; `tf.Variable` or Keras
    variables), the kernel reads them itself, without a `ReadVariableOp`
    node each: at batch 1 a product takes microseconds, and each node costs
    a fraction of one. Gradients flow to the variables either way.

    Args:
        inputs: float32 tensor `(batch, input_dim)`.
        values: float32 tensor or variable `(nnz,)`.
        row_splits: int32 tensor or variable `(units + 1,)`: unit `u`'s
            nonzeros are `values[row_splits[u]:row_splits[u + 1]]`.
        columns: int32 tensor or variable `(nnz,)`: the input each nonzero
            reads. `sparse_dense.csr_from_coo` makes both from COO pairs.
        bias: float32 tensor or variable `(units,)`, added as the outputs
            are written, or `None`. Defaults to `None`.

    Raises:
        RuntimeError: If the kernel is not available (see `failure()`).
        tf.errors.InvalidArgumentError: If the row splits decrease or leave
            `[0, nnz]`, or a column leaves `[0, input_dim)`.

    Example:

    >>> sparse_matmul(tf.ones((1, 2)), tf.constant([3.0, 2.0]),
    ...               tf.constant([0, 1, 2]), tf.constant([1, 0])).numpy()
    array([[3., 2.]], dtype=float32)
    """
    library = load()
    if library is None:
        raise RuntimeError(
            f"keras_prune's sparse kernel is not available: {failure()}. "
            'Use compute="coo" or "csr".'
        )
    operands = (values, row_splits, columns) + (() if bias is None else (bias,))
    variables = [
        variable
        for variable in map(_variable, operands)
        if variable is not None and variable.shape.rank == 1
    ]
    dtypes = [tf.float32, tf.int32, tf.int32, tf.float32][: len(operands)]
    if _variable_accessed is not None and [v.dtype for v in variables] == dtypes:
        for variable in variables:
            # What reading it would do: gradient tapes and the function
            # being traced watch it.
            _variable_accessed(variable)
        return library.keras_prune_csr_mat_mul_variables(
            inputs,
            *(variable.handle for variable in variables[:3]),
            [variable.handle for variable in variables[3:]],
            units=int(row_splits.shape[0]) - 1,
        )
    if bias is None:
        bias = tf.zeros([0])
    return library.keras_prune_csr_mat_mul(inputs, values, row_splits, columns, bias)


def _variable(operand: Any) -> tf.Variable | None:
    """The `tf.Variable` behind `operand` (itself, or a Keras variable's),
    or `None` for a tensor."""
    if isinstance(operand, keras.Variable):
        operand = operand.value
    return operand if isinstance(operand, tf.Variable) else None


def _gradients(inputs, values, row_splits, columns, upstream):
    """For `y = x @ W + bias`: `dx = dy @ W.T`, for each nonzero
    `(unit, input)` the sum over rows of `dy[:, unit] * x[:, input]`, and
    `dbias`, the sum over rows of `dy`."""
    units = tf.cast(tf.ragged.row_splits_to_segment_ids(row_splits), tf.int64)
    inputs_of = tf.cast(columns, tf.int64)
    transposed = tf.SparseTensor(
        tf.stack([units, inputs_of], axis=1),
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
        tf.gather(upstream, units, axis=1) * tf.gather(inputs, inputs_of, axis=1),
        axis=0,
    )
    return d_inputs, d_values, tf.reduce_sum(upstream, axis=0)


@tf.RegisterGradient(OP_NAME)
def _sparse_matmul_gradient(op, upstream):
    inputs, values, row_splits, columns, bias = op.inputs
    d_inputs, d_values, d_bias = _gradients(
        inputs, values, row_splits, columns, upstream
    )
    return d_inputs, d_values, None, None, d_bias[: tf.shape(bias)[0]]


@tf.RegisterGradient(OP_NAME + "Variables")
def _variables_gradient(op, upstream):
    """The same gradients, for the variables the op read (the tape maps a
    gradient for a variable's handle to the variable)."""
    inputs, values, row_splits, columns, *bias = op.inputs
    read = tf.raw_ops.ReadVariableOp
    d_inputs, d_values, d_bias = _gradients(
        inputs,
        read(resource=values, dtype=tf.float32),
        read(resource=row_splits, dtype=tf.int32),
        read(resource=columns, dtype=tf.int32),
        upstream,
    )
    return (d_inputs, d_values, None, None, *([d_bias] if bias else []))
