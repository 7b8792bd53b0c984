"""Deployment formats of a pruned model, measured side by side in one process.

For each case, dense against pruned, per format: file size, batch-1 latency
(one thread for LiteRT, median of interleaved repetitions) and, where the
model is trained, test accuracy on MNIST.

1. The seed network's head alone (3136 -> 1024 -> 10), fc1 pruned at random
   and in 1x4 blocks (`granularity=(1, 4)`) to each density, fc2 kept: the
   `.keras` file of `export_sparse`, and `.tflite` files of `export_litert`
   in float, float16 and int8 (dynamic range) against the same model
   converted dense.
2. The seed network: with `--model` (a masked `.keras`, such as the last
   checkpoint of `keras-prune mnist`, `runs/mnist/checkpoints/masked-*.keras`)
   and `--data`, the trained network and its test accuracy in every format;
   without, the untrained network with fc1 and fc2 pruned at random (no
   accuracy). Formats: the masked `.keras`, `export_sparse`'s `.keras`, a
   SavedModel of `export_sparse(compute="tensorflow")` (served by plain
   TensorFlow), and the `.tflite` files.

Ratios are dense / pruned (above 1: the pruned file is smaller or faster).

Run: python benchmarks/deploy.py [--quick] [--model PATH --data PATH]
     [--densities 0.01,0.0023] [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.get_logger().setLevel("ERROR")

import keras_prune as kp  # noqa: E402
from keras_prune import litert  # noqa: E402
from keras_prune.experiments.data import load_mnist, preprocess  # noqa: E402
from keras_prune.experiments.mnist import (  # noqa: E402
    save_without_optimizer,
    seed_convnet,
)
from keras_prune.experiments.timing import time_interleaved  # noqa: E402

DENSITIES = (0.1, 0.01, 0.0023)
QUANTIZATIONS = ("float", "float16", "int8")


def head(density, blocks, seed=0):
    """The seed head, masked, fc1 kept at `density` at random or in 1x4
    blocks (by magnitude of random weights, as the callback would)."""
    keras.utils.set_random_seed(seed)
    model = kp.make_prunable(
        keras.Sequential(
            [
                keras.Input((3136,)),
                keras.layers.Dense(1024, activation="relu", name="fc1"),
                keras.layers.Dense(10, name="fc2"),
            ]
        ),
        layers=["fc1"],
        verbose=False,
    )
    kp.IterativePruningCallback.prune_layer(
        model.get_layer("fc1"), 1 - density, granularity=(1, 4) if blocks else "weight"
    )
    return model


def keras_size(model, folder, name):
    """Size of `model`'s `.keras` file without optimizer state."""
    return save_without_optimizer(model, os.path.join(folder, f"{name}.keras"))


def folder_size(path):
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path)
        for name in names
    )


def keras_latency(models, row, repeats):
    """Median batch-1 latency (ms) of each Keras model's compiled call."""
    x = tf.constant(row)
    functions = {
        name: tf.function(lambda x, m=model: m(x, training=False))
        for name, model in models.items()
    }
    times = time_interleaved(
        {name: (lambda f=f: f(x).numpy()) for name, f in functions.items()},
        repeats=repeats,
        warmup=3,
    )
    return {name: seconds * 1e3 for name, seconds in times.items()}


def litert_rows(model, folder, tag, sample, repeats, images=None, labels=None):
    """One row per quantization: `export_litert`'s size and latency against
    the dense .tflite, and the test accuracy where `images` are given."""
    rows = []
    for quantization in QUANTIZATIONS:
        path = os.path.join(folder, f"{tag}-{quantization}.tflite")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            try:
                report = kp.export_litert(
                    model,
                    path,
                    quantization=quantization,
                    sample=sample,
                    repeats=repeats,
                )
            except ValueError as error:
                rows.append({"format": f".tflite {quantization}", "refused": error})
                continue
        runs = ", ".join(f"{w.layer}: {w.runs}" for w in report.weights)
        accuracy = None
        if images is not None:
            logits = litert.predict(path, images, resolver=report.resolver)
            accuracy = float(np.mean(logits.argmax(1) == labels))
        rows.append(
            {
                "format": f".tflite {quantization}",
                "size": report.bytes,
                "dense_size": report.dense_bytes,
                "latency": report.latency_ms,
                "dense_latency": report.dense_latency_ms,
                "accuracy": accuracy,
                "note": runs
                + ("" if report.resolver == "default" else "; without XNNPACK")
                + (f"; {len(caught)} warning(s)" if caught else ""),
            }
        )
    return rows


def table(title, rows):
    lines = [
        f"### {title}",
        "",
        "| format | size | dense size | size ratio | batch-1 ms | dense ms | "
        "speedup | test accuracy | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        if "refused" in row:
            lines.append(
                f"| {row['format']} | refused | | | | | | | {row['refused']} |"
            )
            continue
        accuracy = "n/a" if row.get("accuracy") is None else f"{row['accuracy']:.2%}"
        lines.append(
            f"| {row['format']} | {row['size']:,} | {row['dense_size']:,} | "
            f"{row['dense_size'] / row['size']:.1f}x | {row['latency']:.4f} | "
            f"{row['dense_latency']:.4f} | "
            f"**{row['dense_latency'] / row['latency']:.1f}x** | {accuracy} | "
            f"{row.get('note', '')} |"
        )
    return "\n".join(lines)


def head_section(densities, repeats):
    out = ["## The seed head alone (3136 -> 1024 -> 10), fc1 pruned", ""]
    sample = np.random.default_rng(1).normal(size=(16, 3136)).astype("float32")
    with tempfile.TemporaryDirectory() as folder:
        for density in densities:
            for blocks in (False, True):
                model = head(density, blocks)
                dense = kp.strip_pruning(model)
                exported = kp.export_sparse(model)
                times = keras_latency(
                    {"dense": dense, "exported": exported}, sample[:1], repeats
                )
                rows = [
                    {
                        "format": ".keras (export_sparse)",
                        "size": keras_size(exported, folder, "exported"),
                        "dense_size": keras_size(dense, folder, "dense"),
                        "latency": times["exported"],
                        "dense_latency": times["dense"],
                        "note": "TensorFlow, compiled call",
                    },
                    *litert_rows(model, folder, "head", sample, repeats),
                ]
                kind = "1x4 blocks" if blocks else "random"
                out += [table(f"fc1 keeps {density:.2%}, {kind}", rows), ""]
                print(".", end="", file=sys.stderr, flush=True)
    return "\n".join(out)


def seed_section(model_path, data_path, repeats, quick):
    images = labels = None
    if model_path:
        masked = keras.models.load_model(model_path)
        title = f"## The trained seed network ({os.path.basename(model_path)})"
    else:
        masked = kp.make_prunable(seed_convnet(), layers=["fc1", "fc2"], verbose=False)
        rng = np.random.default_rng(0)
        masked.get_layer("fc1").prune_to(rng.random((3136, 1024)) < 0.0023)
        masked.get_layer("fc2").prune_to(rng.random((1024, 10)) < 0.04)
        title = "## The seed network, untrained, fc1 at 0.23% and fc2 at 4% at random"
    if data_path:
        _, (x_test, y_test) = load_mnist(data_path)
        count = 2000 if quick else len(x_test)
        images, labels = preprocess(x_test[:count]), y_test[:count]
    sample = (
        images[:16]
        if images is not None
        else np.random.default_rng(1).random((16, 28, 28, 1)).astype("float32")
    )
    dense = kp.strip_pruning(masked)
    exported = kp.export_sparse(masked)
    serving = kp.export_sparse(masked, compute="tensorflow")

    def accuracy(model):
        if images is None:
            return None
        logits = model.predict(images, batch_size=500, verbose=0)
        return float(np.mean(logits.argmax(1) == labels))

    with tempfile.TemporaryDirectory() as folder:
        times = keras_latency(
            {
                "dense": dense,
                "masked": masked,
                "exported": exported,
                "serving": serving,
            },
            sample[:1],
            repeats,
        )
        dense_size = keras_size(dense, folder, "dense")
        serving.export(os.path.join(folder, "served"), verbose=False)
        dense.export(os.path.join(folder, "dense-served"), verbose=False)
        rows = [
            {
                "format": ".keras (masked)",
                "size": keras_size(masked, folder, "masked"),
                "dense_size": dense_size,
                "latency": times["masked"],
                "dense_latency": times["dense"],
                "accuracy": accuracy(masked),
                "note": "TensorFlow, compiled call",
            },
            {
                "format": ".keras (export_sparse)",
                "size": keras_size(exported, folder, "exported"),
                "dense_size": dense_size,
                "latency": times["exported"],
                "dense_latency": times["dense"],
                "accuracy": accuracy(exported),
                "note": "TensorFlow, compiled call",
            },
            {
                "format": 'SavedModel (compute="tensorflow")',
                "size": folder_size(os.path.join(folder, "served")),
                "dense_size": folder_size(os.path.join(folder, "dense-served")),
                "latency": times["serving"],
                "dense_latency": times["dense"],
                "accuracy": accuracy(serving),
                "note": "plain TensorFlow serves it",
            },
            *litert_rows(masked, folder, "seed", sample, repeats, images, labels),
        ]
    note = (
        f"Dense accuracy (the masked model stripped): {accuracy(dense):.2%}."
        if images is not None
        else "No `--model`/`--data`: accuracy n/a."
    )
    return "\n".join([title, "", note, "", table("formats", rows)])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one density, fewer runs")
    parser.add_argument("--model", help="a masked .keras of the seed network")
    parser.add_argument("--data", help="MNIST .npz (Keras layout), for accuracy")
    parser.add_argument(
        "--densities",
        type=lambda text: tuple(float(x) for x in text.split(",")),
        help="fc1 densities of the head, e.g. 0.01,0.0023",
    )
    parser.add_argument("--repeats", type=int, help="timed calls per file")
    args = parser.parse_args(argv)
    densities = args.densities or ((0.0023,) if args.quick else DENSITIES)
    repeats = args.repeats or (20 if args.quick else 300)
    from benchmarks.sparse_dense import environment

    print(f"# Deployment benchmark\n\n{environment()}\n")
    print(head_section(densities, repeats))
    print(seed_section(args.model, args.data, repeats, args.quick))
    print(file=sys.stderr)


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    main()
