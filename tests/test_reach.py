"""`make_prunable`, the callback and the summary on every kind of model:
each situation of the "prune any model" issue, with its right value."""

import warnings

import keras
import numpy as np
import pytest

import keras_prune as kp
from tests.backend_utils import to_numpy

L = keras.layers


def mask_counts(model):
    # Sublayers that a custom layer makes get new automatic names on load.
    return sorted(
        (type(layer).__name__, key, int(np.count_nonzero(to_numpy(mask))))
        for layer, key, _, mask in kp.masking.iter_masked_weights(model)
    )


def assert_round_trip(model, x, tmp_path):
    """A `.keras` file restores every mask and the same outputs."""
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert mask_counts(loaded) == mask_counts(model)
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )
    return loaded


def masked_share(model):
    """Fraction of the trainable parameters that the masks cover."""
    masked = sum(
        int(np.prod(v.shape))
        for layer in kp.masked_layers(model)
        for v in layer.prunable_weights.values()
    )
    return masked / sum(int(np.prod(v.shape)) for v in model.trainable_weights)


def fit_pruned(model, x, y, sparsity=0.8, epochs=2, **kwargs):
    model.compile(keras.optimizers.Adam(1e-3), kwargs.pop("loss", "mse"))
    callback = kp.IterativePruningCallback(final_sparsity=sparsity, **kwargs)
    return model.fit(x, y, epochs=epochs, batch_size=8, verbose=0, callbacks=[callback])


@keras.saving.register_keras_serializable(package="tests")
class TransformerBlock(L.Layer):
    """The keras.io text-classification block: attention and feed-forward
    as sublayers of a custom layer."""

    def __init__(self, dim=8, heads=2, hidden=16, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.heads, self.hidden = dim, heads, hidden
        self.attention = L.MultiHeadAttention(heads, dim // heads)
        self.ffn = keras.Sequential([L.Dense(hidden, activation="relu"), L.Dense(dim)])
        self.norm1 = L.LayerNormalization()
        self.norm2 = L.LayerNormalization()

    def call(self, x):
        x = self.norm1(x + self.attention(x, x))
        return self.norm2(x + self.ffn(x))

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "heads": self.heads,
                "hidden": self.hidden}  # fmt: skip


def tokens(n=16, length=6, vocab=50):
    return np.random.default_rng(0).integers(0, vocab, size=(n, length))


def transformer(custom_block):
    inputs = keras.Input((6,), dtype="int32")
    x = L.Embedding(50, 8)(inputs)
    if custom_block:
        x = TransformerBlock()(x)
    else:
        x = L.LayerNormalization()(x + L.MultiHeadAttention(2, 4)(x, x))
        x = L.LayerNormalization()(x + L.Dense(8)(L.Dense(16, activation="relu")(x)))
    outputs = L.Dense(2)(L.GlobalAveragePooling1D()(x))
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("custom_block", [False, True], ids=["functional", "custom"])
def test_transformer_is_pruned_through_attention_and_custom_layers(
    custom_block, tmp_path
):
    model = kp.make_prunable(transformer(custom_block), verbose=False)
    # Everything but biases and the normalization weights: 92% here.
    assert masked_share(model) > 0.9
    history = fit_pruned(model, tokens(), np.zeros((16, 2)))
    summary = kp.sparsity_summary(model)
    assert summary.sparsity == pytest.approx(0.8, abs=0.01)
    assert any("query" in name for name in history.history if "sparsity/" in name)
    # The attention projections are made by MultiHeadAttention.build, the
    # block's sublayers by its constructor: both come back masked.
    assert_round_trip(model, tokens(), tmp_path)


def test_embedding_lstm_classifier_is_pruned(tmp_path):
    model = keras.Sequential(
        [keras.Input((6,)), L.Embedding(50, 8), L.LSTM(8, name="lstm"), L.Dense(2)]
    )
    model = kp.make_prunable(model)
    assert masked_share(model) > 0.9
    fit_pruned(model, tokens(), np.zeros((16, 2)))
    rows = {row.name: row for row in kp.sparsity_summary(model).rows}
    assert set(rows) >= {"lstm/kernel", "lstm/recurrent_kernel"}
    assert rows["lstm/recurrent_kernel"].sparsity == pytest.approx(0.8, abs=0.01)
    assert_round_trip(model, tokens(), tmp_path)


def test_bidirectional_and_time_distributed_inner_layers_are_masked(tmp_path):
    model = keras.Sequential(
        [
            keras.Input((5, 8)),
            L.Bidirectional(L.GRU(16, return_sequences=True)),
            L.TimeDistributed(L.Dense(2, name="per_step")),
        ]
    )
    prunable = kp.make_prunable(model)
    names = [type(layer).__name__ for layer in kp.masked_layers(prunable)]
    assert names.count("MaskedGRU") == 2 and "MaskedDense" in names
    assert masked_share(prunable) > 0.9
    x = np.random.default_rng(0).normal(size=(8, 5, 8))
    np.testing.assert_array_equal(
        prunable.predict(x, verbose=0), model.predict(x, verbose=0)
    )
    fit_pruned(prunable, x, np.zeros((8, 5, 2)))
    assert kp.sparsity_summary(prunable).sparsity == pytest.approx(0.8, abs=0.01)
    assert_round_trip(prunable, x, tmp_path)


def test_naming_a_layer_inside_a_wrapper_converts_it():
    model = keras.Sequential(
        [keras.Input((5, 3)), L.TimeDistributed(L.Dense(2, name="inner"))]
    )
    prunable = kp.make_prunable(model, layers=["inner"])
    assert [layer.name for layer in kp.masked_layers(prunable)] == ["inner"]


def test_einsum_dense_only_model_trains_and_prunes():
    model = keras.Sequential(
        [
            keras.Input((4,)),
            L.EinsumDense("ab,bc->ac", 40),
            L.EinsumDense("ab,bc->ac", 1),
        ]
    )
    model = kp.make_prunable(model)
    history = fit_pruned(model, np.ones((16, 4)), np.ones((16, 1)))
    assert kp.sparsity_summary(model).sparsity == pytest.approx(0.8, abs=0.01)
    assert len([k for k in history.history if k.startswith("sparsity/")]) == 2


class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.embedding = L.Embedding(50, 8)
        self.conv = L.Conv1D(8, 3, activation="relu")
        self.pool = L.GlobalMaxPooling1D()
        self.head = L.Dense(2)

    def call(self, x):
        return self.head(self.pool(self.conv(self.embedding(x))))


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_subclassed_model_is_pruned_saved_and_stripped(inplace, tmp_path):
    model = Subclassed()
    x = tokens()
    expected = model.predict(x, verbose=0)
    prunable = kp.make_prunable(model, inplace=inplace)
    assert (prunable is model) == inplace
    assert masked_share(prunable) > 0.9
    np.testing.assert_allclose(prunable.predict(x, verbose=0), expected, atol=1e-6)
    fit_pruned(prunable, x, np.zeros((16, 2)))
    assert kp.sparsity_summary(prunable).sparsity == pytest.approx(0.8, abs=0.01)
    assert type(prunable).__name__ == "MaskedSubclassed"
    assert_round_trip(prunable, x, tmp_path)
    stripped = kp.strip_pruning(prunable)
    assert not kp.masked_layers(stripped)
    assert type(stripped).__name__ == "Subclassed"
    np.testing.assert_allclose(
        stripped.predict(x, verbose=0), prunable.predict(x, verbose=0), atol=1e-6
    )
    # Exported: stock computation, compact storage of every pruned weight.
    exported = kp.export_sparse(prunable)
    assert type(exported).__name__ == "CompactSubclassed"
    assert not exported.compiled  # no optimizer state goes into its file
    assert [type(layer).__name__ for layer in exported._flatten_layers()][1:] == [
        "CompactEmbedding", "CompactConv1D", "GlobalMaxPooling1D", "CompactDense"
    ]  # fmt: skip
    np.testing.assert_allclose(
        exported.predict(x, verbose=0), prunable.predict(x, verbose=0), atol=1e-6
    )
    exported.save(tmp_path / "exported.keras")
    loaded = keras.models.load_model(tmp_path / "exported.keras")
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), exported.predict(x, verbose=0)
    )


def test_export_sparse_says_which_dense_layers_cannot_run_sparse_kernels():
    if keras.backend.backend() != "tensorflow":
        pytest.skip("off TensorFlow, export_sparse first names the backend")
    model = kp.make_prunable(Subclassed())
    model.predict(tokens(), verbose=0)
    model.head.prune_to(np.eye(8, 2))
    with pytest.warns(
        UserWarning,
        match=r"^export_sparse stores \['dense(_\d+)?'\] compactly but computes "
        r"them dense: SparseDense replaces layers of a Sequential or Functional "
        r"graph, not layers inside wrappers, custom layers or subclassed models\.$",
    ):
        exported = kp.export_sparse(model, compute="coo")
    np.testing.assert_allclose(
        exported.predict(tokens(), verbose=0),
        model.predict(tokens(), verbose=0),
        atol=1e-6,
    )


def test_sequential_without_input_is_pruned_once_built():
    model = kp.make_prunable(keras.Sequential([L.Dense(8), L.Dense(2)]))
    history = fit_pruned(model, np.ones((16, 4)), np.ones((16, 2)), sparsity=0.5)
    assert history.history["sparsity/" + model.layers[0].name][-1] == 0.5


def my_activation(x):
    return keras.ops.relu(x) * 2.0


def my_loss(y_true, y_pred):
    return keras.ops.mean(keras.ops.abs(y_true - y_pred))


def test_unregistered_activation_and_loss_need_no_registration():
    model = keras.Sequential(
        [keras.Input((4,)), L.Dense(3, activation=my_activation), L.Dense(1)]
    )
    model.compile("adam", my_loss)
    prunable = kp.make_prunable(model)
    assert prunable.layers[0].activation is my_activation
    assert prunable.loss is my_loss
    prunable.fit(np.ones((8, 4)), np.ones((8, 1)), verbose=0)


def test_a_target_that_would_empty_a_layer_keeps_one_weight_and_says_so():
    model = kp.make_prunable(
        keras.Sequential([keras.Input((40,)), L.Dense(1, name="fc")])
    )
    with pytest.warns(
        UserWarning,
        match=r"^A sparsity of 0\.99 would prune all 40 weights of 'fc' \(kernel\); "
        r"keeping its largest one\.$",
    ):
        history = fit_pruned(
            model, np.ones((8, 40)), np.ones((8, 1)), sparsity=0.99, schedule="constant"
        )
    # round(0.99 * 40) = 40 would empty it: 39 pruned, 1 kept.
    assert history.history["sparsity/fc"] == [39 / 40, 39 / 40]


class Gate(L.Layer):
    """A custom layer with a weight of its own and no pruning rule."""

    def build(self, input_shape):
        self.gate = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.gate


def test_make_prunable_reports_what_it_left():
    model = keras.Sequential(
        [
            keras.Input((4, 4, 1)),
            L.Conv2D(2, 3),
            L.BatchNormalization(name="bn"),
            L.Flatten(),
            Gate(name="gate"),
            L.Dense(2, name="fc"),
        ]  # fmt: skip
    )
    with pytest.warns(
        UserWarning,
        match=r"^make_prunable left 1 layer\(s\) with trainable weights unmasked:\n"
        r"  gate \(Gate, 8 weights\): no pruning rule for Gate: give it a "
        r"`get_prunable_weights\(\)` method$",
    ):
        prunable = kp.make_prunable(model)
    report = kp.conversion_report(prunable)
    assert [(e.name, e.status) for e in report.entries][1:] == [
        ("bn", "left"),
        ("gate", "left"),
        ("fc", "already masked"),
    ]
    assert "normalization weights are not pruned" in str(report)


def test_shared_layer_is_masked_once():
    shared = L.Dense(3, name="shared")
    a, b = keras.Input((3,)), keras.Input((3,))
    model = keras.Model([a, b], shared(a) + shared(b))
    prunable = kp.make_prunable(model)
    assert [layer.name for layer in kp.masked_layers(prunable)] == ["shared"]


def test_input_model_is_never_touched_on_any_backend():
    model = keras.Sequential([keras.Input((3,)), L.Dense(2)])
    model.compile("adam", "mse")
    before = to_numpy(model.layers[0].kernel).copy()
    prunable = kp.make_prunable(model)
    prunable.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0)
    # On JAX the copy must own its buffers: the input still predicts.
    model.predict(np.ones((1, 3)), verbose=0)
    np.testing.assert_array_equal(to_numpy(model.layers[0].kernel), before)
    assert type(model.layers[0]) is L.Dense


def test_strip_pruning_gives_stock_layers_ready_to_quantize():
    model = kp.make_prunable(keras.Sequential([keras.Input((8,)), L.Dense(4)]))
    mask = np.zeros((8, 4), "float32")
    mask[::2] = 1
    model.layers[0].prune_to(mask)
    stripped = kp.strip_pruning(model)
    assert type(stripped.layers[0]) is L.Dense
    assert kp.masked_layers(model)  # the input is untouched
    np.testing.assert_array_equal(to_numpy(stripped.layers[0].kernel)[1::2], 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stripped.quantize("int8")
    assert stripped.layers[0].quantization_mode == "int8"


FRESH_PROCESS = """
import sys
import keras, numpy as np
import keras_prune as kp
model = keras.models.load_model(sys.argv[1])
print(len(kp.masked_layers(model)))
"""


def test_a_new_process_loads_masked_stock_layers_without_registering(tmp_path):
    import subprocess
    import sys

    model = kp.make_prunable(transformer(custom_block=False), verbose=False)
    model.save(tmp_path / "model.keras")
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "model.keras")],
        capture_output=True,
        text=True,
        check=True,
    )
    # Embedding, 4 attention projections, 3 Dense.
    assert result.stdout.split()[-1] == str(len(kp.masked_layers(model))) == "8"


def test_stripped_model_trains_and_subclasses_strip_to_the_stock_class():
    class MyDense(kp.MaskedDense):
        pass

    model = kp.make_prunable(keras.Sequential([keras.Input((4,)), L.Dense(3)]))
    extra = keras.Sequential([keras.Input((3,)), MyDense(2)])
    stripped = kp.strip_pruning(keras.Sequential([model, extra]))
    assert not kp.masked_layers(stripped)
    assert type(stripped.layers[1].layers[0]) is L.Dense
    stripped.compile("sgd", "mse")
    stripped.fit(np.ones((4, 4)), np.ones((4, 2)), verbose=0)


class Heads(L.Layer):
    """Sublayers in a dict attribute."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.heads = {"a": L.Dense(3), "b": L.Dense(3)}

    def call(self, x):
        return self.heads["a"](x) + self.heads["b"](x)


def test_sublayers_held_in_a_dict_come_back_masked(tmp_path):
    kp.masked_class(Heads)  # as a new process would, before loading
    model = kp.make_prunable(keras.Sequential([keras.Input((4,)), Heads()]))
    for layer in kp.masked_layers(model):
        layer.prune_to(np.eye(4, 3))
    assert len(kp.masked_layers(model)) == 2
    assert_round_trip(model, np.random.default_rng(0).normal(size=(3, 4)), tmp_path)


def test_summary_counts_a_recurrent_layer_once():
    model = kp.make_prunable(
        keras.Sequential([keras.Input((5, 3)), L.LSTM(4, name="lstm")])
    )
    assert [row.name for row in kp.sparsity_summary(model).rows] == [
        "lstm/kernel",
        "lstm/recurrent_kernel",
    ]
    stock = keras.Sequential([keras.Input((5, 3)), L.LSTM(4, name="plain")])
    assert len(kp.sparsity_summary(stock).rows) == 2


@pytest.mark.parametrize(
    ("fit_kwargs", "model_input"),
    [
        ({}, False),  # built by its first batch
        ({"initial_epoch": 1}, True),
        ({}, True),
    ],
    ids=["unbuilt", "initial-epoch", "steps-per-execution"],
)
def test_step_unit_reaches_the_target_at_the_last_step(
    fit_kwargs, model_input, request
):
    layers = [L.Dense(8, name="fc"), L.Dense(2)]
    model = keras.Sequential(([keras.Input((4,))] if model_input else []) + layers)
    model = kp.make_prunable(model)
    spe = 4 if request.node.callspec.id == "steps-per-execution" else 1
    if spe > 1 and keras.backend.backend() == "torch":
        pytest.skip("Keras's PyTorch trainer runs one step per execution")
    model.compile("adam", "mse", steps_per_execution=spe)
    callback = kp.IterativePruningCallback(0.5, unit="step")
    model.fit(
        np.ones((64, 4)), np.ones((64, 2)), batch_size=8, epochs=2, verbose=0,
        callbacks=[callback], **fit_kwargs,
    )  # fmt: skip
    assert model.get_layer("fc").sparsity == 0.5


def test_a_masked_layer_never_built_is_named_and_the_rest_pruned():
    class WithSpare(L.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.used = L.Dense(4, name="used")
            self.spare = L.Dense(4, name="spare")

        def call(self, x):
            return self.used(x)

    model = kp.make_prunable(keras.Sequential([WithSpare()]))
    model.compile("adam", "mse")
    with pytest.warns(UserWarning, match=r"^Masked layers \['spare'\] were not built"):
        model.fit(
            np.ones((16, 4)), np.ones((16, 4)), epochs=2, verbose=0,
            callbacks=[kp.IterativePruningCallback(0.5)],
        )  # fmt: skip
    used = [layer for layer in kp.masked_layers(model) if layer.name == "used"]
    assert used[0].sparsity == 0.5


def test_import_needs_no_tensorflow_off_the_tensorflow_backend():
    import subprocess
    import sys

    if keras.backend.backend() == "tensorflow":
        pytest.skip("checked in the JAX and PyTorch runs, whose venvs lack TensorFlow")
    code = "import sys, keras_prune; print('tensorflow' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.split()[-1] == "False"


def test_layers_sharing_a_name_are_told_apart_by_their_paths():
    inputs = keras.Input((4, 8))
    x = L.MultiHeadAttention(2, 4, name="first")(inputs, inputs)
    x = L.MultiHeadAttention(2, 4, name="second")(x, x)
    model = kp.make_prunable(keras.Model(inputs, x))
    history = fit_pruned(model, np.ones((8, 4, 8)), np.zeros((8, 4, 8)))
    keys = sorted(k for k in history.history if k.startswith("sparsity/"))
    assert len(keys) == 8 and "sparsity/first/query" in keys
    rows = [row.name for row in kp.sparsity_summary(model).rows]
    assert len(set(rows)) == 8 and "second/value" in rows


def test_make_prunable_wants_layer_names_not_layer_objects():
    model = keras.Sequential([keras.Input((2,)), L.Dense(1, name="fc")])
    with pytest.raises(TypeError, match=r"pass layer names, not layer objects"):
        kp.make_prunable(model, layers=[model.layers[0]])


def test_export_sparse_names_the_backend_for_a_sparse_kernel_off_tensorflow():
    if keras.backend.backend() == "tensorflow":
        pytest.skip("the TensorFlow backend runs every kernel")
    model = kp.make_prunable(keras.Sequential([keras.Input((2,)), L.Dense(1)]))
    with pytest.raises(
        RuntimeError,
        match=r"^export_sparse\(compute='coo'\) needs the TensorFlow backend of "
        r"Keras",
    ):
        kp.export_sparse(model, compute="coo")
    assert type(kp.export_sparse(model).layers[0]) is L.Dense  # nothing pruned
