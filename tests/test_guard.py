import keras
import numpy as np
import pytest
from keras import ops

from keras_prune import AccuracyGuard, IterativePruningCallback, ListSchedule
from keras_prune.masking import MaskedDense


class Score(keras.callbacks.Callback):
    """Logs `val_score`: 1.0 while fc keeps at least half of its 20 weights,
    else 0.5; records fc's kernel and kept count at every epoch end."""

    def __init__(self, stop_after=None):
        super().__init__()
        self.kernels, self.kept, self.stop_after = [], [], stop_after

    def on_epoch_end(self, epoch, logs=None):
        layer = self.model.get_layer("fc")
        kept = int(np.count_nonzero(ops.convert_to_numpy(layer.mask)))
        self.kept.append(kept)
        self.kernels.append(ops.convert_to_numpy(layer.kernel).copy())
        logs["val_score"] = 1.0 if kept >= 10 else 0.5
        if self.stop_after is not None and epoch >= self.stop_after:
            self.model.stop_training = True


def guarded_fit(guard, sparsities, epochs, score=None):
    rng = np.random.default_rng(0)
    model = keras.Sequential([keras.Input((20,)), MaskedDense(1, name="fc")])
    model.compile(keras.optimizers.SGD(0.01), "mse")
    callback = IterativePruningCallback(schedule=ListSchedule(sparsities), guard=guard)
    score = score or Score()
    with pytest.warns(UserWarning, match="val_score fell to 0.5000") as warned:
        history = model.fit(
            rng.normal(size=(32, 20)).astype("float32"),
            rng.normal(size=(32, 1)).astype("float32"),
            epochs=epochs,
            verbose=0,
            callbacks=[score, callback],
        )
    return model, callback, score, history, warned


def test_a_cut_that_costs_too_much_is_undone_and_retried_with_half_the_step():
    guard = AccuracyGuard("val_score", tolerance=0.1, retries=1, baseline=1.0)
    model, callback, score, history, warned = guarded_fit(
        guard, [0.2, 0.4, 0.6, 0.8], epochs=10
    )
    # Kept weights at each epoch end, before the guard's decision: 16, 12,
    # then 8 (too few: undone, back to 12), 10 (half the step: kept), 8
    # (the full step again: undone, back to 10), 9 (0.55: undone, retries
    # used up: stop).
    assert score.kept == [16, 12, 8, 10, 8, 9]
    assert [e.action for e in callback.guard_events] == [
        "kept", "kept", "restored, retrying", "kept", "restored, retrying",
        "restored, stopped",
    ]  # fmt: skip
    assert history.history["guard/rolled_back"] == [0, 0, 1, 0, 1, 1]
    assert history.history["guard/best"] == [1.0] * 6
    assert callback.stopped
    assert sum("val_score fell to" in str(w.message) for w in warned) == 3
    # The model ends in the last kept state: 10 weights, epoch 3's kernel.
    layer = model.get_layer("fc")
    assert int(np.count_nonzero(ops.convert_to_numpy(layer.mask))) == 10
    np.testing.assert_array_equal(ops.convert_to_numpy(layer.kernel), score.kernels[3])
    # Stopped: a later fit trains without cutting.
    model.fit(np.ones((4, 20)), np.ones((4, 1)), epochs=2, verbose=0,
              callbacks=[Score(), callback])  # fmt: skip
    assert int(np.count_nonzero(ops.convert_to_numpy(layer.mask))) == 10


def test_stop_puts_back_the_state_before_the_cut_and_ends_fit():
    guard = AccuracyGuard("val_score", tolerance=0.1, on_drop="stop")
    model, callback, score, history, _ = guarded_fit(guard, [0.2, 0.4, 0.6], 6)
    # No baseline: the first state is the reference. The last cut retrains
    # to the end of fit, where it is judged.
    assert score.kept == [16, 12, 8, 8, 8, 8]
    assert [e.kept_fraction for e in callback.guard_events] == [0.8, 0.6, 0.4]
    assert model.get_layer("fc").sparsity == pytest.approx(0.4)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(model.get_layer("fc").kernel), score.kernels[1]
    )


def test_a_fit_stopped_by_another_callback_is_judged_at_its_end():
    guard = AccuracyGuard("val_score", tolerance=0.1, on_drop="stop")
    # Cuts every 2 epochs; the third cut's retraining is cut short at epoch 4.
    callback_schedule = [0.2, 0.4, 0.6]
    model = keras.Sequential([keras.Input((20,)), MaskedDense(1, name="fc")])
    model.compile(keras.optimizers.SGD(0.01), "mse")
    callback = IterativePruningCallback(
        schedule=ListSchedule(callback_schedule, frequency=2), guard=guard
    )
    score = Score(stop_after=4)
    with pytest.warns(UserWarning, match="before epoch 4"):
        model.fit(np.ones((8, 20)), np.ones((8, 1)), epochs=8, verbose=0,
                  callbacks=[score, callback])  # fmt: skip
    assert score.kept == [16, 16, 12, 12, 8]
    assert model.get_layer("fc").sparsity == pytest.approx(0.4)


def test_a_missing_metric_is_named():
    model = keras.Sequential([keras.Input((20,)), MaskedDense(1, name="fc")])
    model.compile("sgd", "mse")
    callback = IterativePruningCallback(0.5, guard=AccuracyGuard())
    with pytest.raises(ValueError, match=r"monitors 'val_accuracy'.*validation_data"):
        model.fit(np.ones((4, 20)), np.ones((4, 1)), epochs=2, verbose=0,
                  callbacks=[callback])  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tolerance=-0.1), r"Received: tolerance=-0.1$"),
        (dict(mode="up"), r"Received: mode='up'$"),
        (dict(on_drop="ignore"), r"Received: on_drop='ignore'$"),
        (dict(retries=0), r"Received: retries=0$"),
        (dict(baseline=float("nan")), r"Received: baseline=nan$"),
        (dict(monitor=""), r"Received: monitor=''$"),
    ],
)
def test_bad_guard_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AccuracyGuard(**kwargs)


def test_loss_and_error_are_lower_is_better():
    assert not AccuracyGuard("val_loss").higher_is_better
    assert not AccuracyGuard("val_error_rate").higher_is_better
    assert AccuracyGuard("val_auc").higher_is_better
    assert not AccuracyGuard("val_auc", mode="min").higher_is_better
