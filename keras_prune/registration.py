"""Masked and compact classes for every registered layer class, so that a
`.keras` file holding them loads in any process.

`make_prunable` gives a keras-hub backbone, its blocks and its layers their
masked classes (`MaskedGPT2Backbone`, `MaskedReversibleEmbedding`, ...) and
`export_sparse` their compact ones: Keras finds those by their registered
names when it loads a file, so they must exist in the loading process
before `keras.models.load_model` runs, although that process never pruned
anything. On import, keras_prune makes them for every layer and model class
registered with Keras (`keras.saving.register_keras_serializable`: all of
keras-hub's), and again once keras-hub is imported, if that comes later.
Making one is cheap (a `type(...)` call and a registration, no weights).

Your own unregistered classes still need `masked_class(MyLayer)` (or
`compact_class`) before loading, as the README says.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings
from typing import Any

import keras

from keras_prune.compact import compact_class
from keras_prune.masking import LIBRARIES, masked_class

_done: set[type] = set()


def register_layer_classes() -> int:
    """Makes the masked and compact class of every registered layer class
    that has none yet (see the module's docstring).

    Returns:
        How many classes got theirs now.

    Example:

    >>> @keras.saving.register_keras_serializable(package="example")
    ... class Scale(keras.layers.Layer):
    ...     __module__ = "example"  # a user's module (keras_prune's are skipped)
    ...     def call(self, x):
    ...         return 2 * x
    >>> register_layer_classes() >= 1
    True
    >>> keras.saving.get_registered_object("keras_prune>MaskedScale").__name__
    'MaskedScale'
    """
    made = 0
    for value in list(keras.saving.get_custom_objects().values()):
        if (
            not isinstance(value, type)
            or not issubclass(value, keras.layers.Layer)
            or value in _done
            or value.__module__.startswith("keras_prune")
        ):
            continue
        _done.add(value)
        try:
            masked_class(value)
            compact_class(value)
        except Exception as error:  # noqa: BLE001 - one class must not stop import
            warnings.warn(
                f"keras_prune could not make the masked or compact class of "
                f"{value.__module__}.{value.__name__}: {error}. Models holding "
                "it save, but may not load in a new process.",
                stacklevel=2,
            )
            continue
        made += 1
    return made


class _Loader(importlib.abc.Loader):
    """Runs a module's own loader, then `register_layer_classes`."""

    def __init__(self, loader: Any):
        self._loader = loader

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        register_layer_classes()

    def __getattr__(self, name: str) -> Any:  # resources, source, ...
        return getattr(self._loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds `LIBRARIES` with the other finders and registers their classes
    once they are imported."""

    #: Marks the finder across reloads of this module (a new class each).
    keras_prune_after_import = True

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in LIBRARIES:
            return None
        for finder in sys.meta_path:
            if getattr(finder, "keras_prune_after_import", False) or not hasattr(
                finder, "find_spec"
            ):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def install() -> None:
    """Registers the classes of what is imported now, and of `LIBRARIES`
    once imported (called when keras_prune is imported)."""
    register_layer_classes()
    if not any(
        getattr(finder, "keras_prune_after_import", False) for finder in sys.meta_path
    ):
        sys.meta_path.insert(0, _AfterImport())
