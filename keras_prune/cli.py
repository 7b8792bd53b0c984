"""The `keras-prune` command line (also `python -m keras_prune`)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

# Every field of `MnistConfig` becomes an option `--field-name`.
_HELP = {
    "data": "MNIST .npz in Keras layout (default: download with keras.datasets)",
    "out": "output folder for report.md, rounds.csv and accuracy_vs_kept.png",
    "quick": "a few thousand samples, one epoch per stage",
    "seed": "random seed of Keras, NumPy and TensorFlow",
    "batch_size": "training batch size",
    "dense_epochs": "epochs of dense training before pruning",
    "dense_lr": "Adam learning rate of the dense training",
    "epochs_per_round": "retraining epochs after each cut",
    "dropout": "dropout rate before fc2 in the dense network",
    "rounds": "pruning rounds; round k keeps factor**k of the Dense weights",
    "factor": "fraction of the Dense weights kept per round",
    "prune_lr": "Adam learning rate while pruning",
    "final_lr": "learning rate of the last two rounds",
    "fc2_min_kept": "least fraction of fc2's weights kept",
    "scale_dropout": "shrink dropout with the connections (Han et al.)",
    "train_samples": "use only the first N training images",
    "test_samples": "use only the first N test images",
}


def _parser() -> argparse.ArgumentParser:
    from keras_prune.experiments.mnist import MnistConfig

    parser = argparse.ArgumentParser(
        prog="keras-prune",
        description="Iterative magnitude pruning for Keras 3.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    mnist = commands.add_parser(
        "mnist",
        help="reproduce and beat the seed report on MNIST",
        description="Train the seed convnet on MNIST, prune its Dense layers "
        "round by round, export it sparse, and write a report, a CSV and a plot.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for field in dataclasses.fields(MnistConfig):
        flag = "--" + field.name.replace("_", "-")
        help_text = _HELP.get(field.name, "")
        if isinstance(field.default, bool):
            mnist.add_argument(
                flag, action=argparse.BooleanOptionalAction,
                default=field.default, help=help_text,
            )  # fmt: skip
        else:
            kind = str if field.name in ("data", "out") else type(field.default)
            mnist.add_argument(
                flag,
                type=int if field.default is None and kind is not str else kind,
                default=field.default,
                help=help_text,
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status.

    Example:

    >>> main(["mnist", "--help"])  # doctest: +SKIP
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow loads
    args = _parser().parse_args(argv)
    from keras_prune.experiments import mnist, report

    options = {k: v for k, v in vars(args).items() if k != "command"}
    config = mnist.MnistConfig(**options)
    try:
        result = mnist.run(config, verbose=1 if sys.stdout.isatty() else 2)
    except (FileNotFoundError, RuntimeError, ValueError) as error:
        print(f"keras-prune: error: {error}", file=sys.stderr)
        return 2
    paths = report.write_report(result, config.out)
    print()
    print(report.comparison_table(result.rounds))
    print()
    print(report.deployment_table(result.sizes, result.times))
    print()
    print(
        f"Wall time {result.wall_seconds / 60:.1f} min. Wrote "
        + ", ".join(paths.values())
    )
    return 0
