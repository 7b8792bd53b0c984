"""Pruning schedules: pure maps from an epoch number to a target sparsity.

A schedule answers one question: "what fraction of this layer's weights
should be zero while epoch `step` trains?". It is piecewise constant: the
value changes only at the steps where the callback cuts. Schedules hold no
tensors and no state, so they are trivial to test and to serialize.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import keras
import numpy as np

from keras_prune.masks import validate_sparsity


def validate_step(value: Any, name: str, minimum: int = 0) -> int:
    """Checks that `value` is an integer (numpy's too) >= `minimum` and
    returns it as an `int`."""
    if (
        isinstance(value, bool | np.bool_)
        or not isinstance(value, numbers.Integral)
        or value < minimum
    ):
        raise ValueError(
            f"Expected `{name}` to be an integer >= {minimum}. "
            f"Received: {name}={value!r}"
        )
    return int(value)


def is_real(value: Any) -> bool:
    """Whether `value` is a real number (numpy's too), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def validate_end(begin_step: int, end_step: Any, name: str = "end_step") -> int:
    """Checks that `end_step` is an integer >= `begin_step` and returns it."""
    end_step = validate_step(end_step, name)
    if end_step < begin_step:
        raise ValueError(
            f"Expected `{name}` >= {begin_step}, the first pruning step. "
            f"Received: {name}={end_step}"
        )
    return end_step


class PruningSchedule:
    """Base class of pruning schedules.

    Subclasses implement `__call__(step) -> float`, the target sparsity (the
    fraction of zero weights) that a layer should have while epoch `step`
    trains, and `get_config()`. The value must never decrease with `step`;
    the callback only ever prunes more, never less. Register a subclass with
    `@keras.saving.register_keras_serializable()` so that a callback config
    holding it loads (`IterativePruningCallback.from_config`).

    Example:

    >>> class Halfway(PruningSchedule):
    ...     def __call__(self, step):
    ...         return 0.5 if step >= 2 else 0.0
    ...     def get_config(self):
    ...         return {}
    >>> Halfway()(3)
    0.5
    """

    def __call__(self, step: int) -> float:
        raise NotImplementedError(
            f"{type(self).__name__} must implement `__call__(step)`."
        )

    def get_config(self) -> dict[str, Any]:
        raise NotImplementedError(
            f"{type(self).__name__} must implement `get_config()`."
        )

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> PruningSchedule:
        return cls(**config)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.get_config() == other.get_config()


@keras.saving.register_keras_serializable(package="keras_prune")
class PolynomialSchedule(PruningSchedule):
    """Sparsity that ramps up along a polynomial, fast at first, then slowly.

    Cuts happen at `begin_step`, every `frequency` steps after it, and at
    `end_step`. With `n` cuts in all, cut `k` (counting from 1) targets
    `final + (initial - final) * (1 - k / n) ** power`, so the last cut lands
    exactly on `final_sparsity`. Before `begin_step` the target is 0.

    Args:
        final_sparsity: Sparsity reached at `end_step`, in [0, 1).
        begin_step: Step of the first cut. Defaults to `0`.
        end_step: Step of the last cut. Defaults to `10`.
        initial_sparsity: Sparsity the ramp starts from, in [0, 1).
            Defaults to `0.0`.
        power: Exponent of the ramp; 3 is the cubic of Zhu & Gupta.
            Defaults to `3`.
        frequency: Steps between cuts. Defaults to `1`.

    Example:

    >>> schedule = PolynomialSchedule(0.875, begin_step=0, end_step=1)
    >>> [schedule(step) for step in range(3)]
    [0.765625, 0.875, 0.875]

    Reference:
        Zhu & Gupta 2017, "To prune, or not to prune", arXiv:1710.01878.
    """

    def __init__(
        self,
        final_sparsity: float,
        begin_step: int = 0,
        end_step: int = 10,
        initial_sparsity: float = 0.0,
        power: float = 3,
        frequency: int = 1,
    ):
        self.final_sparsity = validate_sparsity(final_sparsity, "final_sparsity")
        self.initial_sparsity = validate_sparsity(initial_sparsity, "initial_sparsity")
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                "Expected `initial_sparsity` <= `final_sparsity` "
                f"({self.final_sparsity}). "
                f"Received: initial_sparsity={initial_sparsity!r}"
            )
        self.begin_step = validate_step(begin_step, "begin_step")
        self.end_step = validate_end(self.begin_step, end_step)
        if not (is_real(power) and power > 0):
            raise ValueError(f"Expected `power` > 0. Received: power={power!r}")
        self.power = float(power)
        self.frequency = validate_step(frequency, "frequency", minimum=1)

    def __call__(self, step: int) -> float:
        if step < self.begin_step:
            return 0.0
        if step >= self.end_step:
            return self.final_sparsity
        cuts = math.ceil((self.end_step - self.begin_step) / self.frequency) + 1
        done = (step - self.begin_step) // self.frequency + 1
        remaining = (1.0 - done / cuts) ** self.power
        return (
            self.final_sparsity
            + (self.initial_sparsity - self.final_sparsity) * remaining
        )

    def get_config(self) -> dict[str, Any]:
        return {
            "final_sparsity": self.final_sparsity,
            "begin_step": self.begin_step,
            "end_step": self.end_step,
            "initial_sparsity": self.initial_sparsity,
            "power": self.power,
            "frequency": self.frequency,
        }


@keras.saving.register_keras_serializable(package="keras_prune")
class GeometricSchedule(PruningSchedule):
    """The kept fraction shrinks by a constant factor at every cut.

    This is iterative pruning as Han et al. 2015 (arXiv:1506.02626, section
    3.3) run it, each round keeping a fixed share of the survivors: after cut `k`
    (counting from 1) a fraction `factor ** k` of the weights is kept, until
    that would fall below `1 - final_sparsity`. At `end_step`, if given, the
    target jumps to `final_sparsity` whatever the count of cuts so far.

    Args:
        final_sparsity: The sparsity the cuts stop at, in [0, 1).
        begin_step: Step of the first cut. Defaults to `0`.
        end_step: Step by which `final_sparsity` is reached, or `None` to
            stop only when the factor gets there. Defaults to `None`.
        factor: Fraction of the live weights each cut keeps, in (0, 1).
            Defaults to `0.7`.
        frequency: Steps between cuts. Defaults to `1`.

    Example:

    >>> schedule = GeometricSchedule(0.9, factor=0.5)
    >>> [schedule(step) for step in range(5)]
    [0.5, 0.75, 0.875, 0.9, 0.9]

    Reference:
        Han et al. 2015, arXiv:1506.02626.
    """

    def __init__(
        self,
        final_sparsity: float,
        begin_step: int = 0,
        end_step: int | None = None,
        factor: float = 0.7,
        frequency: int = 1,
    ):
        self.final_sparsity = validate_sparsity(final_sparsity, "final_sparsity")
        self.begin_step = validate_step(begin_step, "begin_step")
        self.end_step = (
            None if end_step is None else validate_end(self.begin_step, end_step)
        )
        if not (is_real(factor) and 0.0 < factor < 1.0):
            raise ValueError(
                f"Expected `factor` in (0, 1). Received: factor={factor!r}"
            )
        self.factor = float(factor)
        self.frequency = validate_step(frequency, "frequency", minimum=1)

    def __call__(self, step: int) -> float:
        if step < self.begin_step:
            return 0.0
        if self.end_step is not None and step >= self.end_step:
            return self.final_sparsity
        cuts = (step - self.begin_step) // self.frequency + 1
        return min(1.0 - self.factor**cuts, self.final_sparsity)

    def get_config(self) -> dict[str, Any]:
        return {
            "final_sparsity": self.final_sparsity,
            "begin_step": self.begin_step,
            "end_step": self.end_step,
            "factor": self.factor,
            "frequency": self.frequency,
        }


@keras.saving.register_keras_serializable(package="keras_prune")
class ConstantSchedule(PruningSchedule):
    """One cut to `final_sparsity` at `begin_step`, then retraining only.

    Args:
        final_sparsity: The sparsity from `begin_step` on, in [0, 1).
        begin_step: Step of the cut. Defaults to `0`.

    Example:

    >>> schedule = ConstantSchedule(0.8, begin_step=1)
    >>> [schedule(step) for step in range(3)]
    [0.0, 0.8, 0.8]
    """

    def __init__(self, final_sparsity: float, begin_step: int = 0):
        self.final_sparsity = validate_sparsity(final_sparsity, "final_sparsity")
        self.begin_step = validate_step(begin_step, "begin_step")

    def __call__(self, step: int) -> float:
        return self.final_sparsity if step >= self.begin_step else 0.0

    def get_config(self) -> dict[str, Any]:
        return {
            "final_sparsity": self.final_sparsity,
            "begin_step": self.begin_step,
        }


@keras.saving.register_keras_serializable(package="keras_prune")
class ListSchedule(PruningSchedule):
    """Sparsities given one by one: cut `k` goes to `sparsities[k]`.

    Cuts happen at `begin_step` and every `frequency` steps after it; after
    the last value the schedule holds it. Use it to replay a ladder from a
    paper, or to give layers hand-picked targets.

    Args:
        sparsities: Non-decreasing sparsities in [0, 1).
        begin_step: Step of the first cut. Defaults to `0`.
        frequency: Steps between cuts. Defaults to `1`.

    Example:

    >>> schedule = ListSchedule([0.5, 0.9], begin_step=1)
    >>> [schedule(step) for step in range(4)]
    [0.0, 0.5, 0.9, 0.9]
    """

    def __init__(
        self, sparsities: list[float], begin_step: int = 0, frequency: int = 1
    ):
        if isinstance(sparsities, (str, bytes)) or not hasattr(sparsities, "__len__"):
            raise ValueError(
                "Expected `sparsities` to be a non-empty list of numbers. "
                f"Received: sparsities={sparsities!r}"
            )
        values = [validate_sparsity(v, "sparsities") for v in sparsities]
        if not values or values != sorted(values):
            raise ValueError(
                "Expected `sparsities` to be a non-empty, non-decreasing list. "
                f"Received: sparsities={sparsities!r}"
            )
        self.sparsities = values
        self.begin_step = validate_step(begin_step, "begin_step")
        self.frequency = validate_step(frequency, "frequency", minimum=1)

    def __call__(self, step: int) -> float:
        if step < self.begin_step:
            return 0.0
        cut = (step - self.begin_step) // self.frequency
        return self.sparsities[min(cut, len(self.sparsities) - 1)]

    def get_config(self) -> dict[str, Any]:
        return {
            "sparsities": list(self.sparsities),
            "begin_step": self.begin_step,
            "frequency": self.frequency,
        }


SCHEDULES = {
    "polynomial": PolynomialSchedule,
    "geometric": GeometricSchedule,
    "constant": ConstantSchedule,
}
