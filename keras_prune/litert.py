"""`export_litert`: a pruned model as a LiteRT (`.tflite`) file whose pruned
weights are stored sparse and run TFLite's sparse kernels, checked against
the Keras model before it is written.

How it works: the masks are stripped (each masked layer becomes its stock
layer holding `weight * mask`; a `SparseDense` becomes a `Dense`), Keras
exports the model (`model.export(format="litert")`, TFLite builtins only),
and the converter's sparsity optimization (`tf.lite.Optimize.
EXPERIMENTAL_SPARSITY`) stores weights with enough zeros in TFLite's sparse
format. The file is then read back: per layer, whether its weights are
stored sparse and whether a `DENSIFY` op expands them when the model loads
(so the layer runs dense), the file size, the outputs against the Keras
model's, and the batch-1 latency against the same model converted dense.

What runs sparse (TensorFlow 2.21, LiteRT 2.3): only `FULLY_CONNECTED`
(Dense) has a sparse kernel, and the converter keeps a weight sparse for it
when it is sparse enough (1x4 blocks of inputs, see
`IterativePruningCallback(granularity=(1, 4))`, pass at 90% zeros and
more; random masks need more zeros). Other weights (convolutions) are
stored sparse only to make the file smaller and are densified at load.

Known LiteRT defects this module guards against (found by the output
check, measured on the seed network's head):
- int8 (dynamic range) sparse weights give wrong outputs (relative error
  2-5) or fail to prepare under the default XNNPACK delegate; without the
  default delegates they are correct and fast. Such a file is written with
  a warning that says how to load it.
- int8 sparse weights can also crash the process under the default
  XNNPACK delegate (a segmentation fault while it prepares them): such a
  file is never loaded with the default resolver (the check skips it,
  `predict` refuses it), and every check runs LiteRT in a child process
  (`litert_interpreter.run_isolated`), so that a crash is a failed check.
- float16 sparse weights are read wrongly on every resolver (NaN
  outputs, or a segmentation fault in a fresh process): refused.

Reference: TensorFlow Lite's sparsity format (`SparsityParameters` in
`schema.fbs`) and Elsen et al. 2020, "Fast Sparse ConvNets",
arXiv:1911.09723 (XNNPACK's sparse inference).
"""

from __future__ import annotations

import dataclasses
import os
import re
import statistics
import tempfile
import time
import warnings
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_prune.convert import _check_model, _clone_functional, strip_pruning
from keras_prune.inference.backend import tensorflow_module
from keras_prune.litert_interpreter import (
    RESOLVERS,
    litert_modules,
    load,
    run,
    run_isolated,
)
from keras_prune.masking import (
    find_prunable_weights,
    is_graph_model,
    is_plain_graph_model,
    is_prunable,
)

QUANTIZATIONS = ("float", "float16", "int8")
# Largest accepted output error, `max |tflite - keras| / max |keras|`:
# float32 round-off; half-precision weights; 8-bit weights (dynamic range).
TOLERANCE = {"float": 1e-4, "float16": 1e-2, "int8": 5e-2}
LOAD_WITHOUT_DELEGATES = (
    "Interpreter(model_path=..., experimental_op_resolver_type="
    "OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)"
)


@dataclasses.dataclass(frozen=True)
class LiteRTWeight:
    """One weight tensor of a pruned layer in a `.tflite` file.

    Attributes:
        layer: The Keras layer's name.
        shape: The tensor's shape in the file (TFLite's layout: a Dense
            kernel is `(units, input_dim)`).
        kept: Fraction of the weights that are nonzero in the Keras model.
        storage: `"sparse"`, `"sparse, 1x4 blocks"` (or other block sizes)
            or `"dense"`.
        runs: `"sparse kernel"`; `"dense (DENSIFY at load)"` when the file
            stores it sparse but a `DENSIFY` op expands it; or `"dense"`
            (`"not found"`, with `storage`, where no tensor of the file could
            be matched to the weight).
        bytes: Bytes the tensor's values and indices take in the file.
    """

    layer: str
    shape: tuple[int, ...]
    kept: float
    storage: str
    runs: str
    bytes: int


@dataclasses.dataclass(frozen=True)
class LiteRTReport:
    """What `export_litert` wrote and measured.

    Attributes:
        path: The `.tflite` file.
        quantization: `"float"`, `"float16"` or `"int8"`.
        bytes: Size of the file.
        dense_bytes: Size of the same model converted without sparsity
            (same quantization), or `None` with `compare=False`.
        latency_ms: Median batch-1 latency of the file, one thread, in ms.
        dense_latency_ms: The same for the dense file (LiteRT's default
            resolver), or `None`.
        max_error: `max |tflite - keras| / max |keras|` over the sample.
        resolver: `"default"`, or `"without_default_delegates"` when the
            file must be loaded without LiteRT's default delegates to be
            correct (see `load_hint`).
        weights: One `LiteRTWeight` per weight tensor of a pruned layer.
    """

    path: str
    quantization: str
    bytes: int
    dense_bytes: int | None
    latency_ms: float | None
    dense_latency_ms: float | None
    max_error: float
    resolver: str
    weights: tuple[LiteRTWeight, ...]

    @property
    def speedup(self) -> float | None:
        """Dense latency over sparse latency, or `None` if not measured."""
        if self.latency_ms is None or self.dense_latency_ms is None:
            return None
        return self.dense_latency_ms / self.latency_ms

    @property
    def load_hint(self) -> str:
        """How to load the file with LiteRT's Python `Interpreter`."""
        if self.resolver == "default":
            return "Interpreter(model_path=...)"
        return LOAD_WITHOUT_DELEGATES

    def __str__(self) -> str:
        header = ("layer", "shape", "kept", "stored", "runs", "bytes")
        rows = [
            (
                w.layer,
                "x".join(map(str, w.shape)),
                f"{w.kept:.2%}",
                w.storage,
                w.runs,
                f"{w.bytes:,}",
            )
            for w in self.weights
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(6)]
        lines = [
            "  ".join(
                cell.ljust(width) for cell, width in zip(row, widths, strict=True)
            )
            for row in [header, *rows]
        ]
        lines.insert(1, "  ".join("-" * width for width in widths))
        size = f"{self.path}: {self.bytes:,} bytes ({self.quantization})"
        if self.dense_bytes:
            size += f", {self.bytes / self.dense_bytes:.1%} of the dense .tflite"
        lines += ["", size]
        if self.latency_ms is not None:
            timing = f"batch-1 latency {self.latency_ms:.4f} ms"
            if self.speedup is not None:
                timing += f", dense .tflite {self.dense_latency_ms:.4f} ms: " + (
                    f"{self.speedup:.1f}x faster"
                    if self.speedup >= 1
                    else f"{1 / self.speedup:.1f}x slower"
                )
            lines.append(timing)
        lines.append(
            f"max |tflite - keras| / max |keras| = {self.max_error:.2e}; "
            f"load with {self.load_hint}"
        )
        return "\n".join(lines)


def _stock_model(model: keras.Model) -> keras.Model:
    """`model` with stock layers only: masks stripped, `SparseDense` back to
    `Dense` (a converted `SparseDense` runs gathers, not TFLite's sparse
    kernel)."""
    from keras_prune.inference.sparse_dense import SparseDense

    def replace(layer: keras.layers.Layer) -> keras.layers.Layer | None:
        if not isinstance(layer, SparseDense):
            return None
        dense = keras.layers.Dense(
            layer.units,
            activation=layer.activation,
            use_bias=layer.use_bias,
            name=layer.name,
            dtype=layer.dtype_policy,
        )
        dense.build((None, layer.input_dim))
        dense.kernel.assign(layer.dense_kernel())
        if layer.bias is not None:
            dense.bias.assign(ops.convert_to_numpy(layer.bias))
        return dense

    if is_plain_graph_model(model):
        return strip_pruning(_clone_functional(model, replace), inplace=True)
    return strip_pruning(model)


def _why_wrong(quantization: str, weights: list[LiteRTWeight]) -> str:
    """The known LiteRT defect behind a file with wrong outputs, if any
    (`weights`: the file's pruned weights, from `_weights_report`)."""
    if quantization == "float16":
        return (
            "LiteRT dequantizes sparse float16 weights wrongly: use "
            'quantization="float" or "int8".'
        )
    blocked = [
        w.layer
        for w in weights
        if w.runs == "sparse kernel" and w.shape and w.shape[-1] % 4
    ]
    if blocked:
        return (
            f"LiteRT's sparse FULLY_CONNECTED kernel computes {blocked} wrongly: "
            "their input size is not a multiple of 4, its block size. Pad their "
            "inputs to a multiple of 4, or keep those layers less sparse."
        )
    return "Try another quantization."


def _convert(model: keras.Model, quantization: str, sparsity: bool) -> bytes:
    import tensorflow as tf

    optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY] if sparsity else []
    target_spec: dict[str, Any] = {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS]}
    if quantization != "float":
        optimizations.append(tf.lite.Optimize.DEFAULT)
    if quantization == "float16":
        target_spec["supported_types"] = [tf.float16]
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.tflite")
        try:
            model.export(
                path,
                format="litert",
                verbose=False,
                optimizations=optimizations,
                target_spec=target_spec,
            )
        except Exception as error:  # noqa: BLE001 - the converter's own errors
            first = str(error).strip().splitlines()[0][:300] if str(error) else ""
            recurrent = any(
                isinstance(layer, keras.layers.RNN)
                for layer in model._flatten_layers(include_self=False)
            )
            hint = (
                " Recurrent layers (LSTM, GRU) need TensorFlow ops that "
                "LiteRT's builtin interpreter lacks."
                if recurrent
                else ""
            )
            raise ValueError(
                f"TFLite's converter cannot express model {model.name!r} with "
                f"TFLite builtin ops ({type(error).__name__}: {first}).{hint}"
            ) from error
        with open(path, "rb") as file:
            return file.read()


def _tensors(content: bytes) -> list[dict[str, Any]]:
    """The constant tensors of a `.tflite` flatbuffer: name, shape, block
    size (`None`: stored dense), whether a DENSIFY op reads it, whether it
    holds int8 values, bytes."""
    _, _, schema = litert_modules()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(content, 0))
    names = {
        value: name for name, value in vars(schema.BuiltinOperator).items()
        if not name.startswith("_")
    }  # fmt: skip
    found = []
    for graph in model.subgraphs:
        densified: set[int] = set()
        for operator in graph.operators:
            code = model.operatorCodes[operator.opcodeIndex]
            op = names.get(max(code.builtinCode, code.deprecatedBuiltinCode))
            if op == "DENSIFY":
                densified.update(int(i) for i in operator.inputs)
        for index, tensor in enumerate(graph.tensors):
            data = model.buffers[tensor.buffer].data
            if data is None or len(data) == 0:
                continue
            block = None
            if tensor.sparsity is not None:
                block_map = tensor.sparsity.blockMap
                dims = tensor.sparsity.dimMetadata
                block = tuple(
                    int(dims[len(tensor.shape) + k].denseSize)
                    for k in range(0 if block_map is None else len(block_map))
                )
                block_dims = [] if block_map is None else [int(d) for d in block_map]
                block = _block_shape(len(tensor.shape), block_dims, block)
            found.append(
                {
                    "name": tensor.name.decode(),
                    "shape": tuple(int(n) for n in tensor.shape),
                    "block": block,
                    "densified": index in densified,
                    "int8": tensor.type == schema.TensorType.INT8,
                    "bytes": _sparse_bytes(tensor, len(data)),
                }
            )
    return found


def _block_shape(rank: int, block_dims: list[int], sizes: tuple) -> tuple:
    """The block a sparse tensor is stored in, `(1, 1)` for single weights."""
    shape = [1] * rank
    for dim, size in zip(block_dims, sizes, strict=True):
        shape[dim] = size
    return tuple(shape)


def _sparse_bytes(tensor: Any, data_bytes: int) -> int:
    """Bytes of a tensor's values plus, if sparse, its index arrays."""
    total = data_bytes
    if tensor.sparsity is not None:
        for dim in tensor.sparsity.dimMetadata:
            for vector in (dim.arraySegments, dim.arrayIndices):
                if vector is not None and vector.values is not None:
                    total += np.asarray(vector.values).nbytes
    return total


def _pruned_weights(model: keras.Model) -> list[tuple[str, int, float]]:
    """`(layer name, size, kept fraction)` of each prunable weight of the
    stock `model` that holds zeros."""
    found = []
    for layer in model._flatten_layers(include_self=False):
        if not is_prunable(layer) or not layer.built:  # unbuilt: never called
            continue
        for weight in find_prunable_weights(layer):
            values = ops.convert_to_numpy(weight)
            if values.size and not values.all():
                found.append((layer.name, values.size, float(np.mean(values != 0))))
    return found


def _weights_report(
    pruned: list[tuple[str, int, float]], tensors: list[dict[str, Any]]
) -> list[LiteRTWeight]:
    """Matches each pruned weight to its `.tflite` tensor: the one named
    after its layer (`.../fc1_1/MatMul`) with as many elements, else the
    only unclaimed one with as many elements (the converter renames the
    last layer's weights after the model's output)."""
    claimed: dict[int, int] = {}  # pruned weight -> tensor
    for by_name in (True, False):
        for i, (name, size, _) in enumerate(pruned):
            if i in claimed:
                continue
            pattern = re.compile(rf"(^|/){re.escape(name)}(_\d+)?(/|;|$)")
            candidates = [
                j
                for j, tensor in enumerate(tensors)
                if j not in claimed.values()
                and int(np.prod(tensor["shape"])) == size
                and (not by_name or pattern.search(tensor["name"]))
            ]
            if candidates and (by_name or len(candidates) == 1):
                claimed[i] = candidates[0]
    rows = []
    for i, (name, _, kept) in enumerate(pruned):
        if i not in claimed:
            rows.append(LiteRTWeight(name, (), kept, "not found", "not found", 0))
            continue
        tensor = tensors[claimed[i]]
        block = tensor["block"]
        if block is None:
            storage, runs = "dense", "dense"
        else:
            storage = "sparse"
            if max(block) > 1:
                storage += ", " + "x".join(map(str, block)) + " blocks"
            runs = "dense (DENSIFY at load)" if tensor["densified"] else "sparse kernel"
        rows.append(
            LiteRTWeight(name, tensor["shape"], kept, storage, runs, tensor["bytes"])
        )
    return rows


def _error(got: np.ndarray, expected: np.ndarray) -> float:
    """`max |got - expected| / max |expected|`: relative to the outputs'
    scale, so that small outputs do not hide a wrong file."""
    expected = np.asarray(expected, dtype="float64")
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-30)
    difference = np.abs(np.asarray(got, dtype="float64") - expected)
    if not np.all(np.isfinite(difference)):
        return float("inf")
    return float(difference.max(initial=0.0)) / scale


def _int8_sparse(tensors: list[dict[str, Any]]) -> bool:
    """Whether a file's tensors (from `_tensors`) hold int8 weights stored
    sparse, which LiteRT 2.3's XNNPACK delegate (its default resolver)
    computes wrongly or crashes the process on while preparing them."""
    return any(tensor["int8"] and tensor["block"] is not None for tensor in tensors)


def _check(
    content: bytes,
    tensors: list[dict[str, Any]],
    sample: Any,
    expected: np.ndarray,
    tolerance: float,
) -> tuple[str, float, list[str]]:
    """The first resolver under which `content` (its `tensors` from
    `_tensors`) reproduces `expected`, its error, and what went wrong under
    the resolvers tried before it. Each resolver runs the file in a child
    process: a crash inside LiteRT is a failure of that resolver, not of
    the user's process."""
    failures = []
    for resolver in RESOLVERS:
        if resolver == "default" and _int8_sparse(tensors):
            failures.append(
                "default: not tried (int8 sparse weights, which LiteRT's XNNPACK "
                "delegate computes wrongly or crashes on)"
            )
            continue
        try:
            got = run_isolated(content, resolver, sample)
        except RuntimeError as failure:
            failures.append(f"{resolver}: fails to run ({str(failure).strip()[:200]})")
            continue
        error = _error(got, expected)
        if error <= tolerance:
            return resolver, error, failures
        failures.append(f"{resolver}: wrong outputs (error {error:.3g})")
    return "", float("inf"), failures


def _latencies(
    contents: dict[str, tuple[bytes, str]], row: Any, repeats: int
) -> dict[str, float]:
    """Median batch-1 latency (ms) of each `(content, resolver)`, one thread,
    timed in turns so that both see the same machine load."""
    interpreters = {
        name: load(content, resolver, 1)
        for name, (content, resolver) in contents.items()
    }
    for interpreter in interpreters.values():
        for _ in range(5):
            run(interpreter, row)
    times: dict[str, list[float]] = {name: [] for name in interpreters}
    for _ in range(repeats):
        for name, interpreter in interpreters.items():
            start = time.perf_counter()
            interpreter.invoke()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def _default_input(tensor: Any, rows: int = 8) -> np.ndarray:
    shape = tensor.shape[1:]
    if any(size is None for size in shape):
        raise ValueError(
            "Expected `sample` for a model whose input shape has unknown sizes. "
            f"Received: sample=None, input {tensor.name!r} of shape {tensor.shape}"
        )
    dtype = keras.backend.standardize_dtype(tensor.dtype)
    if "int" in dtype:
        return np.zeros((rows, *shape), dtype=dtype)
    return np.random.default_rng(0).normal(size=(rows, *shape)).astype(dtype)


def _sample(model: keras.Model, sample: Any) -> Any:
    """The inputs to check the file on: an array for a model with one input,
    `{input name: array}` for several (given as a dict by name or a list in
    the order of `model.inputs`); validated against the inputs' shapes."""
    tensors = list(model.inputs)
    if len(tensors) == 1:
        given = {tensors[0].name: sample} if sample is not None else {}
    elif sample is None:
        given = {}
    elif isinstance(sample, dict):
        given = dict(sample)
        inputs = model.input  # several inputs: the model has been called
        if isinstance(inputs, dict) and sorted(given) == sorted(inputs):
            given = {inputs[key].name: value for key, value in given.items()}
    elif isinstance(sample, list | tuple) and len(sample) == len(tensors):
        given = {t.name: value for t, value in zip(tensors, sample, strict=True)}
    else:
        raise ValueError(
            f"Expected `sample` for a model with inputs {[t.name for t in tensors]} "
            "to be a dict of arrays by input name, or a list in that order. "
            f"Received: sample of type {type(sample).__name__}"
        )
    names = [t.name for t in tensors]
    if given and sorted(given) != sorted(names):
        raise ValueError(
            f"Expected `sample` to hold the model's inputs {names}. "
            f"Received: {sorted(given)}"
        )
    arrays = {}
    for tensor in tensors:
        value = given.get(tensor.name)
        value = _default_input(tensor) if value is None else np.asarray(value)
        shape = tensor.shape
        if (
            value.ndim != len(shape)
            or len(value) == 0
            or any(
                n not in (None, m)
                for n, m in zip(shape[1:], value.shape[1:], strict=True)
            )
        ):
            label = "" if len(tensors) == 1 else f"[{tensor.name!r}]"
            raise ValueError(
                f"Expected `sample{label}` to be a batch of inputs of shape "
                f"{shape}. Received: sample{label}.shape={value.shape}"
            )
        arrays[tensor.name] = value
    if len({len(value) for value in arrays.values()}) != 1:
        raise ValueError(
            "Expected the arrays of `sample` to have the same number of rows. "
            f"Received: { {k: len(v) for k, v in arrays.items()} }"
        )
    return arrays if len(tensors) > 1 else arrays[tensors[0].name]


def _rows(inputs: Any, stop: int) -> Any:
    """The first `stop` rows of an array or of each array of a dict."""
    if isinstance(inputs, dict):
        return {name: value[:stop] for name, value in inputs.items()}
    return inputs[:stop]


def export_litert(
    model: keras.Model,
    path: str | os.PathLike,
    *,
    quantization: str = "float",
    sample: Any = None,
    compare: bool = True,
    repeats: int = 200,
) -> LiteRTReport:
    """Writes `model` as a LiteRT (`.tflite`) file whose pruned weights are
    stored sparse and run TFLite's sparse kernels, and reports what it got.

    Masked layers become stock layers holding `weight * mask` (and
    `SparseDense` layers `Dense`), Keras exports the model with TFLite
    builtins only, and the converter's sparsity optimization stores weights
    with enough zeros in TFLite's sparse format. Before the file is written
    its outputs on `sample` are compared with the Keras model's; the report
    lists, per pruned weight, how it is stored and whether it runs TFLite's
    sparse kernel or is expanded at load by a `DENSIFY` op (a warning names
    those), the file size, and the batch-1 latency against the same model
    converted dense. The input model is not changed.

    What runs sparse: Dense layers (TFLite's sparse `FULLY_CONNECTED`) that
    the converter finds sparse enough; masks in 1x4 blocks
    (`IterativePruningCallback(granularity=(1, 4))`) pass at lower sparsity
    and run about twice as fast. Convolutions are stored sparse (a smaller
    file) but run dense.

    Quantization: `"float"` (float32), `"float16"` (half-precision weights)
    or `"int8"` (dynamic-range: int8 weights, float activations). LiteRT
    (2.3) computes int8 sparse weights wrongly under its default XNNPACK
    delegate; such a file is verified without the default delegates, and
    the report's `load_hint` and a warning say how to load it. Float16 sparse
    weights dequantize to NaN there: a file whose outputs are wrong under
    every resolver is refused.

    Args:
        model: A Sequential or Functional `keras.Model` (a keras-hub task
            or a backbone under a head too) with one output, masked,
            exported or stock, on the TensorFlow backend. Recurrent layers
            do not convert to TFLite builtins.
        path: Where to write the file; must end with `.tflite`.
        quantization: `"float"`, `"float16"` or `"int8"`. Defaults to
            `"float"`.
        sample: Inputs to check the outputs on, a numpy array with a batch
            dimension (for a model with several inputs, a dict of them by
            input name, or a list in the order of `model.inputs`). Defaults
            to 8 standard-normal rows (zeros for integer inputs); required
            when an input shape has unknown sizes.
        compare: Also convert the model without sparsity and time both at
            batch 1. Defaults to `True`.
        repeats: Timed batch-1 calls of each file. Defaults to `200`.

    Returns:
        A `LiteRTReport`; `print()` it for a table.

    Raises:
        TypeError: If `model` is not a `keras.Model`.
        ValueError: For a bad `path`, `quantization`, `repeats` or `sample`
            (or NaN outputs on it); a subclassed model, or one with several
            outputs; a model the converter cannot express with
            TFLite builtins; or a file whose outputs differ from the model's
            beyond `TOLERANCE[quantization]` (relative to the largest
            output) under every resolver. Nothing is written then, and the
            message names the known LiteRT defect behind it: sparse float16
            weights, or a sparse Dense layer whose input size is not a
            multiple of 4.
        RuntimeError: Off the TensorFlow backend.

    Warns:
        UserWarning: Naming pruned weights that run dense in the file, and
            when the file must be loaded without LiteRT's default delegates.

    Example:

    >>> import tempfile
    >>> from keras_prune import MaskedDense
    >>> model = keras.Sequential([keras.Input((512,)), MaskedDense(256, name="fc")])
    >>> model.layers[0].prune_to(np.random.default_rng(0).random((512, 256)) < 0.02)
    >>> path = os.path.join(tempfile.mkdtemp(), "fc.tflite")
    >>> report = export_litert(model, path, repeats=20)
    >>> [(w.layer, w.runs) for w in report.weights]
    [('fc', 'sparse kernel')]
    >>> report.bytes < 0.2 * report.dense_bytes, report.max_error < 1e-4
    (True, True)

    Reference:
        TensorFlow Lite's sparsity format (`SparsityParameters`, `schema.fbs`);
        Elsen et al. 2020, "Fast Sparse ConvNets", arXiv:1911.09723.
    """
    _check_model(model, "export_litert")
    tensorflow_module("export_litert")
    path = os.fspath(path)
    if not path.endswith(".tflite"):
        raise ValueError(
            f"Expected `path` to end with '.tflite'. Received: path={path!r}"
        )
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"Expected `quantization` to be one of {list(QUANTIZATIONS)}. "
            f"Received: quantization={quantization!r}"
        )
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(
            "Expected `repeats` to be a positive integer. "
            f"Received: repeats={repeats!r}"
        )
    if not is_graph_model(model):
        raise ValueError(
            "export_litert takes a Sequential or Functional model, whose inputs "
            f"are known. Received: model={model.name!r} of type "
            f"{type(model).__name__}"
        )
    if len(model.outputs) != 1:
        raise ValueError(
            "export_litert checks and times models with one output. Received: "
            f"a model with {len(model.outputs)} outputs"
        )
    sample = _sample(model, sample)
    if isinstance(sample, dict):  # the model's own structure of inputs
        structured = keras.tree.map_structure(lambda t: sample[t.name], model.input)
    else:
        structured = sample
    expected = ops.convert_to_numpy(model(structured, training=False))
    if not np.all(np.isfinite(expected)):
        raise ValueError(
            "Expected the model's outputs on `sample` to be finite, to check the "
            "file against. Received: NaN or infinite outputs"
        )
    stock = _stock_model(model)
    try:
        content = _convert(stock, quantization, sparsity=True)
    except ValueError as sparse_error:
        # The converter's sparsity pass fails on some graphs that convert
        # dense (a sparse embedding tied to the output projection: "operand
        # #0 does not dominate this use"): a dense file, said so.
        content = _convert(stock, quantization, sparsity=False)
        warnings.warn(
            f"export_litert: TFLite's converter fails on this model with its "
            f"sparsity optimization ({sparse_error.__cause__ or sparse_error}); "
            f"{path} stores every weight dense.",
            stacklevel=2,
        )
    tensors = _tensors(content)
    weights = _weights_report(_pruned_weights(stock), tensors)
    resolver, error, failures = _check(
        content, tensors, sample, expected, TOLERANCE[quantization]
    )
    if not resolver:
        raise ValueError(
            f"export_litert(quantization={quantization!r}) made a file whose "
            f"outputs differ from the model's ({'; '.join(failures)}); nothing "
            f"was written. {_why_wrong(quantization, weights)}"
        )
    dense = _convert(stock, quantization, sparsity=False) if compare else None
    latency = dense_latency = None
    if compare and dense is not None:
        timed = _latencies(
            {"sparse": (content, resolver), "dense": (dense, "default")},
            _rows(sample, 1),
            repeats,
        )
        latency, dense_latency = timed["sparse"], timed["dense"]
    report = LiteRTReport(
        path=path,
        quantization=quantization,
        bytes=len(content),
        dense_bytes=None if dense is None else len(dense),
        latency_ms=latency,
        dense_latency_ms=dense_latency,
        max_error=error,
        resolver=resolver,
        weights=tuple(weights),
    )
    temporary = path + ".partial"
    with open(temporary, "wb") as file:
        file.write(content)
    os.replace(temporary, path)
    dense_runs = [w.layer for w in weights if w.runs != "sparse kernel"]
    if dense_runs:
        warnings.warn(
            f"export_litert: {dense_runs} run dense in {path}. TFLite runs sparse "
            "only Dense (FULLY_CONNECTED) weights that its converter finds sparse "
            "enough; convolutions and embeddings always run dense. For a Dense "
            "layer, prune further or in 1x4 blocks "
            "(IterativePruningCallback(granularity=(1, 4))).",
            stacklevel=2,
        )
    if resolver != "default":
        warnings.warn(
            f"export_litert: {path} computes correctly only without LiteRT's default "
            f"delegates ({'; '.join(failures)}). Load it with {LOAD_WITHOUT_DELEGATES} "
            "(C++: tflite::ops::builtin::BuiltinOpResolverWithoutDefaultDelegates).",
            stacklevel=2,
        )
    return report


def predict(
    model_file: str | os.PathLike | bytes,
    inputs: np.ndarray,
    *,
    resolver: str = "default",
    batch_size: int = 256,
) -> np.ndarray:
    """Runs a single-input `.tflite` file on `inputs` with LiteRT, one
    thread, `batch_size` rows at a time.

    Args:
        model_file: The file's path, or its contents.
        inputs: A numpy array with a batch dimension.
        resolver: `"default"` (LiteRT's default delegates, XNNPACK) or
            `"without_default_delegates"` (see `LiteRTReport.resolver`).
            Defaults to `"default"`.
        batch_size: Rows per call. Defaults to `256`.

    Returns:
        The outputs, a numpy array with `len(inputs)` rows.

    Raises:
        ValueError: For an unknown `resolver`, or `resolver="default"` for a
            file with int8 sparse weights (LiteRT's XNNPACK delegate
            computes them wrongly or crashes).
        RuntimeError: When LiteRT cannot load or run the file.

    Example:

    >>> import tempfile
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> path = os.path.join(tempfile.mkdtemp(), "m.tflite")
    >>> _ = export_litert(model, path, compare=False)
    >>> x = np.ones((5, 3), "float32")
    >>> bool(np.allclose(predict(path, x), model.predict(x, verbose=0), atol=1e-5))
    True
    """
    if resolver not in RESOLVERS:
        raise ValueError(
            f"Expected `resolver` to be one of {list(RESOLVERS)}. "
            f"Received: resolver={resolver!r}"
        )
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or batch_size < 1
    ):
        raise ValueError(
            "Expected `batch_size` to be a positive integer. "
            f"Received: batch_size={batch_size!r}"
        )
    if len(inputs) == 0:
        raise ValueError("Expected at least one row in `inputs`. Received: none")
    if not isinstance(model_file, bytes):
        with open(model_file, "rb") as file:
            model_file = file.read()
    tensors = []  # only the default resolver needs the file's tensors read
    if resolver == "default":
        try:
            tensors = _tensors(model_file)
        except Exception:  # not a flatbuffer: LiteRT says what is wrong below
            pass
    if _int8_sparse(tensors):
        raise ValueError(
            "The file holds int8 sparse weights, which LiteRT's default resolver "
            "(its XNNPACK delegate) computes wrongly or crashes on: pass "
            "resolver=\"without_default_delegates\". Received: resolver='default'"
        )
    inputs = np.asarray(inputs)
    outputs = []
    interpreter = None
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        try:
            if interpreter is None or len(chunk) != batch_size:
                interpreter = load(model_file, resolver, len(chunk))
            outputs.append(run(interpreter, chunk))
        except (RuntimeError, ValueError) as error:
            raise RuntimeError(
                f"LiteRT cannot run the file with resolver={resolver!r} ({error})"
            ) from error
    return np.concatenate(outputs)
