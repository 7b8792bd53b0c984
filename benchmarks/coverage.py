"""What keras_prune prunes in the models Keras users train, and what it costs.

For each model: the share of its trainable parameters that `make_prunable`
masks, the sparsity reached after 2 epochs of `fit` on synthetic data with
`IterativePruningCallback(final_sparsity=0.8)`, whether the masked model's
outputs equal the stock model's before any cut, whether a `.keras` round
trip restores outputs and masks exactly, and the training-step time of the
masked model against the stock one (`train_on_batch`, medians of
interleaved repetitions, measured side by side in one process). Runs on the
backend Keras is set to (`KERAS_BACKEND`); run it once per backend.

Run: python benchmarks/coverage.py [--quick] [--models resnet50,lstm]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_prune as kp  # noqa: E402
from keras_prune.experiments.mnist import seed_convnet  # noqa: E402
from keras_prune.experiments.timing import time_interleaved  # noqa: E402

L = keras.layers
TARGET = 0.8


@keras.saving.register_keras_serializable(package="benchmarks")
class TransformerBlock(L.Layer):
    """The keras.io text-classification Transformer block, as users write it."""

    def __init__(self, dim=64, heads=4, hidden=128, rate=0.1, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.heads, self.hidden, self.rate = dim, heads, hidden, rate
        self.attention = L.MultiHeadAttention(heads, dim // heads)
        self.ffn = keras.Sequential([L.Dense(hidden, activation="relu"), L.Dense(dim)])
        self.norm1 = L.LayerNormalization(epsilon=1e-6)
        self.norm2 = L.LayerNormalization(epsilon=1e-6)
        self.drop1 = L.Dropout(rate)
        self.drop2 = L.Dropout(rate)

    def call(self, inputs, training=False):
        attended = self.drop1(self.attention(inputs, inputs), training=training)
        x = self.norm1(inputs + attended)
        return self.norm2(x + self.drop2(self.ffn(x), training=training))

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "heads": self.heads,
                "hidden": self.hidden, "rate": self.rate}  # fmt: skip


def transformer(custom_block: bool, vocab=5000, length=64, dim=64, blocks=2):
    inputs = keras.Input((length,), dtype="int32")
    x = L.Embedding(vocab, dim)(inputs)
    for _ in range(blocks):
        if custom_block:
            x = TransformerBlock(dim)(x)
        else:
            attended = L.Dropout(0.1)(L.MultiHeadAttention(4, dim // 4)(x, x))
            x = L.LayerNormalization(epsilon=1e-6)(x + attended)
            hidden = L.Dense(128, activation="relu")(x)
            x = L.LayerNormalization(epsilon=1e-6)(x + L.Dense(dim)(hidden))
    x = L.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, L.Dense(2)(L.Dense(20, activation="relu")(x)))


class SubclassedTextCNN(keras.Model):
    """A subclassed model: Embedding, Conv1D, Dense."""

    def __init__(self, vocab=5000, **kwargs):
        super().__init__(**kwargs)
        self.vocab = vocab
        self.embedding = L.Embedding(vocab, 64)
        self.conv = L.Conv1D(128, 5, activation="relu")
        self.pool = L.GlobalMaxPooling1D()
        self.hidden = L.Dense(64, activation="relu")
        self.out = L.Dense(2)

    def call(self, x):
        return self.out(self.hidden(self.pool(self.conv(self.embedding(x)))))

    def get_config(self):
        return {**super().get_config(), "vocab": self.vocab}


def lstm_classifier():
    return keras.Sequential(
        [
            keras.Input((64,), dtype="int32"),
            L.Embedding(5000, 64),
            L.LSTM(64),
            L.Dense(2),
        ]  # fmt: skip
    )


def images(shape, n, rng):
    return rng.random((n, *shape)).astype("float32")


def token_ids(n, rng, length=64, vocab=5000):
    return rng.integers(0, vocab, size=(n, length)).astype("int32")


def cases(quick: bool):
    """`{name: (make stock model, x, y, batch size)}`."""
    rng = np.random.default_rng(0)
    n = 32 if quick else 64
    return {
        "MobileNetV2 96x96": (
            lambda: keras.applications.MobileNetV2(
                input_shape=(96, 96, 3), weights=None, classes=10
            ),
            images((96, 96, 3), n, rng), rng.integers(0, 10, n), 16,
        ),
        "ResNet50 64x64": (
            lambda: keras.applications.ResNet50(
                input_shape=(64, 64, 3), weights=None, classes=10
            ),
            images((64, 64, 3), n, rng), rng.integers(0, 10, n), 16,
        ),
        "Transformer, Functional": (
            lambda: transformer(custom_block=False),
            token_ids(n, rng), rng.integers(0, 2, n), 16,
        ),
        "Transformer, custom block": (
            lambda: transformer(custom_block=True),
            token_ids(n, rng), rng.integers(0, 2, n), 16,
        ),
        "Embedding + LSTM": (
            lstm_classifier, token_ids(n, rng), rng.integers(0, 2, n), 16,
        ),
        "subclassed Embedding + Conv1D + Dense": (
            SubclassedTextCNN, token_ids(n, rng), rng.integers(0, 2, n), 16,
        ),
        "seed convnet (MNIST), every layer": (
            seed_convnet, images((28, 28, 1), n, rng), rng.integers(0, 10, n), 32,
        ),
    }  # fmt: skip


def compile_model(model):
    model.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


def masked_weights(model) -> int:
    return sum(
        int(np.prod(v.shape))
        for layer in kp.masked_layers(model)
        for v in layer.prunable_weights.values()
    )


def trainable(model) -> int:
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


def round_trip_exact(model, x) -> bool:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
    same_masks = all(
        np.array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
        for (_, _, _, a), (_, _, _, b) in zip(
            kp.masking.iter_masked_weights(model),
            kp.masking.iter_masked_weights(loaded),
            strict=True,
        )
    )
    return same_masks and np.array_equal(
        model.predict(x, verbose=0), loaded.predict(x, verbose=0)
    )


def step_times(stock, masked, x, y, batch, repeats):
    xb, yb = x[:batch], y[:batch]

    def step(model):
        return lambda: float(keras.ops.convert_to_numpy(model.train_on_batch(xb, yb)))

    times = time_interleaved(
        {"stock": step(stock), "masked": step(masked)}, repeats=repeats, warmup=2
    )
    return times["stock"], times["masked"]


def measure(name, make, x, y, batch, repeats):
    keras.utils.set_random_seed(0)
    stock = make()
    compile_model(stock)
    stock.predict(x[:2], verbose=0)  # build subclassed models
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masked = kp.make_prunable(stock, verbose=False)
    compile_model(masked)
    before = float(
        np.abs(masked.predict(x, verbose=0) - stock.predict(x, verbose=0)).max()
    )
    stock_time, masked_time = step_times(stock, masked, x, y, batch, repeats)
    callback = kp.IterativePruningCallback(final_sparsity=TARGET)
    start = time.perf_counter()
    masked.fit(x, y, epochs=2, batch_size=batch, verbose=0, callbacks=[callback])
    fit_seconds = time.perf_counter() - start
    summary = kp.sparsity_summary(masked)
    masked_rows = [row for row in summary.rows if row.kind.startswith("Masked")]
    sparsity = 1 - sum(r.nonzeros for r in masked_rows) / sum(
        r.size for r in masked_rows
    )
    return {
        "model": name,
        "params": trainable(stock),
        "share": masked_weights(masked) / trainable(stock),
        "sparsity": sparsity,
        "before": before,
        "round_trip": round_trip_exact(masked, x[:8]),
        "stock_ms": stock_time * 1e3,
        "masked_ms": masked_time * 1e3,
        "fit_s": fit_seconds,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer samples and repeats"
    )
    parser.add_argument("--models", help="comma-separated substrings of model names")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else 15
    chosen = cases(args.quick)
    if args.models:
        wanted = [w.strip().lower() for w in args.models.split(",")]
        chosen = {
            k: v for k, v in chosen.items() if any(w in k.lower() for w in wanted)
        }
    print(
        f"keras_prune {kp.__version__}, Keras {keras.__version__}, backend "
        f"{keras.backend.backend()}, Python {sys.version.split()[0]}, "
        f"{platform.machine()} with {os.cpu_count()} CPUs"
    )
    print(
        f"\nfinal_sparsity={TARGET}, 2 epochs on synthetic data; train step = "
        f"median of {repeats} interleaved `train_on_batch` calls\n"
    )
    print("| model | trainable params | masked share | sparsity after 2 epochs "
          "| outputs before any cut | .keras round trip | train step stock "
          "| masked | ratio |")  # fmt: skip
    print("|---|---:|---:|---:|---|---|---:|---:|---:|")
    for name, (make, x, y, batch) in chosen.items():
        r = measure(name, make, x, y, batch, repeats)
        equal = "equal" if r["before"] == 0 else f"max diff {r['before']:.1e}"
        print(
            f"| {r['model']} | {r['params']:,} | {r['share']:.2%} | "
            f"{r['sparsity']:.4f} | {equal} | "
            f"{'exact' if r['round_trip'] else 'NOT exact'} | "
            f"{r['stock_ms']:.1f} ms | {r['masked_ms']:.1f} ms | "
            f"**{r['masked_ms'] / r['stock_ms']:.2f}x** |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
