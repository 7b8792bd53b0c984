"""The LiteRT interpreter side of `export_litert`: load a `.tflite` file
with one of LiteRT's op resolvers and run it, in this process or, to check
a file that may crash LiteRT, in a child process.

Why a child process: LiteRT 2.3's XNNPACK delegate (the default resolver)
does not only compute int8 sparse weights wrongly, it can also crash the
process while it prepares them (a segmentation fault in
`Interpreter.allocate_tensors`, measured on the seed network's head: every
time in a fresh process at batch 8, now and then inside a test run). A
crash in the child becomes a failure `export_litert` reports, and the
user's process goes on.

This module imports nothing from keras_prune, Keras or TensorFlow (only
`ai_edge_litert`, or TensorFlow's bundled `tf.lite` where LiteRT is not
installed), so the child starts in a fraction of a second. The child
loads this file by path and calls `main` with: model path, inputs
(`.npy`), resolver, outputs (`.npy`); it writes the outputs there, or
LiteRT's error message to `outputs + ".error"` and exits with status 1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np

# The op resolvers tried, in order: LiteRT's default (with the XNNPACK
# delegate), then its builtin kernels without default delegates.
RESOLVERS = ("default", "without_default_delegates")
# Seconds a child may take to load and run a file before it counts as hung.
CHILD_SECONDS = 300


def litert_modules() -> tuple[Any, Any, Any]:
    """`(Interpreter, OpResolverType, schema module)`, from `ai_edge_litert`
    where it is installed, else from TensorFlow's bundled copy.

    Raises:
        ImportError: When neither LiteRT nor TensorFlow is installed.

    Example:

    >>> interpreter_class, resolver_types, schema = litert_modules()
    >>> resolver_types.BUILTIN_WITHOUT_DEFAULT_DELEGATES is not None
    True
    """
    try:
        from ai_edge_litert import schema_py_generated as schema
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError:
        import tensorflow as tf
        from tensorflow.lite.python import schema_py_generated as schema

        return tf.lite.Interpreter, tf.lite.experimental.OpResolverType, schema
    return Interpreter, OpResolverType, schema


def load(content: bytes, resolver: str, batch: int) -> Any:
    """A one-thread interpreter for a `.tflite` file.

    Args:
        content: The file's bytes.
        resolver: `"default"` (LiteRT's default delegates, XNNPACK) or
            `"without_default_delegates"` (its builtin kernels only).
        batch: Rows of the inputs; each input's first dimension is resized
            to it (the other dimensions are the file's).

    Returns:
        The interpreter, its tensors allocated, ready for `run`.

    Raises:
        RuntimeError, ValueError: LiteRT's, when it cannot load or prepare
            the file. A defect inside LiteRT can also crash the process:
            `run_isolated` survives that.

    Example: see `run`.
    """
    interpreter_class, resolver_types, _ = litert_modules()
    kind = (
        resolver_types.AUTO
        if resolver == "default"
        else resolver_types.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    )
    result = interpreter_class(
        model_content=content, num_threads=1, experimental_op_resolver_type=kind
    )
    for detail in result.get_input_details():
        result.resize_tensor_input(
            detail["index"], [batch, *detail["shape"][1:]], strict=False
        )
    result.allocate_tensors()
    return result


def input_name(detail: dict[str, Any]) -> str:
    """The Keras input name of an interpreter's input: Keras's export names
    the tensor `serving_default_<name>:0`."""
    name = detail["name"].rsplit(":", 1)[0]
    return name.removeprefix("serving_default_")


def run(interpreter: Any, inputs: Any) -> np.ndarray:
    """The first output of an interpreter from `load` on `inputs`.

    Args:
        interpreter: From `load`, with `batch` the inputs' rows.
        inputs: A numpy array of the input's shape, or for a file with
            several inputs `{Keras input name: array}`; cast to the inputs'
            dtypes.

    Returns:
        A copy of the output, `len(inputs)` rows.

    Example:

    >>> import os, tempfile
    >>> from keras_prune import export_litert
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> path = os.path.join(tempfile.mkdtemp(), "m.tflite")
    >>> _ = export_litert(model, path, compare=False)
    >>> with open(path, "rb") as file:
    ...     interpreter = load(file.read(), "default", 4)
    >>> run(interpreter, np.ones((4, 3))).shape
    (4, 2)
    """
    details = interpreter.get_input_details()
    if not isinstance(inputs, dict):
        inputs = {input_name(details[0]): inputs}
    names = sorted(input_name(detail) for detail in details)
    if sorted(inputs) != names:
        raise ValueError(
            f"Expected inputs named {names} for this file. Received: {sorted(inputs)}"
        )
    values = {d["index"]: np.asarray(inputs[input_name(d)]) for d in details}
    resized = [d for d in details if tuple(d["shape"]) != values[d["index"]].shape]
    for detail in resized:  # sizes the file leaves open (a sequence length)
        interpreter.resize_tensor_input(
            detail["index"], list(values[detail["index"]].shape), strict=True
        )
    if resized:
        interpreter.allocate_tensors()
    for detail in details:
        value = values[detail["index"]]
        interpreter.set_tensor(detail["index"], value.astype(detail["dtype"]))
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).copy()


def _child_command(model: str, inputs: str, resolver: str, outputs: str) -> list[str]:
    """The command that runs this file as a script, without importing the
    keras_prune package (whose `__init__` imports Keras)."""
    script = (
        "import importlib.util, sys; "
        "spec = importlib.util.spec_from_file_location('litert_child', sys.argv[1]); "
        "module = importlib.util.module_from_spec(spec); "
        "spec.loader.exec_module(module); module.main(sys.argv[2:])"
    )
    return [sys.executable, "-c", script, __file__, model, inputs, resolver, outputs]


def run_isolated(content: bytes, resolver: str, inputs: Any) -> np.ndarray:
    """`run(load(content, resolver, len(inputs)), inputs)` in a child
    process, so that a crash inside LiteRT cannot take this process down.

    The file, the inputs and the outputs pass through a temporary folder
    (deleted after); the child is a new `sys.executable` that imports only
    this module, numpy and LiteRT (about 0.1 s to start; with TensorFlow's
    bundled interpreter instead, TensorFlow's import time).

    Args:
        content: The `.tflite` file's bytes.
        resolver: See `load`.
        inputs: A numpy array with a batch dimension, or `{name: array}`
            (see `run`).

    Returns:
        The first output, one row per input row.

    Raises:
        RuntimeError: When LiteRT refuses the file (its message), crashes
            (the signal's name), does not finish in `CHILD_SECONDS` (300 s),
            or no child process can be started (an embedded Python whose
            `sys.executable` is not a Python interpreter).

    Example:

    >>> run_isolated(b"not a model", "default", np.ones((1, 3)))
    Traceback (most recent call last):
    ...
    RuntimeError: The model is not a valid Flatbuffer buffer
    """
    with tempfile.TemporaryDirectory(prefix="keras_prune_litert_") as folder:
        model = os.path.join(folder, "model.tflite")
        with open(model, "wb") as file:
            file.write(content)
        given = os.path.join(folder, "inputs.npz")
        if isinstance(inputs, dict):
            arrays: dict[str, Any] = {
                f"input:{k}": np.asarray(v) for k, v in inputs.items()
            }
            np.savez(given, **arrays)
        else:
            np.savez(given, single=np.asarray(inputs))
        outputs = os.path.join(folder, "outputs.npy")
        try:
            done = subprocess.run(
                _child_command(model, given, resolver, outputs),
                cwd=folder,  # not the user's folder, whose files could shadow
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=CHILD_SECONDS,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"LiteRT did not finish loading and running the file in "
                f"{CHILD_SECONDS} s"
            ) from None
        except OSError as error:
            raise RuntimeError(
                "cannot start a Python child process to check the file with "
                f"LiteRT (sys.executable={sys.executable!r}: {error})"
            ) from error
        if done.returncode < 0:
            try:
                name = signal.Signals(-done.returncode).name
            except ValueError:
                name = f"signal {-done.returncode}"
            raise RuntimeError(
                f"LiteRT crashed ({name}) while loading or running the file"
            )
        if os.path.exists(outputs + ".error"):
            with open(outputs + ".error") as file:
                raise RuntimeError(file.read())
        if done.returncode != 0 or not os.path.exists(outputs):
            tail = done.stderr.decode(errors="replace").strip()[-300:]
            raise RuntimeError(
                f"the LiteRT child process stopped with status {done.returncode} "
                f"({tail})"
            )
        return np.load(outputs)


def main(arguments: list[str]) -> None:
    """The child's side of `run_isolated`: `model inputs resolver outputs`."""
    model, given, resolver, outputs = arguments
    with open(model, "rb") as file:
        content = file.read()
    with np.load(given) as data:
        if "single" in data.files:
            inputs: Any = data["single"]
            rows = len(inputs)
        else:
            inputs = {k.removeprefix("input:"): data[k] for k in data.files}
            rows = len(next(iter(inputs.values())))
    try:
        result = run(load(content, resolver, rows), inputs)
    except (RuntimeError, ValueError) as error:
        with open(outputs + ".error", "w") as file:
            file.write(str(error).strip())
        sys.exit(1)
    np.save(outputs, result)
