"""The `keras-prune` command line (also `python -m keras_prune`)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import signal
import sys

from keras_prune.experiments.settings import (
    JobConfig,
    Lenet5Config,
    Lenet300Config,
    MnistConfig,
    StructuredConfig,
    earlier_values,
)

# command -> (settings, experiment module, report module, help, description).
# The modules import Keras: they load only once the settings are checked.
COMMANDS: dict[str, tuple[type[JobConfig], str, str, str, str]] = {
    "mnist": (
        MnistConfig,
        "keras_prune.experiments.mnist",
        "keras_prune.experiments.report",
        "prune the MNIST convnet's Dense layers, round by round",
        "Train the TensorFlow-tutorial MNIST convnet, prune its Dense layers "
        "round by round, export it sparse, and write a report, a CSV and a "
        "plot. Each finished round is saved: rerun with --resume to continue a "
        "run that was stopped.",
    ),
    "mnist-structured": (
        StructuredConfig,
        "keras_prune.experiments.structured",
        "keras_prune.experiments.structured_report",
        "prune whole filters and units of the MNIST convnet, then shrink it",
        "Train the TensorFlow-tutorial MNIST convnet, prune whole filters of "
        "conv1 and conv2 and units of fc1 (granularity='unit'), shrink it to a "
        "smaller dense network, time it against the dense one, and write a "
        "report, a CSV, a plot of accuracy against speed-up and shrunk.keras. "
        "Each finished epoch is saved: rerun with --resume to continue a run "
        "that was stopped.",
    ),
    "lenet300": (
        Lenet300Config,
        "keras_prune.experiments.lenet",
        "keras_prune.experiments.lenet_report",
        "prune every layer of LeNet-300-100 past the published results",
        "Train LeNet-300-100 (784-300-100-10) on shifted MNIST images, scan each "
        "layer's sensitivity, prune every layer gradually to its own kept "
        "fraction with a dense LeNet-5 as teacher (distillation) and an accuracy "
        "guard, retrain, and write a report next to Han et al. 2015 and later "
        "results, a CSV of every epoch and plots. Each finished epoch is saved: "
        "rerun with --resume to continue a run that was stopped.",
    ),
    "lenet5": (
        Lenet5Config,
        "keras_prune.experiments.lenet",
        "keras_prune.experiments.lenet_report",
        "prune every layer of the Caffe LeNet-5 past the published results",
        "Train the Caffe LeNet-5 (conv 5x5x20, pool, conv 5x5x50, pool, Dense "
        "500, Dense 10) on shifted MNIST images, scan each layer's sensitivity, "
        "prune every layer gradually to its own kept fraction with the dense "
        "network as teacher and an accuracy guard, retrain, and write a report "
        "next to Han et al. 2015 and later results, a CSV of every epoch and "
        "plots. Each finished epoch is saved: rerun with --resume to continue a "
        "run that was stopped.",
    ),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keras-prune",
        description="Iterative magnitude pruning for Keras 3.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (config_class, _, _, help_text, description) in COMMANDS.items():
        command = commands.add_parser(
            name,
            help=help_text,
            description=description,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        _add_options(command, config_class)
    return parser


def _add_options(parser: argparse.ArgumentParser, config_class: type) -> None:
    """Every field of the settings becomes an option `--field-name`."""
    for field in dataclasses.fields(config_class):
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata["help"]
        if isinstance(field.default, bool):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction,
                default=field.default, help=help_text,
            )  # fmt: skip
        else:
            kind = str if field.name in ("data", "out") else type(field.default)
            parser.add_argument(
                flag,
                type=int if field.default is None and kind is not str else kind,
                default=field.default,
                help=help_text,
            )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run recorded in --out after its last finished stage "
        "(same settings required)",
    )


def _error(error: BaseException | str) -> int:
    print(f"keras-prune: error: {error}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status.

    0 on success, 2 on bad input or a missing dependency (checked before
    anything is trained), 130 when stopped with Ctrl-C and 143 when stopped
    with SIGTERM (`kill`, a job scheduler), after writing a partial report
    (`--resume` continues the run).

    Example:

    >>> main(["mnist", "--help"])  # doctest: +SKIP
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow loads
    args = _parser().parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in ("command", "resume")}
    config_class, experiment_name, report_name, *_ = COMMANDS[args.command]
    config = config_class(**options)
    from keras_prune.experiments import requirements

    try:
        config.validate()
        requirements.check(args.command)
    except (FileNotFoundError, RuntimeError, ValueError) as error:
        return _error(error)

    from keras_prune.experiments.progress import CSV, RunFolder

    experiment = importlib.import_module(experiment_name)
    report = importlib.import_module(report_name)
    # A setting a recorded run lacks: what runs did before it existed.
    defaults = {**experiment.settings(config_class()), **earlier_values(config_class)}
    try:
        folder = RunFolder(
            config.out, experiment.settings(config), args.resume, defaults
        )
    except (FileExistsError, ValueError) as error:
        return _error(error)
    except OSError as error:
        return _error(
            f"Expected --out to be a folder that can be made and written. "
            f"Received: --out={config.out!r} ({error.strerror}: {error.filename})"
        )
    if args.resume and not folder.rows:
        print(
            f"Nothing to resume in {config.out}: starting a new run.", file=sys.stderr
        )
    stopped_by: list[int] = []

    def stop(signum: int, frame: object) -> None:
        stopped_by.append(signum)
        raise KeyboardInterrupt

    def stopped() -> int:
        path = report.write_partial_report(
            config, folder.rows, folder.seconds(), config.out
        )
        written = " and ".join(p for p in (path, folder.file(CSV)) if os.path.exists(p))
        print(
            f"\nStopped. What was finished is in {written}; rerun with "
            "--resume to continue.",
            file=sys.stderr,
        )
        return 128 + (stopped_by[0] if stopped_by else signal.SIGINT)

    previous = {
        number: signal.signal(number, stop)
        for number in (signal.SIGINT, signal.SIGTERM)
        if signal.getsignal(number) is not signal.SIG_IGN  # ignored on purpose
    }
    try:
        result = experiment.run(
            config, verbose=1 if sys.stdout.isatty() else 2, folder=folder
        )
    except KeyboardInterrupt:
        return stopped()
    except Exception as error:
        # A signal that lands inside TensorFlow's C++ code (tracing a
        # function) can surface as another exception type (a TypeError
        # from a tensor conversion); the signal is what stopped the run.
        if stopped_by:
            return stopped()
        if isinstance(error, FileNotFoundError | RuntimeError | ValueError):
            return _error(error)
        raise
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    paths = report.write_report(result, config.out)
    print()
    print(report.console(result))
    print()
    print(
        f"Wall time {result.wall_seconds / 60:.1f} min. Wrote "
        + ", ".join(paths.values())
    )
    return 0


def entry() -> None:
    """The `keras-prune` console script and `python -m keras_prune`: runs
    `main` and exits with its status.

    A stopped job (status 130 or 143) exits at once, after its report and
    CSV are written and the output flushed: a signal can leave a thread of
    TensorFlow's `Dataset.from_generator` (which feeds `fit` from a
    `keras.utils.PyDataset`, as the LeNet jobs do) waiting on a batch that
    never comes, and Python would wait for it forever at exit.
    """
    status = main()
    if status >= 128:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
