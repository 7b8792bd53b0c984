"""What each command needs beyond keras_prune's own dependencies, checked
before any training starts so that a long job never fails at its end."""

from __future__ import annotations

import importlib.util
import os

# command -> (modules it imports, the extra of keras_prune that installs them)
NEEDS = {
    "mnist": (("tensorflow", "matplotlib"), "demo"),
    "mnist-structured": (("tensorflow", "matplotlib"), "demo"),
    "lenet300": (("tensorflow", "matplotlib"), "demo"),
    "lenet5": (("tensorflow", "matplotlib"), "demo"),
}


def _installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a broken install, or an import hook refusing it
        return False


def check(command: str) -> None:
    """Raises if `command` cannot run to its end here.

    Checks, without importing them, that the modules the command needs are
    installed, and that Keras runs on the TensorFlow backend (the job's
    timing and sparse export are TensorFlow code).

    Args:
        command: A key of `NEEDS`, e.g. `"mnist"`.

    Raises:
        RuntimeError: Naming what is missing and the extra that installs it,
            or the backend to set.
        ValueError: If `command` is not a key of `NEEDS`.

    Example:

    >>> check("mnist")  # silent where tensorflow and matplotlib are installed
    >>> check("lenet")
    Traceback (most recent call last):
    ...
    ValueError: Expected `command` to be one of ['lenet300', 'lenet5', 'mnist', \
'mnist-structured']. Received: command='lenet'
    """
    if command not in NEEDS:
        raise ValueError(
            f"Expected `command` to be one of {sorted(NEEDS)}. "
            f"Received: command={command!r}"
        )
    modules, extra = NEEDS[command]
    missing = [name for name in modules if not _installed(name)]
    if missing:
        # The extra brings tensorflow-cpu: suggest it only where TensorFlow
        # is missing, never next to a TensorFlow build the user has.
        fix = (
            f"pip install 'keras_prune[{extra}]'"
            if "tensorflow" in missing
            else "pip install " + " ".join(missing)
        )
        raise RuntimeError(
            f"keras-prune {command} needs {' and '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed; nothing was "
            f"run. Install with: {fix}"
        )
    backend = os.environ.get("KERAS_BACKEND")
    if backend is None:
        try:
            import keras
        except ImportError as error:  # keras.json names a backend not installed
            raise RuntimeError(
                f"keras-prune {command} runs on Keras's TensorFlow backend, and "
                f"Keras could not import its configured one ({error}); set "
                "KERAS_BACKEND=tensorflow."
            ) from error
        backend = keras.backend.backend()
    if backend != "tensorflow":
        raise RuntimeError(
            f"keras-prune {command} runs on Keras's TensorFlow backend (it "
            f"times and exports with TensorFlow). Received: KERAS_BACKEND="
            f"{backend!r}; set KERAS_BACKEND=tensorflow."
        )
