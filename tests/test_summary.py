import keras
import numpy as np
import pytest

from keras_prune import MaskedDense, SparseDense, sparsity_summary


def test_summary_counts_each_kind_of_dense_layer_by_hand():
    inputs = keras.Input((4,))
    x = MaskedDense(5, name="masked")(inputs)  # 4x5 = 20 weights
    x = SparseDense.from_kernel(np.eye(5, 2), name="sparse")(x)  # 5x2, 2 nonzeros
    x = SparseDense.from_kernel(np.eye(2), name="tf", compute="csr")(x)
    plain = keras.layers.Dense(3, name="plain", kernel_initializer="ones")
    model = keras.Model(inputs, plain(keras.layers.ReLU()(x)))
    model.get_layer("masked").prune_to(np.eye(4, 5))  # 4 ones left

    summary = sparsity_summary(model)
    rows = [(r.name, r.kind, r.shape, r.size, r.nonzeros, r.compute)
            for r in summary.rows]  # fmt: skip
    assert rows == [
        ("masked", "MaskedDense", (4, 5), 20, 4, "dense"),
        ("sparse", "SparseDense", (5, 2), 10, 2, "dense"),  # too small to gain
        ("tf", "SparseDense", (2, 2), 4, 2, "csr"),
        ("plain", "Dense", (2, 3), 6, 6, "dense"),
    ]
    assert summary["masked"].sparsity == 0.8
    assert (summary.size, summary.nonzeros) == (40, 14)
    assert summary.sparsity == pytest.approx(26 / 40)
    table = str(summary).splitlines()
    assert table[0].split() == ["layer", "type", "kernel", "shape", "compute",
                                "size", "nonzeros", "sparsity"]  # fmt: skip
    assert table[2].split() == ["masked", "MaskedDense", "4x5", "dense", "20", "4",
                                "80.00%"]  # fmt: skip
    assert table[-1].split() == ["total", "40", "14", "65.00%"]


def test_summary_refuses_non_models():
    with pytest.raises(
        TypeError,
        match=r"^`sparsity_summary` expects `model` to be a keras\.Model\. "
        r"Received: model='x' of type str$",
    ):
        sparsity_summary("x")
