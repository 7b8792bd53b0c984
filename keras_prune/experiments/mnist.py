"""The main job: reproduce and beat the seed report's MNIST pruning.

The seed report is the 2017 research report keras_prune grew from (in
Chinese, unpublished; its numbers are in `SEED_TABLE` and `SEED_TIMES`). It
trained the TensorFlow-tutorial convnet on MNIST and pruned its two Dense
layers iteratively, keeping 70% of the live weights per round.
`run` does the same with keras_prune: it trains the network dense, converts
it with `make_prunable`, prunes it with `IterativePruningCallback` while
`DropoutScalingCallback` shrinks dropout (Han et al. 2015), evaluates after
every round, exports with `export_sparse`, and measures file sizes and
inference time.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from typing import Any

import keras
import numpy as np

import keras_prune as kp
from keras_prune.experiments.data import load_mnist, preprocess
from keras_prune.experiments.progress import RunFolder
from keras_prune.experiments.requirements import check
from keras_prune.experiments.settings import JobConfig, MnistConfig, SeedNetConfig
from keras_prune.experiments.timing import time_interleaved

# The seed report's table: fraction of Dense weights kept -> test accuracy.
SEED_TABLE = (
    (1.0, 0.99),
    (0.7, 0.991),
    (0.49, 0.993),
    (0.24, 0.994),
    (0.117, 0.993),
    (0.057, 0.994),
    (0.013, 0.993),
    (0.009, 0.992),
    (0.0047, 0.99),
    (0.0023, 0.987),
    (0.0016, 0.889),
    (0.0011, 0.886),
    (0.00079, 0.677),
    (0.00056, 0.409),
)
# The seed's inference times on the 10,000 test images, in seconds.
SEED_TIMES = {"dense": 0.644, "masked": 1.572, "sparse": 0.692}

DENSE_LAYERS = ("fc1", "fc2")
CONV_LAYERS = ("conv1", "conv2")


@dataclasses.dataclass
class Round:
    """One row of the results: the state after a round's retraining."""

    round: int
    epoch: int
    kept: float
    kept_fc1: float
    kept_fc2: float
    dropout: float
    test_accuracy: float
    kept_conv1: float = 1.0
    kept_conv2: float = 1.0
    kept_all: float = 1.0  # of every layer's weights (biases aside)


@dataclasses.dataclass
class MnistResult:
    """Everything a run measured; `report.write_report` renders it."""

    config: MnistConfig
    rounds: list[Round]
    sizes: dict[str, int]
    times: dict[str, float]
    sparse_accuracy: float
    max_difference: float
    summary: str
    wall_seconds: float
    versions: dict[str, str]
    litert: kp.LiteRTReport | None = None
    litert_accuracy: float | None = None


def seed_convnet(dropout: float = 0.5) -> keras.Model:
    """The seed report's network: the TensorFlow-tutorial MNIST convnet.

    Example:

    >>> seed_convnet().count_params()
    3274634
    """
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Conv2D(32, 5, padding="same", activation="relu", name="conv1"),
            layers.MaxPooling2D(2, name="pool1"),
            layers.Conv2D(64, 5, padding="same", activation="relu", name="conv2"),
            layers.MaxPooling2D(2, name="pool2"),
            layers.Flatten(name="flatten"),
            layers.Dense(1024, activation="relu", name="fc1"),
            layers.Dropout(dropout, name="dropout"),
            layers.Dense(10, name="fc2"),
        ],
        name="seed_convnet",
    )


def kept_ladder(rounds: int, factor: float) -> list[float]:
    """Fraction of all Dense weights kept after each round: `factor ** k`.

    Example:

    >>> [round(k, 3) for k in kept_ladder(3, 0.7)]
    [0.7, 0.49, 0.343]
    """
    return [factor**k for k in range(1, rounds + 1)]


def split_ladder(
    ladder: list[float], sizes: dict[str, int], fc2_min_kept: float
) -> dict[str, list[float]]:
    """Per-layer sparsities that keep `ladder[k]` of all Dense weights.

    fc2 (10 outputs) keeps at least `fc2_min_kept` of its weights, since a
    class left with one or two connections collapses (the seed report's
    drop to 88.9% at 0.16%); fc1 gives up what fc2 keeps.

    Example:

    >>> split_ladder([0.5, 0.01], {"fc1": 1000, "fc2": 100}, 0.1)
    {'fc1': [0.5, 0.999], 'fc2': [0.5, 0.9]}
    """
    total = sizes["fc1"] + sizes["fc2"]
    sparsities: dict[str, list[float]] = {"fc1": [], "fc2": []}
    for kept in ladder:
        kept_fc2 = max(kept, fc2_min_kept)
        kept_fc1 = (kept * total - kept_fc2 * sizes["fc2"]) / sizes["fc1"]
        if kept_fc1 <= 0:
            raise ValueError(
                "Expected `fc2_min_kept` to leave fc1 some weights. Received: "
                f"fc2_min_kept={fc2_min_kept} at kept={kept}"
            )
        sparsities["fc1"].append(round(1.0 - kept_fc1, 12))
        sparsities["fc2"].append(round(1.0 - kept_fc2, 12))
    return sparsities


class _LearningRate(keras.callbacks.Callback):
    """Sets the optimizer's learning rate per epoch: `prune_lr`, then
    `final_lr` for the last two rounds, where the sparsity is extreme."""

    def __init__(self, prune_lr: float, final_lr: float, final_from: int):
        super().__init__()
        self.prune_lr, self.final_lr, self.final_from = prune_lr, final_lr, final_from

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        rate = self.final_lr if epoch >= self.final_from else self.prune_lr
        self.model.optimizer.learning_rate.assign(rate)


def _compile(model: keras.Model, learning_rate: float) -> None:
    model.compile(
        keras.optimizers.Adam(learning_rate),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def save_without_optimizer(model: keras.Model, path: str) -> int:
    """Saves an uncompiled copy of `model` as `.keras`; returns the file size.

    A compiled model's file also holds the optimizer's state (Adam: two
    slots per weight), which says nothing about the model's own size.

    Example:

    >>> import tempfile
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> save_without_optimizer(model, tempfile.mkdtemp() + "/m.keras") > 0
    True
    """
    plain = model.__class__.from_config(model.get_config())  # uncompiled
    plain.set_weights(model.get_weights())
    plain.save(path)
    return os.path.getsize(path)


def versions() -> dict[str, str]:
    """Versions of what the numbers depend on."""
    import tensorflow as tf

    return {
        "keras_prune": kp.__version__,
        "keras": keras.__version__,
        "tensorflow": tf.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
    }


@dataclasses.dataclass
class Data:
    """Preprocessed MNIST arrays: images float32 `(n, 28, 28, 1)` in [0, 1]."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def prepare_data(config: JobConfig) -> Data:
    """Loads MNIST (see `load_mnist`) and keeps the configured subsets."""
    (x_train, y_train), (x_test, y_test) = load_mnist(config.data)
    return Data(
        preprocess(x_train[: config.train_samples]),
        y_train[: config.train_samples],
        preprocess(x_test[: config.test_samples]),
        y_test[: config.test_samples],
    )


def train_dense(
    config: SeedNetConfig, data: Data, verbose: int = 2
) -> tuple[keras.Model, Round]:
    """Trains the seed convnet dense; returns it and its row 0 of the table."""
    dense = seed_convnet(config.dropout)
    _compile(dense, config.dense_lr)
    dense.fit(
        data.x_train,
        data.y_train,
        batch_size=config.batch_size,
        epochs=config.dense_epochs,
        verbose=verbose,
    )
    accuracy = dense.evaluate(data.x_test, data.y_test, batch_size=1000, verbose=0)[1]
    return dense, Round(0, config.dense_epochs - 1, 1.0, 1.0, 1.0, config.dropout,
                        accuracy)  # fmt: skip


def trained_dense(
    config: SeedNetConfig,
    data: Data,
    folder: RunFolder,
    verbose: int = 2,
    row: Callable[[Round], Any] = dataclasses.asdict,
) -> keras.Model:
    """The dense network: read back where `folder` holds it, else trained
    (from `config.seed`) and recorded as the folder's first row, `row(its
    Round)`."""
    if folder.rows:
        return folder.load_model("dense")
    keras.utils.set_random_seed(config.seed)
    dense, dense_round = train_dense(config, data, verbose)
    folder.record([row(dense_round)], {"dense": dense})
    return dense


def pruned_layers(config: MnistConfig) -> tuple[str, ...]:
    """The layers a run prunes: the Dense ones, and with `prune_convs` the
    convolutions.

    Example:

    >>> pruned_layers(MnistConfig(prune_convs=True))
    ('fc1', 'fc2', 'conv1', 'conv2')
    """
    return DENSE_LAYERS + (CONV_LAYERS if config.prune_convs else ())


def prune(
    config: MnistConfig,
    dense: keras.Model,
    data: Data,
    verbose: int = 2,
    folder: RunFolder | None = None,
) -> tuple[keras.Model, list[Round]]:
    """Prunes fc1 and fc2 round by round; returns the masked model and rows.

    Round `k` cuts the Dense layers to `factor ** k` of their weights (see
    `split_ladder` for how fc1 and fc2 share them), then retrains
    `epochs_per_round` epochs and evaluates on the test set. Each round
    starts from the random seed `config.seed + k`, so that its shuffling
    depends only on the settings and the state the round starts from.

    Args:
        config: The settings.
        dense: The trained dense network; left unchanged.
        data: The training and test images.
        verbose: Keras `fit` verbosity. Defaults to `2`.
        folder: Where each finished round is recorded (CSV row, progress,
            checkpoint of the masked model with its optimizer state). Rows
            after the first (the dense model's) are rounds already done:
            pruning continues from the checkpoint after the last of them.
            Defaults to `None` (nothing written).
    """
    rounds = [Round(**row) for row in folder.rows[1:]] if folder else []
    if folder is not None and rounds:
        masked = folder.load_model("masked")
        # DropoutScalingCallback scales the rate from its initial value.
        masked.get_layer("dropout").rate = config.dropout
    else:
        if folder is not None:
            folder.restore_python_random()  # the masked copy's dropout seed
        masked = kp.make_prunable(dense, layers=list(pruned_layers(config)))
        _compile(masked, config.prune_lr)
    layers = {name: masked.get_layer(name) for name in DENSE_LAYERS + CONV_LAYERS}
    sizes = {name: math.prod(layer.kernel.shape) for name, layer in layers.items()}
    ladder = kept_ladder(config.rounds, config.factor)
    per_layer = split_ladder(ladder, sizes, config.fc2_min_kept)
    if config.prune_convs:
        per_layer["conv1"] = [1.0 - max(k, config.conv1_min_kept) for k in ladder]
        per_layer["conv2"] = [1.0 - max(k, config.conv2_min_kept) for k in ladder]
    every = config.epochs_per_round
    callbacks: list[keras.callbacks.Callback] = [
        kp.IterativePruningCallback(
            schedule={
                name: kp.ListSchedule(sparsities, frequency=every)
                for name, sparsities in per_layer.items()
            }
        ),
        _LearningRate(config.prune_lr, config.final_lr, (config.rounds - 2) * every),
    ]
    if config.scale_dropout:
        callbacks.insert(1, kp.DropoutScalingCallback({"dropout": "fc1"}))
    for k in range(len(rounds) + 1, config.rounds + 1):
        keras.utils.set_random_seed(config.seed + k)
        masked.fit(
            data.x_train,
            data.y_train,
            batch_size=config.batch_size,
            initial_epoch=(k - 1) * every,
            epochs=k * every,
            callbacks=callbacks,
            verbose=verbose,
        )
        accuracy = masked.evaluate(data.x_test, data.y_test, batch_size=1000,
                                   verbose=0)[1]  # fmt: skip
        kept = {name: 1.0 - getattr(layer, "sparsity", 0.0)
                for name, layer in layers.items()}  # fmt: skip
        rounds.append(
            Round(
                round=k,
                epoch=config.dense_epochs + k * every - 1,
                kept=ladder[k - 1],
                kept_fc1=kept["fc1"],
                kept_fc2=kept["fc2"],
                dropout=masked.get_layer("dropout").rate,
                test_accuracy=accuracy,
                kept_conv1=kept["conv1"],
                kept_conv2=kept["conv2"],
                kept_all=sum(kept[n] * sizes[n] for n in sizes) / sum(sizes.values()),
            )
        )
        if folder is not None:
            rows = folder.rows[:1] + [dataclasses.asdict(r) for r in rounds]
            folder.record(rows, {"masked": masked})
    return masked, rounds


@dataclasses.dataclass
class Deployment:
    """The exported model and what it costs: file sizes and inference times,
    and the LiteRT file's report and test accuracy."""

    sparse: keras.Model
    sizes: dict[str, int]
    times: dict[str, float]
    sparse_accuracy: float
    max_difference: float
    litert: kp.LiteRTReport
    litert_accuracy: float


def deploy(
    config: MnistConfig,
    dense: keras.Model,
    masked: keras.Model,
    data: Data,
    folder: str | None = None,
) -> Deployment:
    """Exports the masked model sparse (`sparse.keras`) and to LiteRT
    (`sparse.tflite`) in `folder` (a new temporary folder if `None`);
    measures sizes, accuracy and timing."""
    from keras_prune import litert

    if folder is None:
        folder = tempfile.mkdtemp(prefix="keras_prune_mnist_")
    sparse = kp.export_sparse(masked)
    save_without_optimizer(sparse, os.path.join(folder, "sparse.keras"))
    report = kp.export_litert(
        masked,
        os.path.join(folder, "sparse.tflite"),
        sample=data.x_test[:64],
        repeats=50 if config.quick else 500,
    )
    tflite_logits = litert.predict(report.path, data.x_test, resolver=report.resolver)
    masked_logits = masked.predict(data.x_test, batch_size=1000, verbose=0)
    sparse_logits = sparse.predict(data.x_test, batch_size=1000, verbose=0)
    models = {"dense": dense, "masked": masked, "sparse": sparse}
    with tempfile.TemporaryDirectory() as folder:
        sizes = {
            name: save_without_optimizer(model, os.path.join(folder, f"{name}.keras"))
            for name, model in models.items()
        }
    return Deployment(
        sparse=sparse,
        sizes=sizes,
        times=time_test_set(models, data.x_test, repeats=3 if config.quick else 15),
        sparse_accuracy=float(np.mean(sparse_logits.argmax(1) == data.y_test)),
        max_difference=float(np.abs(sparse_logits - masked_logits).max()),
        litert=report,
        litert_accuracy=float(np.mean(tflite_logits.argmax(1) == data.y_test)),
    )


def settings(config: JobConfig) -> dict[str, Any]:
    """The settings a resumed run must share: all but the output folder.

    Example:

    >>> "out" in settings(MnistConfig()), settings(MnistConfig())["rounds"]
    (False, 21)
    """
    resolved = dataclasses.asdict(config.resolved())
    return {key: value for key, value in resolved.items() if key != "out"}


def run(
    config: MnistConfig, verbose: int = 2, folder: RunFolder | None = None
) -> MnistResult:
    """Trains, prunes, exports and measures; returns every number.

    What each stage finishes is recorded in `folder` as it goes (see
    `RunFolder`): the dense model and its row, then each round's row and
    checkpoint. Given a folder that holds part of a run, `run` continues
    after its last finished round, with the same masks, optimizer state and
    schedule position, and ends with the same table as a run never stopped.

    Args:
        config: The settings.
        verbose: Keras `fit` verbosity (1 progress bars, 2 one line per
            epoch, 0 silent). Defaults to `2`.
        folder: Where to record progress, or `None` for
            `RunFolder(config.out, settings(config))`, which refuses a folder
            holding a run. Defaults to `None`.

    Returns:
        A `MnistResult`.

    Raises:
        RuntimeError: If TensorFlow or matplotlib is missing, or Keras runs
            on another backend (before anything is trained).
        FileExistsError: If `folder` is `None` and `config.out` holds a run.

    Example:

    >>> result = run(MnistConfig(data="mnist.npz", quick=True))  # doctest: +SKIP
    >>> f"{result.rounds[-1].kept:.4%}"  # doctest: +SKIP
    '0.1628%'
    """
    check("mnist")
    config = config.validate().resolved()
    if folder is None:
        folder = RunFolder(config.out, settings(config))
    data = prepare_data(config)
    dense = trained_dense(config, data, folder, verbose)
    masked, _ = prune(config, dense, data, verbose, folder)
    deployment = deploy(config, dense, masked, data, folder.path)
    folder.record(folder.rows, finished=True)
    return MnistResult(
        config=config,
        rounds=[Round(**row) for row in folder.rows],
        sizes=deployment.sizes,
        times=deployment.times,
        sparse_accuracy=deployment.sparse_accuracy,
        max_difference=deployment.max_difference,
        summary=str(kp.sparsity_summary(deployment.sparse)),
        wall_seconds=folder.seconds(),
        versions=versions(),
        litert=deployment.litert,
        litert_accuracy=deployment.litert_accuracy,
    )


def _run_to_numpy(function: Any, images: Any) -> np.ndarray:
    return function(images).numpy()


def time_test_set(
    models: dict[str, keras.Model], images: np.ndarray, repeats: int = 15
) -> dict[str, float]:
    """Median seconds for one compiled inference over all of `images`.

    Each model runs as one `tf.function` call on the whole set, as the seed
    report timed it; the models are timed in turn, `repeats` rounds.

    Example:

    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> times = time_test_set({"m": model}, np.ones((4, 2), "float32"), repeats=2)
    >>> times["m"] > 0
    True
    """
    import tensorflow as tf

    images = tf.constant(images)
    candidates: dict[str, Any] = {}
    for name, model in models.items():
        function = tf.function(partial(model, training=False), autograph=False)
        candidates[name] = partial(_run_to_numpy, function, images)
    return time_interleaved(candidates, repeats=repeats, warmup=2)
