"""Quick start on synthetic data: prune an MLP with each schedule, export it
sparse, check the predictions and the file sizes.

Run: python examples/quickstart.py
"""

import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_prune as kp  # noqa: E402
from keras_prune.experiments.mnist import save_without_optimizer  # noqa: E402


def make_data(n, rng):
    """Ten Gaussian blobs in 256 dimensions: easy, but not linearly trivial."""
    centers = np.random.default_rng(0).normal(size=(10, 256)) * 0.25
    labels = rng.integers(0, 10, n)
    return (centers[labels] + rng.normal(size=(n, 256))).astype("float32"), labels


def main():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(1)
    x_train, y_train = make_data(6000, rng)
    x_test, y_test = make_data(2000, rng)
    folder = tempfile.mkdtemp(prefix="keras_prune_quickstart_")

    print(
        "schedule     final  fc1 sparsity  fc2 sparsity  test acc  sparse acc"
        "  max |masked - sparse|"
    )
    for schedule in ("polynomial", "geometric", "constant"):
        dense = keras.Sequential(
            [
                keras.Input((256,)),
                keras.layers.Dense(4096, activation="relu", name="fc1"),
                keras.layers.Dense(10, name="fc2"),
            ]
        )
        dense.compile(
            keras.optimizers.Adam(1e-3),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        dense.fit(x_train, y_train, epochs=2, batch_size=64, verbose=0)

        model = kp.make_prunable(dense)
        model.fit(
            x_train,
            y_train,
            epochs=8,
            batch_size=64,
            verbose=0,
            callbacks=[
                kp.IterativePruningCallback(final_sparsity=0.98, schedule=schedule)
            ],
        )
        sparse = kp.export_sparse(model)
        masked_out = model.predict(x_test, verbose=0)
        sparse_out = sparse.predict(x_test, verbose=0)
        summary = kp.sparsity_summary(model)
        print(
            f"{schedule:<11}  0.98   {summary['fc1'].sparsity:12.4f}  "
            f"{summary['fc2'].sparsity:12.4f}  "
            f"{np.mean(masked_out.argmax(1) == y_test):8.4f}  "
            f"{np.mean(sparse_out.argmax(1) == y_test):10.4f}  "
            f"{np.abs(masked_out - sparse_out).max():.2e}"
        )

    print()
    print(kp.sparsity_summary(sparse))
    sizes = {
        name: save_without_optimizer(saved, os.path.join(folder, f"{name}.keras"))
        for name, saved in (("dense", dense), ("masked", model), ("sparse", sparse))
    }
    print()
    for name, size in sizes.items():
        print(
            f"{name:<7} .keras  {size / 1024:8.1f} KiB  "
            f"({size / sizes['dense']:.1%} of dense)"
        )
    print(f"\nmodels saved in {folder}")


if __name__ == "__main__":
    main()
