"""Structured pruning: which whole units, filters and channels to prune.

`IterativePruningCallback(granularity="unit")` prunes on a schedule;
`prune_units` prunes once. Both rank the *unit sets* of a model's
`ChannelGraph` (the units a layer makes; layers coupled by a residual `Add`
share one set) by `masks.unit_scores`, and prune a unit with every weight that
belongs to it: its kernel column, the kernel rows of the layers that read it,
its depthwise kernels.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from keras_prune.channels import ChannelGraph, nonzero_groups
from keras_prune.masking import MaskedLayer
from keras_prune.masks import (
    check_finite,
    global_magnitude_masks,
    magnitude_mask,
    unit_scores,
    validate_norm,
    validate_sparsity,
)

UnitSet = tuple[list[str], np.ndarray]


def select_units(
    graph: ChannelGraph,
    sets: list[UnitSet],
    targets: list[float],
    norm: str = "l1",
    scope: str = "layer",
    min_kept: list[float] | None = None,
    max_kept: list[float] | None = None,
) -> tuple[list[int], dict[str, float]]:
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
        `(live groups to prune now, {layer name: smallest score kept in
        its set})`.
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
    thresholds: dict[str, float] = {}
    for (names, groups), k, s, was in zip(sets, kept, scores, live, strict=True):
        pruned.extend(groups[(k == 0) & (was != 0)].tolist())
        smallest = float(s[k != 0].min()) if (k != 0).any() else 0.0
        thresholds.update(dict.fromkeys(names, smallest))
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
        ValueError: On a bad argument, a subclassed model, or non-finite
            weights.

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
    graph = ChannelGraph(model)
    sets = graph.unit_sets()
    if not sets:
        return 0
    pruned, _ = select_units(graph, sets, [sparsity] * len(sets), norm, scope)
    changes = masks_to_prune(graph, pruned)
    for layer, masks in changes:
        layer.prune_to(masks, optimizer=optimizer)
    return len(pruned)
