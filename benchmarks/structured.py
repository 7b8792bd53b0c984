"""Structured pruning: shrunk models against the originals, side by side in
one process.

For each network and fraction of its prunable filters and units removed
(`prune_units` with the L1 norm, each set of coupled layers losing that
fraction; the weights are random, since only the shapes matter for speed),
`shrink` builds the smaller model, and both run as one compiled
`tf.function` call at batch 1 and batch 32 (medians of interleaved
repetitions). Also printed: parameters and FLOPs per image (`shrink_summary`)
and the largest logit difference between the masked and the shrunk model.

Networks: MobileNetV2 at 96x96 (`weights=None`, 1000 classes, logits),
ResNet50 at 96x96 (likewise; full runs only) and the seed network (28x28x1).

Ratios are original / shrunk (above 1: the shrunk model is faster).

Run: python benchmarks/structured.py [--quick] [--fractions 0.25,0.5]
     [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.get_logger().setLevel("ERROR")

import keras_prune as kp  # noqa: E402
from keras_prune.experiments.mnist import seed_convnet, time_test_set  # noqa: E402

FRACTIONS = (0.25, 0.5)
BATCHES = (1, 32)


def networks(quick):
    """`{name: (builder, input shape)}` of the networks measured."""
    found = {
        "MobileNetV2 96x96": (
            lambda: keras.applications.MobileNetV2(
                input_shape=(96, 96, 3), weights=None, classifier_activation=None
            ),
            (96, 96, 3),
        ),
        "seed network 28x28": (seed_convnet, (28, 28, 1)),
    }
    if not quick:
        found["ResNet50 96x96"] = (
            lambda: keras.applications.ResNet50(
                input_shape=(96, 96, 3), weights=None, classifier_activation=None
            ),
            (96, 96, 3),
        )
    return found


def measure(build, shape, fraction, repeats):
    """One row per batch size: times of the original and the shrunk model,
    and what shrink removed."""
    keras.utils.set_random_seed(0)
    original = build()
    masked = kp.make_prunable(original, verbose=False)
    removed = kp.prune_units(masked, fraction)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the output layer keeps its units
        shrunk = kp.shrink(masked)
    summary = kp.shrink_summary(masked, shrunk)
    probe = np.random.default_rng(0).normal(size=(4, *shape)).astype("float32")
    difference = float(
        np.max(
            np.abs(masked.predict(probe, verbose=0) - shrunk.predict(probe, verbose=0))
        )
    )
    rows = []
    for batch in BATCHES:
        images = np.random.default_rng(1).normal(size=(batch, *shape)).astype("float32")
        times = time_test_set(
            {"original": original, "shrunk": shrunk}, images, repeats=repeats
        )
        rows.append((batch, times["original"], times["shrunk"]))
    return removed, summary, difference, rows


def table(quick, fractions, repeats):
    lines = [
        "| network | filters removed | units removed | params | FLOPs / image "
        "| max |Δlogit| | batch | original | shrunk | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (build, shape) in networks(quick).items():
        for fraction in fractions:
            removed, summary, difference, rows = measure(
                build, shape, fraction, repeats
            )
            for batch, before, after in rows:
                lines.append(
                    f"| {name} | {fraction:.0%} | {removed:,} | "
                    f"{summary.params_after / summary.params_before:.1%} | "
                    f"{summary.flops_after / summary.flops_before:.1%} | "
                    f"{difference:.1e} | {batch} | {before * 1e3:.2f} ms | "
                    f"{after * 1e3:.2f} ms | **{before / after:.2f}x** |"
                )
            print(".", end="", file=sys.stderr, flush=True)
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer networks and runs")
    parser.add_argument(
        "--fractions",
        type=lambda text: tuple(float(x) for x in text.split(",")),
        help="fractions of the filters removed, e.g. 0.25,0.5",
    )
    parser.add_argument("--repeats", type=int, help="timed calls per model")
    args = parser.parse_args(argv)
    fractions = args.fractions or FRACTIONS
    repeats = args.repeats or (5 if args.quick else 50)
    from benchmarks.sparse_dense import environment

    print(f"# Structured pruning benchmark\n\n{environment()}\n")
    print(
        "Params and FLOPs: the shrunk model's, as a fraction of the original's. "
        "Times: one compiled call, median of interleaved repetitions.\n"
    )
    print(table(args.quick, fractions, repeats))
    print(file=sys.stderr)


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    main()
