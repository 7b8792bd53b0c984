"""Exported models store every pruned layer as its nonzeros, compute what
the masked model computes, and read back, on every backend."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_prune as kp
from keras_prune.compact import compact_class
from tests.backend_utils import to_numpy

L = keras.layers


def prune_every_weight(model, density, seed=0):
    """Random masks keeping `density` of every prunable weight."""
    rng = np.random.default_rng(seed)
    for layer in kp.masked_layers(model):
        layer.prune_to(
            {
                name: (rng.random(tuple(mask.shape)) < density).astype("float32")
                for name, mask in layer.masks.items()
            }
        )


def every_kind(width=8, vocabulary=50):
    """Embedding, convolution, attention, bidirectional LSTM, a Dense in a
    wrapper, GRU and Dense heads, functional."""
    tokens = keras.Input((12,), dtype="int32")
    x = L.Embedding(vocabulary, width, name="embedding")(tokens)
    x = L.Conv1D(width, 3, padding="same", name="conv")(x)
    x = L.MultiHeadAttention(2, width // 2, name="attention")(x, x)
    x = L.Bidirectional(L.LSTM(width, return_sequences=True), name="bilstm")(x)
    x = L.TimeDistributed(L.Dense(width), name="time_dense")(x)
    x = L.GRU(width, name="gru")(x)
    x = L.Dense(width, name="fc")(x)
    return keras.Model(tokens, L.Dense(3, name="head")(x))


def tokens(vocabulary=50):
    return np.random.default_rng(1).integers(0, vocabulary, (4, 12)).astype("int32")


def test_every_pruned_layer_exports_compact_and_reads_back(tmp_path):
    masked = kp.make_prunable(every_kind(), verbose=False)
    prune_every_weight(masked, density=0.3)
    expected = masked.predict(tokens(), verbose=0)
    exported = kp.export_sparse(masked)
    assert not kp.masked_layers(exported)
    kinds = {layer.name: type(layer).__name__ for layer in exported.layers}
    assert kinds["embedding"] == "CompactEmbedding"
    assert kinds["conv"] == "CompactConv1D"
    assert kinds["attention"] == "CompactMultiHeadAttention"
    assert kinds["gru"] == "CompactGRU"
    assert kinds["fc"] == kinds["head"] == "SparseDense"
    bilstm = exported.get_layer("bilstm")
    assert type(bilstm.forward_layer).__name__ == "CompactLSTM"
    assert type(bilstm.forward_layer.cell).__name__ == "CompactLSTMCell"
    time_dense = exported.get_layer("time_dense")
    assert type(time_dense.layer) is compact_class(L.Dense)
    query = exported.get_layer("attention")._query_dense
    assert type(query) is compact_class(L.EinsumDense)
    np.testing.assert_allclose(
        exported.predict(tokens(), verbose=0), expected, rtol=1e-5, atol=1e-6
    )

    exported.save(tmp_path / "exported.keras")
    loaded = keras.models.load_model(tmp_path / "exported.keras")
    assert type(loaded.get_layer("bilstm").backward_layer.cell).__name__ == (
        "CompactLSTMCell"
    )
    for old, new in zip(exported.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(old), to_numpy(new))
    np.testing.assert_allclose(
        loaded.predict(tokens(), verbose=0), expected, rtol=1e-5, atol=1e-6
    )


def seed_network():
    """The seed report's convnet: 3.3M weights, 94% of them in fc1."""
    images = keras.Input((28, 28, 1))
    x = L.Conv2D(32, 5, padding="same", activation="relu")(images)
    x = L.MaxPooling2D()(x)
    x = L.Conv2D(64, 5, padding="same", activation="relu")(x)
    x = L.Flatten()(L.MaxPooling2D()(x))
    x = L.Dense(1024, activation="relu")(x)
    return keras.Model(images, L.Dense(10)(x))


def test_keras_file_shrinks_with_the_kept_fraction_of_every_layer(tmp_path):
    # Every layer kept at 10%: 12.7% of the dense file (floor: 16%). Each
    # pruned variable costs about 1 KB of HDF5 bookkeeping on top of its
    # 5 bytes a nonzero, so very small models land a little higher.
    dense = seed_network()
    dense.save(tmp_path / "dense.keras")
    masked = kp.make_prunable(dense, verbose=False)
    prune_every_weight(masked, density=0.1)
    kp.export_sparse(masked).save(tmp_path / "exported.keras")
    ratio = (tmp_path / "exported.keras").stat().st_size / (
        tmp_path / "dense.keras"
    ).stat().st_size
    assert ratio <= 0.16, ratio


def test_unpruned_layers_export_as_their_stock_class():
    masked = kp.make_prunable(every_kind(), verbose=False)
    masked.get_layer("conv").prune_to(np.zeros((3, 8, 8)))  # all but one weight
    exported = kp.export_sparse(masked)
    kinds = {layer.name: type(layer).__name__ for layer in exported.layers}
    assert kinds["conv"] == "CompactConv1D"
    assert kinds["embedding"] == "Embedding" and kinds["head"] == "Dense"
    assert type(exported.get_layer("bilstm").forward_layer) is L.LSTM


def test_compact_storage_writes_each_variable_in_its_smallest_form():
    layer = compact_class(L.Conv2D)(32, 3, name="conv")
    layer.build((None, 8, 8, 64))
    kernel = np.zeros((3, 3, 64, 32), "float32")
    kernel[0, 0, 0, 0], kernel[2, 2, 63, 31] = 1.5, -2.0
    layer.kernel.assign(kernel)
    layer.bias.assign(np.ones(32))
    store = {}
    layer.save_own_variables(store)
    # 18,432 weights, 2 nonzero: two 16-bit gaps beat a 2,304-byte bitmask
    # and the 73,728-byte dense kernel; the 32 biases are dense.
    assert sorted(store) == ["0.gaps", "0.shape", "0.values", "1"]
    np.testing.assert_array_equal(store["0.gaps"], [0, 18431])
    assert store["0.gaps"].dtype == np.uint16
    np.testing.assert_array_equal(store["0.values"], [1.5, -2.0])
    copy = compact_class(L.Conv2D)(32, 3)
    copy.build((None, 8, 8, 64))
    copy.load_own_variables(store)
    np.testing.assert_array_equal(to_numpy(copy.kernel), kernel)
    np.testing.assert_array_equal(to_numpy(copy.bias), np.ones(32))


def test_export_on_any_backend_makes_sparse_dense_that_computes_dense():
    masked = kp.make_prunable(
        keras.Sequential([keras.Input((20,)), L.Dense(6, name="fc")]), verbose=False
    )
    prune_every_weight(masked, density=0.2)
    layer = kp.export_sparse(masked, compute="dense").get_layer("fc")
    assert isinstance(layer, kp.SparseDense) and layer.compute_path(1) == "dense"
    if keras.backend.backend() != "tensorflow":
        assert kp.export_sparse(masked).get_layer("fc").compute_path(1) == "dense"
        with pytest.raises(RuntimeError, match="TensorFlow"):
            kp.export_sparse(masked, compute="coo")


def test_compact_class_refuses_non_layers():
    with pytest.raises(
        ValueError,
        match=r"^Expected `cls` to be a keras\.layers\.Layer subclass\. "
        r"Received: <class 'int'>$",
    ):
        compact_class(int)


def test_same_named_classes_of_two_packages_stay_apart():
    @keras.saving.register_keras_serializable("trial_a")
    class Scale(L.Layer):
        pass

    first = Scale

    @keras.saving.register_keras_serializable("trial_b")
    class Scale(L.Layer):  # noqa: F811 - the point of the test
        pass

    assert compact_class(first).__name__ == "Compacttrial_a_Scale"
    assert compact_class(Scale).__name__ == "Compacttrial_b_Scale"


def test_two_unregistered_classes_of_one_name_are_refused():
    def make():
        class Twin(L.Layer):
            pass

        return Twin

    one = make()
    compact_class(one)
    other = type("Twin", (L.Layer,), {"__module__": "elsewhere"})
    with pytest.raises(ValueError, match="Expected one layer class named 'Twin'"):
        compact_class(other)
