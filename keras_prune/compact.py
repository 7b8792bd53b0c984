"""Compact `.keras` storage for stock layers whose weights were pruned.

`compact_class(keras.layers.Conv2D)` is `CompactConv2D(CompactStorage,
Conv2D)`: the stock layer in everything (config, call, weights in memory),
except that `save_own_variables` writes each variable in the smallest of the
formats of `keras_prune.storage` (dense, or the nonzeros plus a bitmask or
gaps) and `load_own_variables` rebuilds the dense variables, once, when the
file is read. A pruned layer's share of the file then shrinks with its kept
fraction, and it computes exactly as the stock layer does, on every backend.

Layers that make their weight-holding sublayers themselves (`LSTM` makes
its cell, `MultiHeadAttention` its projections, a custom block its layers)
get the mixin too: it gives the same class to every sublayer that holds
variables once they exist (after `build`, and before the weights load), so
the whole subtree is stored compactly and reads back.

`export_sparse` makes these layers; see `docs/design.md`, "Export".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import keras
from keras import ops

from keras_prune import storage
from keras_prune.masking import PRUNABLE_WEIGHTS, construct_from_config, library_name

if TYPE_CHECKING:
    from keras.layers import Layer as _Layer
else:
    _Layer = object

# Separates a stock variable key ("0") from the part of its encoding
# ("0.values"); Keras's own keys are plain integers.
_SEPARATOR = "."
# Bytes an HDF5 dataset of a `.keras` file takes beyond its data (measured
# with h5py 3: 100 one-number datasets take 38 KB more than none).
_DATASET_OVERHEAD = 400


def _owns_variables(layer: Any) -> bool:
    return bool(layer._trainable_variables or layer._non_trainable_variables)


def compact_descendants(layer: keras.layers.Layer) -> None:
    """Gives `compact_class` to every sublayer of `layer` that holds
    variables (idempotent)."""
    for sublayer in layer._flatten_layers(include_self=False, recursive=True):
        if _owns_variables(sublayer) and not isinstance(sublayer, CompactStorage):
            sublayer.__class__ = compact_class(type(sublayer))


class CompactStorage(_Layer):
    """Mixin that stores a layer's variables compactly in `.keras` files.

    Never used alone: `compact_class(cls)` puts it in front of a layer
    class. Each variable the stock layer saves is written in the smallest
    of `keras_prune.storage`'s formats (dense for a dense variable, so an
    unpruned weight costs nothing extra); loading rebuilds the dense
    variables once. Memory, config and computation are the stock layer's.

    Example:

    >>> layer = compact_class(keras.layers.Dense)(4)
    >>> _ = layer(np.ones((1, 1000)))
    >>> kernel = np.zeros((1000, 4), dtype="float32")
    >>> kernel[7, 2] = 1.5
    >>> _ = layer.kernel.assign(kernel)
    >>> store = {}
    >>> layer.save_own_variables(store)
    >>> sorted(store)  # the kernel as its one nonzero, the small bias dense
    ['0.gaps', '0.shape', '0.values', '1']
    """

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Any:
        # A subclassed model whose constructor takes no arguments reads
        # back its automatic config (see `construct_from_config`).
        return construct_from_config(super().from_config, cls, config)

    def save_own_variables(self, store: Any) -> None:
        plain: dict[str, Any] = {}
        super().save_own_variables(plain)
        for key, value in plain.items():
            parts = storage.encode(ops.convert_to_numpy(value), _DATASET_OVERHEAD)
            if set(parts) == {"dense"}:
                store[key] = parts["dense"]
                continue
            for part, array in parts.items():
                store[f"{key}{_SEPARATOR}{part}"] = array

    def load_own_variables(self, store: Any) -> None:
        compact_descendants(self)  # before the sublayers' weights load
        grouped: dict[str, dict[str, Any]] = {}
        for name in store.keys():
            key, _, part = name.partition(_SEPARATOR)
            grouped.setdefault(key, {})[part or "dense"] = store[name]
        plain = {key: storage.decode(parts) for key, parts in grouped.items()}
        super().load_own_variables(plain)

    def _post_build(self) -> None:
        compact_descendants(self)
        super()._post_build()


_COMPACT_CLASSES: dict[type, type] = {}


def _same_definition(a: type, b: type) -> bool:
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def compact_class(cls: type) -> type:
    """Returns the compactly stored version of a Keras layer class,
    `Compact<Name>`: `cls` with `CompactStorage` in front.

    The class is made once per `cls` and registered as a Keras serializable
    (`"keras_prune>Compact<Name>"`, or `"keras_prune>Compact<package>_<Name>"`
    for a class registered under a package); those of the stock layers
    keras_prune prunes exist from import on. For your own classes, call this
    before `keras.models.load_model` in a new process.

    Args:
        cls: A `keras.layers.Layer` subclass.

    Returns:
        A subclass of `cls` with `CompactStorage` first in its bases (`cls`
        itself if it already has it).

    Raises:
        ValueError: If `cls` is not a layer class, or another class of the
            same (registered) name already has a compact class.

    Example:

    >>> compact_class(keras.layers.Conv2D).__name__
    'CompactConv2D'
    """
    if not (isinstance(cls, type) and issubclass(cls, keras.layers.Layer)):
        raise ValueError(
            f"Expected `cls` to be a keras.layers.Layer subclass. Received: {cls!r}"
        )
    if issubclass(cls, CompactStorage):
        return cls
    if cls not in _COMPACT_CLASSES:
        # A class registered as "package>Name" gets "Compactpackage_Name",
        # so that same-named classes of two packages stay apart.
        # A library's class its `library_name` (registered or not).
        qualified = library_name(cls)
        name = "Compact" + (
            qualified or keras.saving.get_registered_name(cls).replace(">", "_")
        )
        taken = keras.saving.get_registered_object(f"keras_prune>{name}")
        if taken is not None and _same_definition(taken.__mro__[2], cls):
            # The class was defined again (a re-run notebook cell): replace it.
            keras.saving.get_custom_objects().pop(f"keras_prune>{name}")
        elif taken is not None:
            raise ValueError(
                f"Expected one layer class named {cls.__name__!r} to store "
                f"compactly. Received: {cls!r}, while {taken.__mro__[2]!r} "
                f"already uses the name keras_prune>{name}. Register one of them "
                "under a package (keras.saving.register_keras_serializable)."
            )
        namespace = {
            "__module__": __name__,
            "__doc__": (
                f"A `{cls.__module__}.{cls.__name__}` whose variables are stored "
                "compactly in `.keras` files; see `keras_prune.compact`."
            ),
        }
        compact = type(name, (CompactStorage, cls), namespace)
        _COMPACT_CLASSES[cls] = keras.saving.register_keras_serializable(
            package="keras_prune"
        )(compact)
    return _COMPACT_CLASSES[cls]


def compact_in_place(layer: keras.layers.Layer) -> None:
    """Turns `layer` (and, once built, every sublayer holding variables)
    into its `compact_class`, keeping the object and its weights."""
    layer.__class__ = compact_class(type(layer))
    if layer.built:
        compact_descendants(layer)


# Every stock class keras_prune prunes, and the stock layers that make
# prunable sublayers in `build`, can be read back in any process.
for _cls in (
    *PRUNABLE_WEIGHTS,
    keras.layers.MultiHeadAttention,
    keras.layers.GroupQueryAttention,
):
    compact_class(_cls)
