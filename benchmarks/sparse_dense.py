"""Dense vs SparseDense, measured side by side in one process.

Prints the machine (CPU model and vector flags: the native kernel's speed
depends on them), then markdown tables of medians over interleaved
repetitions:

1. Layers: `Dense` against what `export_sparse` makes of it (`auto`), and
   against `SparseDense` forced to each kernel (keras_prune's `native`,
   TensorFlow's `coo` and `csr`), for the seed network's fc1 (3136x1024), a
   LeNet-300 layer (784x300) and an output layer (1024x10), at several
   densities and batch sizes. Two measures:
   - op: the in-graph cost of one application, (chain of K - chain of 1) /
     (K - 1), inside one compiled function (K = 50 for up to 4 rows, else
     10), less the chain's own links (an identity and a slice an
     application, timed alone); this cancels the fixed cost of calling a
     tf.function. Each timing follows 2 ms of untimed calls of the same
     candidate (at least one), so that it is timed in its steady state, not
     in the wake of the previous candidate.
   - call: one call of a compiled one-layer model, as a Python user makes it
     (the mean of CALLS back-to-back calls, as in a serving loop).
   Ratios are Dense time / sparse time (above 1: the sparse layer is faster).
   scipy's CSR product (single-threaded; a mat-vec for one row; Python call
   included), timed as the op is ((K calls - 1 call) / (K - 1)), and the FLOP
   bound (1 / density) are given for scale.
2. Small batches (up to 4 rows): the native kernel's op with each of its
   loads forced (hardware gathers, scalar loads) next to the plan's choice
   and scipy's CSR product, from the same runs as table 1.
3. The seed convnet on the 10,000 MNIST test images, dense vs exported at
   99.77% Dense-layer sparsity: one compiled call, `predict`, and a served
   SavedModel; and the Dense head alone (what pruning can speed up).

Run: python benchmarks/sparse_dense.py [--quick] [--data PATH]
     [--shapes 3136x1024,784x300] [--densities 0.1,0.01] [--batches 1,32]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.get_logger().setLevel("ERROR")  # each candidate is traced on purpose

import keras_prune as kp  # noqa: E402
from keras_prune.experiments.mnist import seed_convnet  # noqa: E402
from keras_prune.experiments.timing import time_interleaved  # noqa: E402
from keras_prune.inference import native, sparse_ops  # noqa: E402

SHAPES = ((3136, 1024), (784, 300), (1024, 10))
DENSITIES = (1.0, 0.3, 0.1, 0.03, 0.01, 0.0023)
BATCHES = (1, 4, 32, 256)
CHAIN = 10
# Each timing follows this many seconds of untimed calls of the same
# candidate: a microsecond layer reaches its steady state (what a server
# that runs only it sees) after a few calls, not one.
SETTLE = 0.002
# Small batches take microseconds a layer, below the jitter of a
# tf.function call (tens of microseconds): a longer chain averages it out.
SMALL_BATCH_CHAIN = 50
# A call is timed as the mean of this many back-to-back calls, as in a
# serving loop: a lone call right after another candidate's work starts on
# caches that work left cold (about 0.1 ms more for a small sparse model).
CALLS = 5


def prune_at_random(layer, density, rng):
    """Prunes a MaskedDense to `density` (at least one weight) at random."""
    shape = tuple(layer.mask.shape)
    mask = np.zeros(int(np.prod(shape)), "float32")
    mask[rng.choice(mask.size, max(1, round(density * mask.size)), replace=False)] = 1
    layer.prune_to(mask.reshape(shape))


def masked_layer_model(shape, density, seed=0):
    """A one-layer model with a MaskedDense pruned at random to `density`."""
    model = keras.Sequential([keras.Input((shape[0],)), kp.MaskedDense(shape[1])])
    prune_at_random(model.layers[0], density, np.random.default_rng(seed))
    return model


def op_function(model, k):
    """A compiled chain of `k` applications of `model`, each waiting for the
    one before (through a control dependency on one element of its output;
    a pure data dependency would add work, and a node whose output is only a
    control input is pruned by TensorFlow's graph optimizer)."""

    @tf.function(autograph=False)
    def chain(x):
        probes = []
        for _ in range(k):
            if probes:
                with tf.control_dependencies([probes[-1]]):
                    x = tf.identity(x)
            probes.append(model(x)[0, 0])
        return tf.add_n(probes)

    return chain


def measure_layers(shapes, densities, batches, repeats):
    """Times Dense, auto, native, coo and csr for every shape, density and
    batch."""
    rng = np.random.default_rng(1)
    rows = []
    for shape in shapes:
        for density in densities:
            masked = masked_layer_model(shape, density)
            candidates = {
                "dense": kp.strip_pruning(masked),
                "auto": kp.export_sparse(masked),
            }
            for path in sparse_paths():
                candidates[path] = kp.export_sparse(masked, compute=path)
            kernel = keras.ops.convert_to_numpy(masked.layers[0].masked_kernel)
            for batch in batches:
                chain = SMALL_BATCH_CHAIN if batch <= native.SMALL_BATCH else CHAIN
                x = tf.constant(rng.normal(size=(batch, shape[0])).astype("float32"))
                timers = {}
                native_timers = {}
                for name, model in candidates.items():
                    ops = op_timers(name, model, chain, x)
                    timers.update(ops)
                    if name == "native":
                        native_timers = ops
                    call = tf.function(model)
                    timers[f"{name}/call"] = lambda f=call, x=x: [
                        f(x).numpy() for _ in range(CALLS)
                    ]
                # The chain's own links (an identity and a slice an
                # application), timed alone and subtracted from the ops.
                timers.update(op_timers("links", tf.identity, chain, x))
                timers = {
                    name: with_loads(None, timer) for name, timer in timers.items()
                }
                if native_timers and batch <= native.SMALL_BATCH:
                    # The native candidate's chains again, loads forced.
                    for loads in native.plan().built:
                        for key, timer in native_timers.items():
                            timers[key.replace("native", loads)] = with_loads(
                                loads, timer
                            )
                scipy_product = scipy_reference(kernel, x.numpy())
                if scipy_product is not None:
                    # timed as the ops are: (K calls - 1 call) / (K - 1)
                    timers["scipy/long"] = lambda f=scipy_product, k=chain: [
                        f() for _ in range(k)
                    ]
                    timers["scipy/short"] = scipy_product
                times = time_interleaved(
                    timers, repeats=repeats, warmup=2, settle=SETTLE
                )

                def per_application(name, links=0.0, chain=chain, times=times):
                    """(chain of K - chain of 1) / (K - 1) for timers `name`,
                    less `links`."""
                    long, short = times[f"{name}/long"], times[f"{name}/short"]
                    return max((long - short) / (chain - 1) - links, 1e-7)

                links = per_application("links")
                row = {
                    "shape": shape,
                    "density": density,
                    "batch": batch,
                    "scipy": per_application("scipy")
                    if "scipy/long" in times
                    else None,
                    "auto_dense": computes_dense(candidates["auto"].layers[0], batch),
                }
                for name in candidates:
                    row[f"{name}/op"] = per_application(name, links)
                    row[f"{name}/call"] = times[f"{name}/call"] / CALLS
                for loads in native.LOADS:
                    if f"{loads}/long" in times:
                        row[f"{loads}/op"] = per_application(loads, links)
                rows.append(row)
                print(".", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return rows


def op_timers(name, model, chain, x):
    """Timers `name/long` and `name/short`: chains of `chain` and of 1
    application of `model` to `x`."""
    long, short = op_function(model, chain), op_function(model, 1)
    return {
        f"{name}/long": lambda: long(x).numpy(),
        f"{name}/short": lambda: short(x).numpy(),
    }


def with_loads(loads, timer):
    """`timer`, run with the native kernel's small-batch loads forced to
    `loads` (`None`: the plan's), so that timers that force them in turn
    leave no trace on the next one."""
    if not native.available():
        return timer

    def run():
        native.set_loads(loads)
        return timer()

    return run


def computes_dense(layer, batch):
    """Whether an exported layer multiplies a dense kernel at `batch`."""
    return not isinstance(layer, kp.SparseDense) or layer.compute_path(batch) == "dense"


def sparse_paths():
    """The kernels to force: the native one only where it was built (the
    tables say n/a otherwise, and the environment line says why)."""
    return ("native", "coo", "csr") if native.available() else ("coo", "csr")


def ratio(baseline, row, key):
    """`baseline / row[key]` as `1.23x`, or n/a for a kernel not measured."""
    return f"{baseline / row[key]:.2f}x" if key in row else "n/a"


def scipy_reference(kernel, x):
    try:
        import scipy.sparse
    except ImportError:
        return None
    transposed = scipy.sparse.csr_matrix(kernel.T)
    # One row: a mat-vec (scipy's csr_matvec), as a server calls it.
    x_t = x[0].copy() if len(x) == 1 else np.ascontiguousarray(x.T)
    return lambda: transposed @ x_t


def layer_tables(rows):
    header = (
        "| layer | density | batch | Dense op | auto op | ratio | native | coo | "
        "csr | Dense call | auto call | ratio | native | coo | csr | scipy | "
        "vs scipy | FLOP bound |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
        "---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [header]
    for row in rows:
        dense_op, dense_call = row["dense/op"], row["dense/call"]
        scipy_time = row["scipy"]
        auto = "(dense)" if row["auto_dense"] else ""
        lines.append(
            f"| {row['shape'][0]}x{row['shape'][1]} {auto} | {row['density']:g} | "
            f"{row['batch']} | {ms(dense_op)} | {ms(row['auto/op'])} | "
            f"**{dense_op / row['auto/op']:.2f}x** | "
            f"{ratio(dense_op, row, 'native/op')} | "
            f"{dense_op / row['coo/op']:.2f}x | {dense_op / row['csr/op']:.2f}x | "
            f"{ms(dense_call)} | {ms(row['auto/call'])} | "
            f"**{dense_call / row['auto/call']:.2f}x** | "
            f"{ratio(dense_call, row, 'native/call')} | "
            f"{dense_call / row['coo/call']:.2f}x | "
            f"{dense_call / row['csr/call']:.2f}x | "
            + (
                f"{ms(scipy_time)} | {scipy_time / row['auto/op']:.2f}x | "
                if scipy_time is not None
                else "n/a | n/a | "
            )
            + f"{1 / row['density']:.0f}x |"
        )
    return "\n".join(lines)


def loads_table(rows):
    """The small-batch rows: the native op with each loads forced, the
    plan's choice, and scipy's CSR product."""
    plan = native.plan()
    built = plan.built
    header = (
        "| layer | density | batch | Dense op | "
        + " | ".join(f"{loads} loads" for loads in built)
        + f" | planned ({plan.loads}) | vs Dense | scipy CSR | vs scipy |\n"
        + "|---|---:|---:|---:|"
        + "---:|" * (len(built) + 4)
    )
    lines = [header]
    for row in rows:
        if f"{plan.loads}/op" not in row:
            continue
        planned = row[f"{plan.loads}/op"]
        scipy_time = row["scipy"]
        lines.append(
            f"| {row['shape'][0]}x{row['shape'][1]} | {row['density']:g} | "
            f"{row['batch']} | {us(row['dense/op'])} | "
            + " | ".join(us(row[f"{loads}/op"]) for loads in built)
            + f" | {us(planned)} | **{row['dense/op'] / planned:.2f}x** | "
            + (
                f"{us(scipy_time)} | **{scipy_time / planned:.2f}x** |"
                if scipy_time is not None
                else "n/a | n/a |"
            )
        )
    return "\n".join(lines)


def us(seconds):
    return f"{seconds * 1e6:.1f} us"


def ms(seconds):
    return f"{seconds * 1e3:.3f} ms"


def measure_convnet(images, sparsity, repeats):
    """The seed convnet on `images`, dense vs exported, and its Dense head
    (fc1, dropout, fc2) alone on the flattened features, dense vs exported:
    the part of the model that pruning can speed up."""
    dense = seed_convnet()
    masked = kp.make_prunable(dense, layers=["fc1", "fc2"])
    rng = np.random.default_rng(0)
    for layer in kp.masked_layers(masked):
        prune_at_random(layer, 1 - sparsity, rng)
    sparse = kp.export_sparse(masked)

    def head(model):
        names = ("fc1", "dropout", "fc2")
        return keras.Sequential(
            [keras.Input((3136,)), *(model.get_layer(name) for name in names)]
        )

    x = tf.constant(images)
    features = tf.constant(np.abs(rng.normal(size=(len(images), 3136))), tf.float32)
    timers = {}
    for name, model, inputs in (
        ("dense", dense, x),
        ("sparse", sparse, x),
        ("dense head", head(dense), features),
        ("sparse head", head(sparse), features),
    ):
        function = tf.function(model, autograph=False)
        timers[f"{name} call"] = lambda f=function, v=inputs: f(v).numpy()
    timers["dense predict"] = lambda: dense.predict(images, batch_size=1000, verbose=0)
    timers["sparse predict"] = lambda: sparse.predict(
        images, batch_size=1000, verbose=0
    )
    with tempfile.TemporaryDirectory(prefix="keras_prune_benchmark_") as folder:
        for name, model in (("dense", dense), ("sparse", sparse)):
            model.export(os.path.join(folder, name), verbose=False)
            # Loading restores the weights into memory: the files can go.
            served = tf.saved_model.load(os.path.join(folder, name))
            timers[f"{name} served"] = lambda s=served: s.serve(x).numpy()
    times = time_interleaved(timers, repeats=repeats, warmup=2)
    difference = np.abs(
        sparse.predict(images[:1000], verbose=0)
        - masked.predict(images[:1000], verbose=0)
    ).max()
    return times, difference


def convnet_table(times, images, difference):
    dense, sparse = times["dense call"], times["sparse call"]
    dense_head, sparse_head = times["dense head call"], times["sparse head call"]
    return "\n".join(
        [
            f"Seed convnet, {len(images):,} images, fc1 and fc2 at 99.77% sparsity "
            f"(max |sparse - masked| logit difference {difference:.1e}):",
            "",
            "| measure | dense | exported sparse | ratio |",
            "|---|---:|---:|---:|",
            f"| one compiled call on all images | {ms(dense)} | {ms(sparse)} | "
            f"**{dense / sparse:.2f}x** |",
            f"| `predict(batch_size=1000)` | {ms(times['dense predict'])} | "
            f"{ms(times['sparse predict'])} | "
            f"**{times['dense predict'] / times['sparse predict']:.2f}x** |",
            f"| served SavedModel (`model.export`, then `serve` on all images) | "
            f"{ms(times['dense served'])} | {ms(times['sparse served'])} | "
            f"**{times['dense served'] / times['sparse served']:.2f}x** |",
            f"| the Dense head alone (fc1, dropout, fc2) | {ms(dense_head)} | "
            f"{ms(sparse_head)} | **{dense_head / sparse_head:.2f}x** |",
            "",
            f"The Dense head is {dense_head / dense:.0%} of the dense model's time; "
            f"exported, it is {sparse_head / dense:.1%}. The rest, "
            f"{1 - dense_head / dense:.0%}, is the convolutions, which pruning the "
            "Dense layers cannot speed up.",
        ]
    )


def environment():
    return (
        f"CPU: {native.cpu_description()}; "
        f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}; "
        f"Python {sys.version.split()[0]}, TensorFlow {tf.__version__}, "
        f"Keras {keras.__version__}, keras_prune {kp.__version__}; "
        "native kernel: "
        + (f"yes, {native.plan()}" if native.available() else native.failure())
        + "; "
        "SparseDense computes dense above density "
        f"{sparse_ops.DENSE_MIN_DENSITY} or below "
        f"{sparse_ops.SPARSE_MIN_WEIGHTS:,} weights"
    )


def load_images(path, count):
    if path and os.path.isfile(path):
        with np.load(path) as arrays:
            return (arrays["x_test"][:count, ..., None] / 255.0).astype("float32")
    return np.random.default_rng(0).random((count, 28, 28, 1), dtype="float32")


def parse_list(kind):
    def parse(text):
        return tuple(kind(item) for item in text.split(","))

    return parse


def parse_shapes(text):
    return tuple(tuple(int(n) for n in shape.split("x")) for shape in text.split(","))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one small layer and few repetitions (a smoke test)",
    )
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--shapes", type=parse_shapes, help="e.g. 3136x1024,784x300 (layers only)"
    )
    parser.add_argument("--densities", type=parse_list(float), help="e.g. 0.1,0.01")
    parser.add_argument("--batches", type=parse_list(int), help="e.g. 1,32,256")
    parser.add_argument(
        "--data",
        default=os.path.join(
            os.path.dirname(__file__), "..", "..", "shared", "data", "mnist.npz"
        ),
        help="MNIST npz for the convnet images (random images if missing)",
    )
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(0)
    if args.quick:
        shapes, densities, batches = ((64, 32),), (1.0, 0.01), (1, 32)
        repeats, image_count = args.repeats or 3, 256
    else:
        shapes, densities, batches = SHAPES, DENSITIES, BATCHES
        repeats, image_count = args.repeats or 9, 10_000
    shapes = args.shapes or shapes
    densities = args.densities or densities
    batches = args.batches or batches
    print(f"# SparseDense benchmark\n\n{environment()}\n")
    print(
        "## Layers (Dense time / sparse time; **auto** is what export_sparse makes)\n"
    )
    rows = measure_layers(shapes, densities, batches, repeats)
    print(layer_tables(rows))
    if native.available() and min(batches) <= native.SMALL_BATCH:
        print(
            "\n## Small batches: the native kernel's loads (op times; ratios: "
            "other time / planned time)\n"
        )
        print(loads_table(rows))
    if args.shapes or args.densities or args.batches:
        return  # a custom layer sweep
    images = load_images(args.data, image_count)
    times, difference = measure_convnet(images, 0.9977, max(3, repeats // 3))
    print("\n## Whole model\n")
    print(convnet_table(times, images, difference))


if __name__ == "__main__":
    main()
