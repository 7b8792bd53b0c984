"""Han et al.'s LeNets, pruned further than the published magnitude results.

`keras-prune lenet300` prunes LeNet-300-100 (784-300-100-10) and
`keras-prune lenet5` the Caffe LeNet-5 (conv 5x5x20, pool, conv 5x5x50,
pool, Dense 500, Dense 10), every layer to its own kept fraction. The
recipe, each part a stock Keras or keras_prune piece:

1. dense training on randomly shifted images (`ShiftedImages`);
2. a sensitivity scan of the dense network on held-out training images
   (`kp.sensitivity_scan`, Han et al.'s Fig. 5), reported;
3. gradual pruning (`IterativePruningCallback`, one target per layer on a
   polynomial or geometric schedule) with a dense teacher (knowledge
   distillation, Hinton et al. 2015, arXiv:1503.02531): the network's own
   dense version, or a dense LeNet-5 (`--teacher lenet5`), and an
   `AccuracyGuard` on the held-out images. Each cut ranks by magnitude, or
   (`--ranking variational`, LeNet-5's default) by signal-to-noise ratio
   under sparse variational dropout (`kp.add_variational_dropout`,
   Molchanov et al. 2017, arXiv:1701.05369);
4. retraining at the final masks with a lower learning rate (without the
   noise).

Every epoch is evaluated on the test set and recorded; the result is the
last epoch's test error, never the best epoch picked on the test set.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from keras import ops

import keras_prune as kp
from keras_prune.experiments.mnist import (
    Data,
    prepare_data,
    save_without_optimizer,
    settings,
    versions,
)
from keras_prune.experiments.progress import RunFolder
from keras_prune.experiments.requirements import check
from keras_prune.experiments.settings import (
    Lenet5Config,
    Lenet300Config,
    LenetConfig,
)

__all__ = ["lenet300", "lenet5", "run", "settings"]

SCAN_SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995)


def lenet300() -> keras.Model:
    """LeNet-300-100 on 28x28x1 images (Han et al. 2015, Table 2).

    Example:

    >>> lenet300().count_params()
    266610
    """
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Flatten(name="flatten"),
            layers.Dense(300, activation="relu", name="fc1"),
            layers.Dense(100, activation="relu", name="fc2"),
            layers.Dense(10, name="fc3"),
        ],
        name="lenet_300_100",
    )


def lenet5() -> keras.Model:
    """The Caffe LeNet-5 (Han et al. 2015, Table 3): no activation after
    the convolutions, as in Caffe's `lenet_train_test.prototxt`.

    Example:

    >>> lenet5().count_params()
    431080
    """
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Conv2D(20, 5, name="conv1"),
            layers.MaxPooling2D(2, name="pool1"),
            layers.Conv2D(50, 5, name="conv2"),
            layers.MaxPooling2D(2, name="pool2"),
            layers.Flatten(name="flatten"),
            layers.Dense(500, activation="relu", name="fc1"),
            layers.Dense(10, name="fc2"),
        ],
        name="lenet5",
    )


NETWORKS = {Lenet300Config: lenet300, Lenet5Config: lenet5}
# `LenetConfig.teacher`'s choices other than "dense".
TEACHER_NETWORKS = {"lenet5": lenet5}


@keras.saving.register_keras_serializable("keras_prune")
class DistillationLoss(keras.losses.Loss):
    """Cross-entropy with the labels, plus the teacher's softened outputs.

    `y_true` packs the label in column 0 and, where a teacher is used, its
    logits in the other columns (`ShiftedImages` makes them); with only the
    label it is the plain cross-entropy. The loss is `(1 - weight) * CE +
    weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))`
    (Hinton et al. 2015, arXiv:1503.02531; T^2 keeps the soft part's
    gradients at the scale of the hard part's).

    Example:

    >>> loss = DistillationLoss(weight=0.5, temperature=2.0)
    >>> logits = np.array([[2.0, 0.0]])
    >>> float(loss(np.array([[0.0, 2.0, 0.0]]), logits))  # teacher agrees: CE/2
    0.0634...
    """

    def __init__(self, weight: float = 0.0, temperature: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.weight, self.temperature = float(weight), float(temperature)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        labels = ops.cast(y_true[:, 0], "int32")
        hard = keras.losses.sparse_categorical_crossentropy(
            labels, y_pred, from_logits=True
        )
        if y_true.shape[-1] == 1 or self.weight == 0.0:
            return hard
        t = self.temperature
        teacher = ops.log_softmax(y_true[:, 1:] / t)
        student = ops.log_softmax(y_pred / t)
        soft = ops.sum(ops.exp(teacher) * (teacher - student), axis=-1) * t * t
        return (1.0 - self.weight) * hard + self.weight * soft

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "weight": self.weight,
            "temperature": self.temperature,
        }


@keras.saving.register_keras_serializable("keras_prune")
def label_accuracy(y_true: Any, y_pred: Any) -> Any:
    """Accuracy against the label in column 0 of `y_true` (see
    `DistillationLoss`)."""
    labels = ops.cast(y_true[:, 0], "int32")
    return ops.cast(ops.equal(labels, ops.argmax(y_pred, axis=-1)), "float32")


def compile_model(
    model: keras.Model,
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule,
    config: LenetConfig,
    weight_decay: float = 0.0,
):
    """Adam (AdamW with a `weight_decay` above 0, which leaves variational
    dropout's `log_sigma2` alone), `DistillationLoss`, and `label_accuracy`
    logged as accuracy."""
    optimizer = keras.optimizers.Adam(learning_rate)
    if weight_decay:
        optimizer = keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay)
        optimizer.exclude_from_weight_decay(var_names=["log_sigma2"])
    model.compile(
        optimizer,
        DistillationLoss(config.distill, config.temperature),
        metrics=[keras.metrics.MeanMetricWrapper(label_accuracy, name="accuracy")],
    )


class ShiftedImages(keras.utils.PyDataset):
    """Batches of images shifted at random by up to `shift` pixels (zeros
    fill in), in a shuffled order; `y` holds the label and, with a
    `teacher`, the teacher's logits on the same shifted images.

    Each epoch draws a new order and new shifts; they come from `seed`
    alone, so the same seed gives the same epochs.

    Example:

    >>> images = np.arange(2 * 28 * 28, dtype="float32").reshape(2, 28, 28, 1)
    >>> x, y = ShiftedImages(images, np.array([3, 7]), shift=0, batch_size=2)[0]
    >>> x.shape, sorted(y[:, 0].tolist())
    ((2, 28, 28, 1), [3.0, 7.0])
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        shift: int = 2,
        batch_size: int = 128,
        teacher: keras.Model | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.images, self.labels = images, labels
        self.shift, self.batch_size, self.teacher = shift, batch_size, teacher
        self.rng = np.random.default_rng(seed)
        self.on_epoch_end()

    def on_epoch_end(self) -> None:
        """Draws a new order and new shifts for the next epoch."""
        self.order = self.rng.permutation(len(self.images))
        self.offsets = self.rng.integers(0, 2 * self.shift + 1, (len(self.images), 2))

    def __len__(self) -> int:
        return math.ceil(len(self.images) / self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        chosen = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        images = self.images[chosen]
        if self.shift:
            k = self.shift
            padded = np.pad(images, ((0, 0), (k, k), (k, k), (0, 0)))
            windows = np.lib.stride_tricks.sliding_window_view(
                padded, images.shape[1:3], axis=(1, 2)
            )  # (batch, 2k+1, 2k+1, channels, 28, 28)
            dy, dx = self.offsets[chosen].T
            images = np.ascontiguousarray(
                windows[np.arange(len(chosen)), dy, dx].transpose(0, 2, 3, 1)
            )
        y = self.labels[chosen].astype("float32")[:, None]
        if self.teacher is not None:
            # One compiled call (an eager call per batch took ~1.5x longer).
            logits = ops.convert_to_numpy(self.teacher.predict_on_batch(images))
            y = np.concatenate([y, logits], axis=1)
        return images, y


def held_out(data: Data, count: int) -> tuple[Data, tuple[np.ndarray, np.ndarray]]:
    """Splits the last `count` training images off as validation data."""
    if count >= len(data.x_train):
        raise ValueError(
            f"Expected --validation to leave training images. Received: "
            f"--validation={count} of {len(data.x_train)} training images"
        )
    train = dataclasses.replace(
        data, x_train=data.x_train[:-count], y_train=data.y_train[:-count]
    )
    return train, (data.x_train[-count:], _label_column(data.y_train[-count:]))


def _label_column(labels: np.ndarray) -> np.ndarray:
    return labels.astype("float32")[:, None]


def kept_fractions(model: keras.Model) -> dict[str, float]:
    """`{"kept": of all masked weights, "kept_<layer>": of each layer's}`."""
    layers = kp.masked_layers(model)
    sizes = [sum(math.prod(m.shape) for m in layer.masks.values()) for layer in layers]
    alive = [
        (1.0 - layer.sparsity) * size for layer, size in zip(layers, sizes, strict=True)
    ]
    return {
        "kept": sum(alive) / sum(sizes),
        **{f"kept_{layer.name}": 1.0 - layer.sparsity for layer in layers},
    }


def _row(
    epoch: int,
    phase: str,
    model: keras.Model,
    validation: float,
    test: float,
    guard: str = "",
) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "phase": phase,
        **kept_fractions(model),
        "val_accuracy": validation,
        "test_error": 1.0 - test,
        "guard": guard,
    }


def _evaluate(model: keras.Model, images: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy on `images`, `labels` a vector or a label column."""
    return float(
        model.evaluate(
            images,
            _label_column(labels.reshape(-1)),
            batch_size=1000,
            verbose=0,
            return_dict=True,
        )["accuracy"]
    )


# `LenetConfig.dense_decay`'s choices: (learning rate, steps) -> the
# learning rate (or its schedule) of the dense training.
DENSE_DECAY_BUILDERS: dict[str, Callable[[float, int], Any]] = {
    "cosine": lambda rate, steps: keras.optimizers.schedules.CosineDecay(rate, steps),
    "none": lambda rate, steps: rate,
}


def train_network(
    network: Callable[[], keras.Model], config: LenetConfig, data: Data, verbose: int
) -> keras.Model:
    """A new `network()` trained on shifted images (`config.shift`), as the
    dense network and the teacher are.

    Args:
        network: Builds the untrained model (`lenet300`, `lenet5`).
        config: `dense_epochs` epochs of `batch_size` images, Adam from
            `dense_lr`, its rate falling as `dense_decay` says (`"cosine"`:
            to 0 after the last step), the `distill` loss (no teacher here),
            seeded by `seed`. Call `config.validate()` first: an unknown
            `dense_decay` is a `KeyError` here.
        data: The training images `(n, 28, 28, 1)` and labels `(n,)`.
        verbose: Keras's `fit` verbosity.

    Returns:
        The trained model, compiled (its optimizer holds the final rate).

    Example: see `tests/test_lenet.py`, which trains LeNet-300-100 on 64
    random images for 2 epochs.
    """
    keras.utils.set_random_seed(config.seed)
    model = network()
    images = ShiftedImages(
        data.x_train, data.y_train, config.shift, config.batch_size, seed=config.seed
    )
    learning_rate = DENSE_DECAY_BUILDERS[config.dense_decay](
        config.dense_lr, config.dense_epochs * len(images)
    )
    compile_model(model, learning_rate, config)
    model.fit(images, epochs=config.dense_epochs, verbose=verbose)
    return model


def train_dense(
    config: LenetConfig,
    data: Data,
    validation: tuple[np.ndarray, np.ndarray],
    folder: RunFolder,
    verbose: int = 2,
) -> keras.Model:
    """The dense network, trained on shifted images, or read back from
    `folder` (its row is row 0)."""
    if folder.rows:
        return folder.load_model("dense")
    dense = train_network(NETWORKS[type(config)], config, data, verbose)
    row = {
        "epoch": config.dense_epochs - 1,
        "phase": "dense",
        "kept": 1.0,
        **{f"kept_{name}": 1.0 for name in config.kept()},
        "val_accuracy": _evaluate(dense, *validation),
        "test_error": 1.0 - _evaluate(dense, data.x_test, data.y_test),
        "guard": "",
    }
    folder.record([row], {"dense": dense})
    return dense


def train_teacher(
    config: LenetConfig,
    dense: keras.Model,
    data: Data,
    folder: RunFolder,
    verbose: int = 2,
) -> keras.Model | None:
    """The network whose softened outputs the pruned one learns from:
    `None` without distillation, `dense` itself, or the dense network
    `config.teacher` names, trained as `dense` was (or read back from
    `folder`, which checkpoints it with the dense row)."""
    if not config.distill:
        return None
    network = TEACHER_NETWORKS.get(config.teacher)
    if network is None or network is NETWORKS[type(config)]:
        return dense
    if "teacher" in folder.checkpoints:
        return folder.load_model("teacher")
    teacher = train_network(network, config, data, verbose)
    folder.record(folder.rows, {"teacher": teacher})
    return teacher


def scan(
    dense: keras.Model, validation: tuple[np.ndarray, np.ndarray]
) -> kp.SensitivityScan:
    """The dense network's sensitivity scan on the held-out images."""
    return kp.sensitivity_scan(
        dense, validation, sparsities=SCAN_SPARSITIES, batch_size=1000
    )


def _geometric(kept: float, epochs: int) -> kp.PruningSchedule:
    # A layer kept whole would need factor 1, which GeometricSchedule
    # refuses; its final sparsity 0 caps any factor below 1.
    factor = min(kept ** (1.0 / epochs), 1.0 - 1e-6)
    return kp.GeometricSchedule(1.0 - kept, 0, epochs - 1, factor=factor)


# `LenetConfig.schedule`'s choices: (kept fraction, epochs) -> schedule.
SCHEDULE_BUILDERS: dict[str, Callable[[float, int], kp.PruningSchedule]] = {
    "polynomial": lambda kept, epochs: kp.PolynomialSchedule(1.0 - kept, 0, epochs - 1),
    "geometric": _geometric,
}


def layer_schedule(config: LenetConfig, kept: float) -> kp.PruningSchedule:
    """The schedule that takes one layer from all its weights to the fraction
    `kept` in `config.prune_epochs` cuts, one per epoch from epoch 0:
    `config.schedule` "polynomial" (sparsity a cubic of the epoch, Zhu &
    Gupta) or "geometric" (each cut keeps the same share
    `kept ** (1 / prune_epochs)` of the survivors). The last cut lands
    exactly on `kept`."""
    build = SCHEDULE_BUILDERS.get(config.schedule)
    if build is None:
        raise ValueError(
            f"Expected --schedule one of {', '.join(SCHEDULE_BUILDERS)}. "
            f"Received: --schedule={config.schedule!r}"
        )
    return build(kept, config.prune_epochs)


def prune(
    config: LenetConfig,
    dense: keras.Model,
    data: Data,
    validation: tuple[np.ndarray, np.ndarray],
    folder: RunFolder,
    verbose: int = 2,
    teacher: keras.Model | None = None,
) -> tuple[keras.Model, kp.IterativePruningCallback]:
    """Prunes every layer to its kept fraction on `layer_schedule` over
    `prune_epochs`, then retrains `tune_epochs`, learning from `teacher`'s
    softened outputs where one is given, with AdamW where `weight_decay` is
    above 0; one row and checkpoint per epoch, continuing after the last
    recorded one. With `ranking="variational"` the pruning epochs train
    with sparse variational dropout and cut by signal-to-noise ratio; the
    noise is removed (and the optimizer made anew) for the retraining."""
    done = len(folder.rows) - 1
    if done:
        masked = folder.load_model("masked")
    else:
        folder.restore_python_random()
        masked = kp.make_prunable(dense)
        if config.ranking == "variational":
            kp.add_variational_dropout(
                masked, examples=len(data.x_train), seed=config.seed
            )
        compile_model(masked, config.prune_lr, config, config.weight_decay)
    kept_rows = [row for row in folder.rows if not row["guard"].startswith("restored")]
    guard = kp.AccuracyGuard(
        "val_accuracy",
        tolerance=config.tolerance,
        baseline=max(row["val_accuracy"] for row in kept_rows),
    )
    pruning = kp.IterativePruningCallback(
        schedule={
            name: layer_schedule(config, kept) for name, kept in config.kept().items()
        },
        guard=guard,
        ranking="signal_to_noise" if config.ranking == "variational" else "magnitude",
    )
    rate = keras.callbacks.LearningRateScheduler(
        lambda epoch: config.prune_lr if epoch < config.prune_epochs else config.tune_lr
    )
    for epoch in range(done, config.prune_epochs + config.tune_epochs):
        if (
            epoch >= config.prune_epochs
            and not _cuts_pending(masked, config, pruning)
            and kp.remove_variational_dropout(masked)
        ):
            compile_model(masked, config.tune_lr, config, config.weight_decay)
        keras.utils.set_random_seed(config.seed + 1 + epoch)
        events = len(pruning.guard_events)
        history = masked.fit(
            ShiftedImages(
                data.x_train,
                data.y_train,
                config.shift,
                config.batch_size,
                teacher=teacher,
                seed=config.seed + 1 + epoch,
            ),
            initial_epoch=epoch,
            epochs=epoch + 1,
            validation_data=validation,
            callbacks=[pruning, rate],
            verbose=verbose,
        )
        validation_accuracy = float(history.history["val_accuracy"][-1])
        guard_note = ""
        if len(pruning.guard_events) > events:
            event = pruning.guard_events[-1]
            if event.action != "kept":
                # The row describes the model as the epoch leaves it.
                guard_note = (
                    f"{event.action} (tried {event.kept_fraction:.2%} kept: "
                    f"val {event.value:.2%})"
                )
                validation_accuracy = _evaluate(masked, *validation)
        row = _row(
            config.dense_epochs + epoch,
            "prune" if epoch < config.prune_epochs else "tune",
            masked,
            validation_accuracy,
            _evaluate(masked, data.x_test, data.y_test),
            guard_note,
        )
        folder.record([*folder.rows, row], {"masked": masked})
    return masked, pruning


def _cuts_pending(
    masked: keras.Model, config: LenetConfig, pruning: kp.IterativePruningCallback
) -> bool:
    """Whether `pruning` has cuts left to make: a layer keeps more than its
    target (the guard's retries delay cuts past `prune_epochs`) and the
    guard has not stopped pruning. Variational dropout stays until then, as
    the cuts rank by its noise."""
    if any(event.action == "restored, stopped" for event in pruning.guard_events):
        return False
    layers = {layer.name: layer for layer in kp.masked_layers(masked)}
    for name, kept in config.kept().items():
        layer = layers[name]
        size = sum(math.prod(mask.shape) for mask in layer.masks.values())
        if 1.0 - layer.sparsity > kept + 0.5 / size:
            return True
    return False


@dataclasses.dataclass
class LenetResult:
    """Everything a run measured; `lenet_report.write_report` renders it."""

    config: LenetConfig
    rows: list[dict[str, Any]]
    scan: kp.SensitivityScan
    summary: str
    # Test error of a teacher other than the dense network (`None`: none).
    teacher_error: float | None
    wall_seconds: float
    versions: dict[str, str]


def run(
    config: LenetConfig, verbose: int = 2, folder: RunFolder | None = None
) -> LenetResult:
    """Trains dense, scans, prunes every layer, retrains; returns every
    number. Progress is recorded as in `mnist.run`: a stopped run continues
    after its last finished epoch.

    Raises:
        RuntimeError: If TensorFlow or matplotlib is missing, or Keras runs
            on another backend (before anything is trained).
        FileExistsError: If `folder` is `None` and `config.out` holds a run.

    Example:

    >>> result = run(Lenet300Config(data="mnist.npz", quick=True))  # doctest: +SKIP
    >>> f"{result.rows[-1]['kept']:.2%}"  # doctest: +SKIP
    '1.46%'
    """
    check("lenet300" if isinstance(config, Lenet300Config) else "lenet5")
    config = config.validate().resolved()
    if folder is None:
        folder = RunFolder(config.out, settings(config))
    data, validation = held_out(prepare_data(config), config.validation)
    dense = train_dense(config, data, validation, folder, verbose)
    teacher = train_teacher(config, dense, data, folder, verbose)
    sensitivity = scan(dense, validation)
    sensitivity.to_csv(folder.file("sensitivity.csv"))
    masked, _ = prune(config, dense, data, validation, folder, verbose, teacher)
    # Stock Keras layers, pruned weights at zero: loads anywhere.
    save_without_optimizer(kp.strip_pruning(masked), folder.file("pruned.keras"))
    folder.record(folder.rows, finished=True)
    return LenetResult(
        config=config,
        rows=folder.rows,
        scan=sensitivity,
        summary=str(kp.sparsity_summary(masked)),
        teacher_error=(
            None
            if teacher is None or teacher is dense
            else 1.0 - _evaluate(teacher, data.x_test, data.y_test)
        ),
        wall_seconds=folder.seconds(),
        versions=versions(),
    )
