"""keras-hub models through the whole pipeline, one of each kind: an
encoder (BERT), decoders with grouped-query attention (Llama, Gemma), an
encoder-decoder (BART), a mixture of experts (Mixtral), task models
(GPT2CausalLM, ViTImageClassifier), a bare backbone and a convolutional one
(ResNet). Each is made prunable, pruned in `fit`,
saved and loaded with its masks, exported and stripped with its outputs
kept. keras-hub is a test dependency; tiny configurations, random weights."""

import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest

import keras_prune as kp
from tests.backend_utils import BACKEND, to_numpy

keras_hub = pytest.importorskip("keras_hub")
models = keras_hub.models

VOCAB, LENGTH = 64, 8


def tokens(n=4, prefix=""):
    rng = np.random.default_rng(0)
    return {
        f"{prefix}token_ids": rng.integers(1, VOCAB, (n, LENGTH)).astype("int32"),
        f"{prefix}padding_mask": np.ones((n, LENGTH), "int32"),
    }


def bert():
    backbone = models.BertBackbone(
        vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=LENGTH,
    )  # fmt: skip
    x = {**tokens(), "segment_ids": np.zeros((4, LENGTH), "int32")}
    return with_head(backbone, "pooled_output"), x


def llama():
    backbone = models.LlamaBackbone(
        vocabulary_size=VOCAB, num_layers=2, num_query_heads=4,
        num_key_value_heads=2, hidden_dim=16, intermediate_dim=32,
    )  # fmt: skip
    return with_head(backbone), tokens()


def bart():
    backbone = models.BartBackbone(
        vocabulary_size=VOCAB, num_layers=1, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=LENGTH,
    )  # fmt: skip
    x = {**tokens(prefix="encoder_"), **tokens(prefix="decoder_")}
    return with_head(backbone, "decoder_sequence_output"), x


def mixtral():
    backbone = models.MixtralBackbone(
        vocabulary_size=VOCAB, num_layers=1, num_query_heads=4,
        num_key_value_heads=2, hidden_dim=16, intermediate_dim=32,
        num_experts=4, top_k=2,
    )  # fmt: skip
    return with_head(backbone), tokens()


def gpt2_causal_lm():
    backbone = models.GPT2Backbone(
        vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=LENGTH,
    )  # fmt: skip
    return models.GPT2CausalLM(backbone=backbone, preprocessor=None), tokens()


def gpt2_backbone():
    return models.GPT2Backbone(
        vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=LENGTH,
    ), tokens()  # fmt: skip


def gemma():
    backbone = models.GemmaBackbone(
        vocabulary_size=VOCAB, num_layers=1, num_query_heads=2,
        num_key_value_heads=1, hidden_dim=16, intermediate_dim=32, head_dim=8,
    )  # fmt: skip
    return with_head(backbone), tokens()


def gemma3():
    # Its own RMSNormalization, not the one Gemma has: two library classes of
    # one name, which must not take each other's masked or compact class.
    backbone = models.Gemma3Backbone(
        vocabulary_size=VOCAB, num_layers=1, num_query_heads=2,
        num_key_value_heads=1, hidden_dim=16, intermediate_dim=32, head_dim=8,
        image_size=16, vision_encoder=None,
    )  # fmt: skip
    return with_head(backbone), tokens()


def vit():
    backbone = models.ViTBackbone(
        image_shape=(16, 16, 3), patch_size=8, num_layers=1, num_heads=2,
        hidden_dim=16, mlp_dim=32,
    )  # fmt: skip
    x = np.random.default_rng(0).random((4, 16, 16, 3)).astype("float32")
    return models.ViTImageClassifier(backbone, num_classes=2, preprocessor=None), x


def resnet():
    backbone = models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 16], stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2], block_type="basic_block",
        image_shape=(16, 16, 3),
    )  # fmt: skip
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.GlobalAveragePooling2D()(backbone(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
    return model, np.random.default_rng(0).random((4, 16, 16, 3)).astype("float32")


def with_head(backbone, output=None):
    """The backbone under a small classification head, as a user adds one."""
    x = backbone(backbone.input)
    if output is not None:
        x = x[output]
    if len(x.shape) == 3:
        x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(backbone.input, keras.layers.Dense(2, name="head")(x))


KINDS = {
    "encoder BERT": bert,
    "decoder with GQA Llama": llama,
    "encoder-decoder BART": bart,
    "mixture of experts Mixtral": mixtral,
    "task GPT2CausalLM": gpt2_causal_lm,
    "bare backbone GPT2": gpt2_backbone,
    "decoder Gemma": gemma,
    "decoder Gemma3 after Gemma": gemma3,
    "vision ViTImageClassifier": vit,
    "convnet ResNetBackbone": resnet,
}


def outputs(model, x):
    y = model(x, training=False)
    if isinstance(y, dict):
        y = y[sorted(y)[0]]
    return to_numpy(y)


def mask_counts(model):
    # Unnamed sublayers (the experts' block) get new numbered names on load.
    return sorted(
        (type(layer).__name__, key, int(np.count_nonzero(to_numpy(mask))))
        for layer in kp.masked_layers(model)
        for key, mask in layer.masks.items()
    )


def pruned_model(make):
    keras.utils.set_random_seed(0)
    stock, x = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # normalization layers left: by design
        masked = kp.make_prunable(stock)
    return stock, masked, x


@pytest.mark.parametrize("make", KINDS.values(), ids=KINDS.keys())
def test_keras_hub_model_prunes_saves_loads_and_exports(make, tmp_path):
    stock, masked, x = pruned_model(make)
    trainable = sum(int(np.prod(v.shape)) for v in stock.trainable_weights)
    covered = sum(
        int(np.prod(w.shape))
        for layer in kp.masked_layers(masked)
        for w in layer.prunable_weights.values()
    )
    assert covered / trainable >= 0.9  # all but biases and normalization
    np.testing.assert_array_equal(outputs(masked, x), outputs(stock, x))
    target = outputs(stock, x)
    if isinstance(masked, keras_hub.models.CausalLM):
        masked.compile(keras.optimizers.Adam(1e-3))  # the task's own loss
        y = x["token_ids"]
    else:
        masked.compile(keras.optimizers.Adam(1e-3), "mse")
        y = np.zeros_like(target)
    masked.fit(
        x, y, epochs=2, batch_size=2, verbose=0,
        callbacks=[kp.IterativePruningCallback(final_sparsity=0.5)],
    )  # fmt: skip
    assert kp.sparsity_summary(masked).sparsity == pytest.approx(0.5, abs=0.01)
    expected = outputs(masked, x)

    masked.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert type(loaded) is type(masked)
    assert mask_counts(loaded) == mask_counts(masked)
    np.testing.assert_array_equal(outputs(loaded, x), expected)
    if BACKEND != "tensorflow":
        return  # export_sparse is TensorFlow code
    stripped = kp.strip_pruning(masked)
    assert not kp.masked_layers(stripped)
    np.testing.assert_allclose(outputs(stripped, x), expected, rtol=1e-5, atol=1e-6)
    exported = kp.export_sparse(masked)
    np.testing.assert_allclose(outputs(exported, x), expected, rtol=1e-5, atol=1e-6)
    exported.save(tmp_path / "exported.keras")
    again = keras.models.load_model(tmp_path / "exported.keras")
    np.testing.assert_allclose(outputs(again, x), expected, rtol=1e-5, atol=1e-6)
    assert (tmp_path / "exported.keras").stat().st_size < (
        tmp_path / "model.keras"
    ).stat().st_size


LOAD_IN_NEW_PROCESS = """
import sys
import numpy as np
{imports}
import keras
data = np.load(sys.argv[2])
model = keras.models.load_model(sys.argv[1])
x = {{k: data[k] for k in data.files if k != "expected"}}
y = keras.ops.convert_to_numpy(model(x, training=False))
print(type(model).__name__, float(np.abs(y - data["expected"]).max()))
"""


@pytest.mark.parametrize(
    "imports",
    ["import keras_prune\nimport keras_hub", "import keras_hub\nimport keras_prune"],
    ids=["keras_prune first", "keras_hub first"],
)
def test_pruned_causal_lm_loads_in_a_new_process(imports, tmp_path):
    _, masked, x = pruned_model(gpt2_causal_lm)
    for layer in kp.masked_layers(masked):
        mask = np.zeros(tuple(layer.masks[next(iter(layer.masks))].shape))
        mask.flat[::2] = 1
        layer.prune_to({next(iter(layer.masks)): mask})
    masked.save(tmp_path / "model.keras")
    np.savez(tmp_path / "data.npz", expected=outputs(masked, x), **x)
    done = subprocess.run(
        [sys.executable, "-c", LOAD_IN_NEW_PROCESS.format(imports=imports),
         str(tmp_path / "model.keras"), str(tmp_path / "data.npz")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    name, difference = done.stdout.split()[-2:]
    assert name.startswith("Masked") and name.endswith("_GPT2CausalLM")
    assert difference == "0.0"


def test_frozen_backbone_is_left_unpruned_and_named():
    backbone = models.GPT2Backbone(
        vocabulary_size=VOCAB, num_layers=1, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=LENGTH,
    )  # fmt: skip
    backbone.trainable = False
    model = with_head(backbone)
    with pytest.warns(UserWarning, match=r"frozen layer\(s\) \(trainable=False"):
        masked = kp.make_prunable(model)
    assert [layer.name for layer in kp.masked_layers(masked)] == ["head"]
    report = kp.conversion_report(masked)
    frozen = [e for e in report.left if e.reason.startswith("frozen")]
    # token and position embeddings, 4 attention and 2 feed-forward kernels
    assert len(frozen) == 8


@pytest.mark.skipif(BACKEND != "tensorflow", reason="LiteRT export needs TensorFlow")
def test_keras_hub_models_export_to_litert(tmp_path):
    # BERT under a head: three inputs by name, its Dense kernels stored sparse.
    _, masked, x = pruned_model(bert)
    for layer in kp.masked_layers(masked):
        key = next(iter(layer.masks))
        mask = np.zeros(tuple(layer.masks[key].shape))
        mask.flat[::10] = 1
        layer.prune_to({key: mask})
    report = kp.export_litert(masked, tmp_path / "bert.tflite", sample=x, compare=False)
    assert report.max_error < 1e-5
    assert sum(w.storage != "dense" for w in report.weights) >= 10
    # GPT2CausalLM: the converter's sparsity pass fails on the sparse
    # embedding tied to the output projection; the file is dense, said so.
    _, masked, x = pruned_model(gpt2_causal_lm)
    layer = masked.backbone.token_embedding
    layer.prune_to({"embeddings": np.eye(VOCAB, 16)})
    with pytest.warns(UserWarning, match="stores every weight dense"):
        report = kp.export_litert(
            masked, tmp_path / "lm.tflite", sample=x, compare=False
        )
    assert report.max_error < 1e-5


def test_stripped_backbone_round_trips_through_a_keras_hub_preset(tmp_path):
    # How keras-hub users share models: save_to_preset, then from_preset.
    _, masked, x = pruned_model(gpt2_backbone)
    for layer in kp.masked_layers(masked):
        key = next(iter(layer.masks))
        mask = np.zeros(tuple(layer.masks[key].shape))
        mask.flat[::3] = 1
        layer.prune_to({key: mask})
    stripped = kp.strip_pruning(masked)
    assert type(stripped) is models.GPT2Backbone
    stripped.save_to_preset(str(tmp_path / "preset"))
    shared = models.Backbone.from_preset(str(tmp_path / "preset"))
    assert type(shared) is models.GPT2Backbone

    def zeros(model):
        return sum(int(np.sum(to_numpy(w) == 0)) for w in model.weights)

    assert zeros(shared) == zeros(stripped) > 0.6 * sum(
        int(np.prod(w.shape)) for layer in kp.masked_layers(masked)
        for w in layer.prunable_weights.values()
    )  # fmt: skip
    np.testing.assert_array_equal(outputs(shared, x), outputs(masked, x))


def test_a_causal_lm_with_its_tokenizer_prunes_on_text_and_generates_alike(tmp_path):
    # A task with its preprocessor, trained on raw strings as keras-hub
    # users do; its tokenizer's files travel in the `.keras` file and preset.
    vocabulary = {"<|endoftext|>": 0, "a": 1, "b": 2, "Ġ": 3, "ab": 4, "Ġa": 5}
    tokenizer = models.GPT2Tokenizer(vocabulary=vocabulary, merges=["a b", "Ġ a"])
    backbone = models.GPT2Backbone(
        vocabulary_size=len(vocabulary), num_layers=1, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=LENGTH,
    )  # fmt: skip
    preprocessor = models.GPT2CausalLMPreprocessor(tokenizer, sequence_length=LENGTH)
    stock = models.GPT2CausalLM(backbone, preprocessor=preprocessor)
    stock.compile(keras.optimizers.Adam(1e-3), sampler="greedy")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the copy is compiled
        masked = kp.make_prunable(stock, verbose=False)
    assert type(masked.preprocessor) is models.GPT2CausalLMPreprocessor
    assert masked.compiled and isinstance(masked.optimizer, keras.optimizers.Adam)
    assert (
        type(masked.sampler) is type(stock.sampler) is keras_hub.samplers.GreedySampler
    )
    texts = ["a b ab", "b a", "ab ab a", "a"] * 2
    masked.fit(
        texts, epochs=2, batch_size=2, verbose=0,
        callbacks=[kp.IterativePruningCallback(final_sparsity=0.5)],
    )  # fmt: skip
    assert kp.sparsity_summary(masked).sparsity == pytest.approx(0.5, abs=0.01)

    def generated(model):
        model.compile(sampler="greedy")  # the same sampler everywhere
        return model.generate(["a b"], max_length=LENGTH)

    expected = generated(masked)
    masked.save(tmp_path / "lm.keras")
    assert generated(keras.models.load_model(tmp_path / "lm.keras")) == expected
    stripped = kp.strip_pruning(masked)
    assert generated(stripped) == expected
    stripped.save_to_preset(str(tmp_path / "preset"))
    assert generated(models.CausalLM.from_preset(str(tmp_path / "preset"))) == expected
    if BACKEND == "tensorflow":  # export_sparse is TensorFlow code
        assert generated(kp.export_sparse(masked)) == expected
