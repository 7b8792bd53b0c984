import keras
import numpy as np
import pytest
from keras import ops

from keras_prune import (
    AccuracyGuard,
    ConstantSchedule,
    DropoutScalingCallback,
    GeometricSchedule,
    IterativePruningCallback,
    ListSchedule,
    MaskedDense,
    PolynomialSchedule,
    PruningSchedule,
)


def small_model():
    model = keras.Sequential(
        [
            keras.Input((20,)),
            MaskedDense(30, activation="relu", name="fc1"),
            MaskedDense(5, name="fc2"),
        ]
    )
    model.compile(keras.optimizers.Adam(0.01), "mse")
    return model


def data():
    rng = np.random.default_rng(0)
    return (
        rng.normal(size=(64, 20)).astype("float32"),
        rng.normal(size=(64, 5)).astype("float32"),
    )


class MaskRecorder(keras.callbacks.Callback):
    """Records fc1's mask at the start and end of every epoch."""

    def __init__(self):
        super().__init__()
        self.begin, self.end = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self.begin.append(ops.convert_to_numpy(self.model.get_layer("fc1").mask))

    def on_epoch_end(self, epoch, logs=None):
        self.end.append(ops.convert_to_numpy(self.model.get_layer("fc1").mask))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"final_sparsity": 0.95},
        {"final_sparsity": 0.95, "schedule": "geometric", "factor": 0.5},
        {"final_sparsity": 0.95, "schedule": "constant", "begin_epoch": 1},
        {"schedule": GeometricSchedule(0.9, begin_step=1, factor=0.5)},
    ],
    ids=["polynomial", "geometric", "constant", "schedule-object"],
)
def test_every_schedule_reaches_final_sparsity_and_retrains_after_last_cut(kwargs):
    model = small_model()
    callback = IterativePruningCallback(**kwargs)
    recorder = MaskRecorder()
    x, y = data()
    history = model.fit(
        x, y, epochs=6, batch_size=16, verbose=0, callbacks=[callback, recorder]
    )
    final = kwargs.get("final_sparsity", 0.9)
    for name, size in [("fc1", 600), ("fc2", 150)]:
        layer = model.get_layer(name)
        assert abs(layer.sparsity - final) <= 0.005
        # Exact counts: round(final * size) zeros in mask and raw kernel.
        assert np.count_nonzero(ops.convert_to_numpy(layer.mask)) == size - round(
            final * size
        )
        kernel = ops.convert_to_numpy(layer.kernel)
        np.testing.assert_array_equal(kernel[ops.convert_to_numpy(layer.mask) == 0], 0)
        assert history.history[f"sparsity/{name}"][-1] == layer.sparsity
    # The last epoch trained with the final mask: no cut after it began.
    np.testing.assert_array_equal(recorder.begin[-1], recorder.end[-1])
    # Masks only ever lose ones.
    for before, after in zip(recorder.end[:-1], recorder.end[1:], strict=True):
        assert np.all(after <= before)


def test_polynomial_sparsity_in_history_follows_the_cubic_ramp():
    model = small_model()
    history = model.fit(
        *data(),
        epochs=4,
        verbose=0,
        callbacks=[IterativePruningCallback(0.8, begin_epoch=1)],
    )
    # Cuts before epochs 1, 2, 3: 0.8 * (1 - (1 - k/3) ** 3), rounded to 600 weights.
    expected = [0.0] + [
        round(0.8 * (1 - (1 - k / 3) ** 3) * 600) / 600 for k in (1, 2, 3)
    ]
    assert history.history["sparsity/fc1"] == pytest.approx(expected)


@pytest.mark.filterwarnings("ignore:`end_epoch`=5 is past")
def test_geometric_keeps_seventy_percent_per_round_by_default():
    model = small_model()
    history = model.fit(
        *data(),
        epochs=4,
        verbose=0,
        callbacks=[IterativePruningCallback(0.9, schedule="geometric", end_epoch=5)],
    )
    kept = [1 - s for s in history.history["sparsity/fc1"]]
    assert kept == pytest.approx([0.7, 0.49, 0.343, 0.24], abs=1 / 600)


def test_hooks_called_directly_prune_before_the_epoch_and_log_after():
    model = small_model()
    callback = IterativePruningCallback(0.5, schedule="constant", begin_epoch=2)
    callback.set_model(model)
    callback.set_params({"epochs": 4})
    callback.on_train_begin()
    callback.on_epoch_begin(1)
    assert model.get_layer("fc1").sparsity == 0.0
    callback.on_epoch_begin(2)
    assert model.get_layer("fc1").sparsity == 0.5
    logs = {"loss": 1.0}
    callback.on_epoch_end(2, logs)

    def smallest_kept(name):  # the threshold: the smallest magnitude kept
        layer = model.get_layer(name)
        kept = ops.convert_to_numpy(layer.mask) != 0
        return pytest.approx(np.abs(ops.convert_to_numpy(layer.kernel)[kept]).min())

    assert logs == {
        "loss": 1.0,
        "sparsity/fc1": 0.5,
        "sparsity/fc2": 0.5,
        "threshold/fc1": smallest_kept("fc1"),
        "threshold/fc2": smallest_kept("fc2"),
    }


@pytest.mark.filterwarnings("ignore:`end_epoch`=5 is past")
def test_resume_from_a_saved_model_keeps_masks_and_continues(tmp_path):
    x, y = data()
    model = small_model()
    callback = IterativePruningCallback(0.9, schedule="geometric", end_epoch=5)
    model.fit(x, y, epochs=2, verbose=0, callbacks=[callback])
    mask = ops.convert_to_numpy(model.get_layer("fc1").mask)
    model.save(tmp_path / "checkpoint.keras")

    resumed = keras.models.load_model(tmp_path / "checkpoint.keras")
    np.testing.assert_array_equal(
        ops.convert_to_numpy(resumed.get_layer("fc1").mask), mask
    )
    resumed.fit(
        x,
        y,
        epochs=6,
        initial_epoch=2,
        verbose=0,
        callbacks=[IterativePruningCallback(0.9, schedule="geometric", end_epoch=5)],
    )
    new_mask = ops.convert_to_numpy(resumed.get_layer("fc1").mask)
    assert np.all(new_mask <= mask)  # nothing pruned came back
    assert resumed.get_layer("fc1").sparsity == pytest.approx(0.9)


def test_custom_schedule_object():
    class StepAtTwo(PruningSchedule):
        def __call__(self, step):
            return 0.25 if step >= 2 else 0.0

        def get_config(self):
            return {}

    model = small_model()
    history = model.fit(
        *data(),
        epochs=3,
        verbose=0,
        callbacks=[IterativePruningCallback(schedule=StepAtTwo())],
    )
    assert history.history["sparsity/fc1"] == [0.0, 0.0, 0.25]


def test_model_without_masked_dense_fails_when_training_starts():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)], name="plain")
    model.compile("sgd", "mse")
    with pytest.raises(
        ValueError,
        match=r"^IterativePruningCallback found no masked layer to prune in "
        r"model 'plain'\. Convert it with keras_prune\.make_prunable\(model\), or "
        r"build it from masked layers \(keras_prune\.MaskedDense, "
        r"keras_prune\.masked_class\)\.$",
    ):
        model.fit(
            np.ones((4, 3)),
            np.ones((4, 2)),
            verbose=0,
            callbacks=[IterativePruningCallback(0.5)],
        )


def test_end_epoch_past_the_fit_warns():
    model = small_model()
    with pytest.warns(UserWarning, match="will not reach final_sparsity=0.5"):
        model.fit(
            *data(),
            epochs=2,
            verbose=0,
            callbacks=[IterativePruningCallback(0.5, end_epoch=4)],
        )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"final_sparsity": 1.5},
            ValueError,
            r"Expected `final_sparsity` in \[0, 1\)\. Received: final_sparsity=1.5",
        ),
        (
            {"final_sparsity": float("nan")},
            ValueError,
            r"Expected `final_sparsity` in \[0, 1\)\. Received: final_sparsity=nan",
        ),
        (
            {},
            ValueError,
            r"`final_sparsity` is required with a named schedule: expected "
            r"`final_sparsity` in \[0, 1\)\. Received: final_sparsity=None",
        ),
        (
            {"final_sparsity": 0.5, "schedule": "cubic"},
            ValueError,
            r"Expected `schedule` to be one of \['constant', 'geometric', "
            r"'polynomial'\], a PruningSchedule object or a dict of them by layer "
            r"name\. Received: schedule='cubic'",
        ),
        (
            {"final_sparsity": 0.5, "begin_epoch": -1},
            ValueError,
            r"Expected `begin_epoch` to be an integer >= 0\. Received: begin_epoch=-1",
        ),
        (
            {"final_sparsity": 0.5, "begin_epoch": 3, "end_epoch": 1},
            ValueError,
            r"Expected `end_epoch` >= 3, the first pruning step\. "
            r"Received: end_epoch=1",
        ),
        (
            {"final_sparsity": 0.5, "frequency": 0},
            ValueError,
            r"Expected `frequency` to be an integer >= 1\. Received: frequency=0",
        ),
        (
            {"final_sparsity": 0.5, "schedule": "geometric", "factor": 2},
            ValueError,
            r"Expected `factor` in \(0, 1\)\. Received: factor=2",
        ),
        (
            {"final_sparsity": 0.5, "schedule": GeometricSchedule(0.5)},
            ValueError,
            r"Pass `final_sparsity` to the schedule object, not to the callback\. "
            r"Received: final_sparsity=0.5 with schedule=GeometricSchedule\(.*\)",
        ),
    ],
    ids=[
        "above-one",
        "nan",
        "missing",
        "unknown-schedule",
        "begin",
        "end",
        "frequency",
        "factor",
        "both-finals",
    ],
)
def test_bad_arguments_fail_before_fit(kwargs, error, message):
    with pytest.raises(error, match="^" + message + "$"):
        IterativePruningCallback(**kwargs)


def test_config_round_trips():
    callback = IterativePruningCallback(
        0.9, schedule="geometric", begin_epoch=1, end_epoch=8, frequency=2, factor=0.6
    )
    clone = IterativePruningCallback(**callback.get_config())
    assert clone.get_config() == callback.get_config()


def test_per_layer_final_sparsity_dict():
    model = small_model()
    history = model.fit(
        *data(),
        epochs=3,
        verbose=0,
        callbacks=[IterativePruningCallback({"fc1": 0.9, "fc2": 0.5})],
    )
    assert model.get_layer("fc1").sparsity == pytest.approx(0.9)
    assert model.get_layer("fc2").sparsity == pytest.approx(0.5)
    assert history.history["sparsity/fc2"][-1] == pytest.approx(0.5)


def test_per_layer_schedule_dict_prunes_only_named_layers():
    model = small_model()
    model.fit(
        *data(),
        epochs=3,
        verbose=0,
        callbacks=[
            IterativePruningCallback(schedule={"fc2": ListSchedule([0.2, 0.6])})
        ],
    )
    assert model.get_layer("fc1").sparsity == 0.0
    assert model.get_layer("fc2").sparsity == pytest.approx(0.6)


def test_unknown_layer_names_fail_when_training_starts():
    model = small_model()
    with pytest.raises(
        ValueError,
        match=r"^Expected the keys of `final_sparsity` or `schedule` to name "
        r"masked layers of the model \(\['fc1', 'fc2'\]\)\. "
        r"Received: \['fc3'\]$",
    ):
        model.fit(
            *data(),
            verbose=0,
            callbacks=[IterativePruningCallback({"fc1": 0.5, "fc3": 0.5})],
        )


def test_bad_per_layer_final_names_the_layer():
    with pytest.raises(
        ValueError,
        match=r"^Expected `final_sparsity\['fc2'\]` in \[0, 1\)\. "
        r"Received: final_sparsity\['fc2'\]=2$",
    ):
        IterativePruningCallback({"fc1": 0.5, "fc2": 2})


def dropout_model():
    model = keras.Sequential(
        [
            keras.Input((20,)),
            MaskedDense(30, activation="relu", name="fc1"),
            keras.layers.Dropout(0.5, name="drop"),
            MaskedDense(5, name="fc2"),
        ]
    )
    model.compile(keras.optimizers.Adam(0.01), "mse")
    return model


def test_dropout_follows_square_root_of_kept_fraction_and_retraces():
    model = dropout_model()
    functions = []

    class Spy(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            functions.append(self.model.train_function)

    history = model.fit(
        *data(),
        epochs=3,
        verbose=0,
        callbacks=[
            IterativePruningCallback({"fc2": 0.84}, schedule="constant", begin_epoch=1),
            DropoutScalingCallback({"drop": "fc2"}),
            Spy(),
        ],
    )
    # 126 of fc2's 150 weights cut: 0.5 * sqrt(24 / 150) = 0.2 from the cut on.
    assert history.history["dropout/drop"] == pytest.approx([0.5, 0.2, 0.2])
    assert model.get_layer("drop").rate == pytest.approx(0.2)
    assert functions[0] is not functions[1]  # retraced once, at the cut
    assert functions[1] is functions[2]


def test_dropout_scaling_refuses_wrong_layers_at_fit():
    model = dropout_model()
    with pytest.raises(
        ValueError,
        match=r"^Expected `dropout_for` to pair Dropout layers with masked "
        r"layers of the model\. Received: 'fc1' -> 'drop', a MaskedDense and a "
        r"Dropout$",
    ):
        model.fit(
            *data(), verbose=0, callbacks=[DropoutScalingCallback({"fc1": "drop"})]
        )


@pytest.mark.parametrize(
    "value", [{}, ["drop"], {"drop": 3}], ids=["empty", "list", "int"]
)
def test_dropout_scaling_refuses_bad_mapping(value):
    with pytest.raises(
        ValueError,
        match=r"^Expected `dropout_for` to be a non-empty dict of \{dropout layer "
        r"name: masked layer name\}\. Received: dropout_for=",
    ):
        DropoutScalingCallback(value)


# --- every masked layer, ranking scope, steps, guards --------------------


def two_layer_model(seed=0):
    rng = np.random.default_rng(seed)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            MaskedDense(5, name="big"),
            MaskedDense(2, name="small"),
        ]
    )
    # Hand-checkable magnitudes: "big" holds 1..20, "small" holds 0.5..5.
    model.get_layer("big").kernel.assign(
        np.arange(1, 21, dtype="float32").reshape(4, 5)
    )
    model.get_layer("small").kernel.assign(
        np.arange(1, 11, dtype="float32").reshape(5, 2) / 2
    )
    model.compile(keras.optimizers.SGD(0.0), "mse")
    return model, rng


def test_global_scope_ranks_all_layers_together():
    model, _ = two_layer_model()
    callback = IterativePruningCallback(0.5, schedule="constant", scope="global")
    callback.set_model(model)
    callback.set_params({"epochs": 1})
    callback.on_train_begin()
    with pytest.warns(
        UserWarning,
        match=r"^scope=\"global\" left 'small' \(kernel\) with 1 of its 10 weights: "
        r"its weights are the smallest\. Give it a floor with `min_kept`\.$",
    ):
        callback.on_epoch_begin(0)
    # 30 weights, 15 pruned, smallest first: "small" gives up 9 (0.5..4.5;
    # its largest, 5, stays: no layer is emptied) and "big" 6 (1..6).
    big = ops.convert_to_numpy(model.get_layer("big").mask)
    small = ops.convert_to_numpy(model.get_layer("small").mask)
    assert np.count_nonzero(small) == 1 and small[4, 1] == 1
    np.testing.assert_array_equal(big.ravel(), [0] * 6 + [1] * 14)


def test_global_scope_honours_per_layer_kept_bounds():
    model, _ = two_layer_model()
    callback = IterativePruningCallback(
        0.5, schedule="constant", scope="global", min_kept={"small": 0.5}
    )
    callback.set_model(model)
    callback.set_params({"epochs": 1})
    callback.on_train_begin()
    callback.on_epoch_begin(0)
    assert model.get_layer("small").sparsity == 0.5
    assert model.get_layer("big").sparsity == 10 / 20  # 5 + 10 = 15 pruned


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"final_sparsity": {"big": 0.5}, "scope": "global"},
            r'^scope="global" ranks every layer together: it takes one '
            r"`final_sparsity` or schedule, not a dict by layer\. Received: "
            r"final_sparsity=\{'big': 0\.5\}, schedule='polynomial'$",
        ),
        (
            {"final_sparsity": 0.5, "min_kept": 0.1},
            r'^`min_kept` and `max_kept` bound layers under scope="global"\. '
            r'Received: min_kept=0\.1, max_kept=None with scope="layer"$',
        ),
        (
            {"final_sparsity": 0.5, "scope": "global", "max_kept": 1.5},
            r"^Expected `max_kept` in \[0, 1\]\. Received: max_kept=1\.5$",
        ),
        (
            {"final_sparsity": 0.5, "scope": "all"},
            r"^Expected `scope` to be one of \['layer', 'global'\]\. "
            r"Received: scope='all'$",
        ),
        (
            {"final_sparsity": "0.5"},
            r"^Expected `final_sparsity` in \[0, 1\)\. "
            r"Received: final_sparsity='0\.5'$",
        ),
        (
            {"final_sparsity": 0.5, "unit": "batch"},
            r"^Expected `unit` to be one of \['epoch', 'step'\]\. "
            r"Received: unit='batch'$",
        ),
    ],
    ids=["global-dict", "bounds-per-layer", "bound-range", "scope", "string", "unit"],
)
def test_scope_and_unit_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IterativePruningCallback(**kwargs)


def test_step_unit_cuts_inside_one_long_epoch():
    model = small_model()
    x, y = data()  # 64 samples, batch 8: 8 steps
    recorder = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            # JAX's fit keeps the values in its own state during an epoch.
            getattr(self.model, "jax_state_sync", lambda: None)()
            recorder.append(model.get_layer("fc1").sparsity)

    callback = IterativePruningCallback(
        0.75, schedule="geometric", factor=0.5, unit="step", begin_epoch=2,
        end_epoch=6, frequency=2,
    )  # fmt: skip
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[callback, Record()])
    # Cuts before steps 2, 4 and 6: kept 1/2, 1/4, then capped at 1/4.
    assert recorder == pytest.approx([0, 0, 0.5, 0.5, 0.75, 0.75, 0.75, 0.75], abs=0.01)


def test_masks_rolled_back_by_early_stopping_are_put_back_with_a_warning():
    model = small_model()
    x, y = data()
    stop = keras.callbacks.EarlyStopping(
        "loss", patience=0, restore_best_weights=True, mode="max"
    )  # "max" on a falling loss: epoch 0 stays the best, restored at the end
    pruning = IterativePruningCallback(0.9, schedule="geometric", end_epoch=3)
    with pytest.warns(UserWarning, match=r"^Something restored an older mask of"):
        model.fit(x, y, epochs=3, verbose=0, callbacks=[stop, pruning])
    layer = model.get_layer("fc1")
    mask = ops.convert_to_numpy(layer.mask)
    assert layer.sparsity == pytest.approx(1 - 0.49, abs=0.01)
    np.testing.assert_array_equal(ops.convert_to_numpy(layer.kernel)[mask == 0], 0)


def test_early_stopping_listed_after_the_pruning_callback_cannot_undo_it():
    # Keras calls `on_train_end` in list order: EarlyStopping restores its
    # best (dense) weights and masks after the pruning callback has ended.
    model = small_model()
    x, y = data()
    stop = keras.callbacks.EarlyStopping(
        "loss", patience=0, restore_best_weights=True, mode="max"
    )
    pruning = IterativePruningCallback(0.9, schedule="geometric", end_epoch=3)
    callbacks = [pruning, stop]
    with pytest.warns(
        UserWarning,
        match=r"^A callback listed after IterativePruningCallback \(EarlyStopping\) "
        r"restored an older mask of layer 'fc1' \(kernel\): \d+ pruned",
    ):
        model.fit(x, y, epochs=3, verbose=0, callbacks=callbacks)
    layer = model.get_layer("fc1")
    mask = ops.convert_to_numpy(layer.mask)
    assert layer.sparsity == pytest.approx(1 - 0.49, abs=0.01)
    np.testing.assert_array_equal(ops.convert_to_numpy(layer.kernel)[mask == 0], 0)
    assert callbacks == [pruning, stop]  # the user's list is not changed


def test_frozen_masked_layers_are_left_alone_unless_asked():
    model = small_model()
    x, y = data()
    model.get_layer("fc1").trainable = False
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    with pytest.warns(UserWarning, match=r"leaves 1 frozen layer\(s\).*\['fc1'\]"):
        callback = IterativePruningCallback(0.5, schedule="constant")
        model.fit(x, y, epochs=2, verbose=0, callbacks=[callback])
    assert model.get_layer("fc1").sparsity == 0
    assert model.get_layer("fc2").sparsity == pytest.approx(0.5, abs=0.05)
    callback = IterativePruningCallback(0.5, schedule="constant", prune_frozen=True)
    with pytest.warns(UserWarning, match=r"prunes 1 frozen layer\(s\).*not retrain"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    assert model.get_layer("fc1").sparsity == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError, match="Received: prune_frozen='yes'"):
        IterativePruningCallback(0.5, prune_frozen="yes")


def test_frozen_layers_keep_their_units_in_global_unit_pruning():
    model = small_model()
    x, y = data()
    model.get_layer("fc1").trainable = False
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    callback = IterativePruningCallback(
        0.5, schedule="constant", granularity="unit", scope="global"
    )
    with pytest.warns(UserWarning, match="frozen layer"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    assert model.get_layer("fc1").sparsity == 0


def test_cut_zeroes_the_optimizer_state_of_pruned_weights():
    model = small_model()
    x, y = data()
    model.fit(x, y, epochs=1, verbose=0)  # Adam moments everywhere
    callback = IterativePruningCallback(0.5, schedule="constant")
    callback.set_model(model)
    callback.set_params({"epochs": 1})
    callback.on_train_begin()
    callback.on_epoch_begin(0)
    layer = model.get_layer("fc1")
    mask = ops.convert_to_numpy(layer.mask)
    index = model.optimizer._get_variable_index(layer.kernel)
    for slots in (model.optimizer._momentums, model.optimizer._velocities):
        slot = ops.convert_to_numpy(slots[index])
        assert np.all(slot[mask == 0] == 0) and np.any(slot[mask == 1] != 0)


@pytest.mark.parametrize(
    "arguments",
    [
        dict(final_sparsity=0.8, scope="global", min_kept={"fc2": 0.05},
             unit="step", end_epoch=100),
        dict(schedule=PolynomialSchedule(0.9, 2, 10, power=2, frequency=2)),
        dict(schedule={"fc1": ListSchedule([0.5, 0.9], frequency=2),
                       "fc2": GeometricSchedule(0.8, factor=0.5)}),
        dict(schedule=ConstantSchedule(0.5, begin_step=3)),
        dict(quality={"fc1": [0.5, 1.0], "fc2": 0.3}, frequency=2,
             guard=AccuracyGuard("val_loss", 0.1, on_drop="stop", baseline=2.0)),
        dict(final_sparsity={"fc1": 0.9}, ranking="signal_to_noise"),
    ],
    ids=["named", "object", "per-layer", "constant", "quality-and-guard",
         "signal-to-noise"],
)  # fmt: skip
def test_callback_config_round_trips_through_json(arguments):
    import json

    callback = IterativePruningCallback(**arguments)
    config = json.loads(json.dumps(callback.get_config()))
    again = IterativePruningCallback.from_config(config)
    assert again.get_config() == callback.get_config()
    assert again.schedule == callback.schedule  # schedule objects compare by config


def test_an_interrupted_fit_resumes_from_its_backup_with_its_masks(tmp_path):
    x, y = data()

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("interrupted")

    def run(model, extra):
        return model.fit(
            x, y, epochs=4, verbose=0,
            callbacks=[
                keras.callbacks.BackupAndRestore(str(tmp_path / "backup")),
                IterativePruningCallback(0.9, schedule="geometric", end_epoch=3),
                *extra,
            ],
        )  # fmt: skip

    model = small_model()
    with pytest.raises(RuntimeError, match="interrupted"):
        run(model, [Interrupt()])
    cut = ops.convert_to_numpy(model.get_layer("fc1").mask).copy()
    assert model.get_layer("fc1").sparsity == pytest.approx(1 - 0.49, abs=0.01)

    resumed = small_model()  # a new process would rebuild the model
    history = run(resumed, [])
    # The backup restored epoch 1's masks; epochs 2 and 3 cut on from there
    # (kept 0.343, then the schedule's end at final_sparsity).
    assert history.history["sparsity/fc1"] == pytest.approx([0.657, 0.9], abs=0.01)
    final = ops.convert_to_numpy(resumed.get_layer("fc1").mask)
    assert np.all(final <= cut)
    kernel = ops.convert_to_numpy(resumed.get_layer("fc1").kernel)
    np.testing.assert_array_equal(kernel[final == 0], 0)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_a_cut_on_diverged_weights_names_the_layer_and_the_bad_values(scope):
    model = small_model()
    kernel = np.array(ops.convert_to_numpy(model.get_layer("fc2").kernel))
    kernel[0, :3] = [np.nan, np.inf, -np.inf]
    model.get_layer("fc2").kernel.assign(kernel)
    x, y = data()
    with pytest.raises(
        ValueError,
        match=r"^Expected the kernel of layer 'fc2' to be finite to rank it by "
        r"magnitude\. Received: 1 NaN and 2 infinite values among 150\. ",
    ):
        model.fit(
            x, y, epochs=1, verbose=0,
            callbacks=[IterativePruningCallback(0.5, "constant", scope=scope)],
        )  # fmt: skip
    assert model.get_layer("fc2").sparsity == 0  # nothing was cut


def test_numpy_numbers_are_numbers_and_bounds_must_be_ordered():
    callback = IterativePruningCallback(
        np.float32(0.9), "geometric", begin_epoch=np.int64(1), factor=np.float32(0.5)
    )
    assert callback.get_config()["factor"] == 0.5
    assert callback.get_config()["begin_epoch"] == 1
    with pytest.raises(
        ValueError,
        match=r"^Expected `min_kept` <= `max_kept`\. Received: min_kept=0\.5, "
        r"max_kept=0\.1$",
    ):
        IterativePruningCallback(0.9, scope="global", min_kept=0.5, max_kept=0.1)


@pytest.mark.parametrize(
    ("bounds", "reached", "why"),
    [
        ({"min_kept": 0.5}, "0.5000", r"the floors \(`min_kept`"),
        ({"max_kept": 0.05}, "0.95", "the `max_kept` caps"),
    ],
)
def test_global_bounds_that_move_the_target_say_so(bounds, reached, why):
    model = small_model()
    x, y = data()
    with pytest.warns(UserWarning, match=rf"reached a sparsity of {reached}.*{why}"):
        model.fit(
            x, y, epochs=1, verbose=0,
            callbacks=[IterativePruningCallback(0.9, "constant", scope="global",
                                                **bounds)],
        )  # fmt: skip


def blocks_of_four_are_whole(mask):
    """Every run of 4 consecutive inputs of a unit is all kept or all pruned."""
    grouped = np.asarray(mask).reshape(-1, 4, mask.shape[-1])
    return bool(np.all(grouped.min(axis=1) == grouped.max(axis=1)))


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_block_granularity_prunes_whole_blocks_of_four_inputs(scope):
    # fc1: 20 inputs, 5 blocks of 4; fc2: 30 inputs, 7 blocks of 4 and one of 2.
    model = small_model()
    x, y = data()
    callback = IterativePruningCallback(
        final_sparsity=0.75, granularity=(1, 4), scope=scope
    )
    history = model.fit(x, y, epochs=4, verbose=0, callbacks=[callback])
    fc1 = ops.convert_to_numpy(model.get_layer("fc1").mask)
    assert blocks_of_four_are_whole(fc1)
    if scope == "layer":
        # 5 x 30 blocks, 75% of them pruned.
        assert np.count_nonzero(fc1) == round(0.25 * 150) * 4
        assert history.history["sparsity/fc1"][-1] == pytest.approx(0.75, abs=0.01)
    else:
        blocks = 150 + 8 * 5  # fc2: 30 inputs = 7 whole blocks and one of 2
        fc2 = ops.convert_to_numpy(model.get_layer("fc2").mask)
        kept = (
            np.count_nonzero(fc1) // 4
            + np.count_nonzero(fc2.reshape(-1)[: 28 * 5]) // 4
            + np.count_nonzero(fc2[28:]) // 2
        )
        assert kept == blocks - round(0.75 * blocks)


def test_granularity_round_trips_through_the_config():
    callback = IterativePruningCallback(0.9, granularity=[1, 4])
    assert callback.granularity == (1, 4)
    config = callback.get_config()
    assert config["granularity"] == [1, 4]
    assert IterativePruningCallback.from_config(config).block == (1, 4)
    assert IterativePruningCallback(0.9).get_config()["granularity"] == "weight"


def test_prune_layer_takes_a_granularity():
    layer = MaskedDense(3)
    layer.build((None, 8))
    IterativePruningCallback.prune_layer(layer, 0.5, granularity=(1, 4))
    assert blocks_of_four_are_whole(ops.convert_to_numpy(layer.mask))
    assert layer.sparsity == 0.5


def test_sparsity_and_threshold_reach_tensorboard(tmp_path):
    tf = pytest.importorskip("tensorflow", reason="TensorBoard writes with TF")
    pytest.importorskip("tensorboard", reason="keras' TensorBoard callback needs it")
    model = small_model()
    x, y = data()
    model.fit(
        x,
        y,
        epochs=3,
        verbose=0,
        callbacks=[
            IterativePruningCallback(final_sparsity=0.9, end_epoch=2),
            keras.callbacks.TensorBoard(str(tmp_path), histogram_freq=1),
        ],
    )
    scalars, histograms = {}, set()
    for path in (tmp_path / "train").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                plugin = value.metadata.plugin_data.plugin_name
                if plugin == "histograms":
                    histograms.add(value.tag)
                elif plugin == "scalars":
                    number = float(tf.make_ndarray(value.tensor))
                    scalars.setdefault(value.tag, []).append((event.step, number))
    sparsity = [v for _, v in sorted(scalars["epoch_sparsity/fc1"])]
    assert sparsity[-1] == pytest.approx(0.9) and sparsity == sorted(sparsity)
    thresholds = [v for _, v in sorted(scalars["epoch_threshold/fc1"])]
    assert len(thresholds) == 3 and thresholds == sorted(thresholds)
    assert thresholds[-1] > 0
    assert any(tag.endswith("/fc1/kernel/histogram") for tag in histograms)


def fixed_kernel_model(kernel):
    """One MaskedDense with `kernel` (inputs x 1), trained at learning rate 0
    so that cuts see exactly these weights."""
    model = keras.Sequential(
        [keras.Input((len(kernel),)), MaskedDense(1, use_bias=False, name="fc")]
    )
    model.layers[0].kernel.assign(np.asarray(kernel, "float32")[:, None])
    model.compile(keras.optimizers.SGD(0.0), "mse")
    return model


def test_quality_prunes_below_quality_times_the_std_of_live_weights_per_cut():
    # std of these ten weights: sqrt(10/10) = 1; of the four left: sqrt(10/4).
    kernel = [2.0, -2.0, 1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    model = fixed_kernel_model(kernel)
    x, y = np.ones((4, 10), "float32"), np.ones((4, 1), "float32")
    callback = IterativePruningCallback(quality=[0.5, 0.9])
    history = model.fit(x, y, epochs=3, verbose=0, callbacks=[callback])
    # Cut 1 (quality 0.5, threshold 0.5): the zeros go. Cut 2 (0.9 x 1.58 =
    # 1.42): the ones go. Cut 3 repeats 0.9 (threshold 0.9 x 2): none go.
    assert history.history["sparsity/fc"] == [0.6, 0.8, 0.8]
    np.testing.assert_array_equal(
        ops.convert_to_numpy(model.layers[0].mask)[:, 0], [1, 1] + [0] * 8
    )
    assert history.history["threshold/fc"][-1] == 2.0  # the smallest kept


def test_quality_per_layer_prunes_only_named_layers_and_checks_names():
    model = small_model()
    callback = IterativePruningCallback(quality={"fc1": 1.0}, frequency=2)
    model.fit(*data(), epochs=3, verbose=0, callbacks=[callback])
    assert model.get_layer("fc1").sparsity > 0.5  # two cuts at 1 std
    assert model.get_layer("fc2").sparsity == 0.0
    with pytest.raises(ValueError, match=r"keys of `quality`.*\['fc3'\]"):
        small_model().fit(
            *data(), epochs=1, verbose=0,
            callbacks=[IterativePruningCallback(quality={"fc3": 1.0})],
        )  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(quality=1.0, final_sparsity=0.5), r"takes no `final_sparsity`"),
        (dict(quality=1.0, scope="global"), r'needs scope="layer"'),
        (dict(quality={"fc1": [0.5, -1]}), r"Received: quality\['fc1'\]\[1\]=-1$"),
        (dict(quality=[]), r"Expected `quality` to hold at least one quality"),
        (dict(final_sparsity=0.5, guard="strict"), r"AccuracyGuard or None"),
        (
            dict(final_sparsity=0.5, guard=AccuracyGuard(), unit="step"),
            r'needs unit="epoch"',
        ),
    ],
)
def test_quality_and_guard_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IterativePruningCallback(**kwargs)
