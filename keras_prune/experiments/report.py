"""Renders an `MnistResult` as a markdown report and a PNG plot, and a stopped
run's rounds as a partial report."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from keras_prune.experiments.mnist import (
    SEED_TABLE,
    SEED_TIMES,
    MnistConfig,
    MnistResult,
    Round,
    versions,
)
from keras_prune.experiments.progress import CSV
from keras_prune.experiments.settings import JobConfig
from keras_prune.plotting import finish


def _seed_accuracy(kept: float) -> float | None:
    """The seed's accuracy at the row nearest `kept` (within 10%), if any."""
    for seed_kept, accuracy in SEED_TABLE:
        if abs(seed_kept - kept) <= 0.1 * seed_kept:
            return accuracy
    return None


def comparison_table(rounds: list[Round]) -> str:
    """Markdown table: each round's kept fraction and accuracy beside the
    seed's; with the convolutions pruned too, their kept fractions and that
    of every layer's weights together."""
    convs = any(row.kept_conv1 < 1.0 or row.kept_conv2 < 1.0 for row in rounds)
    extra = " kept conv1 | kept conv2 | kept (all layers) |" if convs else ""
    lines = [
        "| round | kept (all Dense) | kept fc1 | kept fc2 |"
        + extra
        + " dropout | test accuracy | seed report |",
        "|---:|---:|---:|---:|" + "---:|" * (3 if convs else 0) + "---:|---:|---:|",
    ]
    for row in rounds:
        seed = _seed_accuracy(row.kept)
        conv_cells = (
            f" {row.kept_conv1:.2%} | {row.kept_conv2:.2%} | {row.kept_all:.4%} |"
            if convs
            else ""
        )
        lines.append(
            f"| {row.round} | {row.kept:.4%} | {row.kept_fc1:.4%} | "
            f"{row.kept_fc2:.2%} |{conv_cells} {row.dropout:.3f} | "
            f"{row.test_accuracy:.2%} | "
            + (f"{seed:.1%}" if seed is not None else "")
            + " |"
        )
    return "\n".join(lines)


def deployment_table(sizes: dict[str, int], times: dict[str, float]) -> str:
    """Markdown table of `.keras` sizes and test-set inference times."""
    lines = [
        "| model | .keras size | vs dense | inference, test set | vs dense "
        "| seed's time |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in ("dense", "masked", "sparse"):
        size, seconds = sizes[name], times[name]
        lines.append(
            f"| {name} | {size / 1e6:.2f} MB | {size / sizes['dense']:.1%} | "
            f"{seconds * 1e3:.1f} ms | {times['dense'] / seconds:.2f}x | "
            f"{SEED_TIMES[name] * 1e3:.0f} ms |"
        )
    return "\n".join(lines)


def litert_section(result: MnistResult) -> str:
    """The LiteRT part of the report: `export_litert`'s table, and the
    file's test accuracy next to the Keras model's."""
    report = result.litert
    if report is None:
        return ""
    keras_accuracy = result.rounds[-1].test_accuracy
    return f"""
### LiteRT

`keras_prune.export_litert(masked, "sparse.tflite")`: test accuracy
{result.litert_accuracy:.2%} (the Keras model's: {keras_accuracy:.2%}); batch-1
latency with one thread, median, against the same model converted dense.

```
{report}
```
"""


def plot(rounds: list[Round], path: str | None = None) -> Any:
    """Test accuracy against kept fraction (log x), ours beside the seed's.

    Saves the figure to `path` and closes it, or returns it if `path` is
    `None` (for a notebook).
    """
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    seed_kept, seed_accuracy = zip(*SEED_TABLE, strict=True)
    axes.plot(
        seed_kept, seed_accuracy, "s--", color="tab:gray", label="seed report (2017)"
    )
    axes.plot(
        [row.kept for row in rounds],
        [row.test_accuracy for row in rounds],
        "o-",
        color="tab:blue",
        label="keras_prune",
    )
    axes.set_xscale("log")
    axes.invert_xaxis()
    axes.set_xlabel("fraction of Dense weights kept (log scale)")
    axes.set_ylabel("test accuracy")
    axes.set_ylim(
        max(
            0.0,
            min(seed_accuracy + tuple(row.test_accuracy for row in rounds)) - 0.02,
        ),
        1.0,
    )
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower left")
    axes.set_title("MNIST convnet: iterative pruning of fc1 and fc2")
    return finish(figure, path)


def _settings_and_versions(config: JobConfig, versions: dict[str, str]) -> str:
    settings = "\n".join(
        f"| `{key}` | {value} |" for key, value in dataclasses.asdict(config).items()
    )
    rows = "\n".join(f"| {key} | {value} |" for key, value in versions.items())
    return f"""## Settings

| setting | value |
|---|---|
{settings}

## Versions

| | |
|---|---|
{rows}
"""


def _write(path: str, text: str) -> None:
    with open(path, "w") as file:
        file.write(text)


def _pruned(config: MnistConfig) -> str:
    """What the run prunes, in a sentence."""
    if config.prune_convs:
        return (
            'Every layer is pruned: fc1 and fc2 on the ladder ("kept" counts '
            "their weights), conv1 and conv2 on the same ladder down to "
            f"{config.conv1_min_kept:.0%} and {config.conv2_min_kept:.0%} of their "
            "weights."
        )
    return 'Only fc1 and fc2 are pruned; "kept" counts the weights of both.'


def write_report(result: MnistResult, folder: str) -> dict[str, str]:
    """Writes `report.md`, then `accuracy_vs_kept.png`, to `folder`.

    `rounds.csv` is there already: `mnist.run` writes it after every round.

    Returns:
        `{kind: path}` of the report, the CSV and the plot.
    """
    os.makedirs(folder, exist_ok=True)
    paths = {
        "report": os.path.join(folder, "report.md"),
        "csv": os.path.join(folder, CSV),
        "plot": os.path.join(folder, "accuracy_vs_kept.png"),
    }
    minutes = result.wall_seconds / 60
    quick = (
        "**Quick mode**: a subset of the data and one epoch per stage; the "
        "accuracies are not comparable to the seed's."
        if result.config.quick
        else ""
    )
    _write(
        paths["report"],
        f"""# MNIST iterative pruning: keras_prune vs the seed report

Network: the TensorFlow-tutorial convnet of the seed report (conv 5x5x32, pool,
conv 5x5x64, pool, fc1 3136x1024, dropout, fc2 1024x10). {_pruned(result.config)}
Wall time: {minutes:.1f} min.
{quick}

## Test accuracy after each round

{comparison_table(result.rounds)}

![test accuracy against kept fraction](accuracy_vs_kept.png)

## Deployment

The sparse model is `keras_prune.export_sparse(masked)` (`sparse.keras` in this
folder, next to `sparse.tflite`, its LiteRT export); its test accuracy is
{result.sparse_accuracy:.2%}, and its logits differ from the masked model's by
at most {result.max_difference:.2e}. Sizes are `.keras` files without optimizer
state; times are medians of one compiled call on the whole test set.

{deployment_table(result.sizes, result.times)}

```
{result.summary}
```
{litert_section(result)}
{_settings_and_versions(result.config, result.versions)}""",
    )
    plot(result.rounds, paths["plot"])
    return paths


def write_partial_report(
    config: MnistConfig, rows: list[dict], seconds: float, folder: str
) -> str:
    """Writes `report.md` for a run stopped before its end: the rounds it
    finished, and how to continue it. Returns the report's path.

    Example:

    >>> import tempfile
    >>> row = {"round": 0, "epoch": 2, "kept": 1.0, "kept_fc1": 1.0,
    ...        "kept_fc2": 1.0, "dropout": 0.5, "test_accuracy": 0.99}
    >>> path = write_partial_report(MnistConfig(), [row], 60.0, tempfile.mkdtemp())
    >>> print(open(path).read().splitlines()[2])
    **Stopped after the dense training, before round 1 of 21**, after 1.0 min.
    """
    config = config.resolved()
    rounds = [Round(**row) for row in rows]
    if not rounds:
        stopped = "during the dense training"
    elif rounds[-1].round == config.rounds:
        stopped = "after the last round, before the export and timing"
    elif rounds[-1].round == 0:
        stopped = f"after the dense training, before round 1 of {config.rounds}"
    else:
        stopped = (
            f"after round {rounds[-1].round}, before round {len(rounds)} "
            f"of {config.rounds}"
        )
    return unfinished_report(
        "MNIST iterative pruning: keras_prune vs the seed report",
        stopped,
        seconds,
        "Test accuracy after each finished round",
        comparison_table(rounds) if rounds else "(none yet)",
        config,
        folder,
    )


def unfinished_report(
    title: str,
    stopped: str,
    seconds: float,
    heading: str,
    table: str,
    config: JobConfig,
    folder: str,
) -> str:
    """Writes `report.md` of a stopped run to `folder`: where it stopped,
    how to continue, what it finished (`table` under `heading`) and its
    settings. Returns the report's path."""
    text = f"""# {title} (unfinished)

**Stopped {stopped}**, after {seconds / 60:.1f} min.
Rerun the same command with `--resume` to continue from there.

## {heading}

{table}

{_settings_and_versions(config, versions())}"""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "report.md")
    _write(path, text)
    return path


def console(result: MnistResult) -> str:
    """What the command prints at its end."""
    return (
        f"{comparison_table(result.rounds)}\n\n"
        f"{deployment_table(result.sizes, result.times)}"
    )
