"""Renders a `StructuredResult` as a markdown report and a PNG plot, and a
stopped run's epochs as a partial report."""

from __future__ import annotations

import os
from typing import Any

from keras_prune.experiments.progress import CSV
from keras_prune.experiments.report import (
    _settings_and_versions,
    _write,
    unfinished_report,
)
from keras_prune.experiments.settings import StructuredConfig
from keras_prune.experiments.structured import Epoch, StructuredResult
from keras_prune.plotting import finish

PLOT = "accuracy_vs_speedup.png"


def epochs_table(rows: list[Epoch]) -> str:
    """Markdown table: per epoch, the filters and units kept, the shrunk
    model's FLOPs and measured speed-up, and the test accuracy."""
    lines = [
        "| epoch | phase | conv1 filters kept | conv2 filters kept | fc1 units kept "
        "| FLOPs vs dense | speed-up (measured) | test accuracy |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.epoch} | {row.phase} | {row.kept_conv1:.1%} | "
            f"{row.kept_conv2:.1%} | {row.kept_fc1:.1%} | {row.flops:.1%} | "
            f"{row.speedup:.2f}x | {row.test_accuracy:.2%} |"
        )
    return "\n".join(lines)


def deployment_table(result: StructuredResult) -> str:
    """Markdown table: the dense and shrunk networks' accuracy, parameters,
    FLOPs, `.keras` size and test-set inference times."""
    summary, sizes, times = result.summary, result.sizes, result.times
    dense_accuracy = result.rows[0].test_accuracy
    lines = [
        "| model | test accuracy | parameters | FLOPs / image | .keras size "
        "| one compiled call | speed-up | predict | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, accuracy, params, flops in (
        ("dense", dense_accuracy, summary.params_before, summary.flops_before),
        ("shrunk", result.shrunk_accuracy, summary.params_after, summary.flops_after),
    ):
        call, predict = times[name], times[f"{name} predict"]
        lines.append(
            f"| {name} | {accuracy:.2%} | {params:,} | {flops:,} | "
            f"{sizes[name] / 1e6:.2f} MB | {call * 1e3:.0f} ms | "
            f"{times['dense'] / call:.2f}x | {predict * 1e3:.0f} ms | "
            f"{times['dense predict'] / predict:.2f}x |"
        )
    return "\n".join(lines)


def plot(rows: list[Epoch], path: str | None = None) -> Any:
    """Test accuracy against the measured speed-up of the shrunk network,
    one point per epoch. Saves to `path` and closes the figure, or returns
    it if `path` is `None`."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    axes.plot(
        [row.speedup for row in rows],
        [row.test_accuracy for row in rows],
        "o-",
        color="tab:blue",
        label="keras_prune, granularity='unit' + shrink",
    )
    for row in rows:
        axes.annotate(
            str(row.epoch),
            (row.speedup, row.test_accuracy),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    axes.axhline(0.99, color="tab:gray", linestyle="--", label="99.0%")
    axes.set_xlabel("inference speed-up over the dense network (measured, test set)")
    axes.set_ylabel("test accuracy")
    low = min(row.test_accuracy for row in rows)
    axes.set_ylim(max(0.0, min(low, 0.99) - 0.005), 1.0)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower left")
    axes.set_title("MNIST convnet: structured pruning of conv1, conv2 and fc1")
    return finish(figure, path)


_NETWORK = """Network: the TensorFlow-tutorial convnet of the seed report (conv
5x5x32, pool, conv 5x5x64, pool, fc1 3136x1024, dropout, fc2 1024x10). Whole
filters of conv1 and conv2 and whole units of fc1 are pruned by their L1 norm
(`IterativePruningCallback(granularity="unit")`), with the rows of the next layer
that read them; `keras_prune.shrink` then removes them. Each epoch's speed-up is
a shrunk copy timed against the dense network (3 rounds, one compiled call on
the test set)."""


def write_report(result: StructuredResult, folder: str) -> dict[str, str]:
    """Writes `report.md` and the plot to `folder`; returns `{kind: path}`."""
    os.makedirs(folder, exist_ok=True)
    paths = {
        "report": os.path.join(folder, "report.md"),
        "csv": os.path.join(folder, CSV),
        "plot": os.path.join(folder, PLOT),
        "model": os.path.join(folder, "shrunk.keras"),
    }
    quick = (
        "**Quick mode**: a subset of the data and fewer epochs; the accuracies "
        "are not comparable to a full run's."
        if result.config.quick
        else ""
    )
    _write(
        paths["report"],
        f"""# MNIST structured pruning: a smaller, faster seed network

{_NETWORK} Wall time: {result.wall_seconds / 60:.1f} min.
{quick}

## After each epoch

{epochs_table(result.rows)}

![test accuracy against speed-up]({PLOT})

## The shrunk network

`shrunk.keras` in this folder holds stock Keras layers only. Its test accuracy
is {result.shrunk_accuracy:.2%} (the last epoch's; no epoch is picked on the test
set), and its logits differ from the masked model's by at most
{result.max_difference:.2e}. Times are medians on the whole test set: one
compiled call, and `predict` with batches of 1,000.

{deployment_table(result)}

```
{result.summary}
```

{_settings_and_versions(result.config, result.versions)}""",
    )
    plot(result.rows, paths["plot"])
    return paths


def write_partial_report(
    config: StructuredConfig, rows: list[dict], seconds: float, folder: str
) -> str:
    """Writes `report.md` for a run stopped before its end: the epochs it
    finished, and how to continue. Returns the report's path.

    Example:

    >>> import tempfile
    >>> row = {"epoch": 2, "phase": "dense", "kept_conv1": 1.0, "kept_conv2": 1.0,
    ...        "kept_fc1": 1.0, "flops": 1.0, "speedup": 1.0, "test_accuracy": 0.99}
    >>> path = write_partial_report(StructuredConfig(), [row], 60.0,
    ...                             tempfile.mkdtemp())
    >>> print(open(path).read().splitlines()[2])
    **Stopped after 0 of 9 epochs of pruning and fine-tuning**, after 1.0 min.
    """
    config = config.resolved()
    epochs = [Epoch(**row) for row in rows]
    total = config.prune_epochs + config.tune_epochs
    stopped = (
        "during the dense training"
        if not epochs
        else f"after {len(epochs) - 1} of {total} epochs of pruning and fine-tuning"
    )
    return unfinished_report(
        "MNIST structured pruning",
        stopped,
        seconds,
        "After each finished epoch",
        epochs_table(epochs) if epochs else "(none yet)",
        config,
        folder,
    )


def console(result: StructuredResult) -> str:
    """What the command prints at its end."""
    return f"{epochs_table(result.rows)}\n\n{deployment_table(result)}"
