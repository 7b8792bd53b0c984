import keras
import numpy as np
import pytest
from keras import ops

from keras_prune import MaskedDense, sensitivity_scan, std_threshold_mask


def regression(kernel=(4.0, 3.0, 2.0, 1.0)):
    """y = x @ kernel with x the identity: the MSE of a pruned model is the
    mean of the squared weights pruned."""
    model = keras.Sequential(
        [keras.Input((4,)), MaskedDense(1, use_bias=False, name="fc")]
    )
    model.layers[0].kernel.assign(np.array(kernel, "float32")[:, None])
    model.compile(loss="mse")
    return model, (np.eye(4, dtype="float32"), np.array(kernel, "float32"))


def two_layers():
    model = keras.Sequential(
        [
            keras.Input((6,)),
            MaskedDense(8, activation="relu", name="fc1"),
            MaskedDense(3, name="fc2"),
        ]
    )
    model.compile(loss="mse", metrics=["mae"])
    rng = np.random.default_rng(0)
    return model, (rng.normal(size=(32, 6)), rng.normal(size=(32, 3)))


def test_each_sparsity_prunes_the_smallest_weights_and_the_model_is_put_back():
    model, data = regression()
    model.layers[0].prune_to(np.array([[1.0], [1.0], [1.0], [0.0]]))  # 1.0 gone
    before = [ops.convert_to_numpy(w) for w in model.weights]
    scan = sensitivity_scan(model, data, sparsities=[0.25, 0.5, 0.75], metric="loss")
    # Already 25% sparse: then 2.0 goes (4 + 1) / 4, then 3.0 (9 + 4 + 1) / 4.
    assert scan.baseline == pytest.approx(0.25)
    assert scan.values == {"fc": [0.25, 1.25, 3.5]}
    assert scan.drop("fc") == [0.0, 1.0, 3.25]
    assert scan.sizes == {"fc": 4}
    assert not scan.higher_is_better
    for old, new in zip(before, model.weights, strict=True):
        np.testing.assert_array_equal(old, ops.convert_to_numpy(new))
    assert scan.final_sparsity(1.0) == {"fc": 0.5}
    assert scan.final_sparsity(0.5) == {"fc": 0.25}


def test_the_quality_of_a_tolerated_sparsity_prunes_that_fraction():
    model, data = regression((4.0, 3.0, 2.0, 1.0))
    scan = sensitivity_scan(model, data, sparsities=[0.25, 0.5], metric="loss")
    quality = scan.quality(0.5)["fc"]  # 25% tolerated: 1.0 pruned, 2.0 kept
    assert quality == pytest.approx(2.0 / np.std([4.0, 3.0, 2.0, 1.0]))
    kernel = np.array([[4.0], [3.0], [2.0], [1.0]])
    mask, _ = std_threshold_mask(kernel, None, quality)
    np.testing.assert_array_equal(mask[:, 0], [1, 1, 1, 0])
    assert scan.quality(0.0) == {"fc": 0.0}


def test_layers_are_scanned_alone_and_reported_in_a_table(tmp_path):
    model, data = two_layers()
    scan = sensitivity_scan(model, data, sparsities=[0.5, 0.9], metric="mae")
    assert list(scan.values) == ["fc1", "fc2"] and scan.sizes == {"fc1": 48, "fc2": 24}
    assert [layer.sparsity for layer in model.layers] == [0.0, 0.0]
    rows = scan.rows()
    assert len(rows) == 4 and set(rows[0]) == {
        "layer", "weights", "sparsity", "quality", "mae", "drop"
    }  # fmt: skip
    scan.to_csv(tmp_path / "scan.csv")
    assert (tmp_path / "scan.csv").read_text().count("\n") == 5
    text = str(scan)
    assert "fc1" in text and "90.00%" in text
    only = sensitivity_scan(model, data, sparsities=[0.5], metric="mae", layers=["fc2"])
    assert list(only.values) == ["fc2"]


def test_the_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    model, data = two_layers()
    scan = sensitivity_scan(model, data, sparsities=[0.5, 0.9], metric="loss")
    scan.plot(str(tmp_path / "scan.png"))
    assert (tmp_path / "scan.png").stat().st_size > 1000


def test_a_model_without_masks_is_scanned_through_a_copy():
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(1, use_bias=False, name="fc")]
    )
    model.layers[0].kernel.assign(np.array([[4.0], [3.0], [2.0], [1.0]]))
    model.compile(loss="mse")
    data = (np.eye(4, dtype="float32"), np.array([4.0, 3, 2, 1], "float32"))
    scan = sensitivity_scan(model, data, sparsities=[0.5], metric="loss")
    assert scan.values == {"fc": [1.25]}
    assert type(model.layers[0]) is keras.layers.Dense


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sparsities=[0.9, 0.5]), r"Received: sparsities=\[0.9, 0.5\]$"),
        (dict(sparsities=[0.5, 1.0]), r"Received: sparsities\[1\]=1.0$"),
        (dict(metric="accuracy"), r"Received: metric='accuracy'$"),
        (dict(layers=["fc3"]), r"Received: layers=\['fc3'\]$"),
        (dict(mode="up"), r"Received: mode='up'$"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    model, data = two_layers()
    with pytest.raises(ValueError, match=message):
        sensitivity_scan(model, data, **kwargs)


def test_an_uncompiled_model_is_refused():
    model = keras.Sequential([keras.Input((4,)), MaskedDense(1)])
    with pytest.raises(ValueError, match="compile it first"):
        sensitivity_scan(model, (np.eye(4), np.ones(4)))
