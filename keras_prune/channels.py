"""Channel groups of a graph model: which units, filters and channels can
only be removed together.

Structured pruning removes whole units (of `Dense`), filters (of
convolutions) and channels (of depthwise convolutions). In a real network
they are coupled: a filter of a convolution feeds a channel of the
`BatchNormalization` after it, the rows of the next layers' kernels that read
it and, through a residual `Add`, the filters of every other convolution
added to it. `ChannelGraph` walks a Sequential or Functional model once and
gives every channel of every tensor a *group*: channels in one group can only
be removed together. The same groups serve the callback's
`granularity="unit"` (it ranks and prunes groups) and `shrink` (it removes
them).

How the walk propagates a tensor's channels (its last axis, channels-last):

- a `Dense`, convolution, separable convolution or `Embedding` makes new
  groups, one per output unit or filter, and reads its input's groups in its
  kernel's input rows;
- a depthwise convolution keeps its input's groups (output channel
  `c * depth_multiplier + k` belongs to input channel `c`'s group);
- `BatchNormalization`, elementwise activations, dropout, pooling, padding,
  cropping and upsampling keep them; `Flatten` repeats them for every
  position (channel `c` of an `(h, w, C)` input is features `c, C + c, ...`);
- `Add`, `Multiply` and the other elementwise merges join the groups of
  their inputs channel by channel (residual coupling); `Concatenate` on the
  channel axis puts them side by side.

A group is *pinned*, never removed, when one of its channels is a model
input or output, or reaches an operation that mixes channels in a way that
a removed channel would change (softmax over channels, `LayerNormalization`,
a `Reshape` of the channel axis, `channels_first` layouts, grouped
convolutions) or one this module does not know (a custom layer, an attention
layer, a recurrent layer). A nested Sequential or Functional model (a
`keras.applications` backbone) is walked through. The reason is kept, so that
nothing is left out silently.

Reference: the dependency graph of torch-pruning, Fang et al. 2023,
"DepGraph: Towards Any Structural Pruning", arXiv:2301.12900.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import keras
import numpy as np

from keras_prune.masking import is_graph_model, is_plain_graph_model

_L = keras.layers

# Layers that keep the channels of their (first) input, channel by channel.
_CHANNELWISE: tuple[type, ...] = (
    _L.ReLU,
    _L.LeakyReLU,
    _L.ELU,
    _L.Dropout,
    _L.SpatialDropout1D,
    _L.SpatialDropout2D,
    _L.SpatialDropout3D,
    _L.GaussianNoise,
    _L.GaussianDropout,
    _L.AlphaDropout,
    _L.ActivityRegularization,
    _L.Identity,
    _L.MaxPooling1D,
    _L.MaxPooling2D,
    _L.MaxPooling3D,
    _L.AveragePooling1D,
    _L.AveragePooling2D,
    _L.AveragePooling3D,
    _L.GlobalMaxPooling1D,
    _L.GlobalMaxPooling2D,
    _L.GlobalMaxPooling3D,
    _L.GlobalAveragePooling1D,
    _L.GlobalAveragePooling2D,
    _L.GlobalAveragePooling3D,
    _L.ZeroPadding1D,
    _L.ZeroPadding2D,
    _L.ZeroPadding3D,
    _L.Cropping1D,
    _L.Cropping2D,
    _L.Cropping3D,
    _L.UpSampling1D,
    _L.UpSampling2D,
    _L.UpSampling3D,
    _L.RepeatVector,
    _L.Activation,
    _L.BatchNormalization,
    _L.PReLU,
)
_ELEMENTWISE_MERGES: tuple[type, ...] = (
    _L.Add,
    _L.Subtract,
    _L.Multiply,
    _L.Average,
    _L.Maximum,
    _L.Minimum,
)
_CONVOLUTIONS: tuple[type, ...] = (_L.Conv1D, _L.Conv2D, _L.Conv3D)
_TRANSPOSED: tuple[type, ...] = (
    _L.Conv1DTranspose,
    _L.Conv2DTranspose,
    _L.Conv3DTranspose,
)
_DEPTHWISE: tuple[type, ...] = (_L.DepthwiseConv1D, _L.DepthwiseConv2D)
_SEPARABLE: tuple[type, ...] = (_L.SeparableConv1D, _L.SeparableConv2D)
# Activations that mix the units of their input.
_MIXING_ACTIVATIONS = ("softmax", "log_softmax")
# The weight that makes each kind's units; for the mixing kinds its first
# axis in `LayerChannels.weight_axes` reads the input, its last makes units.
_KERNELS = {
    "dense": "kernel",
    "conv": "kernel",
    "conv_transpose": "kernel",
    "separable": "pointwise_kernel",
    "embedding": "embeddings",
}
_MIXING = ("dense", "conv", "conv_transpose", "separable")


@dataclasses.dataclass
class LayerChannels:
    """The channel groups a layer reads and makes.

    Attributes:
        layer: The layer.
        kind: `"dense"` (also a 2-D `EinsumDense`), `"conv"`,
            `"conv_transpose"`, `"depthwise"`, `"separable"`, `"embedding"`,
            `"reshape"` (a `Reshape` that keeps the channel axis last) or
            `"channelwise"` (normalization, activation and other layers
            with per-channel weights or none).
        inputs: Group of each input channel: of each row of the kernel's
            input axis (for a `Dense` after `Flatten`, of each flattened
            feature); empty for an `Embedding` (its input holds indices).
        outputs: Group of each output unit, filter or channel.
        input: The (symbolic) input tensor of the layer's first call;
            `None` inside a nested model.
        calls: How many times the model calls the layer (shared layers:
            more than one).

    Example:

    >>> model = keras.Sequential([keras.Input((4, 4, 2)),
    ...     keras.layers.Conv2D(3, 1, name="conv"), keras.layers.Flatten(),
    ...     keras.layers.Dense(1, name="out")])
    >>> graph = ChannelGraph(model)
    >>> conv, out = graph.layers["conv"], graph.layers["out"]
    >>> conv.kind, len(conv.outputs), out.inputs.shape  # 16 positions x 3
    ('conv', 3, (48,))
    >>> bool((out.inputs[:3] == conv.outputs).all())  # position 0's channels
    True
    """

    layer: Any
    kind: str
    inputs: np.ndarray
    outputs: np.ndarray
    input: Any = None
    calls: int = 1

    def reads(self) -> tuple[str, int, np.ndarray] | None:
        """The kernel rows that read the input's groups, for a layer whose
        kernel mixes its input channels into each output (dense,
        convolutions, the pointwise part of separable ones): `(weight name,
        axis, group of each row)`; `None` otherwise. These rows are the
        *outgoing weights* of the groups they read."""
        if self.kind not in _MIXING:
            return None
        name = _KERNELS[self.kind]
        axis, ids = self.weight_axes()[name][0]
        return name, axis, ids

    def makes(self) -> tuple[str, int, np.ndarray] | None:
        """The weights that make the layer's units or filters: `(weight
        name, axis, group of each unit)`; `None` for a layer that only
        carries its input's groups."""
        name = _KERNELS.get(self.kind)
        if name is None:
            return None
        axis, ids = self.weight_axes()[name][-1]
        return name, axis, ids

    def weight_axes(self) -> dict[str, list[tuple[int, np.ndarray]]]:
        """`{weight name: [(axis, groups along that axis), ...]}`: how each
        weight of the layer is indexed by channel groups. Removing a group
        removes its entries along every listed axis."""
        inputs, outputs = self.inputs, self.outputs
        if self.kind == "dense":
            return {"kernel": [(0, inputs), (1, outputs)], "bias": [(0, outputs)]}
        if self.kind == "conv":
            return {"kernel": [(-2, inputs), (-1, outputs)], "bias": [(0, outputs)]}
        if self.kind == "conv_transpose":
            return {"kernel": [(-1, inputs), (-2, outputs)], "bias": [(0, outputs)]}
        if self.kind == "depthwise":
            return {"kernel": [(-2, inputs)], "bias": [(0, outputs)]}
        if self.kind == "separable":
            inner = np.repeat(inputs, self.layer.depth_multiplier)
            return {
                "depthwise_kernel": [(-2, inputs)],
                "pointwise_kernel": [(-2, inner), (-1, outputs)],
                "bias": [(0, outputs)],
            }
        if self.kind == "embedding":
            return {"embeddings": [(-1, outputs)]}
        # Channelwise: every weight whose last axis spans the channels.
        return {
            weight_name(v): [(-1, outputs)]
            for v in self.layer.weights
            if v.shape and v.shape[-1] == len(outputs)
        }


def nonzero_groups(array: np.ndarray, axis: int, ids: np.ndarray) -> set[int]:
    """The groups along `axis` of `array` that hold a nonzero entry (`ids`:
    the group of each index along `axis`)."""
    other = tuple(a for a in range(array.ndim) if a != axis % array.ndim)
    nonzero = np.any(np.asarray(array) != 0, axis=other)
    return set(ids[nonzero].tolist())


def weight_name(variable: Any) -> str:
    """A layer weight's own name (`"kernel"`, `"moving_mean"`), the last
    part of its path."""
    return str(variable.path).rsplit("/", 1)[-1]


class ChannelGraph:
    """The channel groups of a Sequential or Functional model.

    Args:
        model: A built Sequential or Functional model (masked or stock).

    Attributes:
        layers: `{layer name: LayerChannels}` for every layer the walk
            understands (the others pin their channels); a layer of a nested
            model whose name repeats is `"<model>/<layer>"`.
        pinned: `{group: reason}` for every group that can never be
            removed, with the first reason found (such as `"model output"`).

    Raises:
        ValueError: For a subclassed model or an unbuilt one.

    Example:

    >>> model = keras.Sequential([keras.Input((8, 8, 1)),
    ...     keras.layers.Conv2D(4, 3, name="conv"),
    ...     keras.layers.BatchNormalization(name="bn"),
    ...     keras.layers.Flatten(name="flatten"),
    ...     keras.layers.Dense(2, name="head")])
    >>> graph = ChannelGraph(model)
    >>> conv, head = graph.layers["conv"], graph.layers["head"]
    >>> len(set(conv.outputs)), head.inputs.shape  # 4 filters, 36 x 4 rows
    (4, (144,))
    >>> sorted(set(graph.pinned.values()))
    ['model input', 'model output']
    >>> len(graph.removable_groups())  # the 4 filters of conv
    4
    """

    def __init__(self, model: keras.Model):
        if not is_graph_model(model):
            raise ValueError(
                "Expected a Sequential or Functional model: channel groups "
                "are read from the layer graph, which a subclassed model does "
                f"not expose. Received: {type(model).__name__} {model.name!r}"
            )
        graph = getattr(model, "_functional", None) or model
        if not getattr(graph, "_nodes_by_depth", None):
            raise ValueError(
                f"Expected a built model. Received: model {model.name!r} is "
                "not built: call it on data or give it an `Input`."
            )
        self.model = model
        self._parent: list[int] = []
        self._pins: dict[int, str] = {}
        self._ids: dict[int, np.ndarray] = {}
        self._layers: dict[int, LayerChannels] = {}
        self._owners: list[str] = []  # the nested models being walked
        self._paths: dict[int, str] = {}
        self._walk(graph)
        for tensor in graph.outputs:
            self._pin(self._ids_of(tensor), "model output")
        self.pinned: dict[int, str] = {}
        for index, reason in self._pins.items():
            self.pinned.setdefault(self.find(index), reason)
        entries = list(self._layers.values())
        names = [entry.layer.name for entry in entries]
        labels = [
            name if names.count(name) == 1 else self._paths[id(entry.layer)]
            for name, entry in zip(names, entries, strict=True)
        ]
        self.layers = {
            label: dataclasses.replace(
                entry,
                inputs=self._roots(entry.inputs),
                outputs=self._roots(entry.outputs),
            )
            for label, entry in zip(labels, entries, strict=True)
        }

    # --- union-find over channel ids -----------------------------------
    def _new(self, count: int, pin: str | None = None) -> np.ndarray:
        start = len(self._parent)
        self._parent.extend(range(start, start + count))
        ids = np.arange(start, start + count)
        if pin is not None:
            self._pin(ids, pin)
        return ids

    def find(self, index: int) -> int:
        """The group of channel id `index` (its union-find root)."""
        parent = self._parent
        root = int(index)
        while parent[root] != root:
            root = parent[root]
        while parent[index] != root:  # path compression
            parent[index], index = root, parent[index]
        return root

    def _roots(self, ids: np.ndarray) -> np.ndarray:
        return np.array([self.find(i) for i in ids], dtype=np.int64)

    def _join(self, a: np.ndarray, b: np.ndarray) -> None:
        for i, j in zip(a.tolist(), b.tolist(), strict=True):
            ri, rj = self.find(i), self.find(j)
            if ri != rj:
                self._parent[max(ri, rj)] = min(ri, rj)

    def _pin(self, ids: np.ndarray, reason: str) -> None:
        for i in np.unique(ids).tolist():
            self._pins.setdefault(i, reason)

    def _ids_of(self, tensor: Any) -> np.ndarray:
        return self._ids[id(tensor)]

    # --- the walk --------------------------------------------------------
    def _walk(self, graph: Any) -> None:
        for depth in sorted(graph._nodes_by_depth, reverse=True):
            for node in graph._nodes_by_depth[depth]:
                self._visit(node)

    def _visit(self, node: Any) -> None:
        layer = node.operation
        if node.is_input:
            for tensor in node.outputs:
                if id(tensor) not in self._ids:  # a nested model's: mapped
                    self._ids[id(tensor)] = self._new(_channels(tensor), "model input")
            return
        inputs = [self._ids_of(t) for t in node.input_tensors]
        # A nested model rebuilt from its constructor's arguments (a
        # keras-hub backbone) is copied whole by `shrink`: not walked.
        nested = is_plain_graph_model(layer)
        if nested and self._nested(layer, node, inputs):
            return
        reason = _unsupported(layer, node)
        outputs = None if reason else self._rule(layer, node, inputs)
        if outputs is None:
            reason = reason or (
                f"read by {type(layer).__name__}, which channel pruning does "
                "not see through"
            )
            why = f"{reason} ({layer.name!r})"
            for ids in inputs:
                self._pin(ids, why)
            outputs = [self._new(_channels(t), why) for t in node.outputs]
        for tensor, ids in zip(node.outputs, outputs, strict=True):
            self._ids[id(tensor)] = ids

    def _nested(self, model: Any, node: Any, inputs: list[np.ndarray]) -> bool:
        """Walks a nested Sequential or Functional model's own graph, its
        inputs carrying the groups of the node's; `False` where its inputs
        or outputs do not match the node's (it is then pinned)."""
        graph = getattr(model, "_functional", None) or model
        outputs = list(getattr(graph, "outputs", None) or [])
        if len(graph.inputs) != len(inputs) or len(outputs) != len(node.outputs):
            return False
        for tensor, ids in zip(graph.inputs, inputs, strict=True):
            # Its `Input` keeps its shape in any rebuild: what enters stays.
            self._pin(ids, f"input of nested model {model.name!r}")
            self._ids[id(tensor)] = ids
        self._owners.append(model.name)
        try:
            self._walk(graph)
        finally:
            self._owners.pop()
        for outer, inner in zip(node.outputs, outputs, strict=True):
            self._ids[id(outer)] = self._ids_of(inner)
        return True

    def _record(
        self,
        node: Any,
        kind: str,
        inputs: np.ndarray,
        outputs: np.ndarray,
    ) -> np.ndarray:
        """Records the groups of the node's layer; a shared layer's later
        calls join their groups with its first call's. Returns the output
        ids."""
        layer = node.operation
        seen = self._layers.get(id(layer))
        if seen is None:
            # A nested model's tensors are not reachable from the model's
            # inputs: no `input` to read values at.
            tensor = None if self._owners else node.input_tensors[0]
            self._paths[id(layer)] = "/".join([*self._owners, layer.name])
            self._layers[id(layer)] = LayerChannels(
                layer, kind, inputs, outputs, tensor
            )
            return outputs
        seen.calls += 1
        if len(inputs) and len(seen.inputs):
            self._join(seen.inputs, inputs)
        if kind != "channelwise":
            return seen.outputs
        self._join(seen.outputs, outputs)
        return outputs

    def _rule(
        self, layer: Any, node: Any, inputs: list[np.ndarray]
    ) -> list[np.ndarray] | None:
        """Output ids for a supported layer; `None` pins it."""
        if len(node.outputs) != 1 or len(inputs) == 0:
            return None
        out_tensor = node.outputs[0]
        units = _channels(out_tensor)
        if isinstance(layer, _ELEMENTWISE_MERGES):
            if any(len(ids) != len(inputs[0]) for ids in inputs):
                return None  # broadcasting over channels
            for ids in inputs[1:]:
                self._join(inputs[0], ids)
            return [inputs[0]]
        if isinstance(layer, _L.Concatenate):
            rank = len(out_tensor.shape)
            if layer.axis in (-1, rank - 1):
                return [np.concatenate(inputs)]
            for ids in inputs[1:]:
                self._join(inputs[0], ids)
            return [inputs[0]]
        if len(inputs) != 1:
            return None
        ids = inputs[0]
        if isinstance(layer, _L.Flatten):
            spatial = node.input_tensors[0].shape[1:-1]
            if any(d is None for d in spatial):
                return None
            return [np.tile(ids, math.prod(spatial))]
        if isinstance(layer, _L.Reshape):
            if units != len(ids) or len(layer.target_shape) < 1:
                return None
            return [self._record(node, "reshape", ids, ids)]
        if isinstance(layer, _CHANNELWISE):
            return [self._record(node, "channelwise", ids, ids)]
        if isinstance(layer, _L.Embedding):
            self._pin(ids, f"indices of Embedding ({layer.name!r})")
            return [self._record(node, "embedding", self._new(0), self._new(units))]
        if isinstance(layer, _DEPTHWISE):
            out = np.repeat(ids, getattr(layer, "depth_multiplier", 1))
            return [self._record(node, "depthwise", ids, out)]
        kind = (
            "dense"
            if isinstance(layer, _L.Dense | _L.EinsumDense)
            else "conv"
            if isinstance(layer, _CONVOLUTIONS)
            else "conv_transpose"
            if isinstance(layer, _TRANSPOSED)
            else "separable"
            if isinstance(layer, _SEPARABLE)
            else None
        )
        if kind is None:
            return None
        outputs = self._record(node, kind, ids, self._new(units))
        if _activation_name(layer) in _MIXING_ACTIVATIONS:
            self._pin(outputs, f"softmax over the units of {layer.name!r}")
        return [outputs]

    # --- queries ---------------------------------------------------------
    def removable_groups(self) -> list[int]:
        """The groups that are not pinned and that some layer makes as its
        units or filters (a group only carried, never made, has no weights
        to prune)."""
        made: set[int] = set()
        for entry in self.layers.values():
            if entry.makes() is not None:
                made.update(entry.outputs.tolist())
        return sorted(made - set(self.pinned))

    def unit_sets(self) -> list[tuple[list[str], np.ndarray]]:
        """The removable groups, partitioned by the layers that make them:
        `(layer names, groups)`, where layers that make a group together (the
        convolutions added by a residual connection) share one set. Ranking
        units "per layer" ranks within each set.

        Example:

        >>> inputs = keras.Input((4, 4, 2))
        >>> a = keras.layers.Conv2D(3, 1, name="a")(inputs)
        >>> b = keras.layers.Conv2D(3, 1, name="b")(inputs)
        >>> added = keras.layers.Add()([a, b])
        >>> c = keras.layers.Conv2D(5, 1, name="c")(added)
        >>> model = keras.Model(inputs, keras.layers.Conv2D(1, 1, name="d")(c))
        >>> [(names, len(groups)) for names, groups in ChannelGraph(model).unit_sets()]
        [(['a', 'b'], 3), (['c'], 5)]
        """
        removable = set(self.removable_groups())
        makers: dict[int, list[str]] = {}
        for name, entry in self.layers.items():
            if entry.makes() is not None:
                for group in set(entry.outputs.tolist()) & removable:
                    makers.setdefault(group, []).append(name)
        owner = {name: name for names in makers.values() for name in names}

        def root(name: str) -> str:
            while owner[name] != name:
                name = owner[name]
            return name

        for names in makers.values():
            for name in names[1:]:
                owner[root(name)] = root(names[0])
        sets: dict[str, list[int]] = {}
        for group in sorted(makers):
            sets.setdefault(root(makers[group][0]), []).append(group)
        order = list(self.layers)
        return [
            (
                sorted({n for g in groups for n in makers[g]}, key=order.index),
                np.array(groups, dtype=np.int64),
            )
            for groups in sets.values()
        ]

    def masks_without(self, groups: Any) -> dict[str, dict[str, np.ndarray]]:
        """0/1 masks that prune `groups` wholly: their units and filters in
        the layers that make them, the kernel rows that read them, and the
        depthwise kernels that carry them.

        Args:
            groups: Group ids (from `removable_groups`).

        Returns:
            `{layer name: {weight name: mask}}` for the prunable weights
            (kernels, embeddings) of every layer touched, masks of the
            weights' shapes holding 0 where a weight belongs to a group.

        Example:

        >>> model = keras.Sequential([keras.Input((2,)),
        ...     keras.layers.Dense(3, name="hidden"),
        ...     keras.layers.Dense(1, name="out")])
        >>> graph = ChannelGraph(model)
        >>> unit_1 = graph.layers["hidden"].outputs[1]
        >>> masks = graph.masks_without([unit_1])
        >>> masks["hidden"]["kernel"].tolist(), masks["out"]["kernel"].ravel().tolist()
        ([[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]], [1.0, 0.0, 1.0])
        """
        removed = np.asarray(sorted(set(np.asarray(groups).tolist())), dtype=np.int64)
        result: dict[str, dict[str, np.ndarray]] = {}
        for name, entry in self.layers.items():
            for weight, axes in entry.weight_axes().items():
                if weight not in _PRUNABLE_NAMES:
                    continue
                variable = _variable(entry.layer, weight)
                mask = np.ones(tuple(variable.shape), dtype=np.float32)
                for axis, ids in axes:
                    hit = np.isin(ids, removed)
                    if hit.any():
                        index: list[Any] = [slice(None)] * mask.ndim
                        index[axis] = hit
                        mask[tuple(index)] = 0
                if not mask.all():
                    result.setdefault(name, {})[weight] = mask
        return result


_PRUNABLE_NAMES = ("kernel", "depthwise_kernel", "pointwise_kernel", "embeddings")


def _variable(layer: Any, name: str) -> Any:
    for variable in layer.weights:
        if weight_name(variable) == name:
            return variable
    raise KeyError(f"{layer.name!r} has no weight named {name!r}")


def _channels(tensor: Any) -> int:
    """The size of a tensor's last axis (0 for a scalar per example)."""
    shape = tensor.shape
    if len(shape) < 2 or shape[-1] is None:
        return 0
    return int(shape[-1])


def _activation_name(layer: Any) -> str | None:
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", None)


def _unsupported(layer: Any, node: Any) -> str | None:
    """Why a layer's channels must be pinned whatever the rule, or `None`."""
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return "channels_first layout"
    if getattr(layer, "groups", 1) != 1:
        return "grouped convolution"
    if getattr(layer, "lora_enabled", False):
        return "LoRA enabled"
    if getattr(layer, "quantization_mode", None):
        return "quantized layer"
    if isinstance(layer, _L.Activation | _L.Softmax) and (
        isinstance(layer, _L.Softmax) or _activation_name(layer) in _MIXING_ACTIVATIONS
    ):
        return "softmax over channels"
    if isinstance(layer, _L.BatchNormalization):
        rank = len(node.input_tensors[0].shape)
        if layer.axis not in (-1, rank - 1):
            return "BatchNormalization on another axis than channels"
    if isinstance(layer, _L.PReLU) and layer.alpha.shape[-1] not in (
        1,
        node.input_tensors[0].shape[-1],
    ):
        return "PReLU"
    if isinstance(layer, _L.EinsumDense) and not _dense_like(layer):
        return "EinsumDense other than a 2-D kernel on the last axis"
    return None


def _dense_like(layer: Any) -> bool:
    """Whether an `EinsumDense` is a `Dense` on the last axis: a 2-D kernel
    `xy` with `x` the input's last axis, `y` the output's, and a bias (if
    any) on `y` only."""
    try:
        left, output = layer.equation.split("->")
        source, kernel = left.split(",")
    except ValueError:
        return False
    return (
        len(kernel) == 2
        and source[-1:] == kernel[0]
        and kernel[0] not in output
        and output[-1:] == kernel[1]
        and kernel[1] not in source
        and (layer.bias is None or tuple(layer.bias.shape) == (layer.kernel.shape[1],))
    )
