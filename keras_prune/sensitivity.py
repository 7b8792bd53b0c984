"""`sensitivity_scan`: how much each layer can lose alone (Han et al.'s
Fig. 5), and per-layer targets from a tolerated drop."""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from keras import ops

from keras_prune.masking import layer_labels, masked_layers
from keras_prune.masks import magnitude_mask, validate_sparsity
from keras_prune.plotting import finish

DEFAULT_SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998)


@dataclasses.dataclass(frozen=True)
class SensitivityScan:
    """What `sensitivity_scan` measured: the metric with each layer alone
    pruned to each sparsity, no retraining.

    Attributes:
        metric: The metric's name, as `model.evaluate` returns it.
        higher_is_better: Whether larger values of it are better.
        baseline: Its value with no layer pruned further.
        sparsities: The scanned sparsities, increasing, in [0, 1).
        values: `{layer label: metric at each sparsity}`.
        qualities: `{layer label: Han's quality at each sparsity}`: the
            threshold in standard deviations of the live weights that
            prunes that fraction (`std_threshold_mask`), so that a tolerated
            drop can become `IterativePruningCallback(quality=...)`.
        sizes: `{layer label: prunable weights}`.

    Example:

    >>> scan = SensitivityScan("accuracy", True, 0.98, (0.5, 0.9),
    ...     {"fc1": [0.98, 0.97], "fc2": [0.95, 0.5]},
    ...     {"fc1": [0.7, 1.8], "fc2": [0.7, 1.7]}, {"fc1": 1000, "fc2": 100})
    >>> scan.final_sparsity(tolerance=0.01)
    {'fc1': 0.9, 'fc2': 0.0}
    """

    metric: str
    higher_is_better: bool
    baseline: float
    sparsities: tuple[float, ...]
    values: dict[str, list[float]]
    qualities: dict[str, list[float]]
    sizes: dict[str, int]

    def drop(self, label: str) -> list[float]:
        """How much worse than the baseline the metric is at each sparsity
        with layer `label` pruned (negative: better)."""
        sign = 1.0 if self.higher_is_better else -1.0
        return [sign * (self.baseline - value) for value in self.values[label]]

    def _tolerated(self, tolerance: float) -> dict[str, int | None]:
        """Per layer, the index of the largest scanned sparsity whose drop,
        and every smaller one's, is within `tolerance` (`None`: none)."""
        if not (isinstance(tolerance, int | float) and 0 <= tolerance < math.inf):
            raise ValueError(
                f"Expected `tolerance` to be a number >= 0. Received: "
                f"tolerance={tolerance!r}"
            )
        indices: dict[str, int | None] = {}
        for label in self.values:
            last = None
            for i, drop in enumerate(self.drop(label)):
                if drop > tolerance + 1e-12:  # 0.98 - 0.97 > 0.01 in floats
                    break
                last = i
            indices[label] = last
        return indices

    def final_sparsity(self, tolerance: float) -> dict[str, float]:
        """Per-layer targets: for each layer, the largest scanned sparsity
        at which pruning it alone costs at most `tolerance` (in the metric's
        units), and at every smaller one; 0.0 where none does. Pass it as
        `IterativePruningCallback(final_sparsity=...)`.

        Retraining recovers much of what a cut costs, so these targets are
        cautious: Han et al. scan to rank layers, then prune further.

        Raises:
            ValueError: If `tolerance` is not a number >= 0.
        """
        return {
            label: 0.0 if index is None else self.sparsities[index]
            for label, index in self._tolerated(tolerance).items()
        }

    def quality(self, tolerance: float) -> dict[str, float]:
        """Han's threshold per layer for the same tolerated drop: the
        quality that prunes `final_sparsity(tolerance)` of it (0.0 where
        nothing is tolerated). Pass it as `IterativePruningCallback(
        quality=...)`.

        Raises:
            ValueError: If `tolerance` is not a number >= 0.
        """
        return {
            label: 0.0 if index is None else self.qualities[label][index]
            for label, index in self._tolerated(tolerance).items()
        }

    def rows(self) -> list[dict[str, Any]]:
        """One dict per layer and sparsity: `layer`, `weights`, `sparsity`,
        `quality`, the metric by its name, and `drop`."""
        return [
            {
                "layer": label,
                "weights": self.sizes[label],
                "sparsity": sparsity,
                "quality": self.qualities[label][i],
                self.metric: self.values[label][i],
                "drop": self.drop(label)[i],
            }
            for label in self.values
            for i, sparsity in enumerate(self.sparsities)
        ]

    def to_csv(self, path: str) -> None:
        """Writes `rows()` as CSV, one line per layer and sparsity."""
        rows = self.rows()
        with open(path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    def __str__(self) -> str:
        width = max(len("layer"), *(len(label) for label in self.values))
        header = f"{'layer':<{width}} {'weights':>9} " + " ".join(
            f"{s:>7.2%}" for s in self.sparsities
        )
        lines = [
            f"{self.metric} with one layer pruned (no retraining); "
            f"unpruned: {self.baseline:.4f}",
            header,
            "-" * len(header),
        ]
        for label, values in self.values.items():
            lines.append(
                f"{label:<{width}} {self.sizes[label]:>9,} "
                + " ".join(f"{value:>7.4f}" for value in values)
            )
        return "\n".join(lines)

    def plot(self, path: str | None = None) -> Any:
        """The metric against the sparsity of each layer (Han et al. 2015,
        Fig. 5). Saves the figure to `path` and closes it, or returns it if
        `path` is `None` (for a notebook). Needs matplotlib.

        Raises:
            ImportError: If matplotlib is not installed, saying how to get it.
        """
        try:
            import matplotlib.pyplot as plt
        except ImportError as error:
            raise ImportError(
                "SensitivityScan.plot needs matplotlib: pip install matplotlib"
            ) from error
        figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
        percent = [100 * s for s in self.sparsities]
        for label, values in self.values.items():
            axes.plot(percent, values, "o-", label=f"{label} ({self.sizes[label]:,})")
        axes.axhline(self.baseline, color="tab:gray", ls="--", label="unpruned")
        axes.set_xlabel("weights pruned away in the layer (%)")
        axes.set_ylabel(self.metric)
        axes.grid(True, alpha=0.3)
        axes.legend(loc="best", fontsize="small")
        axes.set_title("Sensitivity: one layer pruned at a time, no retraining")
        return finish(figure, path)


def sensitivity_scan(
    model: Any,
    data: Any,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    metric: str = "accuracy",
    layers: Sequence[str] | None = None,
    mode: str = "auto",
    batch_size: int | None = None,
) -> SensitivityScan:
    """Prunes each layer alone to each sparsity and evaluates the model.

    For every masked layer (or every layer `make_prunable` would mask, in a
    copy, for a model without masks), and every sparsity, the layer's live
    weights are pruned by magnitude to that sparsity, on top of its current
    mask, with nothing retrained, and `model.evaluate` measures `metric`;
    then the layer is put back exactly. The result shows which layers are
    sensitive (Han et al. 2015, Fig. 5) and turns a tolerated drop into
    per-layer targets (`SensitivityScan.final_sparsity`, `.quality`).

    Cost: `len(layers) * len(sparsities) + 1` evaluations of `data`; use a
    validation set of a few thousand examples, never the test set you
    report on.

    Args:
        model: A compiled Keras model (its loss and metrics are what
            `evaluate` returns). It is left as it was.
        data: `(x, y)` or `(x, y, sample_weight)` arrays, or anything
            `model.evaluate` takes as `x` (a `tf.data.Dataset`, a
            `keras.utils.PyDataset`).
        sparsities: Increasing fractions in [0, 1). Defaults to
            `DEFAULT_SPARSITIES`, 50% to 99.8%.
        metric: The name of the metric to read. Defaults to `"accuracy"`.
        layers: Labels of the layers to scan (`layer_labels`: names, or
            paths where names repeat), or `None` for all. Defaults to
            `None`.
        mode: `"max"`, `"min"` or `"auto"` (`"min"` when the name holds
            "loss" or "error"). Defaults to `"auto"`.
        batch_size: Passed to `evaluate` with arrays. Defaults to `None`
            (Keras's 32).

    Returns:
        A `SensitivityScan`: the table (`str()`, `rows()`, `to_csv`), the
        plot (`plot`) and the targets.

    Raises:
        ValueError: If `model` is not compiled, has no prunable layer or
            does not report `metric`, a sparsity is outside [0, 1) or out of
            order, a name in `layers` is not a prunable layer, or `mode` is
            unknown; each names the argument and the value received.

    Example:

    >>> model = keras.Sequential([keras.Input((4,)),
    ...     keras.layers.Dense(1, use_bias=False, name="fc")])
    >>> _ = model.layers[0].kernel.assign([[4.0], [3.0], [2.0], [1.0]])
    >>> model.compile(loss="mse")
    >>> # x = identity, y = the weights: the loss is the mean squared weight pruned.
    >>> scan = sensitivity_scan(model, (np.eye(4), np.array([4.0, 3, 2, 1])),
    ...     sparsities=[0.25, 0.5, 0.75], metric="loss")
    >>> scan.values["fc"]
    [0.25, 1.25, 3.5]
    >>> scan.final_sparsity(tolerance=1.0)
    {'fc': 0.25}

    Reference:
        Han et al. 2015, "Learning both Weights and Connections for
        Efficient Neural Networks", arXiv:1506.02626, section 4.5, Fig. 5.
    """
    from keras_prune.convert import make_prunable

    if getattr(model, "compiled", False) is not True:
        raise ValueError(
            "sensitivity_scan evaluates `model` with its compiled loss and "
            "metrics: compile it first. Received: an uncompiled model "
            f"{getattr(model, 'name', model)!r}"
        )
    sparsities = tuple(
        validate_sparsity(s, f"sparsities[{i}]") for i, s in enumerate(sparsities)
    )
    if not sparsities or any(
        b <= a for a, b in zip(sparsities[:-1], sparsities[1:], strict=True)
    ):
        raise ValueError(
            "Expected `sparsities` to be increasing fractions in [0, 1). "
            f"Received: sparsities={list(sparsities)}"
        )
    if mode not in ("auto", "max", "min"):
        raise ValueError(
            f"Expected `mode` to be one of ['auto', 'max', 'min']. Received: "
            f"mode={mode!r}"
        )
    if not masked_layers(model):
        model = make_prunable(model)
    found = [layer for layer in masked_layers(model) if layer.built]
    labels = layer_labels(found)
    if not found:
        raise ValueError(
            f"Expected `model` to have prunable layers. Received: model "
            f"{model.name!r}, with none"
        )
    if layers is not None:
        unknown = sorted(set(layers) - set(labels))
        if unknown or isinstance(layers, str):
            raise ValueError(
                f"Expected `layers` to be a list of prunable layers of the model "
                f"({labels}). Received: layers={layers!r}"
            )
    chosen = [
        (label, layer)
        for label, layer in zip(labels, found, strict=True)
        if layers is None or label in layers
    ]

    def evaluate() -> float:
        if isinstance(data, tuple | list):
            results = model.evaluate(
                *data, batch_size=batch_size, verbose=0, return_dict=True
            )
        else:
            results = model.evaluate(data, verbose=0, return_dict=True)
        if metric not in results:
            raise ValueError(
                f"Expected `metric` to be one of what model.evaluate reports, "
                f"{sorted(results)}. Received: metric={metric!r}"
            )
        return float(results[metric])

    baseline = evaluate()
    values: dict[str, list[float]] = {}
    qualities: dict[str, list[float]] = {}
    sizes: dict[str, int] = {}
    for label, layer in chosen:
        saved = [(v, np.array(ops.convert_to_numpy(v))) for v in layer.weights]
        weights = {
            key: ops.convert_to_numpy(variable)
            for key, variable in layer.prunable_weights.items()
        }
        masks = {key: ops.convert_to_numpy(mask) for key, mask in layer.masks.items()}
        sizes[label] = sum(w.size for w in weights.values())
        values[label], qualities[label] = [], []
        try:
            for sparsity in sparsities:
                new = {
                    key: magnitude_mask(weights[key], masks[key], sparsity)
                    for key in weights
                }
                layer.prune_to(new)
                values[label].append(evaluate())
                qualities[label].append(
                    min(_quality_of(weights[k], masks[k], new[k]) for k in weights)
                )
                for variable, value in saved:
                    variable.assign(value)
        finally:
            for variable, value in saved:
                variable.assign(value)
    if mode == "auto":
        name = metric.lower()
        higher = "loss" not in name and "error" not in name
    else:
        higher = mode == "max"
    return SensitivityScan(
        metric, higher, baseline, sparsities, values, qualities, sizes
    )


def _quality_of(weights: np.ndarray, mask: np.ndarray, new: np.ndarray) -> float:
    """The quality (threshold over the standard deviation of the live
    weights) that prunes what `new` prunes of `mask`: the smallest kept
    magnitude in standard deviations."""
    live = weights[mask != 0]
    spread = float(live.std()) if live.size else 0.0
    kept = np.abs(weights[new != 0])
    if spread == 0.0 or not kept.size:
        return 0.0
    return float(kept.min()) / spread
