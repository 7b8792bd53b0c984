"""`AccuracyGuard`: what `IterativePruningCallback` does when a cut costs
too much accuracy, and the snapshots it restores."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from keras import ops

from keras_prune.schedules import is_real

ON_DROP = ("retry", "stop")
MODES = ("auto", "max", "min")


class AccuracyGuard:
    """Undoes a pruning cut that costs more than `tolerance` of a metric.

    Pass it to `IterativePruningCallback(guard=...)`. After each cut's
    retraining (at the end of the last epoch before the next cut, and at
    the end of `fit`), the callback reads `monitor` from the epoch's logs.
    If it is worse than the best value of the states kept so far by more
    than `tolerance`, the callback puts back the weights, masks and
    optimizer state of the last kept state, and then either stops training
    (`on_drop="stop"`) or retries the cut with half the step
    (`on_drop="retry"`: half the sparsity added, or half the quality, and
    again half after each further failure). After `retries` failures in a
    row it stops. Later cuts follow the schedule from where it stopped, one
    retraining interval later each time, so a run that retried ends less
    sparse than planned, never worse than its tolerance.

    States without a pending cut (dense epochs, retraining epochs that
    passed the check) are kept and raise the best value. Without
    `baseline`, the first checked state sets the reference, so the first
    cut is not judged: pass the trained model's validation metric as
    `baseline` to judge it too.

    Every decision is in `IterativePruningCallback.guard_events`, in the
    logs as `guard/best` and `guard/rolled_back` (1.0 at the epoch whose
    state was undone), hence in `History`, and a warning says what was
    undone.

    Args:
        monitor: The logged metric to watch, usually a validation metric
            (`fit(validation_data=...)`). Defaults to `"val_accuracy"`.
        tolerance: How much worse than the best kept state a retrained
            state may be, in the metric's units (0.005: half a point of
            accuracy). Defaults to `0.005`.
        mode: `"max"` (higher is better), `"min"`, or `"auto"`: `"min"`
            when the name contains "loss" or "error", else `"max"`.
            Defaults to `"auto"`.
        on_drop: `"retry"` or `"stop"`. Defaults to `"retry"`.
        retries: Failed checks in a row before stopping, with `"retry"`.
            Defaults to `3` (an eighth of the step at the last try).
        baseline: The metric's value before pruning, or `None`. Defaults to
            `None`.

    Raises:
        ValueError: On a bad argument, naming it and the value received.

    Example:

    >>> guard = AccuracyGuard("val_accuracy", tolerance=0.01)
    >>> guard.worse_by(0.97, best=0.99) > guard.tolerance
    True

    Reference:
        The seed report's collapse (one round past 0.23% kept, 98.7% to
        88.9%) is what this prevents; Han et al. 2015 (arXiv:1506.02626)
        prune each layer only as far as its sensitivity allows.
    """

    def __init__(
        self,
        monitor: str = "val_accuracy",
        tolerance: float = 0.005,
        mode: str = "auto",
        on_drop: str = "retry",
        retries: int = 3,
        baseline: float | None = None,
    ):
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(
                f"Expected `monitor` to be a metric name. Received: monitor={monitor!r}"
            )
        if not (is_real(tolerance) and 0.0 <= tolerance < math.inf):
            raise ValueError(
                f"Expected `tolerance` to be a number >= 0. Received: "
                f"tolerance={tolerance!r}"
            )
        if mode not in MODES:
            raise ValueError(
                f"Expected `mode` to be one of {list(MODES)}. Received: mode={mode!r}"
            )
        if on_drop not in ON_DROP:
            raise ValueError(
                f"Expected `on_drop` to be one of {list(ON_DROP)}. Received: "
                f"on_drop={on_drop!r}"
            )
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 1:
            raise ValueError(
                f"Expected `retries` to be an integer >= 1. Received: "
                f"retries={retries!r}"
            )
        if baseline is not None and not (is_real(baseline) and math.isfinite(baseline)):
            raise ValueError(
                f"Expected `baseline` to be a finite number or None. Received: "
                f"baseline={baseline!r}"
            )
        self.monitor = monitor
        self.tolerance = float(tolerance)
        self.mode = mode
        self.on_drop = on_drop
        self.retries = retries
        self.baseline = None if baseline is None else float(baseline)

    @property
    def higher_is_better(self) -> bool:
        """Whether larger values of `monitor` are better."""
        if self.mode != "auto":
            return self.mode == "max"
        name = self.monitor.lower()
        return "loss" not in name and "error" not in name

    def worse_by(self, value: float, best: float) -> float:
        """How much worse `value` is than `best` (negative: better).

        Example:

        >>> AccuracyGuard("val_loss").worse_by(0.30, best=0.25)
        0.04999999999999999
        """
        return best - value if self.higher_is_better else value - best

    def better(self, value: float, best: float | None) -> bool:
        """Whether `value` beats `best` (`None`: nothing yet)."""
        return best is None or self.worse_by(value, best) < 0

    def get_config(self) -> dict[str, Any]:
        """The constructor's arguments; `AccuracyGuard(**config)` remakes it."""
        return {
            "monitor": self.monitor,
            "tolerance": self.tolerance,
            "mode": self.mode,
            "on_drop": self.on_drop,
            "retries": self.retries,
            "baseline": self.baseline,
        }

    def __repr__(self) -> str:
        arguments = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"AccuracyGuard({arguments})"


@dataclasses.dataclass(frozen=True)
class GuardEvent:
    """One decision of the guard: at the end of `epoch` (0-based), the
    monitored `value` against the `best` kept one; `action` is `"kept"`,
    `"restored, retrying"` or `"restored, stopped"`; `kept_fraction` is the
    fraction of the masked weights alive in the state judged."""

    epoch: int
    value: float
    best: float | None
    action: str
    kept_fraction: float


@dataclasses.dataclass
class Snapshot:
    """The values of a model's variables and of its optimizer's per-weight
    state, to put back with `restore`, plus whatever the callback keeps
    with them (`extra`)."""

    values: list[tuple[Any, np.ndarray]]
    optimizer_slots: set[int]
    extra: dict[str, Any]

    @classmethod
    def take(cls, model: Any, extra: dict[str, Any]) -> Snapshot:
        """Copies every variable of `model` and its optimizer's slots (not
        its step count or learning rate, which go on)."""
        slots = optimizer_slots(model)
        values = [
            (variable, np.array(ops.convert_to_numpy(variable)))
            for variable in [*model.variables, *slots]
        ]
        return cls(values, {id(v) for v in slots}, extra)

    def restore(self, model: Any) -> None:
        """Assigns the copied values back; optimizer slots made since the
        copy (the optimizer was not built yet) are set to zero."""
        for variable, value in self.values:
            variable.assign(value)
        for variable in optimizer_slots(model):
            if id(variable) not in self.optimizer_slots:
                variable.assign(ops.zeros(variable.shape, variable.dtype))


def optimizer_slots(model: Any) -> list[Any]:
    """The optimizer's per-weight variables (moments, momentum, EMA): all
    of its variables but its step count and learning rate."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return []
    skip = {id(optimizer.iterations)}
    rate = getattr(optimizer, "_learning_rate", None)
    if rate is not None:
        skip.add(id(rate))
    return [v for v in optimizer.variables if id(v) not in skip]
