"""Copies of the user's own live models and layers, for the converters.

`make_prunable`, `strip_pruning`, `export_sparse`, `shrink` and
`export_litert` never change their input: they work on a copy. A copy of the
user's live model, made in the user's process, can use what Keras refuses
to read from an untrusted file, and what a file cannot hold at all:

- the user's unregistered classes and functions, by name (a
  `custom_object_scope` of the live objects; Keras's own and registered
  objects are left to Keras, as a bare name can stand for two of them);
- Python lambdas (`Lambda` layers, `activation=lambda x: ...`): each one
  that the config holds as code is replaced by a reference to the live
  function, so closures survive and nothing is unmarshalled;
- subclassed models without `get_config` whose constructor takes no
  arguments, whose automatic config Keras writes but cannot read back
  (`masking.construct_from_config`).

Keras's safe mode is never changed: nothing left to it to refuse remains.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
import warnings
import zipfile
from typing import Any

import keras

from keras_prune.masking import construct_from_config

# Keras warns when it serializes a lambda, for a file to be loaded later;
# a copy holds the live function instead (`LiveObjects.revive`).
_LAMBDA_WARNING = "The object being serialized includes a `lambda`"
# The names under which a copy's custom objects hold the live lambdas.
_LIVE_LAMBDA = "keras_prune_live_lambda_"


def _resolved_by_keras(value: Any) -> bool:
    """Whether Keras finds `value` from its config without help: one of
    Keras's own objects, or one registered with
    `keras.saving.register_keras_serializable`."""
    module = getattr(value, "__module__", None) or ""
    if module == "keras" or module.startswith("keras."):
        return True
    name = getattr(value, "__name__", None)
    return name is None or keras.saving.get_registered_name(value) != name


def _needs_reviver(cls: type) -> bool:
    """Whether a registered layer class of the user's may hold base
    arguments in its config that its constructor does not take (one without
    `**kwargs` that inherits Keras's `get_config`); Keras's own classes and
    those that take `**kwargs` are left to Keras."""
    module = cls.__module__ or ""
    if module == "keras" or module.startswith("keras."):
        return False
    constructor = getattr(cls, "__init__")  # noqa: B009 - the class's own
    parameters = inspect.signature(constructor).parameters.values()
    return not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


class _Reviver:
    """Stands for a user's layer or model class in the copy's custom
    objects: its `from_config`, retried without the base arguments that
    Keras's automatic config adds where the constructor does not take them."""

    def __init__(self, cls: Any):
        self.cls = cls

    def from_config(self, config: dict[str, Any]) -> Any:
        return construct_from_config(self.cls.from_config, self.cls, config)


def _lambda_code(function: Any) -> tuple[str, str] | None:
    """The code string under which Keras serializes a lambda (marshalled
    and base64-encoded) and the JSON of its code, defaults and closure, or
    `None` for a function Keras serializes by name."""
    if function.__name__ != "<lambda>":
        return None
    from keras.src.utils.python_utils import func_dump

    parts = list(func_dump(function))
    return str(parts[0]), json.dumps(parts, default=str)


class LiveObjects:
    """The user's functions and classes that a model's config names.

    Attributes:
        by_name: `{name: object}` for a `custom_object_scope`.
        lambdas: `{code: {whole: reference name}}`: the lambdas, by the
            code Keras writes for each, then (where lambdas share their
            code and differ in defaults or closure) by the JSON of code,
            defaults and closure; the name under which `by_name` holds the
            live function.
    """

    def __init__(self) -> None:
        self.by_name: dict[str, Any] = {}
        self.lambdas: dict[str, dict[str, str]] = {}

    def add(self, value: Any) -> None:
        if callable(value) and getattr(value, "__name__", None) == "<lambda>":
            found = _lambda_code(value)
            if found is not None:
                code, whole = found
                same_code = self.lambdas.setdefault(code, {})
                if whole not in same_code:
                    name = f"{_LIVE_LAMBDA}{len(self.by_name)}"
                    same_code[whole] = name
                    self.by_name[name] = value
            return
        is_layer = isinstance(value, type) and issubclass(value, keras.layers.Layer)
        if _resolved_by_keras(value):
            if is_layer and _needs_reviver(value):
                # A registered class is looked up by its registered name,
                # in the scope first.
                name = keras.saving.get_registered_name(value)
                self.by_name.setdefault(name, _Reviver(value))
            return
        if is_layer:
            self.by_name.setdefault(value.__name__, _Reviver(value))
        else:
            self.by_name.setdefault(value.__name__, value)

    def revive(self, config: Any) -> Any:
        """`config` with every lambda that Keras wrote as code replaced by
        a reference to the live function (a new object; `config` is not
        changed)."""
        # Marshalled code is not stable: `marshal` flags an object held
        # elsewhere too (a constant that JAX's tracing keeps) differently, so
        # the code Keras wrote a moment ago may differ from the one seen when
        # the lambda was added. Each lambda's code now is matched as well.
        for name, function in list(self.by_name.items()):
            if name.startswith(_LIVE_LAMBDA):
                found = _lambda_code(function)
                if found is not None:
                    self.lambdas.setdefault(found[0], {}).setdefault(found[1], name)
        return self._revive(config)

    def _revive(self, config: Any) -> Any:
        if isinstance(config, list | tuple):
            return type(config)(self._revive(item) for item in config)
        if not isinstance(config, dict):
            return config
        parts = None
        if config.get("class_name") == "__lambda__" and isinstance(
            config.get("config"), dict
        ):
            inner = config["config"]  # a `Lambda` layer's function
            parts = inner.get("value") or [
                inner.get("code"),
                inner.get("defaults"),
                inner.get("closure"),
            ]
        elif set(config) == {"value"} and isinstance(config["value"], list | tuple):
            parts = config["value"]  # an activation
        same_code = self.lambdas.get(str(list(parts)[0])) if parts else None
        name = None
        if same_code and len(same_code) == 1:
            name = next(iter(same_code.values()))
        elif same_code:  # the same code with other defaults or closures
            name = same_code.get(json.dumps(list(parts or []), default=str))
        if name is not None:
            return {
                "module": None,
                "class_name": "function",
                "config": name,
                "registered_name": "function",
            }
        return {key: self._revive(value) for key, value in config.items()}


def live_objects(model: keras.layers.Layer) -> LiveObjects:
    """The user's functions and classes that `model`'s config names (see
    `LiveObjects`), found in the attributes of its layers and in its compile
    config."""
    found = LiveObjects()

    def add(value: Any) -> None:
        if inspect.isfunction(value) or isinstance(value, type):
            found.add(value)
        elif isinstance(value, dict):
            for item in value.values():
                add(item)
        elif isinstance(value, list | tuple):
            for item in value:
                add(item)
        elif hasattr(value, "get_config") and not isinstance(value, keras.Variable):
            found.add(type(value))

    for layer in model._flatten_layers(include_self=True, recursive=True):
        found.add(type(layer))
        for value in vars(layer).values():
            if not isinstance(value, keras.layers.Layer):
                add(value)
    compile_config = getattr(model, "_compile_config", None)
    if compile_config is not None:
        add(getattr(compile_config, "config", {}))
    return found


def _rewrite_config(path: str, objects: LiveObjects) -> None:
    """Replaces, in the `.keras` file at `path`, its config by
    `objects.revive(config)`."""
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(members["config.json"])
    members["config.json"] = json.dumps(objects.revive(config)).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def copy_model(model: keras.Model, compile: bool = True) -> keras.Model:
    """Returns an independent copy of `model`: same class, config and
    weights, its own buffers, compiled like `model` with a fresh optimizer
    (uncompiled with `compile=False`).

    The copy goes through Keras's own `.keras` format (in a temporary
    folder), reading back with the model's live objects (see the module's
    docstring): unregistered classes and functions, lambdas, and subclassed
    models whose constructor takes no arguments copy as they are.

    Args:
        model: A `keras.Model`.
        compile: Compile the copy like `model` (with a fresh optimizer).
            Defaults to `True`.

    Returns:
        The copy.

    Raises:
        ValueError: If the model cannot be rebuilt from its config (a
            subclassed model whose `get_config` does not describe it); the
            message names the model and Keras's reason, and offers
            `inplace=True`.

    Example:

    >>> model = keras.Sequential([keras.Input((2,)),
    ...     keras.layers.Dense(1, activation=lambda x: 2 * x)])
    >>> copy = copy_model(model)
    >>> copy is model, float(copy(np.ones((1, 2)))[0, 0]) == float(model(
    ...     np.ones((1, 2)))[0, 0])
    (False, True)
    """
    objects = live_objects(model)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "copy.keras")
        try:  # one `try`: the copy, then its compilation
            clone = _load_copy(model, path, objects)
            _copy_trainable(model, clone)
            if (
                compile
                and model.compiled
                and getattr(model, "_compile_config", None) is not None
            ):
                with keras.saving.custom_object_scope(objects.by_name):
                    with warnings.catch_warnings():
                        warnings.filterwarnings("ignore", _LAMBDA_WARNING)
                        config = model.get_compile_config()
                    _compile_like(model, clone, objects.revive(config))
        except Exception as error:  # noqa: BLE001 - any failure of the copy
            raise ValueError(
                f"Could not copy model {model.name!r} of type "
                f"{type(model).__name__} through Keras's saving format "
                f"{_first_lines(error)} Give the class named there a "
                "`get_config()` that rebuilds it, or convert the model in "
                "place with `inplace=True` (it is then changed)."
            ) from error
    return clone


def _compile_like(
    model: keras.Model, clone: keras.Model, config: dict[str, Any]
) -> None:
    """Compiles `clone` like `model`, from `model`'s compile config, with a
    fresh optimizer (not built: it builds on the first step).

    Unlike Keras's `compile_from_config`, this also compiles a class that
    overrides `compile` (keras-hub's tasks, which then get their sampler too,
    which Keras does not record); where such a `compile` takes arguments of
    its own, Keras's own `compile` takes the recorded settings, with a
    warning. The optimizer's `exclude_from_weight_decay` by name, which
    Keras's optimizer config leaves out, is repeated on the fresh one."""
    settings = keras.saving.deserialize_keras_object(config)
    sampler = getattr(model, "sampler", None)
    if sampler is not None and hasattr(sampler, "get_config"):
        # A fresh one: a sampler may hold a random seed's state.
        settings.setdefault("sampler", type(sampler).from_config(sampler.get_config()))
    if type(clone).compile is keras.Model.compile:
        settings.pop("sampler", None)
        clone.compile(**settings)
    else:
        try:
            clone.compile(**settings)
        except TypeError:
            # Its own arguments (a learning rate, say): Keras recorded what
            # they came to, which Keras's own `compile` takes.
            settings.pop("sampler", None)
            keras.Model.compile(clone, **settings)
            warnings.warn(
                f"The copy of model {clone.name!r} is compiled with the "
                "settings Keras recorded for the original (optimizer, loss, "
                "metrics) through `keras.Model.compile`: its class "
                f"{type(clone).__name__} overrides `compile()` with arguments "
                "of its own, so what that method does beyond them is not "
                "repeated. Compile the copy yourself if it matters.",
                stacklevel=3,
            )
    _carry_weight_decay_exclusions(model, clone)


def _carry_weight_decay_exclusions(model: keras.Model, clone: keras.Model) -> None:
    """Repeats `model.optimizer.exclude_from_weight_decay(var_names=...)` on
    the copy's optimizer; an exclusion by variable, which names no variable
    of the copy, is said."""
    original = getattr(model, "optimizer", None)
    fresh = getattr(clone, "optimizer", None)
    if original is None or fresh is None:
        return
    pattern = getattr(original, "_exclude_from_weight_decay_pattern", None)
    if pattern is not None:
        # One "name" holding the whole pattern compiles to the same regex.
        fresh.exclude_from_weight_decay(var_names=[pattern.pattern])
    if getattr(original, "_exclude_from_weight_decay", None):
        warnings.warn(
            f"The copy of model {model.name!r} has a fresh optimizer, which "
            "does not exclude from weight decay the variables the original's "
            "`exclude_from_weight_decay(var_list=...)` named (variables of "
            "the original). Call `exclude_from_weight_decay` on the copy's "
            "optimizer before training it.",
            stacklevel=4,
        )


def _load_copy(model: keras.Model, path: str, objects: LiveObjects) -> Any:
    """`model` saved at `path` and loaded back with its live objects."""
    with warnings.catch_warnings():
        # An unbuilt model copies fine: it is built when it runs.
        warnings.filterwarnings("ignore", "You are saving a model that has not")
        warnings.filterwarnings("ignore", _LAMBDA_WARNING)
        model.save(path)
    _rewrite_config(path, objects)
    with keras.saving.custom_object_scope(objects.by_name), warnings.catch_warnings():
        # The copy gets a fresh optimizer: the saved one's state is not read.
        warnings.filterwarnings("ignore", "Skipping variable loading for optimizer")
        return keras.saving.load_model(path, compile=False)


def _copy_trainable(model: keras.Model, clone: keras.Model) -> None:
    """Gives every layer of `clone` its counterpart's `trainable`: a model
    rebuilt from constructor arguments (a keras-hub backbone) makes its
    layers anew, trainable, whatever the user froze (on PyTorch even the
    backbone's own flag does not reach them). Layers are matched by their
    place in Keras's walk where both walks hold the same classes (the names
    of a copy's unnamed layers change), else by path; parents come before
    their sublayers in the walk, so each layer ends with its own flag."""
    originals = model._flatten_layers(include_self=True, recursive=True)
    copies = clone._flatten_layers(include_self=True, recursive=True)
    if [type(a).__name__ for a in originals] == [type(b).__name__ for b in copies]:
        for original, copy in zip(originals, copies, strict=True):
            if copy.trainable != original.trainable:
                copy.trainable = original.trainable
        return
    flags = {getattr(layer, "path", layer.name): layer.trainable for layer in originals}
    for copy in copies:
        flag = flags.get(getattr(copy, "path", copy.name))
        if flag is not None and copy.trainable != flag:
            copy.trainable = flag


def clone_layer(layer: keras.layers.Layer, objects: LiveObjects) -> Any:
    """A new layer from `layer`'s config (not built, no weights), reading
    back the live objects that `objects` holds (lambdas included)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", _LAMBDA_WARNING)
        config = objects.revive(layer.get_config())
    with keras.saving.custom_object_scope(objects.by_name):
        return construct_from_config(layer.__class__.from_config, type(layer), config)


def _first_lines(error: Exception, limit: int = 600) -> str:
    """An error's type and the start of its message, for a message of ours
    that quotes it (Keras's deserialization errors print whole configs)."""
    text = " ".join(str(error).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"({type(error).__name__}: {text})."
