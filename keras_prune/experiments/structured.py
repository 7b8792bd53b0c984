"""The structured variant of the main job: a smaller, faster seed network.

Unstructured pruning of the seed network's Dense layers speeds the whole
model up by at most about 1.28x: its convolutions, which no mainstream CPU
runtime speeds up when their weights are sparse, take most of the time.
`run` instead prunes whole filters of conv1 and conv2 and whole units of fc1
(`IterativePruningCallback(granularity="unit")`, ranked by their L1 norm on
a polynomial schedule), fine-tunes, and removes them with `shrink`: the
result is a dense network of stock layers, faster on every runtime. After
every epoch it shrinks a copy and times it against the dense network, so the
table and plot show accuracy against the speed-up actually measured.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
from functools import partial
from typing import Any

import keras
import numpy as np

import keras_prune as kp
from keras_prune.experiments.mnist import (  # noqa: F401 - settings: the CLI's
    Data,
    Round,
    _compile,
    prepare_data,
    save_without_optimizer,
    settings,
    time_test_set,
    trained_dense,
    versions,
)
from keras_prune.experiments.progress import RunFolder
from keras_prune.experiments.requirements import check
from keras_prune.experiments.settings import StructuredConfig
from keras_prune.experiments.timing import time_interleaved

PRUNED = ("conv1", "conv2", "fc1")


@dataclasses.dataclass
class Epoch:
    """One row of the results: the state after an epoch of pruning or
    fine-tuning (row 0: the dense network)."""

    epoch: int
    phase: str
    kept_conv1: float
    kept_conv2: float
    kept_fc1: float
    flops: float
    speedup: float
    test_accuracy: float


@dataclasses.dataclass
class StructuredResult:
    """Everything a run measured; `structured_report.write_report` renders it.

    `times` hold medians in seconds over the test set, one compiled call
    (`"dense"`, `"shrunk"`) and `predict` (`"dense predict"`, `"shrunk
    predict"`); `sizes` `.keras` bytes without optimizer state.
    """

    config: StructuredConfig
    rows: list[Epoch]
    summary: kp.ShrinkSummary
    sizes: dict[str, int]
    times: dict[str, float]
    shrunk_accuracy: float
    max_difference: float
    wall_seconds: float
    versions: dict[str, str]


def kept_units(model: keras.Model) -> dict[str, float]:
    """Fraction of the units (filters) of each of `PRUNED` with a live
    kernel column in `model`'s masks."""
    kept = {}
    for name in PRUNED:
        mask = keras.ops.convert_to_numpy(model.get_layer(name).masks["kernel"])
        columns = mask.reshape(-1, mask.shape[-1])
        kept[name] = float(columns.any(axis=0).mean())
    return kept


def shrink_quietly(model: keras.Model) -> keras.Model:
    """`kp.shrink`, whose warnings (fc2 keeps its units: it is the output)
    the run has already shown once."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return kp.shrink(model)


def prune(
    config: StructuredConfig,
    dense: keras.Model,
    data: Data,
    verbose: int = 2,
    folder: RunFolder | None = None,
) -> tuple[keras.Model, list[Epoch]]:
    """Prunes whole filters and units for `prune_epochs`, fine-tunes for
    `tune_epochs`; returns the masked model and a row per epoch.

    Each epoch ends with a shrunk copy of the model timed against `dense`
    (3 rounds; the final comparison in `run` takes more). With a `folder`,
    each finished epoch is recorded (row, checkpoint), and rows already there
    after the dense one are epochs done: pruning continues after them.
    """
    rows = [Epoch(**row) for row in folder.rows[1:]] if folder else []
    if folder is not None and rows:
        masked = folder.load_model("masked")
    else:
        if folder is not None:
            folder.restore_python_random()
        masked = kp.make_prunable(dense)
        _compile(masked, config.prune_lr)
    kept = {
        "conv1": config.kept_conv1,
        "conv2": config.kept_conv2,
        "fc1": config.kept_fc1,
    }
    schedules: dict[str, kp.PruningSchedule] = {
        name: kp.PolynomialSchedule(1.0 - fraction, 0, config.prune_epochs - 1)
        for name, fraction in kept.items()
    }
    callbacks = [
        kp.IterativePruningCallback(
            schedule=schedules, granularity="unit", norm=config.norm
        ),
        keras.callbacks.LearningRateScheduler(
            lambda epoch: (
                config.prune_lr if epoch < config.prune_epochs else config.tune_lr
            )
        ),
    ]
    dense_flops = kp.shrink_summary(dense, dense).flops_before
    total = config.prune_epochs + config.tune_epochs
    for epoch in range(len(rows), total):
        keras.utils.set_random_seed(config.seed + 1 + epoch)
        masked.fit(
            data.x_train,
            data.y_train,
            batch_size=config.batch_size,
            initial_epoch=epoch,
            epochs=epoch + 1,
            callbacks=callbacks,
            verbose=verbose,
        )
        accuracy = masked.evaluate(
            data.x_test, data.y_test, batch_size=1000, verbose=0
        )[1]
        small = shrink_quietly(masked)
        times = time_test_set({"dense": dense, "shrunk": small}, data.x_test, repeats=3)
        fractions = kept_units(masked)
        rows.append(
            Epoch(
                epoch=config.dense_epochs + epoch,
                phase="prune" if epoch < config.prune_epochs else "tune",
                kept_conv1=fractions["conv1"],
                kept_conv2=fractions["conv2"],
                kept_fc1=fractions["fc1"],
                flops=kp.shrink_summary(small, small).flops_before / dense_flops,
                speedup=times["dense"] / times["shrunk"],
                test_accuracy=float(accuracy),
            )
        )
        if folder is not None:
            records = folder.rows[:1] + [dataclasses.asdict(r) for r in rows]
            folder.record(records, {"masked": masked})
    return masked, rows


def _dense_row(dense: Round) -> dict[str, Any]:
    """Row 0: the dense network, all of it kept."""
    row = Epoch(dense.epoch, "dense", 1.0, 1.0, 1.0, 1.0, 1.0, dense.test_accuracy)
    return dataclasses.asdict(row)


def _predict(model: keras.Model, images: np.ndarray) -> Any:
    return model.predict(images, batch_size=1000, verbose=0)


def run(
    config: StructuredConfig, verbose: int = 2, folder: RunFolder | None = None
) -> StructuredResult:
    """Trains dense, prunes filters and units, shrinks, and measures.

    Writes `shrunk.keras` (stock Keras layers only) in the output folder.
    Progress is recorded as in `mnist.run`: a stopped run continues after
    its last finished epoch with `folder` holding it.

    Raises:
        RuntimeError: If TensorFlow or matplotlib is missing, or Keras runs
            on another backend (before anything is trained).
        FileExistsError: If `folder` is `None` and `config.out` holds a run.
    """
    check("mnist-structured")
    config = config.validate().resolved()
    if folder is None:
        folder = RunFolder(config.out, settings(config))
    data = prepare_data(config)
    dense = trained_dense(config, data, folder, verbose, _dense_row)
    masked, _ = prune(config, dense, data, verbose, folder)
    shrunk = shrink_quietly(masked)
    with tempfile.TemporaryDirectory() as scratch:
        sizes = {
            "dense": save_without_optimizer(dense, os.path.join(scratch, "d.keras")),
            "shrunk": save_without_optimizer(
                shrunk, os.path.join(folder.path, "shrunk.keras")
            ),
        }
    repeats = 3 if config.quick else 15
    times = time_test_set({"dense": dense, "shrunk": shrunk}, data.x_test, repeats)
    predicts = time_interleaved(
        {
            "dense predict": partial(_predict, dense, data.x_test),
            "shrunk predict": partial(_predict, shrunk, data.x_test),
        },
        repeats=repeats,
        warmup=1,
    )
    masked_logits = _predict(masked, data.x_test)
    shrunk_logits = _predict(shrunk, data.x_test)
    folder.record(folder.rows, finished=True)
    return StructuredResult(
        config=config,
        rows=[Epoch(**row) for row in folder.rows],
        summary=kp.shrink_summary(masked, shrunk),
        sizes=sizes,
        times={**times, **predicts},
        shrunk_accuracy=float(np.mean(shrunk_logits.argmax(1) == data.y_test)),
        max_difference=float(np.abs(shrunk_logits - masked_logits).max()),
        wall_seconds=folder.seconds(),
        versions=versions(),
    )
