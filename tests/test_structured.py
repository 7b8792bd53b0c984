"""`granularity="unit"`: the callback prunes whole units and filters, with
the rows that read them and their residual partners, so `shrink` can
remove them."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
from keras import ops

import keras_prune as kp
from keras_prune import IterativePruningCallback
from tests.backend_utils import to_numpy

L = keras.layers


def fit_quietly(model, callback, x, y, epochs=1):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.fit(x, y, epochs=epochs, verbose=0, callbacks=[callback])


def frozen_mlp():
    """4 hidden units whose L1 and L2 rankings disagree; a learning rate of
    zero keeps the weights as set."""
    model = kp.make_prunable(
        keras.Sequential(
            [
                keras.Input((4,)),
                L.Dense(4, activation="relu", name="hidden"),
                L.Dense(2, name="out"),
            ]
        )
    )
    model.get_layer("hidden").kernel.assign(
        np.array(
            [
                [1.0, 3.0, 2.0, 0.1],
                [1.0, 0.0, 2.0, 0.1],
                [1.0, 0.0, 2.0, 0.1],
                [1.0, 0.0, 2.0, 0.1],
            ],
            dtype="float32",
        )
    )  # L1 means 1, 0.75, 2, 0.1; RMS 1, 1.5, 2, 0.1
    model.compile(keras.optimizers.SGD(0.0), "mse")
    return model


def data(shape, outputs, n=16):
    rng = np.random.default_rng(0)
    return (
        rng.normal(size=(n, *shape)).astype("float32"),
        rng.normal(size=(n, outputs)).astype("float32"),
    )


@pytest.mark.parametrize("norm, pruned", [("l1", [1, 3]), ("l2", [0, 3])])
def test_units_with_the_smallest_norm_go_with_the_rows_that_read_them(norm, pruned):
    model = frozen_mlp()
    callback = IterativePruningCallback(0.5, "constant", granularity="unit", norm=norm)
    fit_quietly(model, callback, *data((4,), 2))
    hidden = to_numpy(model.get_layer("hidden").masks["kernel"])
    out = to_numpy(model.get_layer("out").masks["kernel"])
    assert np.flatnonzero(~hidden.any(axis=0)).tolist() == pruned
    assert np.flatnonzero(~out.any(axis=1)).tolist() == pruned
    assert hidden[:, [u for u in range(4) if u not in pruned]].all()
    assert out.any(axis=0).all()  # the output layer keeps its units


def test_the_output_layer_is_named_as_keeping_its_units():
    model = frozen_mlp()
    callback = IterativePruningCallback(0.5, "constant", granularity="unit")
    with pytest.warns(UserWarning, match=r"keeps every unit of 'out' \(model output\)"):
        model.fit(*data((4,), 2), epochs=1, verbose=0, callbacks=[callback])


def residual_model():
    inputs = keras.Input((6, 6, 2))
    a = L.Conv2D(8, 3, padding="same", name="a")(inputs)
    b = L.Conv2D(8, 1, name="b")(inputs)
    x = L.Add()([a, b])
    x = L.BatchNormalization(name="bn")(x)
    x = L.Conv2D(6, 3, padding="same", activation="relu", name="c")(x)
    x = L.GlobalAveragePooling2D()(x)
    model = kp.make_prunable(keras.Model(inputs, L.Dense(3, name="head")(x)))
    model.compile(keras.optimizers.Adam(0.01), "mse")
    return model


def pruned_filters(model, name):
    mask = to_numpy(model.get_layer(name).masks["kernel"])
    return set(np.flatnonzero(~mask.reshape(-1, mask.shape[-1]).any(axis=0)).tolist())


def test_filters_added_by_a_residual_connection_are_pruned_together():
    model = residual_model()
    callback = IterativePruningCallback(0.5, "constant", granularity="unit")
    fit_quietly(model, callback, *data((6, 6, 2), 3))
    assert len(pruned_filters(model, "a")) == 4
    assert pruned_filters(model, "a") == pruned_filters(model, "b")
    assert len(pruned_filters(model, "c")) == 3
    rows = to_numpy(model.get_layer("c").masks["kernel"])
    read = set(np.flatnonzero(~rows.any(axis=(0, 1, 3))).tolist())
    assert read == pruned_filters(model, "a")


def test_global_scope_counts_units_over_every_set():
    model = residual_model()
    callback = IterativePruningCallback(
        0.5, "constant", granularity="unit", scope="global"
    )
    fit_quietly(model, callback, *data((6, 6, 2), 3))
    # Sets: {a, b} (8 groups) and {c} (6): 7 of 14 go.
    assert len(pruned_filters(model, "a")) + len(pruned_filters(model, "c")) == 7


def test_units_stay_pruned_as_the_schedule_rises_and_shrink_removes_them():
    model = residual_model()
    x, y = data((6, 6, 2), 3, n=32)

    class Record(keras.callbacks.Callback):
        seen: list = []

        def on_epoch_end(self, epoch, logs=None):
            self.seen.append(pruned_filters(self.model, "c"))

    callback = IterativePruningCallback(0.6, granularity="unit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, y, epochs=4, verbose=0, callbacks=[callback, Record()])
    seen = Record.seen
    assert all(a <= b for a, b in zip(seen, seen[1:], strict=False))
    assert len(seen[-1]) == round(0.6 * 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = kp.shrink(model)
    assert small.get_layer("c").filters == 6 - len(seen[-1])
    assert small.get_layer("a").filters == 8 - len(pruned_filters(model, "a"))
    expected = to_numpy(model(x[:4]))
    np.testing.assert_allclose(to_numpy(small(x[:4])), expected, atol=1e-5)


def test_unit_granularity_refuses_a_subclassed_model():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = kp.MaskedDense(4)
            self.out = kp.MaskedDense(2)

        def call(self, x):
            return self.out(self.hidden(x))

    net = Net()
    net.compile("sgd", "mse")
    callback = IterativePruningCallback(0.5, granularity="unit")
    with pytest.raises(
        ValueError, match='granularity="unit".*Sequential or Functional'
    ):
        net.fit(*data((4,), 2), epochs=1, verbose=0, callbacks=[callback])


def test_norm_is_checked_and_round_trips():
    with pytest.raises(
        ValueError, match=r"Expected `norm` to be one of \['l1', 'l2'\]"
    ):
        IterativePruningCallback(0.5, granularity="unit", norm="max")
    with pytest.raises(ValueError, match='needs granularity="unit". Received: norm'):
        IterativePruningCallback(0.5, norm="l2")
    config = IterativePruningCallback(0.5, granularity="unit", norm="l2").get_config()
    assert (config["granularity"], config["norm"]) == ("unit", "l2")
    again = IterativePruningCallback.from_config(config)
    assert again.units and again.norm == "l2"


def test_logs_the_smallest_kept_unit_score():
    model = frozen_mlp()
    callback = IterativePruningCallback(0.5, "constant", granularity="unit")
    history = fit_quietly(model, callback, *data((4,), 2))
    assert history.history["threshold/hidden"][-1] == pytest.approx(1.0)
    assert "threshold/out" not in history.history  # it lost rows, not units
    assert ops.convert_to_numpy(model.get_layer("hidden").sparsity) == 0.5


def test_prune_units_prunes_once_and_counts_only_new_units():
    model = residual_model()
    assert kp.prune_units(model, 0.5) == 4 + 3  # {a, b}: 4 of 8; {c}: 3 of 6
    assert pruned_filters(model, "a") == pruned_filters(model, "b")
    assert kp.prune_units(model, 0.5) == 0  # already there
    assert kp.prune_units(model, 0.75, scope="global") == round(0.75 * 14) - 7
    with pytest.raises(ValueError, match="Expected `norm` to be one of"):
        kp.prune_units(model, 0.5, norm="l0")
    with pytest.raises(ValueError, match="Received: scope='net'"):
        kp.prune_units(model, 0.5, scope="net")
