"""The `keras-prune` command line (also `python -m keras_prune`)."""

from __future__ import annotations

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
    from keras_prune.experiments.mnist import MnistConfig

    defaults = MnistConfig()
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
    mnist.add_argument(
        "--data",
        default=defaults.data,
        help="MNIST .npz in Keras layout (default: download with keras.datasets.mnist)",
    )
    mnist.add_argument("--out", default=defaults.out, help="output folder")
    mnist.add_argument(
        "--quick",
        action="store_true",
        help="a few thousand samples, one epoch per stage",
    )
    mnist.add_argument("--seed", type=int, default=defaults.seed)
    mnist.add_argument("--batch-size", type=int, default=defaults.batch_size)
    mnist.add_argument(
        "--dense-epochs",
        type=int,
        default=defaults.dense_epochs,
        help="epochs of dense training before pruning",
    )
    mnist.add_argument("--dense-lr", type=float, default=defaults.dense_lr)
    mnist.add_argument(
        "--rounds",
        type=int,
        default=defaults.rounds,
        help="pruning rounds; round k keeps factor**k",
    )
    mnist.add_argument(
        "--factor",
        type=float,
        default=defaults.factor,
        help="fraction of Dense weights kept per round",
    )
    mnist.add_argument(
        "--epochs-per-round", type=int, default=defaults.epochs_per_round
    )
    mnist.add_argument(
        "--prune-lr",
        type=float,
        default=defaults.prune_lr,
        help="Adam learning rate while pruning",
    )
    mnist.add_argument(
        "--final-lr",
        type=float,
        default=defaults.final_lr,
        help="learning rate of the last two rounds",
    )
    mnist.add_argument(
        "--fc2-min-kept",
        type=float,
        default=defaults.fc2_min_kept,
        help="least fraction of fc2's weights kept",
    )
    mnist.add_argument("--dropout", type=float, default=defaults.dropout)
    mnist.add_argument(
        "--no-scale-dropout",
        dest="scale_dropout",
        action="store_false",
        help="keep dropout fixed instead of Han et al.'s rule",
    )
    mnist.add_argument("--train-samples", type=int, default=None)
    mnist.add_argument("--test-samples", type=int, default=None)
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
