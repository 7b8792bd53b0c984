"""The masking mechanism, checked on every covered layer type."""

import keras
import numpy as np
import pytest

import keras_prune as kp
from keras_prune.masking import PruningMasks, is_prunable
from tests.backend_utils import BACKEND, to_numpy
from tests.layer_contract import run_masked_layer_contract

L = keras.layers
RNG = np.random.default_rng(0)


def floats(*shape):
    return RNG.normal(size=shape).astype("float32")


CASES = {
    "Dense": (lambda: L.Dense(3, activation="relu"), floats(4, 5)),
    "Dense-rank3": (lambda: L.Dense(3), floats(2, 4, 5)),
    "EinsumDense": (
        lambda: L.EinsumDense("abc,cd->abd", (4, 3), bias_axes="d"),
        floats(2, 4, 5),
    ),
    "Conv1D": (lambda: L.Conv1D(3, 2), floats(2, 6, 2)),
    "Conv2D": (lambda: L.Conv2D(3, 2, padding="same"), floats(2, 5, 5, 2)),
    "Conv3D": (lambda: L.Conv3D(2, 2), floats(2, 4, 4, 4, 2)),
    "Conv1DTranspose": (lambda: L.Conv1DTranspose(3, 2), floats(2, 5, 2)),
    "Conv2DTranspose": (lambda: L.Conv2DTranspose(3, 2, strides=2), floats(2, 4, 4, 2)),
    "Conv3DTranspose": (lambda: L.Conv3DTranspose(2, 2), floats(2, 3, 3, 3, 2)),
    "DepthwiseConv1D": (
        lambda: L.DepthwiseConv1D(2, depth_multiplier=2),
        floats(2, 6, 3),
    ),
    "DepthwiseConv2D": (lambda: L.DepthwiseConv2D(2), floats(2, 5, 5, 3)),
    "SeparableConv1D": (lambda: L.SeparableConv1D(4, 2), floats(2, 6, 3)),
    "SeparableConv2D": (lambda: L.SeparableConv2D(4, 2), floats(2, 5, 5, 3)),
    "Embedding": (
        lambda: L.Embedding(12, 4),
        RNG.integers(0, 12, size=(3, 5)).astype("int32"),
    ),
    "SimpleRNN": (lambda: L.SimpleRNN(3), floats(2, 4, 3)),
    "LSTM": (lambda: L.LSTM(3, return_sequences=True), floats(2, 4, 3)),
    "GRU": (lambda: L.GRU(3), floats(2, 4, 3)),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_masked_layer_contract(case, tmp_path):
    make, x = CASES[case]
    run_masked_layer_contract(make, x, tmp_path)


def test_rnn_with_a_masked_cell(tmp_path):
    # The cell is the masked layer: RNN's config carries the cell's.
    cell = kp.masked_class(L.LSTMCell)(3)
    model = keras.Sequential([keras.Input((4, 3)), L.RNN(cell)])
    x = floats(2, 4, 3)
    model(x)
    mask = np.zeros((3, 12), "float32")
    mask[0] = 1
    cell.prune_to({"kernel": mask})
    assert to_numpy(cell.kernel)[1:].max() == 0
    model.save(tmp_path / "rnn.keras")
    loaded = keras.models.load_model(tmp_path / "rnn.keras")
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )
    # kernel: 12 of 36 kept; recurrent kernel: all 36 kept.
    assert loaded.layers[0].cell.sparsity == pytest.approx(24 / 72)


def test_registry_covers_the_stock_classes_the_issue_names():
    names = {cls.__name__ for cls in kp.PRUNABLE_WEIGHTS}
    assert names >= {
        "Dense", "EinsumDense", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose",
        "Conv2DTranspose", "Conv3DTranspose", "DepthwiseConv1D", "DepthwiseConv2D",
        "SeparableConv1D", "SeparableConv2D", "Embedding", "SimpleRNN", "LSTM", "GRU",
    }  # fmt: skip
    assert not is_prunable(L.BatchNormalization())
    assert not is_prunable(L.LayerNormalization())


def test_masks_live_in_a_child_layer_and_save_as_bits(tmp_path):
    layer = kp.masked_class(L.Conv2D)(64, 3, name="conv")
    model = keras.Sequential([keras.Input((8, 8, 64)), layer], name="net")
    assert isinstance(layer.pruning_masks, PruningMasks)
    assert [w.path for w in layer.non_trainable_weights] == [
        "net/conv/pruning_masks/kernel_mask"
    ]
    stock = keras.Sequential([keras.Input((8, 8, 64)), L.Conv2D(64, 3)])
    model.save(tmp_path / "masked.keras")
    stock.save(tmp_path / "stock.keras")
    # 36,864 mask entries: 4,608 bytes as bits (147,456 as float32), plus
    # about 2.5 KB of h5 groups and config.
    grown = (tmp_path / "masked.keras").stat().st_size - (
        tmp_path / "stock.keras"
    ).stat().st_size
    assert grown < 10_000


def test_masked_dense_keeps_every_dense_feature_and_masks_lora_too(tmp_path):
    layer = kp.MaskedDense(
        4, activation="tanh", use_bias=False, kernel_regularizer="l2", lora_rank=2
    )
    model = keras.Sequential([keras.Input((3,)), layer])
    assert layer.lora_enabled and layer.bias is None
    mask = np.ones((3, 4), "float32")
    mask[0] = 0
    layer.prune_to(mask)
    # LoRA adds its product to the kernel: the mask applies to the sum, so a
    # pruned weight stays zero in what the layer computes.
    layer.lora_kernel_b.assign(np.ones((2, 4), "float32"))
    x = np.eye(3, dtype="float32")
    merged = to_numpy(layer._kernel) + to_numpy(layer.lora_kernel_a) @ np.ones((2, 4))
    np.testing.assert_allclose(
        to_numpy(layer(x)), np.tanh(x @ (merged * mask)), rtol=1e-5, atol=1e-6
    )
    assert np.all(to_numpy(layer(x))[0] == 0)
    model.save(tmp_path / "lora.keras")
    loaded = keras.models.load_model(tmp_path / "lora.keras")
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )


def test_saving_writes_masked_weights_without_changing_the_live_ones(tmp_path):
    layer = kp.MaskedDense(2, use_bias=False)
    model = keras.Sequential([keras.Input((2,)), layer])
    layer.kernel.assign(np.ones((2, 2), "float32"))
    layer.mask.assign(np.array([[1, 0], [1, 1]], "float32"))  # raw not zeroed
    model.save(tmp_path / "m.keras")
    assert to_numpy(layer.kernel)[0, 1] == 1  # the live weight is untouched
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(to_numpy(loaded.layers[0].kernel), [[1, 0], [1, 1]])


def test_prune_to_refuses_wrong_names_and_shapes():
    layer = kp.masked_class(L.LSTM)(2, name="lstm")
    layer(floats(1, 3, 4))
    with pytest.raises(
        ValueError,
        match=r"^Layer 'lstm' has several prunable weights \['kernel', "
        r"'recurrent_kernel'\]: pass `masks` as a dict by name\. Received: masks of "
        r"type ndarray$",
    ):
        layer.prune_to(np.ones((4, 8)))
    with pytest.raises(
        ValueError,
        match=r"^Expected the keys of `masks` to be prunable weights of layer "
        r"'lstm': \['kernel', 'recurrent_kernel'\]\. Received: 'bias'$",
    ):
        layer.prune_to({"bias": np.ones(8)})
    with pytest.raises(
        ValueError,
        match=r"^Expected `masks\['kernel'\]` of shape \(4, 8\)\. Received: shape "
        r"\(8, 4\)$",
    ):
        layer.prune_to({"kernel": np.ones((8, 4))})
    with pytest.raises(
        ValueError,
        match=r"^Expected `masks\['kernel'\]` to hold only 0 and 1\. Received values "
        r"such as \[0\.5 0\.5 0\.5\]$",
    ):
        layer.prune_to({"kernel": np.full((4, 8), 0.5)})


def test_prune_to_never_revives_a_pruned_weight_unless_asked():
    layer = kp.MaskedDense(2, use_bias=False, name="fc")
    layer(floats(1, 2))
    layer.kernel.assign(np.full((2, 2), 3.0, "float32"))
    layer.prune_to(np.array([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(
        ValueError,
        match=r"^Expected `masks\['kernel'\]` to keep the pruned weights of "
        r"layer 'fc' pruned\. Received a mask that revives 2 of them; pass regrow=True",
    ):
        layer.prune_to(np.array([[1.0, 1.0], [0.0, 1.0]]))
    np.testing.assert_array_equal(to_numpy(layer.mask), [[1, 0], [0, 0]])  # kept
    layer.prune_to(np.ones((2, 2)), regrow=True)
    # Revived weights start at zero: pruning zeroed them.
    np.testing.assert_array_equal(to_numpy(layer.kernel), [[3, 0], [0, 0]])
    assert layer.sparsity == 0


def test_a_refused_mask_changes_no_mask_of_the_layer():
    layer = kp.masked_class(L.LSTM)(2, name="lstm")
    layer(floats(1, 3, 4))
    with pytest.raises(ValueError, match=r"to hold only 0 and 1"):
        layer.prune_to(
            {"kernel": np.zeros((4, 8)), "recurrent_kernel": np.full((2, 8), 0.5)}
        )
    assert layer.sparsity == 0


def test_unbuilt_masked_layer_says_so():
    layer = kp.masked_class(L.Conv1D)(2, 3, name="later")
    with pytest.raises(ValueError, match=r"^Layer 'later' is not built yet"):
        layer.masks  # noqa: B018


def test_custom_layer_opts_in_with_get_prunable_weights(tmp_path):
    @keras.saving.register_keras_serializable(package="tests")
    class Scale(L.Layer):
        # No get_config: Keras makes the config from the constructor's
        # arguments, for the masked class too.
        def __init__(self, factor, **kwargs):
            super().__init__(**kwargs)
            self.factor = factor

        def build(self, input_shape):
            # Unnamed: Keras numbers it, differently in each new instance.
            self.w = self.add_weight(shape=(input_shape[-1],), initializer="ones")

        def call(self, x):
            return x * self.w * self.factor

        def get_prunable_weights(self):
            return [self.w]

    masked = kp.make_prunable(
        keras.Sequential([keras.Input((4,)), Scale(2.0, name="scale")])
    )
    layer = masked.get_layer("scale")
    assert type(layer).__name__ == "MaskedScale"
    layer.prune_to(np.array([1, 0, 1, 0], "float32"))
    np.testing.assert_array_equal(
        masked.predict(np.ones((1, 4)), verbose=0), [[2, 0, 2, 0]]
    )
    masked.save(tmp_path / "scale.keras")
    keras.layers.Dense(1).build((None, 1))  # shift Keras's automatic numbering
    loaded = keras.models.load_model(tmp_path / "scale.keras")
    np.testing.assert_array_equal(
        loaded.predict(np.ones((1, 4)), verbose=0), [[2, 0, 2, 0]]
    )
    np.testing.assert_array_equal(to_numpy(loaded.layers[0].masks["w"]), [1, 0, 1, 0])


def test_masked_class_of_a_layer_without_weights_rule_is_a_container():
    assert kp.masked_class(L.MultiHeadAttention).__mro__[1] is kp.MaskedContainer
    with pytest.raises(
        ValueError,
        match=r"^Expected `cls` to be a keras\.layers\.Layer subclass\. "
        r"Received: <class 'int'>$",
    ):
        kp.masked_class(int)


def test_file_written_by_keras_prune_0_1_loads_with_its_masks():
    import os

    here = os.path.join(os.path.dirname(__file__), "data")
    model = keras.models.load_model(os.path.join(here, "masked_dense_v0_1.keras"))
    expected = np.load(os.path.join(here, "masked_dense_v0_1_expected.npz"))
    np.testing.assert_allclose(
        model.predict(expected["x"], verbose=0), expected["y"], rtol=1e-6
    )
    fc1 = model.get_layer("fc1")
    assert isinstance(fc1, kp.MaskedDense)
    np.testing.assert_array_equal(
        to_numpy(fc1.mask), [[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]]
    )
    assert to_numpy(fc1.kernel)[0, 1] == 0


@pytest.mark.skipif(BACKEND == "jax", reason="Keras 3.15 JAX: a 2nd fit with EMA fails")
def test_ema_copied_back_at_the_end_of_fit_revives_nothing():
    x, y = floats(32, 6), floats(32, 4)
    model = kp.make_prunable(keras.Sequential([keras.Input((6,)), L.Dense(4)]))
    model.compile(keras.optimizers.Adam(0.05, use_ema=True), "mse")
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    mask = np.ones((6, 4), "float32")
    mask[:3] = 0
    model.layers[0].prune_to(mask, optimizer=model.optimizer)
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert np.all(to_numpy(model.layers[0].kernel)[:3] == 0)


def test_user_kernel_constraint_still_applies_before_the_mask():
    layer = kp.masked_class(L.Conv1D)(2, 1, kernel_constraint="non_neg")
    model = keras.Sequential([keras.Input((3, 2)), layer])
    model.compile(keras.optimizers.SGD(1.0), "mse")
    mask = np.array([[[1, 0], [1, 1]]], "float32")
    layer.prune_to(mask)
    model.fit(np.ones((4, 3, 2)), -np.ones((4, 3, 2)) * 100, verbose=0)
    kernel = to_numpy(layer.kernel)
    assert kernel.min() >= 0 and kernel[0, 0, 1] == 0
