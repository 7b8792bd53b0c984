"""`IterativePruningCallback`: prune, retrain, prune more, during `fit`."""

from __future__ import annotations

import math
import warnings
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_prune.channels import ChannelGraph
from keras_prune.guard import AccuracyGuard, GuardEvent, Snapshot
from keras_prune.masking import (  # noqa: F401 - MaskedDense: doctests
    MaskedDense,
    MaskedLayer,
    iter_masked_weights,
    layer_labels,
    masked_layers,
)
from keras_prune.masks import (
    block_scores,
    check_finite,
    global_magnitude_masks,
    magnitude_mask,
    pruned_count,
    std_threshold_mask,
    validate_granularity,
    validate_norm,
    validate_quality,
    validate_sparsity,
)
from keras_prune.schedules import (
    SCHEDULES,
    PruningSchedule,
    is_real,
    validate_end,
    validate_step,
)
from keras_prune.units import (
    channel_graph,
    kept_whole,
    masked_sets,
    masks_to_prune,
    select_units,
)
from keras_prune.variational import signal_to_noise

SCOPES = ("layer", "global")
UNITS = ("epoch", "step")
# `ranking`'s choices: what a cut ranks the live weights by.
RANKINGS = ("magnitude", "signal_to_noise")


def _magnitude_cut(
    layer: Any,
    sparsity: float,
    block: tuple[int, int] | None = None,
    scores: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """The new masks of `layer`'s prunable weights at `sparsity`, by
    magnitude (of single weights or of `block`s) or by `scores` (`{weight
    name: array}` ranked in its place), for those that lose weights
    (`magnitude_mask`)."""
    changed = {}
    masks = layer.masks
    for key, variable in layer.prunable_weights.items():
        mask = ops.convert_to_numpy(masks[key])
        if _loses_weights(mask, sparsity, block):
            ranked = _finite(layer, key, variable) if scores is None else scores[key]
            changed[key] = magnitude_mask(ranked, mask, sparsity, block)
    return changed


def _loses_weights(
    mask: np.ndarray, sparsity: float, block: tuple[int, int] | None
) -> bool:
    """Whether a cut to `sparsity` prunes more of `mask` (weights or blocks)."""
    live = block_scores(mask, mask, block)[1] if block else mask
    return pruned_count(sparsity, live.size) > live.size - np.count_nonzero(live)


def _threshold(
    weights: np.ndarray, mask: np.ndarray, block: tuple[int, int] | None
) -> float:
    """The smallest magnitude `mask` keeps (of single weights, or the mean
    magnitude of blocks): the cut's threshold, below which it pruned."""
    if block is not None:
        scores, live = block_scores(weights, mask, block)
        return float(scores[live != 0].min(initial=np.inf))
    return float(np.abs(weights[mask != 0]).min(initial=np.inf))


def _finite(layer: Any, key: str, variable: Any) -> np.ndarray:
    """The weight's values; raises naming the layer if any is NaN or inf."""
    return check_finite(
        ops.convert_to_numpy(variable), f"the {key} of layer {layer.name!r}"
    )


def _frozen(layer: Any) -> bool:
    """Whether a masked layer is frozen (`trainable = False`, set on it or on
    a model or layer above it). Its variables' own flags are not the test:
    LoRA freezes the kernel of a layer that trains."""
    return not layer.trainable


#: Callbacks whose `on_train_end` changes no weight: no need to wait for them.
_HARMLESS = (
    keras.callbacks.History,
    keras.callbacks.ProgbarLogger,
    keras.callbacks.CSVLogger,
    keras.callbacks.TensorBoard,
    keras.callbacks.TerminateOnNaN,
)


class _LastWord(keras.callbacks.Callback):
    """Runs the pruning callback's end of training once more, after every
    other callback's `on_train_end`.

    Keras calls `on_train_end` in list order, so a callback listed after
    the pruning callback (`EarlyStopping(restore_best_weights=True)`) can
    restore older weights and masks after the pruning callback finished.
    `join` finds the `CallbackList` that `fit` made (the caller of
    `on_train_begin`, whose `callbacks` holds the pruning callback) and puts
    this callback at its end; at the end of training it puts back the last
    cut's masks, zeroes pruned weights, names what rolled them back, and
    leaves the list. Where no such list is found (a caller other than
    Keras's `fit`), nothing changes: the pruning callback's own
    `on_train_end` still runs.
    """

    def __init__(self, owner: Any, callbacks: list[Any], later: list[str]):
        super().__init__()
        self.owner = owner
        self.callbacks = callbacks
        self.later = later

    @classmethod
    def join(cls, owner: Any) -> None:
        import sys

        frame: Any = sys._getframe(1)
        for _ in range(4):
            frame = frame.f_back
            if frame is None:
                return
            listed = getattr(frame.f_locals.get("self"), "callbacks", None)
            if isinstance(listed, list) and any(c is owner for c in listed):
                break
        else:
            return
        if any(isinstance(c, cls) for c in listed):
            return
        position = next(i for i, c in enumerate(listed) if c is owner)
        later = [
            type(c).__name__
            for c in listed[position + 1 :]
            if not isinstance(c, _HARMLESS)
        ]
        if later:
            listed.append(cls(owner, listed, later))

    def on_train_end(self, logs: dict | None = None) -> None:
        culprits = ", ".join(self.later)
        self.owner._restore_rolled_back(
            f"A callback listed after IterativePruningCallback ({culprits})"
        )
        self.owner._zero_pruned()
        if self in self.callbacks:
            self.callbacks.remove(self)


class IterativePruningCallback(keras.callbacks.Callback):
    """Raises the magnitude threshold of every masked layer during `fit`.

    Before every epoch (or every training step, with `unit="step"`) the
    callback asks its schedule for the sparsity training should run at;
    where that exceeds the current sparsity it prunes the smallest live
    weights (ranking only weights still alive, so a pruned weight never
    comes back) and training retrains the survivors. With the default
    `end_epoch`, the last cut happens before the last epoch, which therefore
    retrains at `final_sparsity`.

    It prunes every masked weight of the model, wherever the layer lives
    (nested models, wrappers, custom layers): `MaskedDense`, any layer made
    by `make_prunable` or `masked_class`. Each prunable weight (a kernel, an
    LSTM's recurrent kernel) is ranked on its own with `scope="layer"`, or
    all of them together with `scope="global"`. No tensor is ever pruned
    empty: one weight is always kept, with a warning.

    What else it guarantees, as Keras features write weights too:
    - at each cut the pruned weights and the optimizer's state for them
      (moments, momentum, EMA) are set to zero, so every element-wise
      optimizer leaves them at exactly zero;
    - after every epoch and after `fit` (after the optimizer's EMA is
      copied back) pruned raw weights are zeroed again;
    - if another callback or a load restored older, less sparse masks (for
      example `EarlyStopping(restore_best_weights=True)` placed after this
      callback restores them at the end of `fit`, or before the next
      `fit`), the masks of the last cut are put back with a warning that
      says what was rolled back.

    After every epoch, each layer's sparsity is added to `logs` as
    `"sparsity/<layer name>"`, and, once a cut has pruned the layer, its
    threshold as `"threshold/<layer name>"` (the smallest magnitude that cut
    kept: weights below it were pruned; with blocks, the smallest kept
    block's mean magnitude), so they show in the progress bar, `History`
    and, with `keras.callbacks.TensorBoard` placed *after* this callback in
    `callbacks`, as TensorBoard scalars (`epoch_sparsity/<layer name>`;
    `TensorBoard(histogram_freq=1)` adds weight histograms, pruned weights
    at zero).

    Instead of a sparsity, a cut can follow Han et al.'s threshold: with
    `quality`, each cut prunes the live weights of a layer whose magnitude is
    below `quality` times the standard deviation of its live weights
    (`masks.std_threshold_mask`), so layers lose weights by how their
    weights spread, not by a fraction set in advance.

    With `guard=AccuracyGuard(...)`, a cut that costs more than a tolerated
    drop of a validation metric is undone after its retraining (weights,
    masks and optimizer state put back) and retried with half the step, or
    training stops: see `AccuracyGuard`.

    In a custom training loop, drive it by hand: `callback.set_model(model)`,
    `callback.set_params({"epochs": epochs})`, `callback.on_train_begin()`,
    then per epoch `callback.on_epoch_begin(epoch)` before its steps (and,
    with `unit="step"`, `callback.on_train_batch_begin(batch)` before each
    step) and `callback.on_epoch_end(epoch, logs)` after, and
    `callback.on_train_end()` at the end. A stateless JAX loop must write
    its state back to the model's variables before these calls and read the
    masks and weights from them after.

    Args:
        final_sparsity: Fraction of each prunable weight pruned by the end
            of `fit` (of all of them together with `scope="global"`), in
            [0, 1), or a dict `{layer name: fraction}` to give layers their
            own targets (layers not named are not pruned). Required with a
            named schedule; leave it `None` with schedule objects, which
            carry their own.
        schedule: `"polynomial"` (Zhu & Gupta's cubic ramp), `"geometric"`
            (keep `factor` of the live weights at each cut: the iterative
            pruning of Han et al. 2015, section 3.3), `"constant"` (one cut
            at `begin_epoch`), a `PruningSchedule` object mapping an epoch
            (or step) to a sparsity, or a dict `{layer name:
            PruningSchedule}`. Defaults to `"polynomial"`.
        begin_epoch: The first epoch (step, with `unit="step"`) that trains
            pruned; the first cut happens just before it. Defaults to `0`,
            right for a model that is already trained; use 1 or more to
            train dense first.
        end_epoch: The epoch (step) before which the last cut happens, or
            `None` for the last epoch (step) of `fit`. Defaults to `None`.
        frequency: Epochs (steps) between cuts. Defaults to `1`.
        factor: Kept fraction per cut of the `"geometric"` schedule.
            Defaults to `0.7`.
        scope: `"layer"` ranks each prunable weight on its own, so each
            reaches its target; `"global"` ranks all of them together
            (global magnitude pruning), so that layers with smaller weights
            give up more. Defaults to `"layer"`.
        min_kept: With `scope="global"`, the least fraction of its weights
            each prunable weight keeps (an LSTM's kernel and recurrent
            kernel are bounded separately): a number for every layer or a
            dict by layer name. Defaults to `None` (at least one weight).
        max_kept: With `scope="global"`, the most fraction each prunable
            weight keeps, likewise. Defaults to `None`.
        unit: `"epoch"` or `"step"`: what `begin_epoch`, `end_epoch`,
            `frequency` and the schedule count. With `"step"` the masks are
            updated before training steps (optimizer iterations, so a
            resumed run continues where it stopped): for `fit` with one
            long epoch, or fine-tuning jobs. Defaults to `"epoch"`.
        granularity: `"weight"` ranks and prunes single weights; `(units,
            inputs)` ranks and prunes blocks of that many output units by
            that many consecutive inputs (over a kernel's last two axes), by
            their mean magnitude, with every schedule and scope; sparsities
            then count blocks. `(1, 4)` is the layout of TFLite's sparse
            FULLY_CONNECTED kernel (see `export_litert`): such masks run
            there about twice as fast as single-weight ones. `"unit"` ranks
            and prunes whole units of `Dense`/`EinsumDense`, filters of
            convolutions and channels of depthwise convolutions, by `norm`:
            a pruned unit loses its kernel column and the kernel rows that
            read it in the next layers, and units coupled by a residual `Add`
            go together (`ChannelGraph`), so that `shrink` can remove them
            and make the network smaller and faster. Sparsities then count
            units, per set of coupled layers (the smallest target of its
            layers) or over all of them with `scope="global"`. The model's
            output layers, and units that reach a layer the graph cannot
            follow, keep all their units: a warning names those layers.
            Needs a Sequential or Functional model. Defaults to `"weight"`.
        norm: How `granularity="unit"` measures a unit: `"l1"` (the mean
            |weight| of its kernel column, Li et al. 2017) or `"l2"` (their
            root mean square). Defaults to `"l1"`.
        quality: Han's threshold instead of a sparsity schedule: a number
            (standard deviations, >= 0) used at every cut, a list giving
            the quality of each cut in turn (the last one repeated: a
            schedule that raises it), or a dict `{layer name: number or
            list}` to give layers their own (layers not named are not
            pruned; a sensitivity scan's `qualities` makes one). Cuts happen
            every `frequency` epochs (steps) from `begin_epoch` to
            `end_epoch`. Takes no `final_sparsity` or schedule; needs
            `scope="layer"` and `granularity="weight"`. Defaults to `None`.
        guard: An `AccuracyGuard`, or `None` for no guard. Needs
            `unit="epoch"`. Defaults to `None`.
        ranking: What a cut ranks the live weights by: `"magnitude"`
            (|weight|), or `"signal_to_noise"` (|theta| / sigma, the noise
            each weight learned under sparse variational dropout, Molchanov
            et al. 2017: the weights that are mostly noise go first; every
            masked layer needs `add_variational_dropout`, and the logged
            thresholds are then signal-to-noise ratios). Needs
            `scope="layer"`, `granularity="weight"` and no `quality`.
            Defaults to `"magnitude"`.
        prune_frozen: Whether to prune masked layers whose prunable weights
            are all frozen (`trainable = False`, as a transfer-learning
            backbone): no retraining can recover what a cut takes from them.
            `False` leaves them as they are and names them in a warning at
            the start of `fit`; `True` prunes them too, with a warning that
            they will not be retrained. Defaults to `False`.

    Whatever its place in the list of callbacks, the model that `fit`
    returns holds the last cut's masks, pruned weights at zero: where a
    callback that runs after it at the end of training (`EarlyStopping(
    restore_best_weights=True)` listed after it) restores older weights
    and masks, it puts back the last cut's masks after that callback and
    warns, naming the layers and the callbacks.

    Raises:
        ValueError: On a bad argument, here; or at the start of `fit` if the
            model has no masked layer or a name is not one.

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
        scope: str = "layer",
        min_kept: float | dict[str, float] | None = None,
        max_kept: float | dict[str, float] | None = None,
        unit: str = "epoch",
        granularity: str | tuple[int, int] = "weight",
        norm: str = "l1",
        quality: float | list[float] | dict[str, float | list[float]] | None = None,
        guard: AccuracyGuard | None = None,
        ranking: str = "magnitude",
        prune_frozen: bool = False,
    ):
        super().__init__()
        if not isinstance(prune_frozen, bool):
            raise ValueError(
                "Expected `prune_frozen` to be True or False. "
                f"Received: prune_frozen={prune_frozen!r}"
            )
        self.prune_frozen = prune_frozen
        self._warned_frozen: set[int] = set()
        if ranking not in RANKINGS:
            raise ValueError(
                f"Expected `ranking` to be one of {list(RANKINGS)}. "
                f"Received: ranking={ranking!r}"
            )
        if ranking != "magnitude" and (
            scope != "layer" or granularity != "weight" or quality is not None
        ):
            raise ValueError(
                f"ranking={ranking!r} ranks single weights layer by layer: it "
                'needs scope="layer", granularity="weight" and no quality. '
                f"Received: scope={scope!r}, granularity={granularity!r}, "
                f"quality={quality!r}"
            )
        self.ranking = ranking
        self.units = isinstance(granularity, str) and granularity == "unit"
        self.block = None if self.units else validate_granularity(granularity)
        self.granularity = granularity if self.block is None else self.block
        validate_norm(norm)
        if norm != "l1" and not self.units:
            raise ValueError(
                '`norm` ranks whole units: it needs granularity="unit". '
                f"Received: norm={norm!r} with granularity={granularity!r}"
            )
        self.norm = norm
        self._channels: ChannelGraph | None = None
        self._unit_sets: list[tuple[list[str], np.ndarray]] = []
        self.begin_epoch = validate_step(begin_epoch, "begin_epoch")
        if end_epoch is not None:
            end_epoch = validate_end(begin_epoch, end_epoch, "end_epoch")
        self.end_epoch = end_epoch
        self.frequency = validate_step(frequency, "frequency", minimum=1)
        if not (is_real(factor) and 0.0 < factor < 1.0):
            raise ValueError(
                f"Expected `factor` in (0, 1). Received: factor={factor!r}"
            )
        self.factor = float(factor)
        if scope not in SCOPES:
            raise ValueError(
                f"Expected `scope` to be one of {list(SCOPES)}. "
                f"Received: scope={scope!r}"
            )
        if unit not in UNITS:
            raise ValueError(
                f"Expected `unit` to be one of {list(UNITS)}. Received: unit={unit!r}"
            )
        if scope == "global" and (
            isinstance(final_sparsity, dict) or isinstance(schedule, dict)
        ):
            raise ValueError(
                'scope="global" ranks every layer together: it takes one '
                "`final_sparsity` or schedule, not a dict by layer. Received: "
                f"final_sparsity={final_sparsity!r}, schedule={schedule!r}"
            )
        if scope == "layer" and (min_kept is not None or max_kept is not None):
            raise ValueError(
                '`min_kept` and `max_kept` bound layers under scope="global". '
                f"Received: min_kept={min_kept!r}, max_kept={max_kept!r} with "
                'scope="layer"'
            )
        self.min_kept = self._validate_fractions(min_kept, "min_kept")
        self.max_kept = self._validate_fractions(max_kept, "max_kept")
        if isinstance(self.min_kept, float) and isinstance(self.max_kept, float):
            if self.min_kept > self.max_kept:
                raise ValueError(
                    "Expected `min_kept` <= `max_kept`. Received: "
                    f"min_kept={min_kept!r}, max_kept={max_kept!r}"
                )
        self.quality = quality
        self._qualities = self._validate_quality(
            quality, final_sparsity, schedule, scope, granularity
        )
        if guard is not None and not isinstance(guard, AccuracyGuard):
            raise ValueError(
                f"Expected `guard` to be an AccuracyGuard or None. Received: "
                f"guard={guard!r}"
            )
        if guard is not None and unit != "epoch":
            raise ValueError(
                "The guard judges validation metrics, logged per epoch: it needs "
                f'unit="epoch". Received: unit={unit!r}'
            )
        self.guard = guard
        if quality is not None:
            pass  # the qualities are the schedule
        elif isinstance(schedule, str):
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
        self.scope = scope
        self.unit = unit
        # {layer label: schedule}, or {None: schedule} with scope="global"
        self.layer_schedules: dict[str | None, PruningSchedule] = {}
        self._cut_masks: dict[tuple[int, str], np.ndarray] = {}
        self._warned_full: set[tuple[str, str]] = set()
        self._warned_bounds = False
        # {id(layer): smallest magnitude its last cut kept}, for the logs.
        self._thresholds: dict[int, float] = {}
        self._applied: dict[str | None, float] = {}
        self._cut_masks_owner: Any = None
        self._epoch_start_step = 0
        self._first_epoch = 0
        self._epoch = 0
        self._started = False
        # Han's threshold: {layer label: quality per cut}, and the position
        # of each layer's last cut.
        self.layer_qualities: dict[str, list[float]] = {}
        self._quality_cut: dict[str, int] = {}
        self._quality_end = 0
        # The guard's state (see `AccuracyGuard`): the last kept state and
        # its best value, whether a cut awaits judgement, and how far a
        # retry has moved the schedules (`_delay`) and scaled the step.
        self.guard_events: list[GuardEvent] = []
        self._kept: Snapshot | None = None
        self._best: float | None = None
        self._pending = False
        self._last_cut = 0
        self._delay = 0
        self._scale = 1.0
        self._failures = 0
        self._stopped = False
        self._last_value: tuple[int, float] | None = None

    @property
    def stopped(self) -> bool:
        """Whether the guard stopped pruning (`AccuracyGuard(on_drop=
        "stop")`, or retries used up): later epochs and `fit` calls train
        without cutting."""
        return self._stopped

    @staticmethod
    def _validate_quality(
        quality: Any, final_sparsity: Any, schedule: Any, scope: str, granularity: Any
    ) -> dict[str | None, list[float]] | None:
        """`quality` as `{layer name (None: every layer): qualities per
        cut}`, checked; `None` without it."""
        if quality is None:
            return None
        if final_sparsity is not None or schedule != "polynomial":
            raise ValueError(
                "`quality` sets each cut's threshold (Han et al.): it takes no "
                "`final_sparsity` or schedule. Received: "
                f"final_sparsity={final_sparsity!r}, schedule={schedule!r}"
            )
        if scope != "layer" or granularity != "weight":
            raise ValueError(
                "`quality` prunes single weights layer by layer: it needs "
                'scope="layer" and granularity="weight". Received: '
                f"scope={scope!r}, granularity={granularity!r}"
            )
        items = quality.items() if isinstance(quality, dict) else [(None, quality)]
        checked: dict[str | None, list[float]] = {}
        for name, value in items:
            label = "quality" if name is None else f"quality[{name!r}]"
            if isinstance(value, list | tuple):
                if not value:
                    raise ValueError(
                        f"Expected `{label}` to hold at least one quality. "
                        f"Received: {label}={value!r}"
                    )
                checked[name] = [
                    validate_quality(q, f"{label}[{i}]") for i, q in enumerate(value)
                ]
            else:
                checked[name] = [validate_quality(value, label)]
        return checked

    @staticmethod
    def _validate_fractions(value: Any, name: str) -> Any:
        if value is None:
            return None
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for key, fraction in items:
            label = name if key is None else f"{name}[{key!r}]"
            if not (is_real(fraction) and 0.0 <= fraction <= 1.0):
                raise ValueError(
                    f"Expected `{label}` in [0, 1]. Received: {label}={fraction!r}"
                )
        if isinstance(value, dict):
            return {key: float(fraction) for key, fraction in value.items()}
        return float(value)

    @staticmethod
    def _validate_finals(final_sparsity: Any) -> float | dict[str, float]:
        if isinstance(final_sparsity, dict):
            return {
                name: validate_sparsity(value, f"final_sparsity[{name!r}]")
                for name, value in final_sparsity.items()
            }
        if final_sparsity is None:
            raise ValueError(
                "`final_sparsity` is required with a named schedule: expected "
                "`final_sparsity` in [0, 1). Received: final_sparsity=None"
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

    def _last_position(self) -> int:
        """The last epoch (or step) of this `fit`, from the callback params."""
        params = self.params or {}
        epochs = params.get("epochs") or 1
        if self.unit == "epoch":
            return epochs - 1
        steps = params.get("steps")
        if not steps:
            if self.end_epoch is None and isinstance(self.schedule, str):
                raise ValueError(
                    'With unit="step" and a dataset of unknown length, pass '
                    "`end_epoch` (the step of the last cut). Received: "
                    "end_epoch=None"
                )
            return self.end_epoch or 0
        # The callback runs before each group of `steps_per_execution`
        # steps: the last cut can come before the last group.
        group = int(getattr(self.model, "steps_per_execution", 1) or 1)
        return self._epoch_start_step + (epochs - self._first_epoch) * steps - group

    def _resolve_schedules(self) -> dict[str | None, PruningSchedule]:
        """Maps each pruned layer's name (`None`: all layers together) to its
        schedule for this `fit`."""
        if isinstance(self.schedule, str):
            last = self._last_position()
            end_epoch = self.end_epoch
            if end_epoch is None:
                end_epoch = max(self.begin_epoch, last)
            if end_epoch > last:
                warnings.warn(
                    f"`end_epoch`={end_epoch} is past the last {self.unit} of this "
                    f"fit ({last}): layers will not reach final_sparsity="
                    f"{self.final_sparsity} in it.",
                    stacklevel=3,
                )
            wanted = {
                name: self._make_schedule(self.schedule, final, end_epoch)
                for name, final in self._per_layer(self.final_sparsity).items()
            }
        else:
            wanted = self._per_layer(self.schedule)
        if self.scope == "global":
            return wanted
        names = [label for label, _ in self._labelled()]
        if None in wanted:
            return dict.fromkeys(names, wanted[None])
        unknown = sorted(str(name) for name in set(wanted) - set(names))
        if unknown:
            raise ValueError(
                f"Expected the keys of `final_sparsity` or `schedule` to name "
                f"masked layers of the model ({names}). Received: {unknown}"
            )
        return wanted

    def _resolve_qualities(self) -> dict[str, list[float]]:
        """Maps each pruned layer's name to its quality per cut, and sets
        the position of the last cut for this `fit`."""
        assert self._qualities is not None
        last = self._last_position()
        self._quality_end = last if self.end_epoch is None else self.end_epoch
        names = [label for label, _ in self._labelled()]
        if None in self._qualities:
            return dict.fromkeys(names, self._qualities[None])
        unknown = sorted(str(name) for name in set(self._qualities) - set(names))
        if unknown:
            raise ValueError(
                f"Expected the keys of `quality` to name masked layers of the "
                f"model ({names}). Received: {unknown}"
            )
        return {str(name): value for name, value in self._qualities.items()}

    def _labelled(self) -> list[tuple[str, Any]]:
        """`(label, layer)` per built masked layer: its name, or its path in
        the model where names repeat (see `layer_labels`)."""
        layers = self.layers
        return list(zip(layer_labels(layers), layers, strict=True))

    @property
    def layers(self) -> list[MaskedLayer]:
        """The masked layers that the callback prunes, wherever they live:
        every built one, but for frozen ones unless `prune_frozen`."""
        return [
            layer
            for layer in masked_layers(self.model)
            if layer.built and (self.prune_frozen or not _frozen(layer))
        ]

    def _warn_frozen(self) -> None:
        """Names, once per layer, the frozen masked layers: left alone, or
        pruned without retraining (`prune_frozen=True`)."""
        frozen = [
            layer
            for layer in masked_layers(self.model)
            if layer.built and _frozen(layer) and id(layer) not in self._warned_frozen
        ]
        if not frozen:
            return
        self._warned_frozen.update(id(layer) for layer in frozen)
        names = layer_labels(frozen)
        if self.prune_frozen:
            warnings.warn(
                f"IterativePruningCallback prunes {len(names)} frozen layer(s) "
                f"(trainable=False), which training will not retrain: {names}",
                stacklevel=3,
            )
        else:
            warnings.warn(
                f"IterativePruningCallback leaves {len(names)} frozen layer(s) "
                f"(trainable=False) unpruned: {names}. Pass prune_frozen=True "
                "to prune them without retraining, or unfreeze them.",
                stacklevel=3,
            )

    # --- the cuts -----------------------------------------------------
    def _sync_backend_state(self) -> None:
        # JAX's `fit` holds the variables' values in its own state during an
        # epoch; write them back before reading or changing masks mid-epoch.
        sync = getattr(self.model, "jax_state_sync", None)
        if sync is not None:
            sync()

    def _apply(
        self, layer: Any, new_masks: dict[str, np.ndarray], threshold: float | None
    ) -> None:
        """Records the cut's threshold (`None`: none to record), sets masks,
        zeroes the pruned weights and their optimizer state."""
        if threshold is not None:
            self._thresholds[id(layer)] = threshold
        layer.prune_to(new_masks, optimizer=getattr(self.model, "optimizer", None))
        for key, mask in new_masks.items():
            self._cut_masks[(id(layer), key)] = mask != 0
        self._pending = True
        self._last_cut = self._epoch

    def _smallest_kept(
        self,
        layer: Any,
        new_masks: dict[str, np.ndarray],
        scores: dict[str, np.ndarray] | None = None,
    ) -> float:
        """The smallest magnitude (of a weight, or a block's mean), or score
        where the cut ranked `scores`, that the new masks keep in `layer`:
        the cut's threshold."""
        return min(
            _threshold(
                ops.convert_to_numpy(layer.prunable_weights[key])
                if scores is None
                else scores[key],
                mask,
                self.block,
            )
            for key, mask in new_masks.items()
        )

    def _warn_if_full(self, layer: Any, key: str, sparsity: float, size: int) -> None:
        if (
            round(sparsity * size) >= size
            and (layer.name, key) not in self._warned_full
        ):
            self._warned_full.add((layer.name, key))
            warnings.warn(
                f"A sparsity of {sparsity} would prune all {size} weights of "
                f"{layer.name!r} ({key}); keeping its largest one.",
                stacklevel=3,
            )

    def _cut(self, position: int) -> None:
        """Prunes every layer to its target at `position` (its schedule's
        sparsity, or its quality), unless the guard stopped pruning."""
        if self._stopped:
            return
        position -= self._delay
        if self._qualities is not None:
            self._cut_quality(position)
            return
        due = {
            key: target
            for key, target in self._targets(position).items()
            if target > self._applied.get(key, -1.0)
        }
        if not due:
            return
        self._sync_backend_state()
        self._applied.update(due)
        if self.units:
            self._cut_units(due)
        elif self.scope == "global":
            self._cut_global(due[None])
        else:
            layers: dict[str | None, Any] = dict(self._labelled())
            for label, target in due.items():
                layer = layers[label]
                for key, mask in layer.masks.items():
                    self._warn_if_full(layer, key, target, math.prod(mask.shape))
                scores = None
                if self.ranking == "signal_to_noise" and any(
                    _loses_weights(ops.convert_to_numpy(mask), target, self.block)
                    for mask in layer.masks.values()
                ):
                    scores = signal_to_noise(layer)  # the noise is needed now
                changed = _magnitude_cut(layer, target, self.block, scores)
                if changed:
                    self._apply(
                        layer, changed, self._smallest_kept(layer, changed, scores)
                    )

    def _targets(self, position: int) -> dict[str | None, float]:
        """Each schedule's sparsity at `position`, by what it prunes: a
        layer's label, `None` for all layers together, or a set of coupled
        layers (`_set_key`); on a retry, that much closer to the kept
        state's."""
        targets: dict[str | None, float]
        if self.scope == "global":
            targets = {None: self.layer_schedules[None](position)}
        elif self.units:
            targets = {
                _set_key(names): self._unit_target(names, position)
                for names, _ in self._unit_sets
            }
        else:
            targets = {
                label: schedule(position)
                for label, schedule in self.layer_schedules.items()
            }
        if self._scale == 1.0 or self._kept is None:
            return targets
        before = self._kept.extra["applied"]
        halved: dict[str | None, float] = {}
        for key, target in targets.items():
            base = max(before.get(key, 0.0), 0.0)
            halved[key] = (
                base + (target - base) * self._scale if target > base else target
            )
        return halved

    def _cut_quality(self, position: int) -> None:
        """Han's threshold: at each cut position, prunes each layer's live
        weights below its quality times their standard deviation."""
        begin, every = self.begin_epoch, self.frequency
        if not begin <= position <= self._quality_end or (position - begin) % every:
            return
        index = (position - begin) // every
        due = [
            (label, layer)
            for label, layer in self._labelled()
            if label in self.layer_qualities
            and self._quality_cut.get(label, -1) < position
        ]
        if due:
            self._sync_backend_state()
        for label, layer in due:
            self._quality_cut[label] = position
            qualities = self.layer_qualities[label]
            quality = qualities[min(index, len(qualities) - 1)] * self._scale
            changed = {}
            for key, variable in layer.prunable_weights.items():
                mask = ops.convert_to_numpy(layer.masks[key])
                new, _ = std_threshold_mask(
                    _finite(layer, key, variable), mask, quality
                )
                if np.count_nonzero(new) < np.count_nonzero(mask):
                    changed[key] = new
            if changed:
                self._apply(layer, changed, self._smallest_kept(layer, changed))

    def _cut_due(self, position: int) -> bool:
        """Whether a cut that prunes something may happen at `position`."""
        if self._stopped:
            return False
        position -= self._delay
        if self._qualities is not None:
            begin = self.begin_epoch
            return (
                begin <= position <= self._quality_end
                and (position - begin) % self.frequency == 0
            )
        return any(
            target > max(self._applied.get(key, 0.0), 0.0)
            for key, target in self._targets(position).items()
        )

    def _cut_global(self, sparsity: float) -> None:
        labels = {id(layer): label for label, layer in self._labelled()}
        entries = [e for e in iter_masked_weights(self.model) if id(e[0]) in labels]
        old = [ops.convert_to_numpy(mask) for *_, mask in entries]
        new = global_magnitude_masks(
            [_finite(layer, key, variable) for layer, key, variable, _ in entries],
            old,
            sparsity,
            min_kept=[
                self._bound(self.min_kept, labels.get(id(layer)), 0.0)
                for layer, *_ in entries
            ],
            max_kept=[
                self._bound(self.max_kept, labels.get(id(layer)), 1.0)
                for layer, *_ in entries
            ],
            block=self.block,
        )
        self._warn_if_bounds_win(sparsity, new)
        by_layer: dict[int, tuple[Any, dict[str, np.ndarray]]] = {}
        for (layer, key, _, _), before, after in zip(entries, old, new, strict=True):
            left = int(np.count_nonzero(after))
            if left == 1 < after.size and (layer.name, key) not in self._warned_full:
                self._warned_full.add((layer.name, key))
                warnings.warn(
                    f'scope="global" left {layer.name!r} ({key}) with 1 of its '
                    f"{after.size} weights: its weights are the smallest. Give it "
                    "a floor with `min_kept`.",
                    stacklevel=3,
                )
            if left < np.count_nonzero(before):
                by_layer.setdefault(id(layer), (layer, {}))[1][key] = after
        for layer, changed in by_layer.values():
            self._apply(layer, changed, self._smallest_kept(layer, changed))

    # --- whole units ------------------------------------------------------
    def _start_units(self) -> None:
        """Reads the model's channel groups once, and says which masked
        layers keep all their units (once per model: `fit` may be called
        epoch by epoch)."""
        if self._channels is not None and self._channels.model is self.model:
            return
        self._channels = channel_graph(self.model, 'granularity="unit"')
        self._unit_sets = masked_sets(self._channels)
        note = kept_whole(self._channels, self.model)
        if note:
            warnings.warn(f'granularity="unit" {note}', stacklevel=3)

    def _unit_target(self, names: list[str], position: int) -> float:
        """A unit set's target at `position`: the smallest of its layers'
        (0 for a layer without a schedule)."""
        return min(
            self.layer_schedules[name](position)
            if name in self.layer_schedules
            else 0.0
            for name in names
        )

    def _cut_units(self, targets: dict[str | None, float]) -> None:
        """Prunes whole units (and the rows that read them) to `targets`,
        by set of coupled layers (`_set_key`) or globally (`None`)."""
        graph = self._channels
        assert graph is not None
        frozen = set()
        if not self.prune_frozen:  # a set with a frozen layer keeps its units
            for layer in masked_layers(self.model):
                if _frozen(layer):
                    frozen.update({layer.name, getattr(layer, "path", layer.name)})
        due = [
            (
                names,
                groups,
                targets[None if self.scope == "global" else _set_key(names)],
            )
            for names, groups in self._unit_sets
            if (self.scope == "global" or _set_key(names) in targets)
            and not frozen.intersection(names)
        ]
        if not due:  # every set holds a frozen layer
            return
        sets = [(names, groups) for names, groups, _ in due]
        pruned, thresholds = select_units(
            graph,
            sets,
            [target for _, _, target in due],
            self.norm,
            self.scope,
            # A set keeps the largest floor and the smallest cap of its layers.
            min_kept=[
                max(self._bound(self.min_kept, n, 0.0) for n in ns) for ns, _ in sets
            ],
            max_kept=[
                min(self._bound(self.max_kept, n, 1.0) for n in ns) for ns, _ in sets
            ],
        )
        for layer, changed in masks_to_prune(graph, pruned):
            # A layer that only lost rows reading pruned units has no score.
            self._apply(layer, changed, thresholds.get(id(layer)))

    @staticmethod
    def _bound(value: Any, label: str | None, default: float) -> float:
        """A layer's `min_kept` or `max_kept`: the number given for every
        layer, its entry in a dict by label, or `default`."""
        if isinstance(value, dict):
            value = value.get(label)
        return default if value is None else float(value)

    def _warn_if_bounds_win(self, sparsity: float, masks: list[np.ndarray]) -> None:
        """Says once when `min_kept`/`max_kept` (or weights pruned before)
        move the global cut off its scheduled sparsity by more than a weight
        (a block, with blocks)."""
        if self.block is not None:
            masks = [block_scores(m, m, self.block)[1] for m in masks]
        total = sum(mask.size for mask in masks)
        reached = 1.0 - sum(int(np.count_nonzero(m)) for m in masks) / total
        if self._warned_bounds or abs(reached - sparsity) <= 1.0 / total:
            return
        self._warned_bounds = True
        why = (
            "the floors (`min_kept`, and one weight per tensor) keep more "
            "weights than that"
            if reached < sparsity
            else "the `max_kept` caps (or earlier, deeper cuts) prune more"
        )
        warnings.warn(
            f'scope="global" reached a sparsity of {reached:.4f} instead of the '
            f"scheduled {sparsity:.4f}: {why}.",
            stacklevel=3,
        )

    @staticmethod
    def prune_layer(
        layer: MaskedLayer, sparsity: float, granularity: Any = "weight"
    ) -> None:
        """Prunes each prunable weight of `layer` to `sparsity` by magnitude
        (of single weights, or of blocks with `granularity=(units, inputs)`)
        if it is below it; never un-prunes, never empties a weight.

        Example:

        >>> layer = MaskedDense(2)
        >>> _ = layer(np.ones((1, 50)))
        >>> IterativePruningCallback.prune_layer(layer, 0.5)
        >>> layer.sparsity
        0.5
        """
        changed = _magnitude_cut(layer, sparsity, validate_granularity(granularity))
        if changed:
            layer.prune_to(changed)

    # --- guarding the masks -------------------------------------------
    def _record_masks(self) -> None:
        for layer, key, _, mask in iter_masked_weights(self.model):
            self._cut_masks[(id(layer), key)] = ops.convert_to_numpy(mask) != 0

    def _restore_rolled_back(self, culprits: str = "Something") -> None:
        """Puts back the masks of the last cut where something (`culprits`,
        where known) restored older, less sparse ones, and says so."""
        for layer, key, _, mask in iter_masked_weights(self.model):
            recorded = self._cut_masks.get((id(layer), key))
            if recorded is None:
                continue
            current = ops.convert_to_numpy(mask) != 0
            revived = int(np.count_nonzero(current & ~recorded))
            if revived:
                warnings.warn(
                    f"{culprits} restored an older mask of layer {layer.name!r} "
                    f"({key}): {revived} pruned weights were alive again. "
                    "keras_prune put back the mask of the last cut (weights "
                    "restored with it stay restored, pruned ones are zero).",
                    stacklevel=3,
                )
                layer.prune_to({key: recorded & current})

    def _zero_pruned(self) -> None:
        for layer in self.layers:
            layer._built_masks().zero_pruned()

    # --- the guard ----------------------------------------------------
    def _keep(self) -> None:
        """Snapshots the model and the cut state, to restore on a drop."""
        self._sync_backend_state()
        self._kept = Snapshot.take(
            self.model,
            {
                "applied": dict(self._applied),
                "cut_masks": dict(self._cut_masks),
                "thresholds": dict(self._thresholds),
                "quality_cut": dict(self._quality_cut),
            },
        )

    def _restore_kept(self) -> None:
        assert self._kept is not None
        self._sync_backend_state()
        self._kept.restore(self.model)
        extra = self._kept.extra
        self._applied = dict(extra["applied"])
        self._cut_masks = dict(extra["cut_masks"])
        self._thresholds = dict(extra["thresholds"])
        self._quality_cut = dict(extra["quality_cut"])

    def _kept_fraction(self) -> float:
        """The fraction of all masked weights alive now."""
        sizes = alive = 0
        for *_, mask in iter_masked_weights(self.model):
            values = ops.convert_to_numpy(mask)
            sizes += values.size
            alive += int(np.count_nonzero(values))
        return alive / max(sizes, 1)

    def _judge(self, epoch: int, logs: dict | None) -> bool:
        """Reads the monitored metric at the end of `epoch`; judges the
        state if a cut's retraining is over (the next epoch cuts, or `fit`
        ends). Returns whether it restored the last kept state."""
        guard = self.guard
        assert guard is not None
        value = (logs or {}).get(guard.monitor)
        if value is None:
            raise ValueError(
                f"AccuracyGuard monitors {guard.monitor!r}, which the logs of "
                f"epoch {epoch} do not hold: {sorted(logs or {})}. Pass "
                "`validation_data` to `fit`, or set `monitor` to a logged metric."
            )
        self._last_value = (epoch, float(value))
        last = epoch >= int((self.params or {}).get("epochs") or 1) - 1
        if self._pending and not last and not self._cut_due(epoch + 1):
            return False  # still retraining after the cut
        return self._decide(epoch, float(value))

    def _decide(self, epoch: int, value: float) -> bool:
        """Keeps the state, or puts back the last kept one and retries or
        stops; returns whether it restored."""
        guard = self.guard
        assert guard is not None
        if not self._pending:  # no cut since the last kept state
            if guard.better(value, self._best):
                self._best = value
            self._keep()
            return False
        self._pending = False
        kept = self._kept_fraction()
        best = self._best
        if best is None or guard.worse_by(value, best) <= guard.tolerance + 1e-12:
            self.guard_events.append(GuardEvent(epoch, value, best, "kept", kept))
            if guard.better(value, best):
                self._best = value
            if self._scale < 1.0:
                # The halved cut held: try the full one again at the next cut.
                self._delay += epoch + 1 - self._last_cut
            self._scale, self._failures = 1.0, 0
            self._keep()
            return False
        self._failures += 1
        stop = guard.on_drop == "stop" or self._failures > guard.retries
        action = "restored, stopped" if stop else "restored, retrying"
        self.guard_events.append(GuardEvent(epoch, value, best, action, kept))
        self._restore_kept()
        if stop:
            self._stopped = True
            self.model.stop_training = True
            then = "pruning stops here"
        else:
            self._scale = 0.5**self._failures
            self._delay += epoch + 1 - self._last_cut
            then = f"the cut is retried with {self._scale:g} of its step"
        warnings.warn(
            f"{guard.monitor} fell to {value:.4f} after the cut before epoch "
            f"{self._last_cut} (best kept: {best:.4f}, tolerance "
            f"{guard.tolerance:g}, {kept:.4%} of the masked weights kept): the "
            f"weights, masks and optimizer state kept at the end of epoch "
            f"{self._last_cut - 1} are back, and {then}.",
            stacklevel=3,
        )
        return True

    # --- Keras hooks --------------------------------------------------
    def on_train_begin(self, logs: dict | None = None) -> None:
        if not masked_layers(self.model):
            raise ValueError(
                "IterativePruningCallback found no masked layer to prune in "
                f"model {self.model.name!r}. Convert it with "
                "keras_prune.make_prunable(model), or build it from masked "
                "layers (keras_prune.MaskedDense, keras_prune.masked_class)."
            )
        if self._cut_masks_owner is not self.model:
            self._cut_masks = {}
            self._cut_masks_owner = self.model
            self._quality_cut = {}
            self.guard_events = []
            self._kept = None
            self._best = None if self.guard is None else self.guard.baseline
            self._pending = False
            self._delay, self._scale, self._failures = 0, 1.0, 0
            self._stopped = False
        self._last_value = None
        self._started = False
        self._warn_frozen()
        _LastWord.join(self)

    def _maybe_start(self, epoch: int, steps_done: int) -> bool:
        """Resolves the schedules once the masked layers are built: at the
        first epoch, or after the first batch for a model that its first
        batch builds (a Sequential without an `Input`, on TensorFlow)."""
        if self._started:
            return True
        unbuilt = [layer.name for layer in masked_layers(self.model) if not layer.built]
        if unbuilt and steps_done == 0:
            return False
        if unbuilt:
            warnings.warn(
                f"Masked layers {unbuilt} were not built by the first batch (not "
                "used by the model?): they are not pruned.",
                stacklevel=3,
            )
        self._sync_backend_state()
        self._first_epoch = epoch
        self._epoch_start_step = self._iterations() - steps_done
        self._applied = {}
        if self._qualities is None:
            self.layer_schedules = self._resolve_schedules()
        else:
            self.layer_qualities = self._resolve_qualities()
        if self.units:
            self._start_units()
        if self._cut_masks:
            self._restore_rolled_back()
        self._record_masks()
        if self.guard is not None and self._kept is None:
            self._keep()
        self._started = True
        return True

    def _iterations(self) -> int:
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None:
            return 0
        return int(ops.convert_to_numpy(optimizer.iterations))

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch
        if self._started:
            self._restore_rolled_back()
            self._epoch_start_step = self._iterations()
        if self._maybe_start(epoch, 0) and self.unit == "epoch":
            self._cut(epoch)

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        if self.unit == "step" and self._started:
            self._cut(self._epoch_start_step + batch)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if not self._started and self._maybe_start(self._epoch, batch + 1):
            if self.unit == "epoch":
                self._cut(self._epoch)
            else:
                self._cut(self._epoch_start_step + batch + 1)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._zero_pruned()
        restored = False
        if self.guard is not None and self._started:
            restored = self._judge(epoch, logs)
        if logs is None:
            return
        for label, layer in self._labelled():
            logs[f"sparsity/{label}"] = layer.sparsity
            if id(layer) in self._thresholds:
                logs[f"threshold/{label}"] = self._thresholds[id(layer)]
        if self.guard is not None:
            logs["guard/rolled_back"] = float(restored)
            if self._best is not None:
                logs["guard/best"] = self._best

    def on_train_end(self, logs: dict | None = None) -> None:
        # Runs after `fit` copied an optimizer's EMA weights back.
        self._restore_rolled_back()
        self._zero_pruned()
        if self._pending and self._last_value is not None:
            # Stopped by another callback in a retraining: judge it now.
            self._decide(*self._last_value)

    def get_config(self) -> dict[str, Any]:
        """The constructor's arguments, JSON-serializable (schedule objects
        as Keras serializes them); `from_config` takes it back.

        Example:

        >>> import json
        >>> from keras_prune import ListSchedule
        >>> callback = IterativePruningCallback(schedule=ListSchedule([0.5, 0.9]))
        >>> text = json.dumps(callback.get_config())
        >>> IterativePruningCallback.from_config(json.loads(text)).schedule
        ListSchedule(sparsities=[0.5, 0.9], begin_step=0, frequency=1)
        """
        return {
            "final_sparsity": self.final_sparsity,
            "schedule": _map_schedules(
                self.schedule, keras.saving.serialize_keras_object
            ),
            "begin_epoch": self.begin_epoch,
            "end_epoch": self.end_epoch,
            "frequency": self.frequency,
            "factor": self.factor,
            "scope": self.scope,
            "min_kept": self.min_kept,
            "max_kept": self.max_kept,
            "unit": self.unit,
            "granularity": (
                self.granularity if self.block is None else list(self.block)
            ),
            "norm": self.norm,
            "quality": self.quality,
            "guard": None if self.guard is None else self.guard.get_config(),
            "ranking": self.ranking,
            "prune_frozen": self.prune_frozen,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> IterativePruningCallback:
        """Makes the callback from `get_config()`'s output (read back from
        JSON or not)."""

        def load(value: Any) -> Any:
            if isinstance(value, dict) and "class_name" in value:
                return keras.saving.deserialize_keras_object(value)
            return value

        guard = config.get("guard")
        return cls(
            **{
                **config,
                "schedule": _map_schedules(config["schedule"], load),
                "guard": None if guard is None else AccuracyGuard(**guard),
            }
        )


def _set_key(names: list[str]) -> str:
    """How `_applied` names a set of coupled layers pruned by unit."""
    return "units of " + "+".join(names)


def _map_schedules(schedule: Any, function: Any) -> Any:
    """Applies `function` to a schedule argument's schedule objects (or
    their serialized dicts), one or a `{layer: schedule}` dict of them;
    schedule names pass through."""
    if isinstance(schedule, dict) and "class_name" not in schedule:
        return {
            name: _map_schedules(value, function) for name, value in schedule.items()
        }
    if isinstance(schedule, str):
        return schedule
    return function(schedule)


class DropoutScalingCallback(keras.callbacks.Callback):
    """Shrinks dropout as the layer it feeds is pruned (Han et al. 2015, eq. 2).

    A pruned layer has fewer connections to regularise, so the dropout in
    front of it should drop less: `rate = initial_rate * sqrt(kept)`, where
    `kept` is the fraction of the layer's weights still alive. Place this
    callback after `IterativePruningCallback` in `callbacks=[...]` so it sees
    each epoch's new mask. A changed rate retraces the training function.

    Args:
        dropout_for: `{dropout layer name: masked layer name}`, pairing
            each `Dropout` with the pruned layer whose inputs it drops.

    Raises:
        ValueError: If `dropout_for` is not a non-empty dict of names; at the
            start of `fit`, if a name is not a `Dropout` or a masked layer of
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
                "{dropout layer name: masked layer name}. "
                f"Received: dropout_for={dropout_for!r}"
            )
        self.dropout_for = dict(dropout_for)
        self.initial_rates: dict[str, float] = {}

    def _pairs(self) -> list[tuple[keras.layers.Dropout, Any]]:
        by_name = {
            layer.name: layer
            for layer in self.model._flatten_layers(include_self=False)
        }
        pairs = []
        for dropout_name, masked_name in self.dropout_for.items():
            dropout, masked = by_name.get(dropout_name), by_name.get(masked_name)
            if not isinstance(dropout, keras.layers.Dropout) or not isinstance(
                masked, MaskedLayer
            ):
                raise ValueError(
                    "Expected `dropout_for` to pair Dropout layers with masked "
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
