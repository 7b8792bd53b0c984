"""Structured pruning: which whole units, filters and channels to prune.

`IterativePruningCallback(granularity="unit")` prunes on a schedule;
`prune_units` prunes once. Both rank the *unit sets* of a model's
`ChannelGraph` (the units a layer makes; layers coupled by a residual `Add`
share one set) by `masks.unit_scores`, and prune a unit with every weight that
belongs to it: its kernel column, the kernel rows of the layers that read it,
its depthwise kernels.
"""

from __future__ import annotations

import warnings
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_prune.channels import ChannelGraph, nonzero_groups
from keras_prune.masking import MaskedLayer, masked_layers
from keras_prune.masks import (
    check_finite,
    global_magnitude_masks,
    magnitude_mask,
    unit_scores,
    validate_norm,
    validate_sparsity,
)

__all__ = ["prune_units"]  # the rest serves the callback

UnitSet = tuple[list[str], np.ndarray]


def channel_graph(model: keras.Model, what: str) -> ChannelGraph:
    """`ChannelGraph(model)`, its error prefixed with what needed it."""
    try:
        return ChannelGraph(model)
    except ValueError as error:
        raise ValueError(
            f"{what} prunes whole units, found in the layer graph: {error}"
        ) from error


def masked_sets(graph: ChannelGraph) -> list[UnitSet]:
    """The unit sets whose layers all have masks (the others cannot be
    pruned; `kept_whole` names them)."""
    return [
        (names, groups)
        for names, groups in graph.unit_sets()
        if all(isinstance(graph.layers[n].layer, MaskedLayer) for n in names)
    ]


def kept_whole(graph: ChannelGraph, model: keras.Model) -> str | None:
    """A sentence naming the masked layers that keep all their units, and
    why, and the layers without masks that unit pruning would need; `None`
    when there are none."""
    ranked = {
        id(graph.layers[name].layer)
        for names, _ in masked_sets(graph)
        for name in names
    }
    by_layer = {id(entry.layer): entry for entry in graph.layers.values()}
    kept = []
    for layer in masked_layers(model):
        if id(layer) in ranked:
            continue
        entry = by_layer.get(id(layer))
        made = None if entry is None else entry.makes()
        reason = (
            graph.pinned.get(int(made[2][0]), "coupled to a layer without masks")
            if made is not None and len(made[2])
            else "not a layer whose units the graph follows"
        )
        kept.append(f"{layer.name!r} ({reason})")
    unmasked = sorted(
        entry.layer.name
        for entry in graph.layers.values()
        if (entry.makes() or entry.reads()) and not isinstance(entry.layer, MaskedLayer)
    )
    if not kept and not unmasked:
        return None
    text = "keeps every unit of " + ("; ".join(kept) or "no masked layer")
    if unmasked:
        text += (
            ". Layers without masks cannot lose units or the rows that read "
            f"pruned ones: {unmasked}"
        )
    return text + "."


def select_units(
    graph: ChannelGraph,
    sets: list[UnitSet],
    targets: list[float],
    norm: str = "l1",
    scope: str = "layer",
    min_kept: list[float] | None = None,
    max_kept: list[float] | None = None,
) -> tuple[list[int], dict[int, float]]:
    """Ranks the units of `sets` by `norm` and picks those to prune.

    Only live units are ranked (a pruned unit stays pruned); a set never
    loses its last unit.

    Args:
        graph: The model's `ChannelGraph` (its layers must be masked).
        sets: Unit sets from `graph.unit_sets()`.
        targets: Fraction of units pruned per set (`scope="layer"`), or the
            first entry for all sets together (`scope="global"`).
        norm: `"l1"` or `"l2"` (see `masks.unit_scores`). Defaults to `"l1"`.
        scope: `"layer"` (each set to its target) or `"global"` (one
            ranking over all sets). Defaults to `"layer"`.
        min_kept, max_kept: With `"global"`, per set, the least and most
            fraction of its units kept. Default to `None`.

    Returns:
        `(live groups to prune now, {id(layer): smallest score kept in its
        set})`.
    """
    scores, live = [], []
    for names, groups in sets:
        slices, alive = [], set()
        for name in names:
            made = graph.layers[name].makes()
            assert made is not None  # unit sets hold layers that make units
            key, axis, ids = made
            layer = graph.layers[name].layer
            mask = ops.convert_to_numpy(layer.masks[key])
            weights = check_finite(
                ops.convert_to_numpy(layer.prunable_weights[key]),
                f"the {key} of {name!r}",
            )
            slices.append((weights * mask, axis, ids))
            alive |= nonzero_groups(mask, axis, ids)
        scores.append(unit_scores(slices, groups, norm))
        live.append(np.isin(groups, list(alive)).astype(np.float64))
    if scope == "global":
        kept = global_magnitude_masks(
            scores, live, targets[0], min_kept=min_kept, max_kept=max_kept
        )
    else:
        kept = [
            magnitude_mask(s, alive, target)
            for s, alive, target in zip(scores, live, targets, strict=True)
        ]
    pruned: list[int] = []
    thresholds: dict[int, float] = {}
    for (names, groups), k, s, was in zip(sets, kept, scores, live, strict=True):
        pruned.extend(groups[(k == 0) & (was != 0)].tolist())
        smallest = float(s[k != 0].min()) if (k != 0).any() else 0.0
        thresholds.update((id(graph.layers[n].layer), smallest) for n in names)
    return pruned, thresholds


def masks_to_prune(
    graph: ChannelGraph, groups: list[int]
) -> list[tuple[MaskedLayer, dict[str, np.ndarray]]]:
    """The new masks (current masks times `graph.masks_without(groups)`) of
    each masked layer that loses weights."""
    changes = []
    for name, masks in graph.masks_without(groups).items():
        layer = graph.layers[name].layer
        if not isinstance(layer, MaskedLayer):
            continue
        current = {key: ops.convert_to_numpy(m) for key, m in layer.masks.items()}
        changed = {
            key: current[key] * mask
            for key, mask in masks.items()
            if np.count_nonzero(current[key] * mask) < np.count_nonzero(current[key])
        }
        if changed:
            changes.append((layer, changed))
    return changes


def prune_units(
    model: keras.Model,
    sparsity: float,
    *,
    norm: str = "l1",
    scope: str = "layer",
    optimizer: Any = None,
) -> int:
    """Prunes whole units, filters and depthwise channels of a masked model
    once, by `norm`: `sparsity` of each unit set (`scope="layer"`) or of all
    of them together (`scope="global"`).

    A pruned unit loses its kernel column and the kernel rows that read it;
    units added together by a residual connection go together; output
    layers and units that reach a layer the graph cannot follow keep all
    their units (`ChannelGraph`). Follow it with `shrink` to remove them.
    For pruning on a schedule while training, use
    `IterativePruningCallback(granularity="unit")`.

    Args:
        model: A masked Sequential or Functional model (`make_prunable`).
        sparsity: Fraction of units pruned, in [0, 1); units pruned before
            count, and stay pruned.
        norm: `"l1"` (mean |weight| of a unit) or `"l2"` (root mean square).
            Defaults to `"l1"`.
        scope: `"layer"` or `"global"`. Defaults to `"layer"`.
        optimizer: The optimizer training the model, if it has state to
            zero at the pruned weights. Defaults to `None`.

    Returns:
        The number of units (channel groups) pruned by this call.

    Raises:
        ValueError: On a bad argument, a model without masks, a subclassed
            model, or non-finite weights.

    Warns:
        UserWarning: Naming the masked layers that keep all their units
            (output layers, channels the graph cannot follow) and why.

    Example:

    >>> from keras_prune.convert import make_prunable
    >>> model = make_prunable(keras.Sequential([keras.Input((8,)),
    ...     keras.layers.Dense(10, name="hidden"), keras.layers.Dense(2)]),
    ...     verbose=False)
    >>> prune_units(model, 0.3)
    3
    >>> from keras_prune.shrink import shrink
    >>> shrink(model).get_layer("hidden").units
    7

    Reference:
        Li et al. 2017, "Pruning Filters for Efficient ConvNets",
        arXiv:1608.08710.
    """
    sparsity = validate_sparsity(sparsity)
    validate_norm(norm)
    if scope not in ("layer", "global"):
        raise ValueError(
            f"Expected `scope` to be 'layer' or 'global'. Received: scope={scope!r}"
        )
    if not masked_layers(model):
        raise ValueError(
            "`prune_units` prunes through masks: convert the model with "
            "keras_prune.make_prunable(model) first. Received: model "
            f"{model.name!r} without masked layers"
        )
    graph = channel_graph(model, "prune_units")
    note = kept_whole(graph, model)
    if note:
        warnings.warn(f"prune_units {note}", stacklevel=2)
    sets = masked_sets(graph)
    if not sets:
        return 0
    pruned, _ = select_units(graph, sets, [sparsity] * len(sets), norm, scope)
    changes = masks_to_prune(graph, pruned)
    for layer, masks in changes:
        layer.prune_to(masks, optimizer=optimizer)
    return len(pruned)
