"""The MNIST job's settings, importable without Keras or TensorFlow (the
command line reads them to build its options and check its dependencies
before anything heavy loads)."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from keras_prune.experiments.data import check_path

_Config = TypeVar("_Config", bound="JobConfig")


def _option(default, help_text):
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """Settings every MNIST job shares: the data, the output folder, the
    dense training. Every field is a command-line option."""

    data: str | None = _option(
        None, "MNIST .npz in Keras layout (default: download with keras.datasets)"
    )
    out: str = _option(
        "runs/mnist",
        "output folder for report.md, rounds.csv, the plot and the checkpoints "
        "that --resume continues from",
    )
    quick: bool = _option(
        False,
        "4,000 training and 2,000 test images unless given, one epoch per stage "
        "(fewer epochs everywhere)",
    )
    seed: int = _option(0, "random seed of Keras, NumPy and TensorFlow")
    batch_size: int = _option(128, "training batch size")
    dense_epochs: int = _option(3, "epochs of dense training before pruning")
    dense_lr: float = _option(1e-3, "Adam learning rate of the dense training")
    train_samples: int | None = _option(None, "use only the first N training images")
    test_samples: int | None = _option(None, "use only the first N test images")

    def _checks(self) -> list[tuple[str, str, Any, str]]:
        """`(field, what it is, test, expected)` for each setting to check."""
        return [
            ("batch_size", "a batch size", lambda v: v >= 1, ">= 1"),
            ("dense_epochs", "a number of epochs", lambda v: v >= 1, ">= 1"),
            ("dense_lr", "a learning rate", lambda v: v > 0, "> 0"),
            ("seed", "a random seed", lambda v: v >= 0, ">= 0"),
            (
                "train_samples",
                "a number of images",
                lambda v: v is None or v >= 1,
                ">= 1",
            ),
            (
                "test_samples",
                "a number of images",
                lambda v: v is None or v >= 1,
                ">= 1",
            ),
        ]

    def validate(self: _Config) -> _Config:
        """Checks every setting before anything runs; returns `self`.

        Raises:
            ValueError: Naming the first bad option and the value received.
            FileNotFoundError: If `data` is given and is not a file.

        Example:

        >>> MnistConfig(factor=1.5).validate()
        Traceback (most recent call last):
        ...
        ValueError: Expected --factor (the fraction kept per round) in (0, 1). \
Received: --factor=1.5
        """
        for name, what, valid, expected in self._checks():
            value = getattr(self, name)
            if not valid(value):
                option = "--" + name.replace("_", "-")
                raise ValueError(
                    f"Expected {option} ({what}) {expected}. "
                    f"Received: {option}={value!r}"
                )
        check_path(self.data)
        return self

    def resolved(self: _Config) -> _Config:
        """Fills the quick mode's smaller sizes where none was given.

        Example:

        >>> MnistConfig(quick=True).resolved().train_samples
        4000
        """
        if not self.quick:
            return self
        return dataclasses.replace(
            self,
            dense_epochs=min(self.dense_epochs, 1),
            train_samples=self.train_samples or 4000,
            test_samples=self.test_samples or 2000,
            **self._quick(),
        )

    def _quick(self) -> dict[str, Any]:
        """The job's own settings in quick mode."""
        return {}


@dataclasses.dataclass(frozen=True)
class SeedNetConfig(JobConfig):
    """Settings of the jobs on the seed report's convnet, which has dropout."""

    dropout: float = _option(0.5, "dropout rate before fc2 in the dense network")

    def _checks(self) -> list[tuple[str, str, Any, str]]:
        return [
            ("dropout", "a dropout rate", lambda v: 0 <= v < 1, "in [0, 1)"),
            *super()._checks(),
        ]


@dataclasses.dataclass(frozen=True)
class MnistConfig(SeedNetConfig):
    """Settings of one MNIST pruning run (`keras-prune mnist`): the seed
    report's pruning of fc1 and fc2, round by round.

    Example:

    >>> MnistConfig(quick=True).rounds
    21
    """

    rounds: int = _option(
        21,
        "pruning rounds; round k keeps factor**k of the Dense weights (21: the "
        "seed report's whole ladder, down to 0.056%%)",
    )
    factor: float = _option(0.7, "fraction of the Dense weights kept per round")
    epochs_per_round: int = _option(2, "retraining epochs after each cut")
    prune_lr: float = _option(3e-4, "Adam learning rate while pruning")
    final_lr: float = _option(1e-4, "learning rate of the last two rounds")
    fc2_min_kept: float = _option(0.04, "least fraction of fc2's weights kept")
    scale_dropout: bool = _option(
        True, "shrink dropout with the connections (Han et al.)"
    )
    prune_convs: bool = _option(
        False,
        "prune conv1 and conv2 too, on the same ladder down to their floors",
    )
    conv1_min_kept: float = _option(
        0.5, "with --prune-convs, least fraction of conv1's 800 weights kept"
    )
    conv2_min_kept: float = _option(
        0.1, "with --prune-convs, least fraction of conv2's 51,200 weights kept"
    )

    def _checks(self) -> list[tuple[str, str, Any, str]]:
        return [
            ("rounds", "the number of pruning rounds", lambda v: v >= 1, ">= 1"),
            ("factor", "the fraction kept per round", lambda v: 0 < v < 1, "in (0, 1)"),
            ("fc2_min_kept", "a kept fraction", lambda v: 0 <= v <= 1, "in [0, 1]"),
            ("conv1_min_kept", "a kept fraction", lambda v: 0 < v <= 1, "in (0, 1]"),
            ("conv2_min_kept", "a kept fraction", lambda v: 0 < v <= 1, "in (0, 1]"),
            ("epochs_per_round", "a number of epochs", lambda v: v >= 1, ">= 1"),
            ("prune_lr", "a learning rate", lambda v: v > 0, "> 0"),
            ("final_lr", "a learning rate", lambda v: v > 0, "> 0"),
            *super()._checks(),
        ]

    def _quick(self) -> dict[str, Any]:
        return {"epochs_per_round": 1}


@dataclasses.dataclass(frozen=True)
class StructuredConfig(SeedNetConfig):
    """Settings of the structured MNIST run (`keras-prune mnist-structured`):
    whole filters of conv1 and conv2 and units of fc1 pruned by their L1 norm
    (`granularity="unit"`), then `shrink`.

    Example:

    >>> StructuredConfig(quick=True).resolved().prune_epochs
    2
    """

    out: str = _option(
        "runs/mnist-structured",
        "output folder for report.md, rounds.csv, accuracy_vs_speedup.png, "
        "shrunk.keras and the checkpoints that --resume continues from",
    )
    kept_conv1: float = _option(0.375, "fraction of conv1's 32 filters kept")
    kept_conv2: float = _option(0.25, "fraction of conv2's 64 filters kept")
    kept_fc1: float = _option(0.125, "fraction of fc1's 1024 units kept")
    norm: str = _option("l1", "how a filter or unit is ranked: l1 or l2")
    prune_epochs: int = _option(
        6, "epochs over which the polynomial schedule removes filters and units"
    )
    tune_epochs: int = _option(3, "fine-tuning epochs after the last cut")
    prune_lr: float = _option(3e-4, "Adam learning rate while pruning")
    tune_lr: float = _option(1e-4, "Adam learning rate of the fine-tuning")

    def _checks(self) -> list[tuple[str, str, Any, str]]:
        kept = (lambda v: 0 < v <= 1, "in (0, 1]")
        return [
            ("kept_conv1", "a kept fraction", *kept),
            ("kept_conv2", "a kept fraction", *kept),
            ("kept_fc1", "a kept fraction", *kept),
            ("norm", "a norm", lambda v: v in ("l1", "l2"), "to be l1 or l2"),
            ("prune_epochs", "a number of epochs", lambda v: v >= 1, ">= 1"),
            ("tune_epochs", "a number of epochs", lambda v: v >= 0, ">= 0"),
            ("prune_lr", "a learning rate", lambda v: v > 0, "> 0"),
            ("tune_lr", "a learning rate", lambda v: v > 0, "> 0"),
            *super()._checks(),
        ]

    def _quick(self) -> dict[str, Any]:
        return {
            "prune_epochs": min(self.prune_epochs, 2),
            "tune_epochs": min(self.tune_epochs, 1),
        }


# The networks `LenetConfig.teacher` names, besides the pruned one's own.
TEACHERS = ("dense", "lenet5")
SCHEDULES = ("polynomial", "geometric")
# `LenetConfig.ranking`'s choices.
RANKINGS = ("magnitude", "variational")
# How the dense training's learning rate falls (`LenetConfig.dense_decay`).
DENSE_DECAYS = ("cosine", "none")


@dataclasses.dataclass(frozen=True)
class LenetConfig(JobConfig):
    """Settings shared by `keras-prune lenet300` and `keras-prune lenet5`:
    Han et al.'s networks pruned gradually, every layer to its own target,
    with the dense network as teacher and an accuracy guard."""

    dense_epochs: int = _option(30, "epochs of dense training before pruning")
    dense_decay: str = _option(
        "cosine",
        "how the dense training's learning rate falls: cosine (from --dense-lr "
        "to 0 over --dense-epochs: a dense network and teacher that end at a "
        "minimum, not wherever the last step left them) or none (constant)",
    )
    validation: int = _option(
        5000,
        "last training images held out for the guard and the sensitivity scan "
        "(never trained on; the test set is only reported)",
    )
    shift: int = _option(
        1, "training images shifted at random by up to this many pixels (0: none)"
    )
    prune_epochs: int = _option(
        60, "epochs over which the schedule reaches the targets"
    )
    schedule: str = _option(
        "polynomial",
        "how each layer's kept fraction falls to its target: polynomial (Zhu & "
        "Gupta's cubic: most weights cut early, the largest share of the "
        "survivors about three-quarters of the way, then tapering off) or "
        "geometric (the same share of the survivors cut every epoch, as in Han "
        "et al.'s rounds)",
    )
    tune_epochs: int = _option(30, "epochs of retraining after the last cut")
    prune_lr: float = _option(
        1e-3, "Adam (AdamW with --weight-decay) learning rate while pruning"
    )
    tune_lr: float = _option(
        1e-4, "Adam (AdamW with --weight-decay) learning rate after the last cut"
    )
    weight_decay: float = _option(
        0.0,
        "decoupled weight decay while pruning and retraining (AdamW, Loshchilov "
        "& Hutter; 0: plain Adam): weights the loss does not hold up shrink "
        "towards zero, so the smallest ones are also the least needed",
    )
    ranking: str = _option(
        "magnitude",
        "what each cut ranks the live weights by: magnitude (Han et al.), or "
        "variational (sparse variational dropout, Molchanov et al. 2017: while "
        "pruning, every weight learns a noise level, and the weights that are "
        "mostly noise are cut first; retraining runs without the noise)",
    )
    teacher: str = _option(
        "dense",
        "the network whose softened outputs the pruned one learns from: dense "
        "(its own dense version) or lenet5 (a dense LeNet-5, trained first on "
        "the same images; for keras-prune lenet5 the same as dense)",
    )
    distill: float = _option(
        0.7,
        "weight of the teacher's softened outputs in the pruned network's "
        "loss (knowledge distillation; 0: labels only)",
    )
    temperature: float = _option(4.0, "softmax temperature of the distillation")
    tolerance: float = _option(
        0.015,
        "accuracy guard: largest fall of validation accuracy below the best "
        "kept state before a cut is undone and retried with half the step",
    )

    def _checks(self) -> list[tuple[str, str, Any, str]]:
        return [
            ("validation", "a number of images", lambda v: v >= 1, ">= 1"),
            ("shift", "a number of pixels", lambda v: 0 <= v <= 8, "in [0, 8]"),
            ("prune_epochs", "a number of epochs", lambda v: v >= 1, ">= 1"),
            ("tune_epochs", "a number of epochs", lambda v: v >= 0, ">= 0"),
            ("prune_lr", "a learning rate", lambda v: v > 0, "> 0"),
            ("tune_lr", "a learning rate", lambda v: v > 0, "> 0"),
            ("weight_decay", "a weight decay", lambda v: v >= 0, ">= 0"),
            (
                "schedule",
                "a pruning schedule",
                lambda v: v in SCHEDULES,
                f"one of {', '.join(SCHEDULES)}",
            ),
            (
                "dense_decay",
                "a learning-rate decay",
                lambda v: v in DENSE_DECAYS,
                f"one of {', '.join(DENSE_DECAYS)}",
            ),
            (
                "ranking",
                "a ranking criterion",
                lambda v: v in RANKINGS,
                f"one of {', '.join(RANKINGS)}",
            ),
            (
                "teacher",
                "a teacher network",
                lambda v: v in TEACHERS,
                f"one of {', '.join(TEACHERS)}",
            ),
            ("distill", "a loss weight", lambda v: 0 <= v <= 1, "in [0, 1]"),
            ("temperature", "a temperature", lambda v: v > 0, "> 0"),
            ("tolerance", "an accuracy drop", lambda v: v >= 0, ">= 0"),
            *[
                (f"kept_{name}", "a kept fraction", lambda v: 0 < v <= 1, "in (0, 1]")
                for name in self.kept()
            ],
            *super()._checks(),
        ]

    def kept(self) -> dict[str, float]:
        """`{layer name: fraction of its weights kept at the end}`."""
        return {
            field.name.removeprefix("kept_"): getattr(self, field.name)
            for field in dataclasses.fields(self)
            if field.name.startswith("kept_")
        }

    def _quick(self) -> dict[str, Any]:
        return {
            "validation": min(self.validation, 1000),
            "prune_epochs": min(self.prune_epochs, 3),
            "tune_epochs": min(self.tune_epochs, 1),
        }


@dataclasses.dataclass(frozen=True)
class Lenet300Config(LenetConfig):
    """Settings of `keras-prune lenet300`: LeNet-300-100 (784-300-100-10).

    Example:

    >>> Lenet300Config().kept()
    {'fc1': 0.01, 'fc2': 0.03333333, 'fc3': 0.5}
    """

    out: str = _option(
        "runs/lenet300",
        "output folder for report.md, rounds.csv, the plots and the checkpoints "
        "that --resume continues from",
    )
    teacher: str = _option(
        "lenet5",
        "the network whose softened outputs the pruned one learns from: lenet5 "
        "(a dense LeNet-5, trained first on the same images; the stronger "
        "teacher) or dense (LeNet-300-100's own dense version)",
    )
    validation: int = _option(
        1000,
        "last training images held out for the guard and the sensitivity scan "
        "(never trained on; the test set is only reported). LeNet-300-100 "
        "underfits once pruned, so it keeps more images to train on",
    )
    kept_fc1: float = _option(0.01, "fraction of fc1's 235,200 weights kept")
    kept_fc2: float = _option(
        0.03333333, "fraction of fc2's 30,000 weights kept (0.03333333 keeps 1,000)"
    )
    kept_fc3: float = _option(0.5, "fraction of fc3's 1,000 weights kept")


@dataclasses.dataclass(frozen=True)
class Lenet5Config(LenetConfig):
    """Settings of `keras-prune lenet5`: the Caffe LeNet-5, every layer
    pruned.

    Example:

    >>> Lenet5Config().kept()
    {'conv1': 0.4, 'conv2': 0.025, 'fc1': 0.0025, 'fc2': 0.05}
    """

    out: str = _option(
        "runs/lenet5",
        "output folder for report.md, rounds.csv, the plots and the checkpoints "
        "that --resume continues from",
    )
    ranking: str = _option(
        "variational",
        "what each cut ranks the live weights by: variational (sparse "
        "variational dropout, Molchanov et al. 2017: while pruning, every weight "
        "learns a noise level, and the weights that are mostly noise are cut "
        "first; retraining runs without the noise) or magnitude (Han et al.; "
        "runs recorded before this option)",
    )
    kept_conv1: float = _option(0.4, "fraction of conv1's 500 weights kept")
    kept_conv2: float = _option(0.025, "fraction of conv2's 25,000 weights kept")
    kept_fc1: float = _option(0.0025, "fraction of fc1's 400,000 weights kept")
    kept_fc2: float = _option(0.05, "fraction of fc2's 5,000 weights kept")


# Settings added after runs were recorded whose earlier runs did something
# other than today's default, by the settings class that has them: a run
# recorded without the setting had this value, and resumes only with it.
EARLIER_VALUES: dict[type[JobConfig], dict[str, Any]] = {
    LenetConfig: {"dense_decay": "none"},
    Lenet5Config: {"ranking": "magnitude"},
}


def earlier_values(config_class: type[JobConfig]) -> dict[str, Any]:
    """What runs recorded before each of `config_class`'s later settings
    existed did instead of today's default.

    Example:

    >>> earlier_values(Lenet5Config), earlier_values(MnistConfig)
    ({'dense_decay': 'none', 'ranking': 'magnitude'}, {})
    """
    found: dict[str, Any] = {}
    for owner, values in EARLIER_VALUES.items():
        if issubclass(config_class, owner):
            found.update(values)
    return found
