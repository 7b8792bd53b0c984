"""`IterativePruningCallback`: prune, retrain, prune more, during `fit`."""

from __future__ import annotations

import math
import warnings
from typing import Any

import keras
from keras import ops

from keras_prune.layers import MaskedDense, masked_layers, walk_layers
from keras_prune.masks import magnitude_mask, validate_sparsity
from keras_prune.schedules import (
    SCHEDULES,
    PruningSchedule,
    validate_end,
    validate_step,
)


class IterativePruningCallback(keras.callbacks.Callback):
    """Raises each `MaskedDense` layer's magnitude threshold between epochs.

    Before every epoch the callback asks its schedule for the sparsity that
    epoch should train at; where that exceeds a layer's current sparsity, it
    prunes the layer's smallest live weights (ranking only weights still
    alive, so a pruned weight never comes back) and the epoch retrains the
    survivors. With the default `end_epoch`, the last cut happens before the
    last epoch, which therefore retrains at `final_sparsity`.

    After every epoch, each layer's sparsity is added to `logs` as
    `"sparsity/<layer name>"`, so it shows in the progress bar and `History`.

    Args:
        final_sparsity: Fraction of each layer's kernel pruned by the end of
            `fit`, in [0, 1), or a dict `{layer name: fraction}` to give
            layers their own targets (layers not named are not pruned).
            Required with a named schedule; leave it `None` with schedule
            objects, which carry their own.
        schedule: `"polynomial"` (Zhu & Gupta's cubic ramp), `"geometric"`
            (keep `factor` of the live weights at each cut, as Han et al.
            and the seed report), `"constant"` (one cut at `begin_epoch`),
            a `PruningSchedule` object mapping an epoch to a sparsity, or a
            dict `{layer name: PruningSchedule}`. Defaults to
            `"polynomial"`.
        begin_epoch: The first epoch that trains pruned; the first cut
            happens just before it. Defaults to `0`, right for a model that
            is already trained; use 1 or more to train dense first.
        end_epoch: The epoch before which the last cut happens, or `None`
            for the last epoch of `fit`. Defaults to `None`.
        frequency: Epochs between cuts. Defaults to `1`.
        factor: Kept fraction per cut of the `"geometric"` schedule.
            Defaults to `0.7`.

    Raises:
        ValueError: On a bad argument, here; or at the start of `fit` if the
            model has no `MaskedDense` layer.

    Example:

    >>> model = keras.Sequential([keras.Input((8,)), MaskedDense(4)])
    >>> model.compile("adam", "mse")
    >>> history = model.fit(np.ones((16, 8)), np.ones((16, 4)), epochs=3,
    ...     verbose=0, callbacks=[IterativePruningCallback(final_sparsity=0.5)])
    >>> model.layers[0].sparsity
    0.5

    Reference:
        Han et al. 2015, arXiv:1506.02626; Zhu & Gupta 2017, arXiv:1710.01878.
    """

    def __init__(
        self,
        final_sparsity: float | dict[str, float] | None = None,
        schedule: str | PruningSchedule | dict[str, PruningSchedule] = "polynomial",
        begin_epoch: int = 0,
        end_epoch: int | None = None,
        frequency: int = 1,
        factor: float = 0.7,
    ):
        super().__init__()
        self.begin_epoch = validate_step(begin_epoch, "begin_epoch")
        if end_epoch is not None:
            end_epoch = validate_end(begin_epoch, end_epoch, "end_epoch")
        self.end_epoch = end_epoch
        self.frequency = validate_step(frequency, "frequency", minimum=1)
        self.factor = factor
        if isinstance(schedule, str):
            if schedule not in SCHEDULES:
                raise ValueError(
                    f"Expected `schedule` to be one of {sorted(SCHEDULES)}, a "
                    "PruningSchedule object or a dict of them by layer name. "
                    f"Received: schedule={schedule!r}"
                )
            if schedule == "constant" and (frequency != 1 or factor != 0.7):
                raise ValueError(
                    "The 'constant' schedule cuts once: it takes no `frequency` "
                    f"or `factor`. Received: frequency={frequency!r}, "
                    f"factor={factor!r}"
                )
            final_sparsity = self._validate_finals(final_sparsity)
            # Build each schedule once with a provisional end, so that every
            # argument is checked now; the real end is known at `fit` time.
            for final in self._per_layer(final_sparsity).values():
                self._make_schedule(schedule, final, end_epoch or begin_epoch)
        else:
            schedules = schedule.values() if isinstance(schedule, dict) else [schedule]
            if not all(isinstance(s, PruningSchedule) for s in schedules):
                raise ValueError(
                    f"Expected `schedule` to be one of {sorted(SCHEDULES)}, a "
                    "PruningSchedule object or a dict of them by layer name. "
                    f"Received: schedule={schedule!r}"
                )
            if final_sparsity is not None:
                raise ValueError(
                    "Pass `final_sparsity` to the schedule object, not to the "
                    f"callback. Received: final_sparsity={final_sparsity!r} with "
                    f"schedule={schedule!r}"
                )
        self.final_sparsity = final_sparsity
        self.schedule = schedule
        self.layer_schedules: dict[str, PruningSchedule] = {}

    @staticmethod
    def _validate_finals(final_sparsity: Any) -> float | dict[str, float]:
        if isinstance(final_sparsity, dict):
            return {
                name: validate_sparsity(value, f"final_sparsity[{name!r}]")
                for name, value in final_sparsity.items()
            }
        if final_sparsity is None:
            raise ValueError(
                "Expected `final_sparsity` in [0, 1). Received: final_sparsity=None"
            )
        return validate_sparsity(final_sparsity, "final_sparsity")

    @staticmethod
    def _per_layer(value: Any) -> dict[str | None, Any]:
        """`{name: value}` as given, or `{None: value}` meaning every layer."""
        return dict(value) if isinstance(value, dict) else {None: value}

    def _make_schedule(
        self, name: str, final: float, end_epoch: int
    ) -> PruningSchedule:
        if name == "polynomial":
            return SCHEDULES[name](
                final, self.begin_epoch, end_epoch, frequency=self.frequency
            )
        if name == "geometric":
            return SCHEDULES[name](
                final,
                self.begin_epoch,
                end_epoch,
                factor=self.factor,
                frequency=self.frequency,
            )
        return SCHEDULES[name](final, self.begin_epoch)

    def _resolve_schedules(self, epochs: int) -> dict[str, PruningSchedule]:
        """Maps each pruned layer's name to its schedule for this `fit`."""
        if isinstance(self.schedule, str):
            end_epoch = self.end_epoch
            if end_epoch is None:
                end_epoch = max(self.begin_epoch, epochs - 1)
            if end_epoch > epochs - 1:
                warnings.warn(
                    f"`end_epoch`={end_epoch} is past the last epoch of this fit "
                    f"({epochs - 1}): layers will not reach final_sparsity="
                    f"{self.final_sparsity} in it.",
                    stacklevel=3,
                )
            wanted = {
                name: self._make_schedule(self.schedule, final, end_epoch)
                for name, final in self._per_layer(self.final_sparsity).items()
            }
        else:
            wanted = self._per_layer(self.schedule)
        names = [layer.name for layer in self.layers]
        if None in wanted:
            return dict.fromkeys(names, wanted[None])
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise ValueError(
                f"Expected the keys of `final_sparsity` or `schedule` to name "
                f"MaskedDense layers of the model ({names}). Received: {unknown}"
            )
        return wanted

    @property
    def layers(self) -> list[MaskedDense]:
        """The `MaskedDense` layers of the model being trained."""
        return masked_layers(self.model)

    def on_train_begin(self, logs: dict | None = None) -> None:
        if not self.layers:
            raise ValueError(
                "IterativePruningCallback found no MaskedDense layer to prune in "
                f"model {self.model.name!r}. Build the model with "
                "keras_prune.MaskedDense or convert it with "
                "keras_prune.make_prunable(model)."
            )
        epochs = (self.params or {}).get("epochs") or 1
        self.layer_schedules = self._resolve_schedules(epochs)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        for layer in self.layers:
            if layer.name in self.layer_schedules:
                self.prune_layer(layer, self.layer_schedules[layer.name](epoch))

    @staticmethod
    def prune_layer(layer: MaskedDense, sparsity: float) -> None:
        """Prunes `layer` to `sparsity` if it is below it; never un-prunes.

        Example:

        >>> layer = MaskedDense(2)
        >>> _ = layer(np.ones((1, 50)))
        >>> IterativePruningCallback.prune_layer(layer, 0.5)
        >>> layer.sparsity
        0.5
        """
        current = layer.sparsity
        size = math.prod(layer.mask.shape)
        if round(sparsity * size) <= round(current * size):
            return
        layer.prune_to(
            magnitude_mask(
                ops.convert_to_numpy(layer.kernel),
                ops.convert_to_numpy(layer.mask),
                sparsity,
            )
        )

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None:
            return
        for layer in self.layers:
            logs[f"sparsity/{layer.name}"] = layer.sparsity

    def get_config(self) -> dict[str, Any]:
        return {
            "final_sparsity": self.final_sparsity,
            "schedule": self.schedule,
            "begin_epoch": self.begin_epoch,
            "end_epoch": self.end_epoch,
            "frequency": self.frequency,
            "factor": self.factor,
        }


class DropoutScalingCallback(keras.callbacks.Callback):
    """Shrinks dropout as the layer it feeds is pruned (Han et al. 2015, eq. 2).

    A pruned layer has fewer connections to regularise, so the dropout in
    front of it should drop less: `rate = initial_rate * sqrt(kept)`, where
    `kept` is the fraction of the layer's weights still alive. Place this
    callback after `IterativePruningCallback` in `callbacks=[...]` so it sees
    each epoch's new mask. A changed rate retraces the training function.

    Args:
        dropout_for: `{dropout layer name: MaskedDense layer name}`, pairing
            each `Dropout` with the pruned layer whose inputs it drops.

    Raises:
        ValueError: If `dropout_for` is not a non-empty dict of names; at the
            start of `fit`, if a name is not a `Dropout` or `MaskedDense` of
            the model.

    Example:

    >>> callback = DropoutScalingCallback({"dropout": "fc2"})
    >>> callback.dropout_for
    {'dropout': 'fc2'}

    Reference:
        Han et al. 2015, arXiv:1506.02626, section 3.2.
    """

    def __init__(self, dropout_for: dict[str, str]):
        super().__init__()
        if (
            not isinstance(dropout_for, dict)
            or not dropout_for
            or not all(
                isinstance(k, str) and isinstance(v, str)
                for k, v in dropout_for.items()
            )
        ):
            raise ValueError(
                "Expected `dropout_for` to be a non-empty dict of "
                "{dropout layer name: MaskedDense layer name}. "
                f"Received: dropout_for={dropout_for!r}"
            )
        self.dropout_for = dict(dropout_for)
        self.initial_rates: dict[str, float] = {}

    def _pairs(self) -> list[tuple[keras.layers.Dropout, MaskedDense]]:
        by_name = {layer.name: layer for layer in walk_layers(self.model)}
        pairs = []
        for dropout_name, masked_name in self.dropout_for.items():
            dropout, masked = by_name.get(dropout_name), by_name.get(masked_name)
            if not isinstance(dropout, keras.layers.Dropout) or not isinstance(
                masked, MaskedDense
            ):
                raise ValueError(
                    "Expected `dropout_for` to pair Dropout layers with MaskedDense "
                    f"layers of the model. Received: {dropout_name!r} -> "
                    f"{masked_name!r}, a {type(dropout).__name__} and a "
                    f"{type(masked).__name__}"
                )
            pairs.append((dropout, masked))
        return pairs

    def on_train_begin(self, logs: dict | None = None) -> None:
        for dropout, _ in self._pairs():
            self.initial_rates.setdefault(dropout.name, dropout.rate)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        changed = False
        for dropout, masked in self._pairs():
            rate = self.initial_rates[dropout.name] * math.sqrt(1.0 - masked.sparsity)
            if not math.isclose(rate, dropout.rate, rel_tol=1e-3):
                dropout.rate = rate
                changed = True
        if changed:
            self.model.make_train_function(force=True)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            for dropout, _ in self._pairs():
                logs[f"dropout/{dropout.name}"] = dropout.rate
