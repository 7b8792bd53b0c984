"""keras_prune's whole pipeline on a zoo of real architectures, one row each.

Each row builds a stock model (keras.applications with `weights=None` at the
smallest input each accepts; keras-hub backbones and task models in tiny
configurations, randomly initialized; models as users write them) and a small
synthetic batch, then takes it through the pipeline and records, per step,
the number or `ok`, or `FAIL: <reason>` (a failing step never stops the
table; steps that need an earlier one say `n/a` when it failed):

- params: the stock model's trainable parameters;
- masked: the share of them that `make_prunable(model, verbose=False)` masks
  (where copying the model fails and the error says to convert in place, a
  twin of the stock model is converted with `inplace=True`, and the cell says
  so);
- before cut: max |masked - stock| of the outputs before any cut;
- sparsity: the fraction of masked weights that are zero after 2 epochs of
  `fit` with `IterativePruningCallback(final_sparsity=0.5)` (from the masks);
- .keras: a `.keras` round trip loaded and run in a fresh Python process:
  outputs bit-identical and the same number of kept weights per masked layer
  (`safe_mode=False` where Python lambdas need it, as in stock Keras; where it
  fails, the stock model's own round trip is tried, to tell keras_prune's
  failures from Keras's);
- export_sparse: outputs equal to the masked model's (max |diff| at most 1e-5
  of the largest output) before and after an in-process `.keras` round trip
  (where that fails and the stock model's own round trip fails too, the
  cell says so after `ok`);
- strip_pruning: outputs equal to the masked model's (`exact` when
  bit-identical);
- export_litert: a float `.tflite` file whose outputs on one example the
  export checks (where it fails, the stock model goes through the same
  conversion, TFLite builtin ops only, to tell keras_prune's limits from
  LiteRT's);
- shrink: outputs of `shrink(masked, sample=x[:4])` equal the masked model's
  (convolutional networks only), and the shrunk model's parameters as a
  fraction of the stock ones;
- train step: `train_on_batch` time of the masked model over the stock one
  (both compiled with Adam and the same loss; ratio of the medians of
  interleaved repetitions, `keras_prune.experiments.timing.time_interleaved`),
  with the stock step's median;
- seconds: the row's wall time.

Kinds of rows (`--kind`): convnet (keras.applications), encoder, decoder,
decoder-gqa (grouped-query attention), moe (mixture of experts),
encoder-decoder, vision-hub (keras-hub vision backbones and classifiers) and
user (subclassed, Sequential and Functional models with Python lambdas).

Rows print as soon as they are done. Runs on TensorFlow (LiteRT and the
fresh-process load need it); on 2 CPU cores a row of a tiny keras-hub model
takes about 20-30 s, a keras.applications row about 1-3 minutes.

Run: python benchmarks/zoo.py [--quick] [--models mobilenetv2,gpt2]
         [--kind convnet,decoder]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_prune as kp  # noqa: E402
from keras_prune.experiments.timing import time_interleaved  # noqa: E402

try:
    import keras_hub
except ImportError:  # the hub rows then fail with this reason
    keras_hub = None

L = keras.layers
TARGET = 0.5
VOCAB, LENGTH, HIDDEN = 100, 16, 32
TOLERANCE = 1e-5
KINDS = (
    "convnet", "encoder", "decoder", "decoder-gqa", "encoder-decoder", "moe",
    "vision-hub", "user",
)  # fmt: skip


# --- user code, as the Keras guides write it ----------------------------------


@keras.saving.register_keras_serializable(package="benchmarks")
class GuideMLP(keras.Model):
    """A subclassed model whose `__init__` takes no arguments."""

    def __init__(self):
        super().__init__()
        self.dense1 = L.Dense(32, activation="relu")
        self.dense2 = L.Dense(32, activation="relu")
        self.dense3 = L.Dense(4)

    def call(self, inputs):
        return self.dense3(self.dense2(self.dense1(inputs)))


def lambda_activation_sequential():
    return keras.Sequential(
        [
            keras.Input((16,)),
            L.Dense(32, activation=lambda t: (t + abs(t)) / 2),
            L.Dense(4),
        ]
    )


def lambda_layer_functional():
    inputs = keras.Input((16,))
    x = L.Dense(32, activation="relu")(inputs)
    x = L.Lambda(lambda t: t * 0.5, name="halve")(x)
    return keras.Model(inputs, L.Dense(4)(x))


# --- rows ---------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """One row: how to build the stock model and its synthetic data.

    `make(n, rng)` returns `(model, x, y, loss)`."""

    name: str
    kind: str
    make: Callable[[int, np.random.Generator], tuple[Any, Any, Any, Any]]
    shrinkable: bool = False


def logits_loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def application(constructor, size):
    def make(n, rng):
        model = constructor(
            input_shape=(size, size, 3),
            weights=None,
            classes=10,
            classifier_activation=None,
        )
        x = rng.random((n, size, size, 3)).astype("float32")
        return model, x, rng.integers(0, 10, n), logits_loss()

    return make


def hub():
    if keras_hub is None:
        raise ImportError("keras_hub is not installed")
    return keras_hub.models


def token_batch(backbone, n, rng):
    """Synthetic int32 inputs for every input of `backbone`, by its names."""
    x = {}
    for tensor in backbone.inputs:
        name = tensor.name
        if name.endswith("padding_mask"):
            x[name] = np.ones((n, LENGTH), "int32")
        elif name.endswith("segment_ids"):
            x[name] = np.zeros((n, LENGTH), "int32")
        else:
            x[name] = rng.integers(1, VOCAB, (n, LENGTH)).astype("int32")
    return x


def with_head(backbone, classes=2):
    """A Functional model: the backbone's inputs at a fixed length, its pooled
    (or mean-pooled decoder) output, and a Dense head."""
    inputs = {
        t.name: keras.Input((LENGTH,), dtype="int32", name=t.name)
        for t in backbone.inputs
    }
    out = backbone(inputs)
    if isinstance(out, dict):
        out = out.get("pooled_output", out.get("decoder_sequence_output"))
        if out is None:
            raise ValueError("backbone outputs have no known key")
    if len(out.shape) == 3:
        out = L.GlobalAveragePooling1D()(out)
    return keras.Model(inputs, L.Dense(classes, name="head")(out))


def text(build, head=True):
    def make(n, rng):
        backbone = build(hub())
        x = token_batch(backbone, n, rng)
        if not head:  # the bare backbone: its sequence output against zeros
            shape = backbone.output.shape
            return backbone, x, np.zeros((n, LENGTH, shape[-1]), "float32"), "mse"
        return with_head(backbone), x, rng.integers(0, 2, n), logits_loss()

    return make


def image_hub(build, classifier=None):
    def make(n, rng):
        models = hub()
        backbone = build(models)
        x = rng.random((n, 32, 32, 3)).astype("float32")
        if classifier is not None:
            task = getattr(models, classifier)
            model = task(backbone, num_classes=2, preprocessor=None)
        else:
            inputs = keras.Input((32, 32, 3))
            out = backbone(inputs)
            pool = L.GlobalAveragePooling2D if len(out.shape) == 4 else None
            out = (pool or L.GlobalAveragePooling1D)()(out)
            model = keras.Model(inputs, L.Dense(2, name="head")(out))
        return model, x, rng.integers(0, 2, n), logits_loss()

    return make


def user(build):
    def make(n, rng):
        x = rng.random((n, 16)).astype("float32")
        return build(), x, rng.integers(0, 4, n), logits_loss()

    return make


def causal_lm(n, rng):
    models = hub()
    backbone = gpt2(models)
    model = models.GPT2CausalLM(backbone, preprocessor=None)
    x = token_batch(backbone, n, rng)
    return model, x, rng.integers(1, VOCAB, (n, LENGTH)), logits_loss()


def bert_classifier(n, rng):
    models = hub()
    backbone = bert(models)
    model = models.BertTextClassifier(backbone, num_classes=2, preprocessor=None)
    return model, token_batch(backbone, n, rng), rng.integers(0, 2, n), logits_loss()


# Tiny configurations: 2 layers, hidden 32, vocabulary 100.
ENCODER = dict(
    vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=HIDDEN,
    intermediate_dim=64, max_sequence_length=32,
)  # fmt: skip
GQA = dict(
    vocabulary_size=VOCAB, num_layers=2, num_query_heads=4, num_key_value_heads=2,
    hidden_dim=HIDDEN, intermediate_dim=64,
)  # fmt: skip


def gpt2(m):
    return m.GPT2Backbone(**ENCODER)


def bert(m):
    return m.BertBackbone(**ENCODER)


def llama(m):
    return m.LlamaBackbone(**GQA)


def efficientnet(m):
    return m.EfficientNetBackbone(
        stackwise_kernel_sizes=[3, 3],
        stackwise_num_repeats=[1, 1],
        stackwise_input_filters=[16, 16],
        stackwise_output_filters=[16, 24],
        stackwise_expansion_ratios=[1, 4],
        stackwise_squeeze_and_excite_ratios=[0.0, 0.25],
        stackwise_strides=[1, 2],
        stackwise_block_types=["fused", "unfused"],
        stackwise_force_input_filters=[0, 0],
        stackwise_nores_option=[False, False],
        width_coefficient=1.0,
        depth_coefficient=1.0,
        # `num_features` stays at its default: keras-hub 0.32's `get_config`
        # leaves it out, so another value does not survive a copy or a
        # `.keras` round trip, stock or pruned.
        input_shape=(32, 32, 3),
    )


def mobilenet(m):
    return m.MobileNetBackbone(
        stackwise_expansion=[[32, 48]],
        stackwise_num_blocks=[2],
        stackwise_num_filters=[[16, 16]],
        stackwise_kernel_size=[[3, 3]],
        stackwise_num_strides=[[2, 1]],
        stackwise_se_ratio=[[None, 0.25]],
        stackwise_activation=[["relu", "hard_swish"]],
        stackwise_padding=[[1, 1]],
        output_num_filters=64,
        depthwise_filters=8,
        depthwise_stride=1,
        depthwise_residual=False,
        last_layer_filter=64,
        squeeze_and_excite=0.5,
        image_shape=(32, 32, 3),
    )


def resnet(m):
    return m.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 32],
        stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2],
        block_type="basic_block",
        image_shape=(32, 32, 3),
    )


def vit(m):
    return m.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=2,
        hidden_dim=HIDDEN, mlp_dim=64,
    )  # fmt: skip


def cases() -> list[Case]:
    apps = keras.applications
    convnets = [
        ("MobileNet", apps.MobileNet, 32),
        ("MobileNetV2", apps.MobileNetV2, 32),
        ("MobileNetV3Small", apps.MobileNetV3Small, 32),
        ("MobileNetV3Large", apps.MobileNetV3Large, 32),
        ("EfficientNetB0", apps.EfficientNetB0, 32),
        ("EfficientNetV2B0", apps.EfficientNetV2B0, 32),
        ("ResNet50", apps.ResNet50, 32),
        ("ResNet50V2", apps.ResNet50V2, 32),
        ("DenseNet121", apps.DenseNet121, 32),
        ("ConvNeXtTiny", apps.ConvNeXtTiny, 32),
        ("Xception", apps.Xception, 71),
        ("InceptionV3", apps.InceptionV3, 75),
        ("NASNetMobile", apps.NASNetMobile, 32),
        ("VGG16", apps.VGG16, 32),
    ]
    rows = [
        Case(f"{name} {size}x{size}", "convnet", application(f, size), True)
        for name, f, size in convnets
    ]
    rows += [
        Case("GPT2Backbone + head", "decoder", text(gpt2)),
        Case("GPT2Backbone alone", "decoder", text(gpt2, head=False)),
        Case("GPT2CausalLM", "decoder", causal_lm),
        Case("BertBackbone + head", "encoder", text(bert)),
        Case("BertTextClassifier", "encoder", bert_classifier),
        Case(
            "DistilBertBackbone + head", "encoder",
            text(lambda m: m.DistilBertBackbone(**ENCODER)),
        ),
        Case(
            "RobertaBackbone + head", "encoder",
            text(lambda m: m.RobertaBackbone(**ENCODER)),
        ),
        Case(
            "AlbertBackbone + head", "encoder",
            text(lambda m: m.AlbertBackbone(embedding_dim=16, **ENCODER)),
        ),
        Case(
            "DebertaV3Backbone + head", "encoder",
            text(lambda m: m.DebertaV3Backbone(bucket_size=16, **ENCODER)),
        ),
        Case(
            "GemmaBackbone + head", "decoder-gqa",
            text(lambda m: m.GemmaBackbone(head_dim=8, **GQA)),
        ),
        Case(
            "Gemma3Backbone (text) + head", "decoder-gqa",
            text(lambda m: m.Gemma3Backbone(
                image_size=16, vision_encoder=None, head_dim=8, **GQA)),
        ),
        Case("LlamaBackbone + head", "decoder-gqa", text(llama)),
        Case("LlamaBackbone alone", "decoder-gqa", text(llama, head=False)),
        Case(
            "Llama3Backbone + head", "decoder-gqa",
            text(lambda m: m.Llama3Backbone(**GQA)),
        ),
        Case(
            "MistralBackbone + head", "decoder-gqa",
            text(lambda m: m.MistralBackbone(sliding_window=8, **GQA)),
        ),
        Case(
            "QwenBackbone + head", "decoder-gqa",
            text(lambda m: m.QwenBackbone(**GQA)),
        ),
        Case(
            "Qwen3Backbone + head", "decoder-gqa",
            text(lambda m: m.Qwen3Backbone(head_dim=8, **GQA)),
        ),
        Case(
            "Phi3Backbone + head", "decoder-gqa",
            text(lambda m: m.Phi3Backbone(
                max_sequence_length=32, pretraining_sequence_length=32, **GQA)),
        ),
        Case(
            "MixtralBackbone (4 experts) + head", "moe",
            text(lambda m: m.MixtralBackbone(num_experts=4, top_k=2, **GQA)),
        ),
        Case(
            "Qwen3MoeBackbone (4 experts) + head", "moe",
            text(lambda m: m.Qwen3MoeBackbone(
                num_experts=4, top_k=2, moe_intermediate_dim=32, head_dim=8, **GQA)),
        ),
        Case(
            "BartBackbone + head", "encoder-decoder",
            text(lambda m: m.BartBackbone(**ENCODER)),
        ),
        Case(
            "T5Backbone + head", "encoder-decoder",
            text(lambda m: m.T5Backbone(**{
                k: v for k, v in ENCODER.items() if k != "max_sequence_length"})),
        ),
        Case("ViTBackbone + head", "vision-hub", image_hub(vit)),
        Case("ViTImageClassifier", "vision-hub", image_hub(vit, "ViTImageClassifier")),
        Case("ResNetBackbone + head", "vision-hub", image_hub(resnet), True),
        Case(
            "ResNetImageClassifier", "vision-hub",
            image_hub(resnet, "ResNetImageClassifier"), True,
        ),
        Case(
            "EfficientNetBackbone + head", "vision-hub", image_hub(efficientnet), True,
        ),
        Case("MobileNetBackbone + head", "vision-hub", image_hub(mobilenet), True),
        Case("subclassed, no-argument __init__", "user", user(GuideMLP)),
        Case(
            "Sequential, lambda activation", "user", user(lambda_activation_sequential)
        ),
        Case("Functional, keras.layers.Lambda", "user", user(lambda_layer_functional)),
    ]  # fmt: skip
    return rows


# --- measurements -------------------------------------------------------------


def clip(reason: str, limit: int = 60) -> str:
    """`reason` on one line, cut at `limit` characters, safe in a table."""
    reason = " ".join(reason.split()) or "(no message)"
    if len(reason) > limit:
        reason = reason[: limit - 1] + "…"
    return reason.replace("|", "\\|")


def short(error: BaseException, limit: int = 60) -> str:
    """`FAIL: <reason>`: the error's message, after its type but for a
    `ValueError`, cut at `limit` characters."""
    reason = str(error)
    if type(error) is not ValueError:
        reason = f"{type(error).__name__}: {reason}"
    return "FAIL: " + clip(reason, limit)


def trainable(model) -> int:
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


def built_masked_layers(model) -> list:
    """Masked layers that hold masks: a layer the model never calls (the
    unused squeeze-and-excite layers of keras-hub's EfficientNet blocks with
    a ratio of 0) is never built and has none."""
    return [layer for layer in kp.masked_layers(model) if layer.built]


def masked_weights(model) -> int:
    return sum(
        int(np.prod(v.shape))
        for layer in built_masked_layers(model)
        for v in layer.prunable_weights.values()
    )


def mask_counts(model) -> np.ndarray:
    """Nonzero mask entries per built masked layer, in `masked_layers`
    order."""
    return np.array(
        [
            sum(
                int(np.count_nonzero(keras.ops.convert_to_numpy(m)))
                for m in layer.masks.values()
            )
            for layer in built_masked_layers(model)
        ],
        dtype=np.int64,
    )


def mask_sparsity(model) -> float:
    masks = [
        keras.ops.convert_to_numpy(m)
        for layer in kp.masked_layers(model)
        for m in layer.masks.values()
    ]
    return 1 - sum(int(np.count_nonzero(m)) for m in masks) / sum(m.size for m in masks)


def outputs(model, x, batch) -> list[np.ndarray]:
    return [
        np.asarray(o)
        for o in keras.tree.flatten(model.predict(x, batch_size=batch, verbose=0))
    ]


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    if len(a) != len(b) or any(p.shape != q.shape for p, q in zip(a, b, strict=True)):
        raise ValueError("output structures differ")
    return max(float(np.abs(p - q).max()) for p, q in zip(a, b, strict=True))


def relative(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """max |a - b| over the largest |b|."""
    scale = max(float(np.abs(q).max()) for q in b) or 1.0
    return max_diff(a, b) / scale


def first(x, rows=1):
    return {k: v[:rows] for k, v in x.items()} if isinstance(x, dict) else x[:rows]


def pack(prefix: str, value) -> dict[str, np.ndarray]:
    if isinstance(value, dict):
        return {f"{prefix}__{k}": np.asarray(v) for k, v in value.items()}
    return {prefix: np.asarray(value)}


def load(path):
    """`keras.models.load_model`; a model with Python lambdas needs
    `safe_mode=False`, as in stock Keras: then the result says so."""
    try:
        return keras.models.load_model(path), ""
    except Exception as error:
        if "safe_mode" not in str(error):
            raise
        return keras.models.load_model(path, safe_mode=False), " (safe_mode=False)"


CHILD = """
import os, sys, warnings
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[1])
import numpy as np
import keras
try:
    import keras_hub  # noqa: F401 - registers the hub's classes
except ImportError:
    pass
import keras_prune
import zoo  # the benchmark's own classes, as a user imports their module
# As the README asks for the user's own classes registered after keras_prune:
keras_prune.masked_class(zoo.GuideMLP)

data = np.load(sys.argv[3])
keys = [k for k in data.files if k.startswith("x__")]
x = {k[3:]: data[k] for k in keys} if keys else data["x"]
expected = [data[f"out{i}"] for i in range(int(data["outputs"]))]
model, note = zoo.load(sys.argv[2])
got = zoo.outputs(model, x, int(data["batch"]))
counts = zoo.mask_counts(model)
if len(keras_prune.masked_layers(model)) == 0:
    print("no masked layers after load")
elif not np.array_equal(counts, data["counts"]):
    print(f"kept weights differ: {counts.sum()} vs {data['counts'].sum()}")
else:
    diff = zoo.max_diff(got, expected)
    print("exact" + note if diff == 0 else f"outputs differ by {diff:.1e}" + note)
"""


def fresh_round_trip(model, stock, x, reference, batch, folder) -> str:
    path = os.path.join(folder, "masked.keras")
    data = os.path.join(folder, "masked.npz")
    model.save(path)
    arrays = {**pack("x", x), **{f"out{i}": o for i, o in enumerate(reference)}}
    np.savez(
        data, outputs=len(reference), batch=batch, counts=mask_counts(model), **arrays
    )
    here = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run(
        [sys.executable, "-c", CHILD, here, path, data],
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = result.stdout.strip().splitlines()
    if result.returncode == 0 and lines and lines[-1].startswith("exact"):
        return lines[-1]
    if result.returncode == 0 and lines:
        verdict = "FAIL: " + clip(lines[-1])
    else:
        errors = [s for s in result.stderr.strip().splitlines() if s.strip()]
        verdict = "FAIL: " + clip(errors[-1] if errors else "the child process failed")
    return stock_fails(stock, x, batch, folder) or verdict


def stock_fails(stock, x, batch, folder) -> str | None:
    """Why stock Keras cannot round-trip the stock model through `.keras`
    (a cell), or `None` where it can: tells keras_prune's failures from
    Keras's."""
    try:
        path = os.path.join(folder, "stock.keras")
        stock.save(path)
        load(path)[0].predict(x, batch_size=batch, verbose=0)
    except Exception as error:
        return short(error).replace(
            "FAIL: ", "FAIL: stock model does not load either: ", 1
        )
    return None


def check_export(masked, stock, x, reference, batch, folder) -> str:
    exported = kp.export_sparse(masked)
    error = relative(outputs(exported, x, batch), reference)
    if error > TOLERANCE:
        return f"FAIL: outputs differ by {error:.1e} (relative)"
    path = os.path.join(folder, "exported.keras")
    exported.save(path)
    try:
        loaded, note = load(path)
    except Exception:
        failure = stock_fails(stock, x, batch, folder)
        if failure is None:
            raise
        return "ok; its .keras file " + failure.replace("FAIL: ", "", 1)
    error = relative(outputs(loaded, x, batch), reference)
    if error > TOLERANCE:
        return f"FAIL: after .keras round trip, differ by {error:.1e}"
    return "ok" + note


def check_strip(masked, x, reference, batch) -> str:
    got = outputs(kp.strip_pruning(masked), x, batch)
    error = relative(got, reference)
    if error > TOLERANCE:
        return f"FAIL: outputs differ by {error:.1e} (relative)"
    return "exact" if error == 0 else f"ok ({error:.0e})"


def check_litert(masked, stock, x, folder) -> str:
    sample = first(x)
    try:
        report = kp.export_litert(
            masked, os.path.join(folder, "masked.tflite"), sample=sample, compare=False
        )
    except Exception as error:
        try:  # the same conversion (TFLite builtins only) of the stock model
            kp.export_litert(
                stock, os.path.join(folder, "stock.tflite"), sample=sample,
                compare=False,
            )  # fmt: skip
        except Exception as stock_error:
            return short(stock_error).replace(
                "FAIL: ", "LiteRT: stock model does not convert either: ", 1
            )
        return short(error) + " (stock converts)"
    stored = sum(w.storage != "dense" for w in report.weights)
    return f"ok ({stored}/{len(report.weights)} stored sparse)"


def check_shrink(masked, stock, x, reference, batch) -> str:
    small = kp.shrink(masked, sample=first(x, 4))
    error = relative(outputs(small, x, batch), reference)
    share = f"{trainable(small) / trainable(stock):.2f}x params"
    if error > 1e-4:
        return f"FAIL: outputs differ by {error:.1e} ({share})"
    return f"{'exact' if error == 0 else f'ok ({error:.0e})'}, {share}"


def step_ratio(stock, masked, x, y, loss, repeats) -> str:
    for model in (stock, masked):
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)

    def step(model):
        return lambda: keras.tree.map_structure(
            keras.ops.convert_to_numpy, model.train_on_batch(x, y)
        )

    times = time_interleaved(
        {"stock": step(stock), "masked": step(masked)}, repeats=repeats, warmup=2
    )
    ratio = times["masked"] / times["stock"]
    return f"**{ratio:.2f}x** ({times['stock'] * 1e3:.0f} ms)"


def measure(case: Case, n: int, repeats: int) -> list[str]:
    """The row's cells after the name and kind."""
    start = time.perf_counter()
    cells = ["n/a"] * 11
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    batch = n
    try:
        stock, x, y, loss = case.make(n, rng)
        stock.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
        stock_out = outputs(stock, x, batch)  # also builds subclassed models
        cells[0] = f"{trainable(stock):,}"
    except Exception as error:
        cells[0] = short(error).replace("FAIL: ", "FAIL: build: ", 1)
        cells[10] = f"{time.perf_counter() - start:.0f}"
        return cells
    try:
        try:
            masked, how = kp.make_prunable(stock, verbose=False), ""
        except Exception as error:
            if "inplace=True" not in str(error):
                raise
            # The copy failed and the message says to convert in place: do
            # so on a twin of the stock model (which the timing still needs).
            twin = case.make(n, np.random.default_rng(0))[0]
            outputs(twin, x, batch)
            twin.set_weights(stock.get_weights())
            masked, how = kp.make_prunable(twin, inplace=True, verbose=False), "only"
        masked.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
        share = masked_weights(masked) / trainable(stock)
        cells[1] = f"{share:.1%}" + (" (inplace=True only)" if how else "")
    except Exception as error:
        cells[1] = short(error)
        cells[10] = f"{time.perf_counter() - start:.0f}"
        return cells
    try:
        diff = max_diff(outputs(masked, x, batch), stock_out)
        cells[2] = "0" if diff == 0 else f"{diff:.1e}"
    except Exception as error:
        cells[2] = short(error)
    try:
        callback = kp.IterativePruningCallback(final_sparsity=TARGET)
        masked.fit(
            x, y, epochs=2, batch_size=max(1, n // 2), verbose=0, callbacks=[callback]
        )
        cells[3] = f"{mask_sparsity(masked):.3f}"
    except Exception as error:
        cells[3] = short(error)
    try:
        reference = outputs(masked, x, batch)
    except Exception as error:
        failed = short(error).replace("FAIL: ", "FAIL: predict: ", 1)
        cells[4:7] = [failed] * 3
        cells[8] = failed if case.shrinkable else "n/a"
        reference = None
    with tempfile.TemporaryDirectory() as folder:
        steps: list[tuple[int, Callable[[], str]]] = [
            (7, lambda: check_litert(masked, stock, x, folder)),
        ]
        if reference is not None:
            steps += [
                (
                    4,
                    lambda: fresh_round_trip(
                        masked, stock, x, reference, batch, folder
                    ),
                ),
                (5, lambda: check_export(masked, stock, x, reference, batch, folder)),
                (6, lambda: check_strip(masked, x, reference, batch)),
            ]
            if case.shrinkable:
                steps.append(
                    (8, lambda: check_shrink(masked, stock, x, reference, batch))
                )
        for index, run in sorted(steps):
            try:
                cells[index] = run()
            except Exception as error:
                cells[index] = short(error)
    try:
        cells[9] = step_ratio(stock, masked, x, y, loss, repeats)
    except Exception as error:
        cells[9] = short(error)
    cells[10] = f"{time.perf_counter() - start:.0f}"
    return cells


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smaller batches, fewer repeats"
    )
    parser.add_argument("--models", help="comma-separated substrings of row names")
    parser.add_argument(
        "--kind", help=f"comma-separated kinds of rows, of: {', '.join(KINDS)}"
    )
    args = parser.parse_args(argv)
    n = 8 if args.quick else 16
    repeats = 5 if args.quick else 15
    chosen = cases()
    if args.models:
        wanted = [w.strip().lower() for w in args.models.split(",") if w.strip()]
        chosen = [c for c in chosen if any(w in c.name.lower() for w in wanted)]
    if args.kind:
        kinds = {k.strip() for k in args.kind.split(",")}
        chosen = [c for c in chosen if c.kind in kinds]
    warnings.simplefilter("ignore")
    hub_version = keras_hub.__version__ if keras_hub is not None else "not installed"
    print(
        f"keras_prune {kp.__version__}, Keras {keras.__version__}, keras-hub "
        f"{hub_version}, backend {keras.backend.backend()}, Python "
        f"{sys.version.split()[0]}, {platform.machine()} with {os.cpu_count()} CPUs"
    )
    print(
        f"\nbatch of {n} synthetic examples; final_sparsity={TARGET} after 2 "
        f"epochs; train step = median of {repeats} interleaved `train_on_batch` "
        "calls, masked over stock (stock's median)\n"
    )
    print(
        "| model | kind | params | masked | before cut | sparsity | .keras "
        "(fresh process) | export_sparse | strip_pruning | export_litert "
        "| shrink | train step | s |"
    )
    print("|---|---|---:|---:|---:|---:|---|---|---|---|---|---:|---:|")
    for case in chosen:
        cells = measure(case, n, repeats)
        print(f"| {case.name} | {case.kind} | " + " | ".join(cells) + " |", flush=True)
        # Without this, TensorFlow's traced functions of every row stay in
        # memory: the whole table once grew past 23 GB.
        keras.backend.clear_session()  # also collects garbage
    return 0


if __name__ == "__main__":
    sys.exit(main())
