"""One masking mechanism for every Keras layer with a kernel.

A *masked layer* is a stock Keras layer whose class has been given
`MaskedLayer` as a first base: `MaskedConv2D` is `(MaskedLayer, Conv2D)`,
made once by `masked_class(keras.layers.Conv2D)`. Nothing else of the stock
layer changes, so every argument and feature keeps working (activations,
regularizers, LoRA, mixed precision, its own save format). What the mixin
adds:

- a 0/1 mask for each *prunable weight* (the variables named in
  `PRUNABLE_WEIGHTS` for stock classes, or those a custom layer returns from
  `get_prunable_weights()`), held by a small child layer, `PruningMasks`,
  which saves them as bits in the layer's `.keras` entry;
- a `call` that runs the stock `call` with each prunable weight replaced by
  `weight * mask`, so the forward pass sees exact zeros and the pruned
  weights get exactly zero gradient, on every backend, with no constraint
  reading a variable;
- `prune_to(masks)`, `masks`, `prunable_weights`, `sparsity`.

The raw variables are kept at exact zeros where the mask is zero wherever a
user can see them: `prune_to` and the pruning callback zero them (and the
optimizer's per-weight state) at every cut, the callback zeroes them again
after each epoch and after `fit`, saving writes `weight * mask`, and loading
the masks zeroes the weights.

Reference:
    Han et al. 2015, "Learning both Weights and Connections for Efficient
    Neural Networks", arXiv:1506.02626. The hook follows Keras's LoRA
    (`keras/src/layers/core/dense.py`) and PyTorch's
    `torch/nn/utils/parametrize.py`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
from keras import ops

_L = keras.layers

#: The prunable weights (variable names) of each covered stock class.
#: Biases and normalization weights are never pruned by default.
PRUNABLE_WEIGHTS: dict[type, tuple[str, ...]] = {
    _L.Dense: ("kernel",),
    _L.EinsumDense: ("kernel",),
    _L.Conv1D: ("kernel",),
    _L.Conv2D: ("kernel",),
    _L.Conv3D: ("kernel",),
    _L.Conv1DTranspose: ("kernel",),
    _L.Conv2DTranspose: ("kernel",),
    _L.Conv3DTranspose: ("kernel",),
    _L.DepthwiseConv1D: ("kernel",),
    _L.DepthwiseConv2D: ("kernel",),
    _L.SeparableConv1D: ("depthwise_kernel", "pointwise_kernel"),
    _L.SeparableConv2D: ("depthwise_kernel", "pointwise_kernel"),
    _L.Embedding: ("embeddings",),
    _L.SimpleRNN: ("kernel", "recurrent_kernel"),
    _L.LSTM: ("kernel", "recurrent_kernel"),
    _L.GRU: ("kernel", "recurrent_kernel"),
    _L.SimpleRNNCell: ("kernel", "recurrent_kernel"),
    _L.LSTMCell: ("kernel", "recurrent_kernel"),
    _L.GRUCell: ("kernel", "recurrent_kernel"),
    # The output projection exists only where it is not tied to the
    # embeddings (`tie_weights=False`): "?" marks a weight a layer may lack.
    _L.ReversibleEmbedding: ("embeddings", "reverse_embeddings?"),
}

#: The prunable weights of layer classes of other libraries, by
#: `module.qualname` (keras_prune imports none of them): keras-hub's
#: position embeddings and the stacked expert kernels of its
#: mixture-of-experts layers, `(experts, in, out)` each.
LIBRARY_PRUNABLE_WEIGHTS: dict[str, tuple[str, ...]] = {
    "keras_hub.src.layers.modeling.position_embedding.PositionEmbedding": (
        "embeddings",
    ),
    "keras_hub.src.models.mixtral.mixtral_decoder.MixtralMoeExperts": (
        "expert_feedforward_gate_dense",
        "expert_feedforward_intermediate_dense",
        "expert_feedforward_output_dense",
    ),
    **{
        f"keras_hub.src.models.{module}.{cls}": (
            "expert_feedforward_gate_dense",
            "expert_feedforward_output_dense",
        )
        for module, cls in (
            ("qwen_moe.qwen_moe_decoder", "QwenMoeExperts"),
            ("qwen3_moe.qwen3_moe_decoder", "Qwen3MoeExperts"),
            ("qwen3_5_moe.qwen3_5_moe_decoder", "Qwen3_5MoeExperts"),
        )
    },
    "keras_hub.src.models.gpt_oss.gpt_oss_decoder.GptOssExperts": (
        "gate_up_proj",
        "down_proj",
    ),
}


def _own_layers(layer: Any) -> list[Any]:
    """`layer` and every sublayer it tracks, each once."""
    return layer._flatten_layers(include_self=True, recursive=True)


def _registered_names(cls: type) -> tuple[str, ...] | None:
    for klass in cls.__mro__:
        if klass in PRUNABLE_WEIGHTS:
            return PRUNABLE_WEIGHTS[klass]
        names = LIBRARY_PRUNABLE_WEIGHTS.get(f"{klass.__module__}.{klass.__qualname__}")
        if names is not None:
            return names
    return None


def is_prunable(layer: keras.layers.Layer) -> bool:
    """Whether keras_prune knows which weights of `layer` to prune.

    True for the stock classes in `PRUNABLE_WEIGHTS` (and their subclasses)
    and for any layer with a `get_prunable_weights()` method (the protocol
    for custom layers); never for a model, whose layers are pruned instead.

    Example:

    >>> is_prunable(keras.layers.Conv2D(4, 3)), is_prunable(keras.layers.ReLU())
    (True, False)
    """
    if isinstance(layer, keras.Model):
        return False
    base = stock_class(type(layer))
    return hasattr(base, "get_prunable_weights") or _registered_names(base) is not None


def stock_class(cls: type) -> type:
    """The class a masked class was made from: the first layer class in its
    MRO that is not masked (`Dense` for `MaskedDense` and its subclasses)."""
    for klass in cls.__mro__:
        if issubclass(klass, keras.layers.Layer) and not issubclass(
            klass, MaskedLayer | MaskedContainer
        ):
            return klass
    return cls


def find_prunable_weights(layer: keras.layers.Layer) -> list[keras.Variable]:
    """The variables of a built `layer` that pruning masks.

    Args:
        layer: A built Keras layer of a covered class, or one implementing
            `get_prunable_weights()`.

    Returns:
        A list of `keras.Variable`.

    Raises:
        ValueError: If `layer` is not prunable, or a registered variable is
            missing.
    """
    if hasattr(layer, "get_prunable_weights"):
        weights = list(layer.get_prunable_weights())
        if not all(isinstance(w, keras.Variable) for w in weights):
            raise ValueError(
                f"Expected `get_prunable_weights()` of layer {layer.name!r} to "
                f"return keras.Variable objects. Received: {weights!r}"
            )
        return weights
    names = _registered_names(type(layer))
    if names is None:
        raise ValueError(
            f"keras_prune has no rule for layer {layer.name!r} of type "
            f"{type(layer).__name__}: give it a `get_prunable_weights()` method."
        )
    found: dict[str, Any] = {}
    for owner in _own_layers(layer):
        for variable in owner._trainable_variables + owner._non_trainable_variables:
            found.setdefault(variable.name, variable)
    missing = [name for name in names if name not in found and name[-1] != "?"]
    if missing:
        raise ValueError(
            f"Layer {layer.name!r} of type {type(layer).__name__} has no "
            f"weight named {missing}. Received weights: {sorted(found)}"
        )
    return [found[name.rstrip("?")] for name in names if name.rstrip("?") in found]


def _locate(layer: Any, variable: Any) -> tuple[Any, str]:
    """The (owner layer, attribute name) under which `layer` holds `variable`."""
    for owner in _own_layers(layer):
        for attr, value in vars(owner).items():
            if value is variable:
                return owner, attr
    raise ValueError(
        f"Could not find the attribute of layer {layer.name!r} that holds "
        f"the weight {variable.path!r}: keras_prune can only mask weights "
        "stored as an attribute of the layer or of one of its sublayers."
    )


def _mask_keys(located: list[tuple[Any, str]]) -> list[str]:
    """A name per prunable weight that a rebuilt layer gives again: the
    attribute that holds it (`_kernel` -> `"kernel"`), not the variable's
    name, which Keras numbers for unnamed weights."""
    keys: list[str] = []
    for _, attr in located:
        key = attr.lstrip("_") or attr
        while key in keys:
            key = f"{key}_"
        keys.append(key)
    return keys


def zero_optimizer_state(
    optimizer: keras.optimizers.Optimizer | None,
    variable: keras.Variable,
    mask: np.ndarray,
) -> int:
    """Zeroes an optimizer's per-weight state where `mask` is zero.

    With its gradient exactly zero from the cut on, a pruned weight is moved
    only by the optimizer's memory of earlier gradients (Adam's moments,
    SGD's momentum) or by an average of earlier weights (`use_ema`). Zeroing
    the slots of `variable` at the pruned positions leaves every
    element-wise optimizer with an exactly zero update there.

    Args:
        optimizer: A `keras.optimizers.Optimizer` (or `None`: no-op).
        variable: A trainable variable the optimizer updates.
        mask: 0/1 array of the variable's shape.

    Returns:
        How many slot variables were changed.

    Example:

    >>> weight = keras.Variable(np.ones((2, 2)))
    >>> optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    >>> optimizer.apply([keras.ops.ones((2, 2))], [weight])
    >>> zero_optimizer_state(optimizer, weight, np.eye(2))  # the momentum
    1
    """
    inner = getattr(optimizer, "inner_optimizer", None)
    if inner is not None:
        return zero_optimizer_state(inner, variable, mask)
    tracked = getattr(optimizer, "_trainable_variables", None)
    if optimizer is None or not tracked:
        return 0
    try:
        index = optimizer._get_variable_index(variable)
    except (AttributeError, KeyError):
        return 0
    changed = 0
    for value in vars(optimizer).values():
        if (
            not isinstance(value, list)
            or value is tracked
            or len(value) != len(tracked)
        ):
            continue
        slot = value[index]
        if isinstance(slot, keras.Variable) and tuple(slot.shape) == mask.shape:
            current = ops.convert_to_numpy(slot)
            slot.assign(np.where(mask != 0, current, 0).astype(current.dtype))
            changed += 1
    return changed


def _unpack_mask(bits: Any, mask: Any) -> None:
    """Assigns to `mask` the 0/1 values packed in `bits` (`np.packbits`)."""
    size = math.prod(mask.shape)
    values = np.unpackbits(np.asarray(bits), count=size)
    mask.assign(values.reshape(mask.shape).astype(mask.dtype))


@contextlib.contextmanager
def _unlocked(layer: Any) -> Iterator[None]:
    """Lets a built layer take new state (as Keras's `enable_lora` does)."""
    locked = layer._tracker.locked
    layer._tracker.unlock()
    try:
        yield
    finally:
        if locked:
            layer._tracker.lock()


class _Hidden:
    """Holds internal references out of sight of Keras's saving walk, which
    descends into a layer's lists, tuples and dicts (a layer that listed
    itself would recurse forever)."""

    def __init__(self, value: Any):
        self.value = value


#: What Keras's `Layer.get_config` adds to every config, whether or not the
#: class's constructor takes it.
_BASE_CONFIG_KEYS = ("name", "trainable", "dtype")


def construct_from_config(from_config: Any, cls: type, config: dict[str, Any]) -> Any:
    """`from_config(config)`, or, where that fails because Keras's automatic
    config holds base arguments (`name`, `trainable`, `dtype`) that the
    class's constructor does not take (a subclassed model whose `__init__`
    takes no arguments, as the Keras guides write one), the class made from
    the other arguments, with `trainable` set afterwards.

    Keras writes such a config itself and then cannot read it back; the
    retry changes nothing for a class whose `from_config` works."""
    try:
        return from_config(config)
    except TypeError:
        constructor = getattr(cls, "__init__")  # noqa: B009 - the class's
        parameters = inspect.signature(constructor).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            raise
        dropped = [k for k in config if k not in parameters]
        if not dropped or any(k not in _BASE_CONFIG_KEYS for k in dropped):
            raise
    instance = from_config({k: v for k, v in config.items() if k not in dropped})
    if "trainable" in dropped:
        instance.trainable = config["trainable"]
    return instance


class PruningMasks(keras.layers.Layer):
    """The masks of one masked layer: a child layer holding one non-trainable
    0/1 variable per prunable weight, named `<weight>_mask`.

    It is created by `MaskedLayer` when its layer is built; users reach it
    through `layer.masks`. In a `.keras` file it stores each mask as bits,
    and loading the masks zeroes the pruned entries of the layer's weights.

    Args:
        targets: `{key: variable}`, the prunable weights to mask.
        **kwargs: Base layer arguments.
    """

    def __init__(self, targets: dict[str, Any], **kwargs: Any):
        super().__init__(**kwargs)
        object.__setattr__(self, "_targets", _Hidden(dict(targets)))
        self.masks = {
            key: self.add_weight(
                name=f"{key}_mask",
                shape=tuple(variable.shape),
                initializer="ones",
                dtype=variable.dtype,
                trainable=False,
            )
            for key, variable in targets.items()
        }
        self.built = True

    def save_own_variables(self, store: Any) -> None:
        for key, mask in self.masks.items():
            store[key] = np.packbits(ops.convert_to_numpy(mask).ravel() != 0)

    def load_own_variables(self, store: Any) -> None:
        if not list(store.keys()):
            return  # A file whose layer saved its mask itself (MaskedDense 0.1).
        if set(store.keys()) != set(self.masks):
            raise ValueError(
                f"Layer {self.name!r} expects saved masks {sorted(self.masks)}. "
                f"Received: {sorted(store.keys())}"
            )
        for key, mask in self.masks.items():
            _unpack_mask(store[key], mask)
        self.zero_pruned()

    def strays(self) -> list[tuple[Any, np.ndarray, np.ndarray, int]]:
        """`(variable, raw value, value * mask, nonzero pruned entries)` for
        each target with nonzero entries where its mask is zero."""
        found = []
        for key, variable in self._targets.value.items():
            keep = ops.convert_to_numpy(self.masks[key]) != 0
            value = ops.convert_to_numpy(variable)
            count = int(np.count_nonzero(value[~keep]))
            if count:
                masked = np.where(keep, value, 0).astype(value.dtype)
                found.append((variable, value, masked, count))
        return found

    def zero_pruned(self) -> int:
        """Sets every masked-out entry of the targets to exactly zero.

        Returns:
            How many nonzero pruned entries were found (and zeroed).
        """
        found = self.strays()
        for variable, _, masked, _ in found:
            variable.assign(masked)
        return sum(count for *_, count in found)


def _masked_call(call: Any) -> Any:
    """Wraps a stock `call` to run under `masked_weights()`, keeping its
    signature (Keras reads it to route `training` and `mask`)."""

    @functools.wraps(call)
    def masked_call(self: Any, *args: Any, **kwargs: Any) -> Any:
        noise = vars(self).get("_variational_noise")
        if noise is not None and _in_training():
            # Sparse variational dropout (keras_prune.variational).
            return noise.value.noisy_call(self, call, args, kwargs)
        with self.masked_weights():
            return call(self, *args, **kwargs)

    return masked_call


def _in_training() -> bool:
    """Whether the layer call running now is a training call. Keras keeps
    `training` in its call context, also for layers whose `call` takes no
    `training` argument (convolutions); outside any layer call there is
    none, which counts as inference."""
    from keras.src.backend.common import global_state

    context = global_state.get_global_attribute("current_call_ctx")
    return bool(context is not None and context.get_value("training"))


def _masked_get_config(cls: type) -> Any:
    """`MaskedLayer.get_config` for the masked version of `cls`, marked as
    Keras's default where `cls` has no `get_config` of its own: Keras then
    still builds the config from the constructor's arguments (a custom
    layer needs no `get_config`)."""

    def get_config(self: Any) -> dict[str, Any]:
        return MaskedLayer.get_config(self)

    if getattr(cls.get_config, "_is_default", False):  # type: ignore[attr-defined]
        get_config._is_default = True  # type: ignore[attr-defined]
    return get_config


class _MaskConstraint:
    """The constraint a masked layer puts on each prunable weight: after
    every optimizer step, `weight * mask` (after the user's own constraint).

    It uses the mask as read by the same training step's forward pass, not
    the mask variable: JAX's trainer hands an optimizer only the trainable
    and optimizer variables, so a constraint that read another variable
    would fail there. With the gradient of a pruned weight already exactly
    zero, this catches what an optimizer does without gradients (momentum,
    weight decay, Muon's orthogonalized update, EMA)."""

    def __init__(self, layer: Any, key: str, inner: Any):
        self.layer = _Hidden(layer)
        self.key = key
        self.inner = inner

    def __call__(self, weight: Any) -> Any:
        if self.inner is not None:
            weight = self.inner(weight)
        layer = self.layer.value
        mask = layer._mask_reads.value.get(self.key)
        if mask is None:  # No forward pass yet (an optimizer used by hand).
            mask = layer._masks_layer.masks[self.key].value
        return ops.multiply(weight, ops.cast(mask, weight.dtype))


# The mixins always come first in front of a Keras layer class; to the type
# checker they are layers (Keras ships no types: `Layer` is `Any` to it).
if TYPE_CHECKING:
    from keras.layers import Layer as _Layer
else:
    _Layer = object


class MaskedLayer(_Layer):
    """Mixin that masks the prunable weights of a stock Keras layer.

    Never used alone: `masked_class(cls)` puts it in front of a layer class
    (`make_prunable` does it for every prunable layer of a model). A masked
    layer computes what the stock layer computes with `weight * mask` in
    place of each prunable weight: same input and output shapes, same
    config, same `.keras` entry plus the masks as bits. Masks are made when
    the layer is built, full (ones).

    Attributes:
        masks: `{weight name: 0/1 variable}`, one per prunable weight, the
            weight's shape.
        prunable_weights: `{weight name: raw variable}`.
        sparsity: Fraction of the prunable weights pruned, in [0, 1].

    Raises:
        ValueError: From `masks`, `prunable_weights`, `sparsity` and
            `prune_to` before the layer is built.

    Example:

    >>> lstm = masked_class(keras.layers.LSTM)(2)
    >>> _ = lstm(np.ones((1, 5, 3)))
    >>> {name: tuple(mask.shape) for name, mask in lstm.masks.items()}
    {'kernel': (3, 8), 'recurrent_kernel': (2, 8)}
    >>> lstm.prune_to({"kernel": np.zeros((3, 8))})
    >>> round(lstm.sparsity, 3)  # 24 of 40 weights
    0.6

    Reference:
        Han et al. 2015, "Learning both Weights and Connections for Efficient
        Neural Networks", arXiv:1506.02626.
    """

    _masks_layer: PruningMasks | None = None

    # --- construction -------------------------------------------------
    def _post_build(self) -> None:
        self._attach_masks()
        pending = vars(self).get("_pending_variational")
        if pending is not None:
            object.__delattr__(self, "_pending_variational")
            from keras_prune.variational import attach

            attach(self, **pending)
        super()._post_build()

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        noise = vars(self).get("_variational_noise")
        if noise is not None:
            config["variational_dropout"] = noise.value.settings()
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Any:
        config = dict(config)
        pending = config.pop("variational_dropout", None)
        layer = super().from_config(config)
        if pending is not None:
            # The noise is made with the masks, when the layer is built.
            object.__setattr__(layer, "_pending_variational", pending)
        return layer

    def _attach_masks(self) -> None:
        """Creates the masks of a built layer (ones: nothing pruned)."""
        if self._masks_layer is not None:
            return
        weights = find_prunable_weights(self)
        located = [_locate(self, w) for w in weights]
        keys = _mask_keys(located)
        slots = [
            (key, owner, attr, w)
            for key, (owner, attr), w in zip(keys, located, weights, strict=True)
        ]
        object.__setattr__(self, "_mask_slots", _Hidden(slots))
        object.__setattr__(self, "_mask_reads", _Hidden({}))
        for key, _, _, variable in slots:
            variable.constraint = _MaskConstraint(self, key, variable.constraint)
        masks = PruningMasks(
            dict(zip(keys, weights, strict=True)),
            name="pruning_masks",
            dtype=self.dtype_policy,
        )
        with _unlocked(self):
            self.pruning_masks = masks
        object.__setattr__(self, "_masks_layer", masks)

    # --- forward ------------------------------------------------------
    @contextlib.contextmanager
    def masked_weights(self, values: dict[str, Any] | None = None) -> Iterator[None]:
        """Within this context the layer's prunable weights read as
        `weight * mask` (each attribute that holds one is swapped for the
        product, then restored). The masked `call` runs in it.

        Args:
            values: `{weight name: tensor}` to read instead of `weight *
                mask` for those weights (variational dropout's variances).
                Defaults to `None`.
        """
        saved = []
        values = values or {}
        try:
            for key, owner, attr, variable in self._mask_slots.value:
                mask = self._built_masks().masks[key].value
                # The constraint of this training step multiplies by the same
                # read, so that it never reads the mask variable itself.
                self._mask_reads.value[key] = mask
                value = variable.value
                if getattr(owner, "lora_enabled", False) and attr.startswith("_"):
                    # LoRA adds its product to the kernel: mask the sum, so
                    # that pruned weights stay zero with LoRA too.
                    value = getattr(owner, attr[1:])
                    saved.append((owner, "lora_enabled", True))
                    object.__setattr__(owner, "lora_enabled", False)
                saved.append((owner, attr, owner.__dict__[attr]))
                object.__setattr__(
                    owner,
                    attr,
                    values[key]
                    if key in values
                    else ops.multiply(value, ops.cast(mask, value.dtype)),
                )
            yield
        finally:
            for owner, attr, original in reversed(saved):
                object.__setattr__(owner, attr, original)

    # --- saving -------------------------------------------------------
    def save_own_variables(self, store: Any) -> None:
        # Write `weight * mask`, without changing the live weights.
        strays = [] if self._masks_layer is None else self._masks_layer.strays()
        for variable, _, masked, _ in strays:
            variable.assign(masked)
        try:
            super().save_own_variables(store)
        finally:
            for variable, raw, _, _ in strays:
                variable.assign(raw)

    # --- public API ---------------------------------------------------
    @property
    def masks(self) -> dict[str, keras.Variable]:
        """`{weight name: 0/1 mask variable}`, one per prunable weight."""
        return dict(self._built_masks().masks)

    @property
    def prunable_weights(self) -> dict[str, keras.Variable]:
        """`{weight name: raw variable}` for the weights the masks prune."""
        self._built_masks()
        return {key: variable for key, _, _, variable in self._mask_slots.value}

    @property
    def sparsity(self) -> float:
        """Fraction of the prunable weights that the masks prune."""
        masks = self._built_masks().masks.values()
        sizes = [math.prod(m.shape) for m in masks]
        kept = [int(np.count_nonzero(ops.convert_to_numpy(m))) for m in masks]
        return 1.0 - sum(kept) / sum(sizes) if sum(sizes) else 0.0

    def prune_to(
        self, masks: Any, optimizer: Any = None, *, regrow: bool = False
    ) -> None:
        """Replaces masks and zeroes the pruned entries of the weights.

        Args:
            masks: A 0/1 array of the weight's shape for a layer with one
                prunable weight, or `{weight name: array}` for any subset of
                the layer's prunable weights.
            optimizer: The optimizer that trains the layer, if it has
                already been used: its per-weight state (moments, momentum,
                EMA) is zeroed at the pruned entries too, so that it cannot
                move them (`IterativePruningCallback` passes the model's).
                Defaults to `None`.
            regrow: Whether `masks` may set to 1 entries that are pruned now.
                Revived weights start at zero (pruning zeroed them). Defaults
                to `False`: pruning only goes one way, and a mask that would
                un-prune a weight is refused.

        Raises:
            ValueError: If a name is unknown, a shape differs, a mask holds
                values other than 0 and 1, or (without `regrow=True`) a mask
                revives pruned weights. Nothing is changed then.

        Example:

        >>> layer = masked_class(keras.layers.Dense)(1)
        >>> _ = layer(np.ones((1, 2)))
        >>> layer.prune_to(np.array([[1.0], [0.0]]))
        >>> layer.sparsity
        0.5
        """
        current = self.masks
        if not isinstance(masks, dict):
            if len(current) != 1:
                raise ValueError(
                    f"Layer {self.name!r} has several prunable weights "
                    f"{sorted(current)}: pass `masks` as a dict by name. "
                    f"Received: masks of type {type(masks).__name__}"
                )
            masks = {next(iter(current)): masks}
        checked = {}
        for key, value in masks.items():
            if key not in current:
                raise ValueError(
                    f"Expected the keys of `masks` to be prunable weights of "
                    f"layer {self.name!r}: {sorted(current)}. Received: {key!r}"
                )
            value = np.asarray(value)
            if value.shape != tuple(current[key].shape):
                raise ValueError(
                    f"Expected `masks[{key!r}]` of shape "
                    f"{tuple(current[key].shape)}. Received: shape {value.shape}"
                )
            if not np.isin(value, (0, 1)).all():
                raise ValueError(
                    f"Expected `masks[{key!r}]` to hold only 0 and 1. Received "
                    f"values such as {value[~np.isin(value, (0, 1))].ravel()[:3]}"
                )
            revived = np.count_nonzero(
                (value != 0) & (ops.convert_to_numpy(current[key]) == 0)
            )
            if revived and not regrow:
                raise ValueError(
                    f"Expected `masks[{key!r}]` to keep the pruned weights of "
                    f"layer {self.name!r} pruned. Received a mask that revives "
                    f"{revived} of them; pass regrow=True to un-prune on purpose."
                )
            checked[key] = value != 0
        for key, value in checked.items():
            current[key].assign(value.astype(current[key].dtype))
            if optimizer is not None:
                zero_optimizer_state(optimizer, self.prunable_weights[key], value)
        self._built_masks().zero_pruned()

    def _built_masks(self) -> PruningMasks:
        if self._masks_layer is None:
            raise ValueError(
                f"Layer {self.name!r} is not built yet: its masks are made "
                "when it is built (call it on data, or build the model)."
            )
        return self._masks_layer


_MASKED_CLASSES: dict[type, type] = {}


def masked_class(cls: type) -> type:
    """Returns the masked version of a Keras layer class, `Masked<Name>`.

    For a class with prunable weights (a stock class of `PRUNABLE_WEIGHTS`
    or a subclass, or a class with `get_prunable_weights()`), the class with
    `MaskedLayer` in front: its weights are masked. For any other layer or
    model class, the class with `MaskedContainer` in front: it holds masked
    sublayers that its own constructor or `build` makes as stock layers
    (attention layers, custom blocks, subclassed models), and its config
    records which, so that they are masked again when it is loaded.

    The class is made once per `cls` and registered as a Keras serializable
    (`"keras_prune>Masked<Name>"`), so `.keras` files load it without
    `custom_objects`. For your own classes, call this before
    `keras.models.load_model` in a new process (`make_prunable` calls it in
    the process that converts).

    Args:
        cls: A `keras.layers.Layer` subclass.

    Returns:
        A subclass of `cls` with `MaskedLayer` or `MaskedContainer` first in
        its bases.

    Raises:
        ValueError: If `cls` is not a layer class.

    Example:

    >>> MaskedConv2D = masked_class(keras.layers.Conv2D)
    >>> MaskedConv2D.__name__
    'MaskedConv2D'
    >>> layer = MaskedConv2D(4, 3)
    >>> _ = layer(np.ones((1, 8, 8, 2)))
    >>> sorted(layer.masks)
    ['kernel']
    """
    if not (isinstance(cls, type) and issubclass(cls, keras.layers.Layer)):
        raise ValueError(
            f"Expected `cls` to be a keras.layers.Layer subclass. Received: {cls!r}"
        )
    if issubclass(cls, MaskedLayer | MaskedContainer):
        return cls
    if cls in _MASKED_CLASSES:
        return _MASKED_CLASSES[cls]
    namespace = {
        "__module__": __name__,
        "__doc__": (
            f"A `{cls.__module__}.{cls.__name__}` with masked weights or "
            "sublayers; see `keras_prune.masking`."
        ),
    }
    if hasattr(cls, "get_prunable_weights") or _registered_names(cls) is not None:
        bases: tuple[type, ...] = (MaskedLayer, cls)
        namespace["call"] = _masked_call(cls.call)  # type: ignore[attr-defined]
        namespace["get_config"] = _masked_get_config(cls)
    else:
        bases = (MaskedContainer, cls)
    masked = type(_masked_name(cls), bases, namespace)
    masked = keras.saving.register_keras_serializable(package="keras_prune")(masked)
    _MASKED_CLASSES[cls] = masked
    return masked


#: Libraries whose classes are registered with Keras on import, and whose
#: classes' masked names carry their registered names
#: (`Maskedkeras_hub_GPT2Backbone`), so that they never take a name a
#: user's class of the same name (a keras.io `TransformerEncoder`) needs.
LIBRARIES = ("keras_hub", "keras_nlp", "keras_cv", "keras_rs")


def library_name(cls: type) -> str | None:
    """For a class of a library of `LIBRARIES`, a name that no other class
    has: its registered name (`keras_hub_GPT2Backbone`), or for a class the
    library does not register (Gemma3's own `RMSNormalization`) its module
    and name; `None` for every other class."""
    if cls.__module__.split(".")[0] not in LIBRARIES:
        return None
    registered = keras.saving.get_registered_name(cls)
    if ">" not in registered:
        registered = f"{cls.__module__}.{cls.__qualname__}"
    return registered.replace(">", "_").replace(".", "_")


def _masked_name(cls: type) -> str:
    """The masked class's name, a function of `cls` alone: `Masked<Name>`
    for Keras's and the user's classes, `Masked<package>_<Name>` after the
    registered name for the libraries of `LIBRARIES`. A class defined again
    (a re-run notebook cell) takes over its name; another class of the same
    name is refused."""
    qualified = library_name(cls)
    name = f"Masked{qualified or cls.__name__}"
    taken = keras.saving.get_registered_object(f"keras_prune>{name}")
    if taken is None:
        return name
    original = taken.__mro__[2]
    if (original.__module__, original.__qualname__) == (
        cls.__module__,
        cls.__qualname__,
    ):
        keras.saving.get_custom_objects().pop(f"keras_prune>{name}")
        return name
    raise ValueError(
        f"Expected one layer class named {cls.__name__!r} to mask. Received: "
        f"{cls!r}, while {original!r} already uses the name keras_prune>{name}. "
        "Rename one of them."
    )


def mask_in_place(layer: keras.layers.Layer) -> None:
    """Turns `layer` into its masked class (`masked_class`), keeping the
    object, its weights and its place in every model that holds it. A built
    layer gets full masks at once, an unbuilt one when it is built."""
    if isinstance(layer, MaskedLayer | MaskedContainer):
        return
    layer.__class__ = masked_class(type(layer))
    if isinstance(layer, MaskedLayer) and layer.built:
        layer._attach_masks()


def unmask_in_place(layer: keras.layers.Layer) -> None:
    """Turns a masked layer or container back into its stock class; a
    masked layer keeps `weight * mask` as its weights and loses its masks
    and constraints."""
    if isinstance(layer, MaskedLayer) and layer._masks_layer is not None:
        from keras_prune.variational import detach

        detach(layer)
        masks = layer._masks_layer
        masks.zero_pruned()
        for _, _, _, variable in layer._mask_slots.value:
            if isinstance(variable.constraint, _MaskConstraint):
                variable.constraint = variable.constraint.inner
        with _unlocked(layer):
            if masks in layer._layers:
                layer._layers.remove(masks)
            delattr(layer, "pruning_masks")
        for name in ("_masks_layer", "_mask_slots", "_mask_reads"):
            if name in vars(layer):
                object.__delattr__(layer, name)
    if isinstance(layer, MaskedLayer | MaskedContainer):
        layer.__class__ = stock_class(type(layer))


def is_graph_model(layer: keras.layers.Layer) -> bool:
    """Whether `layer` is a Sequential or Functional model (whose config
    holds its layers' configs)."""
    from keras.src.models.functional import Functional

    return isinstance(layer, keras.Sequential | Functional)


def carries_sublayer_configs(layer: keras.layers.Layer) -> bool:
    """Whether `layer`'s config holds its sublayers' configs, so that masked
    sublayers come back masked from the config alone: Sequential and
    Functional models built from their graph config, wrappers
    (`TimeDistributed`, `Bidirectional`) and `RNN` with its cell.

    A graph model whose class rebuilds it from constructor arguments
    instead (a keras-hub `Backbone` or `Task`, any Functional subclass with
    its own `__init__` or `get_config`) does not: its sublayers come back
    stock, so it is a container (`MaskedContainer`) like a custom block."""
    if is_graph_model(layer):
        return _config_is_graph(stock_class(type(layer)))
    return isinstance(
        layer, keras.layers.Wrapper | keras.layers.Bidirectional | keras.layers.RNN
    )


def is_plain_graph_model(layer: keras.layers.Layer) -> bool:
    """Whether `layer` is a Sequential or Functional model rebuilt from its
    graph config (not from constructor arguments, as a keras-hub backbone
    is): one whose layers the converters can replace one by one."""
    return is_graph_model(layer) and carries_sublayer_configs(layer)


def _config_is_graph(cls: Any) -> bool:
    """Whether a graph model class is saved and rebuilt through Keras's
    graph config: Keras's own rule (`Functional.get_config` falls back to
    the constructor's arguments for a class whose constructor is not
    Functional's), and neither method overridden."""
    from keras.src.models.functional import Functional, functional_like_constructor

    if issubclass(cls, keras.Sequential):
        base: Any = keras.Sequential
    else:
        base = Functional
        if not functional_like_constructor(cls):
            return False
    return (
        cls.get_config is base.get_config
        and cls.from_config.__func__ is base.from_config.__func__
    )


def _attributes(layer: Any) -> dict[str, Any]:
    """A layer's instance attributes, sublayers included (PyTorch's
    `Module` keeps those in `_modules`, not in `__dict__`)."""
    found = dict(vars(layer))
    modules = found.get("_modules")
    if isinstance(modules, dict):
        found.update(modules)
    return found


def _child_steps(parent: Any) -> list[tuple[list[Any], Any]]:
    """`(step, sublayer)` for each direct sublayer of `parent`, where a step
    addresses it the same way in any rebuild of `parent`: its index in
    `parent.layers` for a graph model, else the attribute that holds it (and
    the index, in a list attribute)."""
    if is_graph_model(parent):
        return [(["layers", i], layer) for i, layer in enumerate(parent.layers)]
    steps: list[tuple[list[Any], Any]] = []
    for attr, value in _attributes(parent).items():
        if attr in ("_layers", "pruning_masks", "_masks_layer", "_modules"):
            continue
        if isinstance(value, keras.layers.Layer):
            steps.append((["attr", attr], value))
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                if isinstance(item, keras.layers.Layer):
                    steps.append((["item", attr, i], item))
        elif isinstance(value, dict):
            for k, item in value.items():
                if isinstance(item, keras.layers.Layer) and isinstance(k, str):
                    steps.append((["item", attr, k], item))
    return steps


def _resolve(parent: Any, path: list[list[Any]]) -> tuple[Any, int]:
    """Follows `path` from `parent` as far as it goes: returns the last
    layer reached and how many steps led to it."""
    layer = parent
    for done, step in enumerate(path):
        if step[0] == "layers":
            layers = layer.layers if is_graph_model(layer) else []
            child = layers[step[1]] if step[1] < len(layers) else None
        elif step[0] == "attr":
            child = _attributes(layer).get(step[1])
        else:
            items = _attributes(layer).get(step[1])
            if isinstance(items, dict):
                child = items.get(step[2])
            elif isinstance(items, list | tuple) and step[2] < len(items):
                child = items[step[2]]
            else:
                child = None
        if not isinstance(child, keras.layers.Layer):
            return layer, done
        layer = child
    return layer, len(path)


def masked_paths(container: keras.layers.Layer) -> list[list[list[Any]]]:
    """Paths (lists of steps, see `_child_steps`) from `container` to every
    masked layer below it."""
    found: list[list[list[Any]]] = []
    seen: set[int] = set()

    def visit(parent: Any, path: list[list[Any]]) -> None:
        for step, child in _child_steps(parent):
            if id(child) in seen:
                continue
            seen.add(id(child))
            if isinstance(child, MaskedLayer):
                found.append([*path, step])
            else:
                visit(child, [*path, step])

    visit(container, [])
    return found


class MaskedContainer(_Layer):
    """Mixin for a layer or model that holds masked sublayers it builds
    itself (in `__init__` or `build`) as stock layers: attention layers,
    custom blocks, subclassed models.

    Its config gains `"masked_sublayers"`, the paths to its masked
    sublayers; `from_config` and `build` mask them again, so a `.keras` file
    loads with every mask. Made by `masked_class`; never used alone.

    Example:

    >>> attention = keras.layers.MultiHeadAttention(2, 4)
    >>> _ = attention(np.ones((1, 3, 8)), np.ones((1, 3, 8)))
    >>> for sublayer in attention._flatten_layers(include_self=False):
    ...     if is_prunable(sublayer):
    ...         mask_in_place(sublayer)
    >>> mask_in_place(attention)
    >>> type(attention).__name__, len(attention.get_config()["masked_sublayers"])
    ('MaskedMultiHeadAttention', 4)
    """

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "masked_sublayers": masked_paths(self)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Any:
        config = dict(config)
        paths = config.pop("masked_sublayers", [])
        layer = construct_from_config(super().from_config, cls, config)
        object.__setattr__(layer, "_pending_masks", _Hidden([list(p) for p in paths]))
        layer._mask_pending()
        return layer

    def _post_build(self) -> None:
        # Sublayers made by `build` exist now, before their weights load.
        self._mask_pending()
        super()._post_build()

    def _mask_pending(self) -> None:
        pending = getattr(self, "_pending_masks", None)
        if pending is None:
            return
        left = []
        for path in pending.value:
            layer, done = _resolve(self, path)
            if done == len(path):
                # The layers on the way get their masked classes as well:
                # Keras names a graph model's entries in the weights file
                # after their classes, so a block must be the masked class
                # it was when it was saved.
                for step in range(1, len(path)):
                    on_the_way = _resolve(self, path[:step])[0]
                    if not carries_sublayer_configs(on_the_way):
                        mask_in_place(on_the_way)  # as `make_prunable` did
                mask_in_place(layer)
            elif done == 0:
                left.append(path)  # Made by this layer's `build`: wait.
            else:
                # A sublayer (made stock by this layer) makes the rest in its
                # own `build`: it takes over the rest of the path.
                mask_in_place(layer)
                if isinstance(layer, MaskedContainer):
                    handed = getattr(layer, "_pending_masks", None)
                    if handed is None:
                        handed = _Hidden([])
                        object.__setattr__(layer, "_pending_masks", handed)
                    handed.value.append(path[done:])
                    layer._mask_pending()
        pending.value = left


def masked_layers(model: keras.layers.Layer) -> list[MaskedLayer]:
    """Every masked layer in `model`, wherever it lives (nested models,
    wrappers, custom layers), each once.

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), MaskedDense(2, name="fc")])
    >>> [layer.name for layer in masked_layers(model)]
    ['fc']
    """
    return [layer for layer in _own_layers(model) if isinstance(layer, MaskedLayer)]


def layer_labels(layers: list[keras.layers.Layer]) -> list[str]:
    """A label per layer for logs, summaries and per-layer arguments: its
    name, or its path in the model (`"attention_1/query"`) where several
    layers share the name (the projections of two attention layers).

    Example:

    >>> layer_labels([keras.layers.Dense(1, name="a"), keras.layers.Dense(1, name="b")])
    ['a', 'b']
    """
    names = [layer.name for layer in layers]
    return [
        layer.name
        if names.count(layer.name) == 1
        else (getattr(layer, "path", None) or layer.name)
        for layer in layers
    ]


def iter_masked_weights(
    model: keras.layers.Layer,
) -> Iterator[tuple[MaskedLayer, str, keras.Variable, keras.Variable]]:
    """Yields `(layer, weight name, raw variable, mask variable)` for every
    masked weight of `model`."""
    for layer in masked_layers(model):
        if layer._masks_layer is None:
            continue
        masks = layer.masks
        for key, variable in layer.prunable_weights.items():
            yield layer, key, variable, masks[key]


@keras.saving.register_keras_serializable(package="keras_prune")
class MaskedDense(MaskedLayer, keras.layers.Dense):
    """A `keras.layers.Dense` whose kernel is multiplied by a 0/1 mask.

    Exactly `masked_class(keras.layers.Dense)` with two conveniences kept
    from keras_prune 0.1: `layer.mask` (the kernel's mask) and
    `layer.masked_kernel`, and it loads `.keras` files written by 0.1.
    Computes `activation(inputs @ (kernel * mask) + bias)`; takes every
    `Dense` argument.

    Input shape:
        N-D tensor with shape `(batch_size, ..., input_dim)`.

    Output shape:
        N-D tensor with shape `(batch_size, ..., units)`.

    Example:

    >>> layer = MaskedDense(2)
    >>> y = layer(np.ones((1, 3)))
    >>> layer.prune_to(np.array([[1, 0], [1, 0], [1, 0]]))
    >>> layer.sparsity
    0.5

    Reference:
        Han et al. 2015, "Learning both Weights and Connections for Efficient
        Neural Networks", arXiv:1506.02626.
    """

    call = _masked_call(keras.layers.Dense.call)

    @property
    def mask(self) -> keras.Variable:
        """The kernel's 0/1 mask variable."""
        return self.masks["kernel"]

    @property
    def masked_kernel(self) -> Any:  # a backend tensor
        """The kernel with pruned weights zeroed: `kernel * mask`."""
        return ops.multiply(self.kernel, self.mask)

    def load_own_variables(self, store: Any) -> None:
        if "mask_bits" not in store.keys():
            super().load_own_variables(store)
            return
        # A file written by keras_prune 0.1: kernel, bias and the mask's bits.
        self._kernel.assign(store["kernel"])
        if self.bias is not None:
            self.bias.assign(store["bias"])
        _unpack_mask(store["mask_bits"], self.mask)
        self._built_masks().zero_pruned()


_MASKED_CLASSES[keras.layers.Dense] = MaskedDense
# The masked classes of every covered stock class, and of the stock layers
# that make prunable sublayers in `build`, exist from import on: `.keras`
# files that hold them load in any process.
for _cls in (
    *PRUNABLE_WEIGHTS,
    keras.layers.MultiHeadAttention,
    keras.layers.GroupQueryAttention,
):
    masked_class(_cls)
