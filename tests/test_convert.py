import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers, ops

from keras_prune import (
    MaskedDense,
    SparseDense,
    compact_class,
    export_sparse,
    make_prunable,
    masked_layers,
)
from keras_prune.inference import native, sparse_ops
from tests.kernels import compute_paths


def convnet():
    """A small cousin of the seed convnet: conv, BN, pool, dropout, two Dense."""
    inputs = keras.Input((8, 8, 1))
    x = layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    x = layers.BatchNormalization()(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    x = layers.Dense(16, activation="relu", name="fc1")(x)
    x = layers.Dropout(0.5)(x)
    outputs = layers.Dense(3, name="fc2")(x)
    model = keras.Model(inputs, outputs, name="convnet")
    model.compile(keras.optimizers.Adam(1e-3), "mse", metrics=["mae"])
    x_train = np.random.default_rng(0).random((32, 8, 8, 1)).astype("float32")
    model.fit(x_train, np.zeros((32, 3)), verbose=0)  # move BN statistics
    return model


def images(n=10):
    return np.random.default_rng(1).random((n, 8, 8, 1)).astype("float32")


def snapshot(model):
    return [type(layer) for layer in model.layers], [
        ops.convert_to_numpy(w).copy() for w in model.weights
    ]


def assert_unchanged(model, before):
    types, weights = snapshot(model)
    assert types == before[0]
    for old, new in zip(before[1], weights, strict=True):
        np.testing.assert_array_equal(old, new)


def prune_randomly(model, density, seed=0):
    rng = np.random.default_rng(seed)
    for layer in masked_layers(model):
        layer.prune_to(
            {
                key: (rng.random(tuple(mask.shape)) < density).astype("float32")
                for key, mask in layer.masks.items()
            }
        )


# --- make_prunable -------------------------------------------------------


def test_make_prunable_gives_identical_outputs_and_leaves_input_alone():
    model = convnet()
    before = snapshot(model)
    prunable = make_prunable(model)
    assert [
        type(layer).__name__ for layer in prunable.layers if "fc" in layer.name
    ] == ["MaskedDense", "MaskedDense"]
    np.testing.assert_array_equal(
        prunable.predict(images(), verbose=0), model.predict(images(), verbose=0)
    )
    assert_unchanged(model, before)
    # Compiled like the original, with a fresh optimizer: fit works at once.
    assert prunable.compiled
    assert prunable.optimizer is not model.optimizer
    prunable.fit(images(), np.zeros((10, 3)), verbose=0)
    assert_unchanged(model, before)


def test_make_prunable_sequential_keeps_config_arguments():
    model = keras.Sequential(
        [
            keras.Input((4,)),
            layers.Dense(
                3,
                activation="tanh",
                use_bias=False,
                kernel_regularizer="l2",
                name="only",
            ),
        ]
    )
    layer = make_prunable(model).get_layer("only")
    assert isinstance(layer, MaskedDense)
    assert layer.get_config()["activation"] == "tanh"
    assert layer.bias is None and layer.kernel_regularizer is not None


@pytest.mark.parametrize(
    "layers_arg",
    [["fc2"], "fc2", lambda layer: layer.name == "fc2"],
    ids=["names", "one-name", "predicate"],
)
def test_make_prunable_converts_only_chosen_layers(layers_arg):
    prunable = make_prunable(convnet(), layers=layers_arg)
    assert type(prunable.get_layer("fc1")) is layers.Dense
    assert type(prunable.get_layer("fc2")) is MaskedDense


@pytest.mark.parametrize(
    ("layers_arg", "reason"),
    [
        (["nope"], "'nope' is not in the model"),
        (
            ["max_pooling2d"],
            "'max_pooling2d' is a MaxPooling2D, which has no pruning rule",
        ),
    ],
    ids=["missing", "not-dense"],
)
def test_make_prunable_refuses_bad_layer_names(layers_arg, reason):
    model = convnet()
    layers_arg = [model.layers[3].name] if reason.startswith("'max") else layers_arg
    reason = reason.replace("'max_pooling2d'", repr(model.layers[3].name))
    with pytest.raises(
        ValueError,
        match=r"^Expected every name in `layers` to be a prunable layer of the "
        r"model\. Received: layers="
        + repr(layers_arg).replace("[", r"\[").replace("]", r"\]")
        + "; "
        + reason
        + "$",
    ):
        make_prunable(model, layers=layers_arg)


@pytest.mark.parametrize(
    "function", [make_prunable, export_sparse], ids=lambda f: f.__name__
)
def test_converters_refuse_non_models(function):
    with pytest.raises(
        TypeError,
        match=rf"^`{function.__name__}` expects `model` to be a keras\.Model\. "
        r"Received: model=\[1, 2\] of type list$",
    ):
        function([1, 2])


# --- export_sparse -------------------------------------------------------


@pytest.mark.parametrize(
    "compute", compute_paths("auto", "native", "coo", "csr", "dense")
)
def test_export_sparse_matches_masked_predictions_and_leaves_input_alone(compute):
    masked = make_prunable(convnet())
    prune_randomly(masked, density=0.1)
    before = snapshot(masked)
    sparse = export_sparse(masked, compute=compute)
    assert_unchanged(masked, before)
    # Every pruned Dense is a SparseDense; layers this small compute dense
    # unless a sparse kernel is forced.
    for name in ("fc1", "fc2"):
        layer = sparse.get_layer(name)
        assert isinstance(layer, SparseDense)
        assert layer.compute_path(1) == ("dense" if compute == "auto" else compute)
    assert not masked_layers(sparse)
    difference = np.abs(
        sparse.predict(images(), verbose=0) - masked.predict(images(), verbose=0)
    ).max()
    assert difference < 1e-5
    # BN kept its weights and statistics; the convolution is a stock Conv2D
    # holding kernel * mask.
    norm = [layer for layer in masked.layers if "normalization" in layer.name][0]
    for a, b in zip(
        norm.get_weights(), sparse.get_layer(norm.name).get_weights(), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    conv = [layer for layer in masked.layers if layer.name.startswith("conv2d")][0]
    exported = sparse.get_layer(conv.name)
    assert type(exported) is compact_class(layers.Conv2D)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(exported.kernel),
        ops.convert_to_numpy(conv.kernel) * ops.convert_to_numpy(conv.masks["kernel"]),
    )
    np.testing.assert_array_equal(
        ops.convert_to_numpy(exported.bias), ops.convert_to_numpy(conv.bias)
    )


def test_export_sparse_stores_exactly_the_nonzeros():
    masked = make_prunable(convnet())
    prune_randomly(masked, density=0.05)
    sparse = export_sparse(masked, compute="csr")
    for layer in (masked.get_layer("fc1"), masked.get_layer("fc2")):
        new = sparse.get_layer(layer.name)
        assert isinstance(new, SparseDense)
        assert new.nnz == np.count_nonzero(ops.convert_to_numpy(layer.masked_kernel))
        np.testing.assert_array_equal(
            new.dense_kernel(), ops.convert_to_numpy(layer.masked_kernel)
        )


def test_export_sparse_handles_nested_models():
    inner = keras.Sequential(
        [keras.Input((6,)), MaskedDense(4, name="inner_fc")], name="inner"
    )
    inputs = keras.Input((6,))
    outputs = MaskedDense(2, name="outer_fc")(inner(inputs))
    model = keras.Model(inputs, outputs)
    prune_randomly(model, density=0.5)
    sparse = export_sparse(model, compute="coo")
    x = np.random.default_rng(0).normal(size=(5, 6)).astype("float32")
    np.testing.assert_allclose(
        sparse.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )
    assert isinstance(sparse.get_layer("inner").get_layer("inner_fc"), SparseDense)


@pytest.mark.parametrize("compute", compute_paths("native", "coo"))
def test_sparse_model_saves_loads_and_serves_as_saved_model(tmp_path, compute):
    masked = make_prunable(convnet())
    prune_randomly(masked, density=0.05)
    sparse = export_sparse(masked, compute=compute)
    expected = sparse.predict(images(), verbose=0)

    sparse.save(tmp_path / "sparse.keras")
    loaded = keras.models.load_model(tmp_path / "sparse.keras")
    assert isinstance(loaded.get_layer("fc1"), SparseDense)
    np.testing.assert_array_equal(loaded.predict(images(), verbose=0), expected)

    sparse.export(str(tmp_path / "served"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "served"))
    np.testing.assert_allclose(served.serve(images()).numpy(), expected, atol=1e-6)


def test_sparse_keras_file_is_under_three_percent_of_dense_at_one_percent(tmp_path):
    dense = keras.Sequential([keras.Input((3136,)), layers.Dense(1024, name="fc1")])
    dense.save(tmp_path / "dense.keras")
    masked = make_prunable(dense)
    prune_randomly(masked, density=0.01)
    export_sparse(masked).save(tmp_path / "sparse.keras")
    ratio = (tmp_path / "sparse.keras").stat().st_size / (
        tmp_path / "dense.keras"
    ).stat().st_size
    assert ratio <= 0.03, ratio


def test_export_sparse_is_uncompiled_so_files_carry_no_optimizer_state(tmp_path):
    masked = make_prunable(convnet())
    assert masked.compiled
    sparse = export_sparse(masked)
    assert not sparse.compiled
    sparse.save(tmp_path / "sparse.keras")
    loaded = keras.models.load_model(tmp_path / "sparse.keras")
    assert not loaded.compiled and getattr(loaded, "optimizer", None) is None


# The smallest layer that goes sparse: 100k weights with the native kernel.
ROWS = (
    sparse_ops.SPARSE_MIN_WEIGHTS
    if native.available()
    else sparse_ops.SPARSE_MIN_WEIGHTS_WITHOUT_NATIVE
) // 1000


@pytest.mark.parametrize(
    ("shape", "density", "expected"),
    [
        ((ROWS, 1000), 0.05, "sparse"),
        ((ROWS, 1000), 0.06, "dense"),
        ((ROWS, 1000), 1.0, "stock"),
        ((ROWS - 1, 1000), 0.01, "dense"),
    ],
    ids=["sparse-enough", "too-dense", "full", "too-small"],
)
def test_export_computes_dense_where_sparse_kernels_cannot_win(
    shape, density, expected
):
    model = keras.Sequential([keras.Input((shape[0],)), MaskedDense(shape[1])])
    mask = np.zeros(shape, "float32")
    mask.reshape(-1)[: round(density * mask.size)] = 1
    model.layers[0].prune_to(mask)
    exported = export_sparse(model)
    layer = exported.layers[0]
    if expected == "stock":  # nothing pruned
        assert type(layer) is layers.Dense
    else:
        assert isinstance(layer, SparseDense)
        assert (layer.compute_path(1) == "dense") == (expected == "dense")
    x = np.random.default_rng(0).normal(size=(3, shape[0])).astype("float32")
    np.testing.assert_allclose(
        exported.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-4
    )


def test_export_sparse_refuses_unknown_compute():
    with pytest.raises(
        ValueError,
        match=r"^Expected `compute` to be one of "
        r"\['auto', 'tensorflow', 'dense', 'native', 'coo', 'csr'\]\. "
        r"Received: compute='fast'$",
    ):
        export_sparse(keras.Sequential([keras.Input((2,)), MaskedDense(1)]), "fast")


@pytest.mark.parametrize("compute", compute_paths("native", "csr"))
def test_sparse_model_runs_when_jit_compile_is_requested(compute):
    model = keras.Sequential([keras.Input((6,)), MaskedDense(4)])
    prune_randomly(model, density=0.05, seed=3)
    sparse = export_sparse(model, compute=compute)
    with pytest.warns(UserWarning, match="Model doesn't support `jit_compile=True`"):
        sparse.compile(loss="mse", jit_compile=True)
    x = np.ones((3, 6), "float32")
    np.testing.assert_allclose(
        sparse.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )
    sparse.compile(loss="mse")  # jit_compile="auto" resolves to False
    assert sparse.jit_compile is False


def test_without_the_native_kernel_only_larger_layers_pay_off(monkeypatch):
    lenet_300 = 784 * 300
    assert sparse_ops.pays_off(0.01, lenet_300) == native.available()
    monkeypatch.setattr(native, "available", lambda: False)
    assert not sparse_ops.pays_off(0.01, lenet_300)
    assert sparse_ops.pays_off(0.01, 3136 * 1024)


@pytest.mark.parametrize("compute", compute_paths("auto", "native", "coo", "csr"))
def test_mixed_precision_export_serves_at_batch_1_5_and_130(compute):
    policy = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        dense = keras.Sequential(
            [keras.Input((40,)), layers.Dense(30, name="fc"), layers.Dense(3)]
        )
    finally:
        keras.mixed_precision.set_dtype_policy(policy)
    masked = make_prunable(dense)
    prune_randomly(masked, density=0.1)
    sparse = export_sparse(masked, compute=compute)
    if compute != "auto":  # "auto" keeps layers this small Dense
        assert sparse.get_layer("fc").compute_path(5) == compute
    for batch in (1, 5, 130):
        x = np.random.default_rng(batch).normal(size=(batch, 40)).astype("float32")
        expected = masked.predict(x, verbose=0)
        served = sparse.predict(x, verbose=0, batch_size=batch)
        assert served.dtype == expected.dtype == np.float16
        # Both round inputs and weights to float16; their sums differ in order.
        np.testing.assert_allclose(served, expected, rtol=1e-2, atol=1e-2)


SERVE_WITHOUT_KERAS_PRUNE = """
    import sys
    import numpy as np
    import tensorflow as tf

    served = tf.saved_model.load(sys.argv[1])
    function = served.signatures["serve"]
    graph = function.graph.as_graph_def()
    kinds = {node.op for node in graph.node}
    kinds |= {node.op for f in graph.library.function for node in f.node_def}
    x = np.load(sys.argv[2])
    outputs = [
        list(function(tf.constant(x[:rows])).values())[0].numpy()
        for rows in (1, 64)
    ]
    np.savez(sys.argv[3], one=outputs[0], many=outputs[1])
    print(sorted(kinds))
    print([name for name in sys.modules if name.startswith("keras_prune")])
"""


def test_tensorflow_compute_is_served_by_plain_tensorflow_and_stays_sparse(tmp_path):
    import subprocess
    import sys
    import textwrap

    dense = keras.Sequential(
        [keras.Input((3136,)), layers.Dense(1024, name="fc1"), layers.Dense(10)]
    )
    masked = make_prunable(dense)
    mask = np.random.default_rng(0).random((3136, 1024)) < 0.01
    masked.get_layer("fc1").prune_to(mask)
    exported = export_sparse(masked, compute="tensorflow")
    fc1 = exported.get_layer("fc1")
    assert [fc1.compute_path(b) for b in (1, 256, None)] == ["coo", "csr", "auto"]
    exported.export(str(tmp_path / "served"), verbose=False)
    x = np.random.default_rng(1).normal(size=(64, 3136)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(SERVE_WITHOUT_KERAS_PRUNE),
            str(tmp_path / "served"),
            str(tmp_path / "x.npy"),
            str(tmp_path / "out.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    kinds, imported = result.stdout.splitlines()[-2:]
    assert imported == "[]"
    # Batch sizes unknown in the signature: COO or CSR chosen at run time.
    assert "SparseTensorDenseMatMul" in kinds and "SparseMatrixMatMul" in kinds
    assert "KerasPruneSparseMatMul" not in kinds
    outputs = np.load(tmp_path / "out.npz")
    expected = masked.predict(x, verbose=0)
    np.testing.assert_allclose(outputs["one"], expected[:1], atol=1e-4)
    np.testing.assert_allclose(outputs["many"], expected, atol=1e-4)


def test_converters_drop_variational_dropout_and_leave_the_input_alone():
    import keras_prune as kp

    model = kp.make_prunable(convnet())
    kp.add_variational_dropout(model, examples=64)
    for layer in kp.masked_layers(model):
        shape = tuple(layer.kernel.shape)
        keep = (np.arange(np.prod(shape)) % 3 != 0).reshape(shape)
        layer.prune_to(keep.astype("float32"))
    x = np.random.default_rng(0).normal(size=(2, *model.input_shape[1:]))
    x = x.astype("float32")
    expected = ops.convert_to_numpy(model(x))
    for converted in (kp.strip_pruning(model), kp.export_sparse(model)):
        assert not any("log_sigma2" in v.path for v in converted.weights)
        np.testing.assert_allclose(
            ops.convert_to_numpy(converted(x)), expected, rtol=1e-4, atol=1e-5
        )
    assert all(
        hasattr(layer, "variational_dropout") for layer in kp.masked_layers(model)
    )
