"""`shrink`: a smaller dense model without the units, filters and channels
that pruning emptied.

Masks make a model sparse but not smaller: a pruned filter still costs its
convolution. `shrink` rebuilds the model from stock Keras layers with fewer
units, filters and channels, so that it is faster on every backend and
runtime (TensorFlow, JAX, LiteRT, ONNX) without a sparse kernel.

What it removes, by channel group (`channels.ChannelGraph`, which also says
which groups are coupled through residual additions, concatenations and
depthwise convolutions):

1. every group whose *outgoing weights* are all zero: the kernel rows of
   every layer that reads it. The group then changes no prediction, so it is
   removed from the layers that make it (kernel columns, bias entries), from
   those that carry it (batch-normalization statistics, depthwise kernels),
   and from the kernels that read it;
2. every *dead* group, whose units have no live input weights (left by
   unstructured pruning, Han et al. 2015): its output is a constant,
   `activation(bias)` carried through the layers after it. The constant's
   contribution is folded into the bias of each layer that reads it (a
   `Dense`, or a convolution with `"valid"` padding; elsewhere only a
   constant of exactly zero goes), and the group goes as in 1.

A group that is pinned (a model output, or a channel that reaches a layer the
walk cannot see through) or whose constant cannot be folded is kept, and a
warning says which and why.
"""

from __future__ import annotations

import collections
import warnings
from typing import Any

import keras
import numpy as np

from keras_prune.channels import (
    ChannelGraph,
    LayerChannels,
    nonzero_groups,
    weight_name,
)
from keras_prune.convert import _check_model, _clone_functional, strip_pruning
from keras_prune.masking import is_graph_model

# Relative tolerance of the check that a shrunk model predicts as its input.
TOLERANCE = 1e-4
_PROBE_BATCH = 4


def shrink(model: keras.Model, *, sample: Any = None) -> keras.Model:
    """Returns a smaller model without the units, filters and channels that
    pruning emptied; predictions do not change.

    Structured pruning (`IterativePruningCallback(granularity="unit")`)
    prunes whole units and filters; unstructured pruning leaves some units
    with no live input (dead neurons). `shrink` removes both physically:
    the result holds stock Keras layers only (a `Dense` of fewer units, a
    `Conv2D` of fewer filters, `BatchNormalization` of fewer channels, the
    next layers' kernels without the rows that read them), so it runs
    faster everywhere and saves smaller. Weights are copied (with the masks
    applied); the input model is not changed.

    Removed: every unit, filter or channel whose outgoing weights (the
    kernel rows that read it in every later layer) are all zero; and every
    dead one, whose constant output `activation(bias)` is folded into the
    biases of the layers that read it first (a `Dense`, or a convolution with
    `"valid"` padding; into a `"same"`-padded convolution only a constant of
    zero goes, since its border sees padding instead). Coupled channels, those
    added by a residual `Add` or carried by a depthwise convolution, go
    together or stay. Kept, with a warning naming them and why: the units of
    the model's outputs, channels that reach a layer that mixes channels in a
    way the walk cannot follow (`LayerNormalization`, softmax over channels,
    a `Reshape` of the channel axis, a custom or recurrent layer), and dead
    units whose constant cannot be folded (those inside a nested model, whose
    layers are otherwise walked through and shrunk).

    The result is checked against the input model on `sample` (or on random
    inputs where the model's input shapes are known): outputs must agree
    within `TOLERANCE` (1e-4) of their largest magnitude.

    Args:
        model: A Sequential or Functional model, pruned (masked, from
            `make_prunable`) or stock with zeros in its kernels.
        sample: Optional model inputs, as the model takes them (an array; a
            list or dict for several inputs), on which dead units' constants
            are read and the result is checked. Defaults to `None`: 4 random
            examples (standard normal, zeros for integer inputs), for which
            every input dimension but the batch must be known.

    Returns:
        A new, uncompiled `keras.Model` of the same class and layer names
        (compile it to fine-tune).

    Raises:
        TypeError: If `model` is not a `keras.Model`.
        ValueError: For a subclassed model (its layer graph is not visible;
            rebuild it as a Functional model), an unbuilt one, or when the
            input model's outputs are not finite on the sample.
        RuntimeError: If the shrunk model's outputs differ from the input
            model's by more than `TOLERANCE` (a bug: please report it).

    Example:

    >>> model = keras.Sequential([keras.Input((3,)),
    ...     keras.layers.Dense(4, activation="relu", name="hidden"),
    ...     keras.layers.Dense(2, name="out")])
    >>> _ = model.get_layer("out").kernel.assign([[1, 2], [0, 0], [3, 4], [0, 0]])
    >>> small = shrink(model)  # units 1 and 3 of "hidden" feed nothing
    >>> small.get_layer("hidden").units, tuple(small.get_layer("out").kernel.shape)
    (2, (2, 2))

    Reference:
        Han et al. 2015, "Learning both Weights and Connections for Efficient
        Neural Networks", arXiv:1506.02626 (removing dead neurons); Fang et
        al. 2023, "DepGraph", arXiv:2301.12900 (coupled channels).
    """
    _check_model(model, "shrink")
    if not is_graph_model(model):
        raise ValueError(
            "`shrink` needs a Sequential or Functional model: it reads the "
            "layer graph, which a subclassed model does not expose. Rebuild it "
            "as a Functional model. Received: model of type "
            f"{type(model).__name__} ({model.name!r})"
        )
    stripped = strip_pruning(model)
    graph = ChannelGraph(stripped)
    values = {
        id(entry.layer): {
            weight_name(v): keras.ops.convert_to_numpy(v) for v in entry.layer.weights
        }
        for entry in graph.layers.values()
    }
    probe = _probe_inputs(stripped, sample)
    plan = _Plan(graph, values, probe)
    if plan.kept:
        lines = "; ".join(
            f"{count} of {layer!r} ({reason})"
            for (layer, reason), count in sorted(plan.kept.items())
        )
        warnings.warn(
            f"shrink kept units, filters or channels that pruning emptied: {lines}.",
            stacklevel=2,
        )
    entries = {id(entry.layer): entry for entry in graph.layers.values()}

    def replace(layer: Any) -> Any:
        entry = entries.get(id(layer))
        if entry is None or not plan.touches(entry):
            return None
        return layer.__class__.from_config(plan.config(entry))

    def fill(old: Any, new: Any) -> None:
        plan.fill(entries[id(old)], values[id(old)], new)

    shrunk = _clone_functional(stripped, replace, fill)
    if probe is not None:
        _check_same(stripped, shrunk, probe)
    return shrunk


class _Plan:
    """What `shrink` removes and folds, decided once from the weights."""

    def __init__(
        self,
        graph: ChannelGraph,
        values: dict[int, dict[str, np.ndarray]],
        probe: Any,
    ):
        self.graph = graph
        self.values = values
        self.kept: collections.Counter[tuple[str, str]] = collections.Counter()
        self.deltas: dict[int, np.ndarray] = {}  # bias increments by layer id
        entries = list(graph.layers.values())
        read, made, readable = set(), set(), set()
        for entry in entries:
            rows, columns = entry.reads(), entry.makes()
            if rows is not None:
                readable |= set(rows[2].tolist())
                read |= nonzero_groups(
                    values[id(entry.layer)][rows[0]], rows[1], rows[2]
                )
            if columns is not None:
                made |= nonzero_groups(
                    values[id(entry.layer)][columns[0]], *columns[1:]
                )
        candidates = set(graph.removable_groups())
        removed = candidates - read
        dead = (candidates & read) - made
        if dead:
            removed |= self._fold(dead, entries, probe)
        self._note_pinned(entries, made, readable - read)
        self.removed = self._keep_one_per_layer(entries, removed)
        self.new_bias: set[int] = {
            key
            for key, delta in self.deltas.items()
            if "bias" not in values[key] and np.any(delta != 0)
        }

    def _fold(
        self,
        dead: set[int],
        entries: list[LayerChannels],
        probe: Any,
    ) -> set[int]:
        """Folds the constant outputs of dead groups into the biases of the
        layers that read them; returns the groups folded everywhere."""
        readers = [e for e in entries if e.reads() is not None]
        if probe is None:
            for group in dead:
                self._kept_group(group, "dead, but no `sample` to read its constant")
            return set()
        reading = [e for e in readers if np.isin(e.inputs, list(dead)).any()]
        unfoldable: dict[int, str] = {}
        for entry in reading:
            if entry.calls != 1:
                why = f"read by shared layer {entry.layer.name!r}"
            elif entry.input is None:
                why = f"read by {entry.layer.name!r} inside a nested model"
            else:
                continue
            for group in set(entry.inputs.tolist()) & dead:
                unfoldable.setdefault(group, why)
        reading = [e for e in reading if e.calls == 1 and e.input is not None]
        inputs = _run_to(self.graph.model, [e.input for e in reading], probe)
        deltas: dict[int, dict[int, np.ndarray]] = collections.defaultdict(dict)
        for entry, seen in zip(reading, inputs, strict=True):
            for group in set(entry.inputs.tolist()) & dead:
                delta, refusal = _constant_term(
                    entry, self.values[id(entry.layer)], seen, group
                )
                if delta is None:
                    unfoldable.setdefault(group, str(refusal))
                else:
                    deltas[group][id(entry.layer)] = delta
        folded = dead - set(unfoldable)
        for group in folded:
            for key, delta in deltas[group].items():
                self.deltas[key] = self.deltas.get(key, 0) + delta
        for group, why in unfoldable.items():
            self._kept_group(group, why)
        return folded

    def _kept_group(self, group: int, why: str) -> None:
        for entry in self.graph.layers.values():
            columns = entry.makes()
            if columns is not None and group in columns[2]:
                self.kept[(entry.layer.name, why)] += int(np.sum(columns[2] == group))

    def _note_pinned(
        self, entries: list[LayerChannels], made: set[int], unread: set[int]
    ) -> None:
        """Counts the pinned units that pruning emptied (no live input, or
        read by kernel rows that are all zero), so the warning names them."""
        for entry in entries:
            columns = entry.makes()
            if columns is None:
                continue
            for group in set(columns[2].tolist()) & set(self.graph.pinned):
                if group in unread or group not in made:
                    count = int(np.sum(columns[2] == group))
                    self.kept[(entry.layer.name, self.graph.pinned[group])] += count

    def _keep_one_per_layer(
        self, entries: list[LayerChannels], removed: set[int]
    ) -> np.ndarray:
        """Keeps the first unit of a layer that would lose all (a layer of
        zero units cannot be built); its outgoing weights are zero anyway."""
        for entry in entries:
            columns = entry.makes()
            if (
                columns is not None
                and len(columns[2])
                and set(columns[2].tolist()) <= removed
            ):
                removed = removed - {int(columns[2][0])}
                self.kept[(entry.layer.name, "a layer keeps one unit")] += 1
        return np.array(sorted(removed), dtype=np.int64)

    # --- rebuilding -------------------------------------------------------
    def _keep(self, ids: np.ndarray) -> np.ndarray:
        return ~np.isin(ids, self.removed)

    def touches(self, entry: LayerChannels) -> bool:
        """Whether a layer changes: loses input channels or units (and so
        entries of its weights, or its `target_shape`), or gains a folded
        bias."""
        return (
            id(entry.layer) in self.deltas
            or not self._keep(entry.inputs).all()
            or not self._keep(entry.outputs).all()
        )

    def config(self, entry: LayerChannels) -> dict[str, Any]:
        """The layer's config with its new number of units (and a bias where
        a folded constant needs one)."""
        config = entry.layer.get_config()
        units = int(self._keep(entry.outputs).sum())
        if entry.kind == "dense" and "units" in config:
            config["units"] = units
        elif entry.kind == "dense":  # EinsumDense
            shape = config["output_shape"]
            config["output_shape"] = (
                units if isinstance(shape, int) else [*list(shape)[:-1], units]
            )
        elif entry.kind in ("conv", "conv_transpose", "separable"):
            config["filters"] = units
        elif entry.kind == "embedding":
            config["output_dim"] = units
        elif entry.kind == "reshape":
            config["target_shape"] = [*list(config["target_shape"])[:-1], units]
        if id(entry.layer) in self.new_bias:
            if "use_bias" in config:
                config["use_bias"] = True
            else:  # EinsumDense
                config["bias_axes"] = config["equation"][-1]
        return config

    def fill(self, entry: LayerChannels, old: dict[str, np.ndarray], new: Any) -> None:
        """Sets the new layer's weights: the old ones without the removed
        entries, biases plus the folded constants."""
        axes = entry.weight_axes()
        for variable in new.weights:
            name = weight_name(variable)
            if name == "bias" and id(entry.layer) in self.deltas:
                delta = self.deltas[id(entry.layer)]
                value = old[name] + delta if name in old else delta
            else:
                value = old[name]
            for axis, ids in axes.get(name, []):
                value = np.compress(self._keep(ids), value, axis=axis)
            variable.assign(np.asarray(value, dtype=variable.dtype))


def _constant_term(
    entry: LayerChannels, weights: dict[str, np.ndarray], seen: np.ndarray, group: int
) -> tuple[np.ndarray | None, str | None]:
    """What a dead group adds to each output of the layer `entry` that reads
    it, from the layer's input `seen` on the probe: `(bias increment, None)`
    if that is a constant the bias can take, else `(None, why)`."""
    layer = entry.layer
    rows = entry.inputs == group
    values = seen[..., rows]  # (batch, ..., rows)
    first = values.reshape(-1, values.shape[-1])[0]
    if not np.allclose(values, first, rtol=1e-5, atol=1e-6):
        return None, f"dead, but its output into {layer.name!r} is not constant"
    if not first.any():
        return np.zeros(len(entry.outputs), dtype=np.float64), None
    kernel = weights["kernel"] if "kernel" in weights else None
    if entry.kind == "dense" and kernel is not None:
        return first.astype(np.float64) @ kernel[rows], None
    if entry.kind == "conv" and layer.padding == "valid" and kernel is not None:
        spatial = tuple(range(kernel.ndim - 2))
        return np.einsum("i,io->o", first, kernel[..., rows, :].sum(axis=spatial)), None
    return None, (
        f"dead with constant output {first.flat[0]:.3g}, which "
        f"{layer.name!r} ({type(layer).__name__}, padding "
        f"{getattr(layer, 'padding', None)!r}) cannot take into its bias"
    )


def _inputs_structure(model: keras.Model) -> Any:
    """The model's symbolic inputs in the structure it is called with (one
    tensor, a list, or a dict by name)."""
    graph = getattr(model, "_functional", None) or model
    structure = getattr(graph, "_inputs_struct", None)
    return graph.inputs if structure is None else structure


def _probe_inputs(model: keras.Model, sample: Any) -> Any:
    """The inputs on which constants are read and the result checked, in the
    structure the model takes: the user's `sample`, or random ones where
    the input shapes are known (`None` where they are not)."""
    structure = _inputs_structure(model)
    if sample is not None:
        if keras.tree.is_nested(structure):
            return keras.tree.map_structure(np.asarray, sample)
        return np.asarray(sample)  # one input: a list is its batch
    rng = np.random.default_rng(0)
    tensors = keras.tree.flatten(structure)
    if any(d is None for tensor in tensors for d in tensor.shape[1:]):
        return None

    def random_like(tensor: Any) -> np.ndarray:
        shape = (_PROBE_BATCH, *tensor.shape[1:])
        if "int" in str(tensor.dtype) or "bool" in str(tensor.dtype):
            return np.zeros(shape, dtype=str(tensor.dtype))
        return rng.standard_normal(shape).astype("float32")

    return keras.tree.map_structure(random_like, structure)


def _run_to(model: keras.Model, tensors: list[Any], probe: Any) -> list[np.ndarray]:
    """The values of `tensors` (symbolic tensors of `model`'s graph) on the
    probe inputs."""
    if not tensors:
        return []
    sub = keras.Model(_inputs_structure(model), tensors)
    outputs = sub(probe, training=False)
    outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
    return [keras.ops.convert_to_numpy(o) for o in outputs]


def _check_same(before: keras.Model, after: keras.Model, probe: Any) -> None:
    """Raises if `after` does not predict as `before` on the probe."""
    expected = keras.tree.flatten(before(probe, training=False))
    received = keras.tree.flatten(after(probe, training=False))
    for a, b in zip(expected, received, strict=True):
        a, b = keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)
        if not np.isfinite(a).all():
            raise ValueError(
                "Expected the model's outputs to be finite on the inputs shrink "
                "checks it on (`sample`, or random inputs). Received "
                f"{int(np.sum(~np.isfinite(a)))} NaN or infinite values: are "
                "its weights finite?"
            )
        scale = max(float(np.max(np.abs(a))), 1e-12)
        error = float(np.max(np.abs(a - b))) / scale if a.size else 0.0
        if error > TOLERANCE:
            raise RuntimeError(
                f"shrink produced a model whose outputs differ from the input "
                f"model's by {error:.2e} of their largest magnitude (tolerance "
                f"{TOLERANCE}). This is a keras_prune bug: please report it."
            )
