import keras
import numpy as np
import pytest
from keras import ops

from keras_prune import MaskedDense, SparseDense
from keras_prune.inference import native
from tests.kernels import compute_paths
from tests.layer_contract import run_layer_contract


def to_numpy(x):
    return ops.convert_to_numpy(x)


def built_masked(kernel, mask, bias=None, activation=None):
    kernel = np.asarray(kernel, "float32")
    layer = MaskedDense(
        kernel.shape[1], activation=activation, use_bias=bias is not None
    )
    layer.build((None, kernel.shape[0]))
    layer.kernel.assign(kernel)
    if bias is not None:
        layer.bias.assign(np.asarray(bias, "float32"))
    layer.prune_to(np.asarray(mask, "float32"))
    return layer


def test_masked_dense_contract(tmp_path):
    layer = MaskedDense(3, activation="relu", kernel_regularizer="l2", name="fc")
    run_layer_contract(
        layer,
        (4, 5),
        (4, 3),
        expected_trainable_weights=2,
        expected_non_trainable_weights=1,
        tmp_path=tmp_path,
    )


def test_masked_dense_mask_weight_is_named_shaped_and_starts_at_ones():
    layer = MaskedDense(3)
    layer.build((None, 5))
    assert layer.mask.name == "kernel_mask"
    assert tuple(layer.mask.shape) == (5, 3)
    assert not layer.mask.trainable
    assert to_numpy(layer.mask).min() == 1.0 and layer.sparsity == 0.0


def test_masked_dense_computes_activation_of_masked_product_plus_bias():
    layer = built_masked(
        [[1.0, 2.0], [3.0, 4.0]], [[1, 0], [0, 1]], bias=[0.5, -10.0], activation="relu"
    )
    # [1, 1] @ [[1, 0], [0, 4]] + [0.5, -10] = [1.5, -6] -> relu -> [1.5, 0].
    np.testing.assert_allclose(
        to_numpy(layer(np.ones((1, 2), "float32"))), [[1.5, 0.0]]
    )
    # prune_to zeroed the raw kernel too.
    np.testing.assert_array_equal(to_numpy(layer.kernel), [[1, 0], [0, 4]])
    assert layer.sparsity == 0.5


def test_masked_dense_accepts_rank_three_inputs_like_dense():
    layer = built_masked([[1.0, 2.0], [3.0, 4.0]], [[1, 1], [0, 1]])
    x = np.arange(12, dtype="float32").reshape(2, 3, 2)
    np.testing.assert_allclose(to_numpy(layer(x)), x @ np.array([[1, 2], [0, 4]]))


def test_pruned_weights_get_zero_gradient():
    import tensorflow as tf

    layer = built_masked(np.ones((3, 2)), [[1, 0], [0, 1], [1, 1]])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(np.ones((4, 3), "float32")))
    gradient = to_numpy(tape.gradient(loss, layer.kernel.value))
    np.testing.assert_array_equal(gradient == 0, to_numpy(layer.mask) == 0)


@pytest.mark.parametrize(
    "optimizer",
    [
        lambda: keras.optimizers.Adam(0.1),
        lambda: keras.optimizers.AdamW(0.1, weight_decay=0.5),
        lambda: keras.optimizers.SGD(0.1, momentum=0.9),
    ],
    ids=["adam", "adamw", "sgd-momentum"],
)
def test_momentum_never_revives_a_pruned_weight(optimizer):
    x = np.random.default_rng(0).normal(size=(32, 6)).astype("float32")
    y = np.random.default_rng(1).normal(size=(32, 4)).astype("float32")
    model = keras.Sequential([keras.Input((6,)), MaskedDense(4)])
    model.compile(optimizer(), "mse")
    model.fit(x, y, epochs=3, batch_size=8, verbose=0)  # build up momentum
    layer = model.layers[0]
    mask = np.ones((6, 4), "float32")
    mask[:, 0] = 0
    mask[2] = 0
    layer.prune_to(mask)
    model.fit(x, y, epochs=3, batch_size=8, verbose=0)
    kernel = to_numpy(layer.kernel)
    assert np.all(kernel[mask == 0] == 0)  # the raw kernel, exactly zero
    assert np.all(kernel[mask == 1] != 0)


def test_user_kernel_constraint_still_applies_before_the_mask():
    model = keras.Sequential(
        [keras.Input((3,)), MaskedDense(2, kernel_constraint="non_neg")]
    )
    model.compile(keras.optimizers.SGD(1.0), "mse")
    model.layers[0].prune_to(np.array([[1, 0], [1, 1], [0, 1]], "float32"))
    model.fit(np.ones((4, 3)), -np.ones((4, 2)) * 100, verbose=0)
    kernel = to_numpy(model.layers[0].kernel)
    assert kernel.min() >= 0
    assert kernel[0, 1] == 0 and kernel[2, 0] == 0


def test_masked_file_stores_the_mask_as_bits(tmp_path):
    dense = keras.Sequential([keras.Input((300,)), keras.layers.Dense(200)])
    masked = keras.Sequential([keras.Input((300,)), MaskedDense(200)])
    dense.save(tmp_path / "dense.keras")
    masked.save(tmp_path / "masked.keras")
    dense_size = (tmp_path / "dense.keras").stat().st_size
    # 60,000 mask entries: 7,500 bytes as bits, 240,000 as float32.
    assert (tmp_path / "masked.keras").stat().st_size < dense_size + 10_000


def test_masks_survive_save_and_load(tmp_path):
    model = keras.Sequential([keras.Input((4,)), MaskedDense(3, name="fc")])
    mask = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]], "float32")
    model.layers[0].prune_to(mask)
    model.save(tmp_path / "masked.keras")
    loaded = keras.models.load_model(tmp_path / "masked.keras")
    np.testing.assert_array_equal(to_numpy(loaded.get_layer("fc").mask), mask)
    assert loaded.get_layer("fc").sparsity == 0.5


@pytest.mark.parametrize(
    "units", [0, -3, 2.5, "4"], ids=["zero", "negative", "float", "string"]
)
def test_units_must_be_a_positive_integer(units):
    with pytest.raises(
        ValueError,
        match=r"^Expected `units` to be a positive integer\. Received: units="
        + repr(units)
        + "$",
    ):
        SparseDense(units)


def test_sparse_dense_contract(tmp_path):
    kernel = np.zeros((5, 3), "float32")
    kernel[0, 1], kernel[4, 2], kernel[2, 0] = 1.5, -2.0, 0.25
    layer = SparseDense.from_kernel(
        kernel, bias=np.ones(3), activation="tanh", name="sparse"
    )
    # Trainable: values and bias; not trainable: indices.
    run_layer_contract(
        layer,
        (4, 5),
        (4, 3),
        expected_trainable_weights=2,
        expected_non_trainable_weights=1,
        tmp_path=tmp_path,
    )


@pytest.mark.parametrize("compute", compute_paths("native", "coo", "csr"))
def test_sparse_paths_hold_only_nonzeros_as_coo_pairs_of_the_transpose(compute):
    kernel = np.array([[0.0, 2.0, 0.0], [3.0, 0.0, 0.0]], "float32")
    layer = SparseDense.from_kernel(kernel, bias=np.zeros(3), compute=compute)
    assert layer.nnz == 2
    native_csr = {"row_splits": (4,), "columns": (2,)} if compute == "native" else {}
    assert {w.name: tuple(w.shape) for w in layer.weights} == {
        "values": (2,),
        "indices": (2, 2),
        **native_csr,
        "bias": (3,),
    }
    # Unit 0 takes input 1 (3.0), unit 1 takes input 0 (2.0), unit 2 nothing.
    np.testing.assert_array_equal(to_numpy(layer.values), [3.0, 2.0])
    np.testing.assert_array_equal(to_numpy(layer.indices), [[0, 1], [1, 0]])
    if compute == "native":  # the same as int32 CSR
        row_splits, columns = (to_numpy(variable) for variable in layer.csr)
        assert row_splits.tolist() == [0, 1, 2, 2] and row_splits.dtype == "int32"
        assert columns.tolist() == [1, 0] and columns.dtype == "int32"
    else:
        assert layer.csr is None
    np.testing.assert_array_equal(layer.dense_kernel(), kernel)
    assert layer.sparsity == pytest.approx(4 / 6)


def test_dense_path_holds_the_kernel_rebuilt_once_and_the_same_values():
    kernel = np.array([[0.0, 2.0, 0.0], [3.0, 0.0, 0.0]], "float32")
    layer = SparseDense.from_kernel(kernel, bias=np.zeros(3))  # small: dense
    assert layer.compute_path(1) == "dense" and layer.supports_jit
    assert {w.name: tuple(w.shape) for w in layer.weights} == {
        "kernel": (2, 3),
        "indices": (2, 2),
        "bias": (3,),
    }
    np.testing.assert_array_equal(to_numpy(layer.kernel), kernel)
    np.testing.assert_array_equal(to_numpy(layer.values), [3.0, 2.0])
    np.testing.assert_array_equal(layer.dense_kernel(), kernel)


def saved_arrays(model, tmp_path):
    import h5py

    model.save_weights(tmp_path / "model.weights.h5")
    arrays = {}

    def collect(name, item):
        if isinstance(item, h5py.Dataset):
            arrays[name.split("/")[-1]] = item[()]

    with h5py.File(tmp_path / "model.weights.h5") as file:
        file.visititems(collect)
    return arrays


@pytest.mark.parametrize("compute", compute_paths("dense", "coo"))
def test_sparse_dense_saves_only_the_nonzeros(tmp_path, compute):
    kernel = np.zeros((100, 3), "float32")
    kernel[1, 0], kernel[0, 1], kernel[99, 2] = 3.0, 2.0, 5.0
    model = keras.Sequential(
        [keras.Input((100,)), SparseDense.from_kernel(kernel, compute=compute)]
    )
    arrays = saved_arrays(model, tmp_path)
    # Positions in the (units, input_dim) transpose: 1, 100, 299.
    assert sorted(arrays) == ["gaps", "shape", "values"]
    np.testing.assert_array_equal(arrays["gaps"], [1, 99, 199])
    assert arrays["gaps"].dtype == np.uint8
    np.testing.assert_array_equal(arrays["values"], [3.0, 2.0, 5.0])
    np.testing.assert_array_equal(arrays["shape"], [3, 100])


def test_sparse_dense_reads_the_csr_arrays_of_earlier_files():
    # keras_prune 0.1 and 0.2 wrote CSR over units with 16-bit columns.
    layer = SparseDense(3, nnz=2, use_bias=False)
    layer.build((None, 2))
    layer.load_own_variables(
        {
            "values": np.array([3.0, 2.0], "float32"),
            "row_splits": np.array([0, 1, 2, 2], "int32"),
            "columns": np.array([1, 0], "uint16"),
        }
    )
    np.testing.assert_array_equal(
        layer.dense_kernel(), [[0.0, 2.0, 0.0], [3.0, 0.0, 0.0]]
    )


def test_sparse_dense_refuses_a_saved_kernel_of_another_shape():
    layer = SparseDense(3, nnz=1, use_bias=False)
    layer.build((None, 2))
    with pytest.raises(
        ValueError,
        match=r"has a \(2, 3\) kernel\. Received: a saved kernel of shape \(4, 3\)",
    ):
        layer.load_own_variables(
            {
                "shape": np.array([3, 4]),
                "values": np.ones(1, "float32"),
                "gaps": np.array([5], "uint8"),
            }
        )


def random_sparse_kernel(shape, density, seed=0):
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=shape).astype("float32")
    return kernel * (rng.random(shape) < density)


def edge_kernels():
    last_empty = random_sparse_kernel((6, 4), 0.5)
    last_empty[-1, :] = 0  # last input row entirely zero
    last_empty[:, -1] = 0  # last unit entirely zero
    single = np.zeros((7, 5), "float32")
    single[6, 4] = 3.0
    return {
        "all-zero": np.zeros((4, 3), "float32"),
        "last-row-and-column-empty": last_empty,
        "single-nonzero": single,
        "one-unit": random_sparse_kernel((8, 1), 0.5),
        "dense": random_sparse_kernel((5, 4), 1.0),
    }


@pytest.mark.parametrize(
    "compute", compute_paths("auto", "dense", "native", "coo", "csr")
)
@pytest.mark.parametrize("name", list(edge_kernels()))
@pytest.mark.parametrize(
    "input_shape",
    [(1,), (3,), (6,), (9,), (17,), (130,), (2, 3)],
    ids=lambda shape: f"batch-{shape[0]}" if len(shape) == 1 else "rank-3",
)
def test_sparse_dense_matches_numpy_on_edge_cases(compute, name, input_shape):
    # The native kernel's paths: batch <= 4 gathered, 5-8 in one tile of 8,
    # more in tiles of 16 (17: one full, one of a single row).
    kernel = edge_kernels()[name]
    bias = np.arange(kernel.shape[1], dtype="float32")
    layer = SparseDense.from_kernel(
        kernel, bias=bias, activation="relu", compute=compute
    )
    x = (
        np.random.default_rng(1)
        .normal(size=(*input_shape, kernel.shape[0]))
        .astype("float32")
    )
    expected = np.maximum(x @ kernel + bias, 0)
    np.testing.assert_allclose(to_numpy(layer(x)), expected, rtol=1e-6, atol=1e-6)


def test_sparse_dense_from_kernel_rejects_non_matrix():
    with pytest.raises(
        ValueError,
        match=r"^Expected `kernel` to be 2-D \(input_dim, units\)\. "
        r"Received: kernel.shape=\(3,\)$",
    ):
        SparseDense.from_kernel(np.ones(3))


def test_sparse_dense_rejects_negative_nnz():
    with pytest.raises(
        ValueError, match=r"^Expected `nnz` to be an integer >= 0\. Received: nnz=-1$"
    ):
        SparseDense(3, nnz=-1)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("batch", [1, 4, 5, 64])
def test_sparse_dense_serves_unknown_batch_sizes(batch, dtype):
    # float64 has no native kernel: TensorFlow's are chosen per call.
    import tensorflow as tf

    kernel = random_sparse_kernel((12, 7), 0.3)
    layer = SparseDense.from_kernel(kernel, dtype=dtype)
    serve = tf.function(layer, input_signature=[tf.TensorSpec([None, 12], dtype)])
    x = np.random.default_rng(2).normal(size=(batch, 12)).astype(dtype)
    np.testing.assert_allclose(serve(x).numpy(), x @ kernel, rtol=1e-5, atol=1e-6)


def seed_layer(density, **kwargs):
    """The seed network's fc1, 3136 x 1024, keeping `density`."""
    return SparseDense.from_kernel(
        random_sparse_kernel((3136, 1024), density), **kwargs
    )


def test_auto_computes_sparse_only_where_it_pays():
    large = seed_layer(0.01)
    expected = ["native"] * 3 if native.available() else ["coo", "csr", "auto"]
    assert [large.compute_path(b) for b in (1, 256, None)] == expected
    assert not large.supports_jit
    double = seed_layer(0.01, dtype="float64")
    assert [double.compute_path(b) for b in (1, 4, 5, 256, None)] == [
        "coo", "coo", "csr", "csr", "auto"]  # fmt: skip
    # Too dense (30% kept) or too small (16 weights): a dense matmul wins.
    assert seed_layer(0.3).compute_path(1) == "dense"
    assert SparseDense.from_kernel(np.eye(4)).compute_path(1) == "dense"
    forced = SparseDense.from_kernel(np.eye(4), compute="csr")
    assert forced.compute_path(1) == "csr"
    assert seed_layer(0.01, compute="dense").compute_path(1) == "dense"


def test_dense_path_fine_tunes_only_the_stored_weights():
    kernel = np.array([[0.0, 2.0], [3.0, 0.0], [0.0, 0.0]], "float32")
    layer = SparseDense.from_kernel(kernel, compute="dense")
    model = keras.Sequential([keras.Input((3,)), layer])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    x = np.random.default_rng(0).normal(size=(16, 3)).astype("float32")
    model.fit(x, np.ones((16, 2)), epochs=2, verbose=0)
    trained = to_numpy(layer.kernel)
    np.testing.assert_array_equal(trained == 0, kernel == 0)
    assert not np.array_equal(trained, kernel)
    np.testing.assert_array_equal(to_numpy(layer.values), trained[[1, 0], [0, 1]])


@pytest.mark.parametrize("compute", compute_paths("native", "coo", "csr"))
def test_sparse_paths_fine_tune_as_the_dense_layer_they_replace(compute):
    # One SGD step on the stored weights and the bias equals the same step
    # on a Dense layer, restricted to its nonzeros.
    kernel = np.array([[0.0, 2.0], [3.0, 0.0], [0.0, -1.0]], "float32")
    sparse = SparseDense.from_kernel(kernel, bias=np.ones(2), compute=compute)
    dense = keras.layers.Dense(2)
    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    target = np.ones((8, 2), "float32")
    for layer in (sparse, dense):
        model = keras.Sequential([keras.Input((3,)), layer])
        model.compile(keras.optimizers.SGD(0.1), "mse")
        if layer is dense:
            dense.set_weights([kernel, np.ones(2, "float32")])
        model.train_on_batch(x, target)
    stepped = dense.get_weights()[0]
    np.testing.assert_allclose(
        sparse.dense_kernel(), np.where(kernel != 0, stepped, 0), rtol=1e-5
    )
    np.testing.assert_allclose(to_numpy(sparse.bias), dense.get_weights()[1], rtol=1e-5)


def test_sparse_dense_refuses_unknown_compute():
    with pytest.raises(
        ValueError,
        match=r"^Expected `compute` to be one of "
        r"\['auto', 'tensorflow', 'dense', 'native', 'coo', 'csr'\]\. "
        r"Received: compute='gpu'$",
    ):
        SparseDense(3, compute="gpu")


@pytest.mark.parametrize(
    "compute", compute_paths("auto", "dense", "native", "coo", "csr")
)
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("batch", [1, 5, 130])
def test_sparse_dense_under_mixed_precision_computes_in_half_precision_out(
    compute, policy, batch
):
    # TensorFlow's CSR kernel has no float16 or bfloat16 version: the layer
    # computes in float32 on every path and casts its output.
    kernel = random_sparse_kernel((12, 7), 0.3)
    layer = SparseDense.from_kernel(kernel, dtype=policy, compute=compute)
    x = np.random.default_rng(3).normal(size=(batch, 12)).astype("float32")
    y = layer(x)
    assert y.dtype == policy.removeprefix("mixed_")
    # The inputs and weights are rounded to half precision (8 bits of
    # mantissa for bfloat16), the sums are float32.
    tolerance = 2e-2 if policy == "mixed_bfloat16" else 3e-3
    np.testing.assert_allclose(
        to_numpy(y).astype("float32"), x @ kernel, rtol=tolerance, atol=tolerance
    )


def test_mixed_precision_layers_choose_the_native_kernel_where_it_exists():
    layer = seed_layer(0.01, dtype="mixed_float16")
    assert layer.compute_path(8) == ("native" if native.available() else "csr")


def test_forcing_the_native_kernel_in_float64_is_refused():
    with pytest.raises(
        ValueError,
        match=r'^Expected a float32, float16 or bfloat16 layer for compute="native" '
        r"\(the kernel computes in float32\)\. Received: dtype=float64$",
    ):
        SparseDense(2, compute="native", dtype="float64")
