"""Reports of `keras-prune lenet300` and `keras-prune lenet5`: the result
next to the published ones, every layer's kept fraction, the sensitivity
scan, and plots."""

from __future__ import annotations

import os
from typing import Any

from keras_prune.experiments.lenet import LenetResult
from keras_prune.experiments.progress import CSV
from keras_prune.experiments.report import _settings_and_versions, _write
from keras_prune.experiments.report import unfinished_report as _unfinished
from keras_prune.experiments.settings import Lenet300Config, LenetConfig
from keras_prune.plotting import finish

# (method, reference, fraction of all weights kept, test error), as the
# papers report them.
PUBLISHED = {
    "LeNet-300-100": (
        ("Han et al. 2015, dense", "arXiv:1506.02626, Table 1", 1.0, 0.0164),
        ("Han et al. 2015, pruned", "arXiv:1506.02626, Table 1", 0.08, 0.0159),
        ("Dynamic Network Surgery", "Guo et al. 2016, arXiv:1608.04493", 0.018, 0.0199),
        ("Sparse VD (not magnitude)", "Molchanov et al. 2017, arXiv:1701.05369",
         0.0147, 0.0192),
    ),
    "LeNet-5": (
        ("Han et al. 2015, dense", "arXiv:1506.02626, Table 1", 1.0, 0.0080),
        ("Han et al. 2015, pruned", "arXiv:1506.02626, Table 1", 0.08, 0.0077),
        ("Dynamic Network Surgery", "Guo et al. 2016, arXiv:1608.04493", 0.009, 0.0091),
        ("Sparse VD (not magnitude)", "Molchanov et al. 2017, arXiv:1701.05369",
         0.0036, 0.0075),
    ),
}  # fmt: skip

# The dense training's learning rate, by `LenetConfig.dense_decay`.
DENSE_RATES = {
    "cosine": "a learning rate falling from {rate} to 0 (cosine)",
    "none": "a constant learning rate of {rate}",
}
DESCRIPTIONS = {
    "LeNet-300-100": "784-300-100-10, ReLU; every layer pruned",
    "LeNet-5": (
        "the Caffe LeNet-5: conv 5x5x20, pool, conv 5x5x50, pool, Dense 500 "
        "(ReLU), Dense 10; every layer pruned"
    ),
}


def network(config: LenetConfig) -> str:
    """The network's name in the papers."""
    return "LeNet-300-100" if isinstance(config, Lenet300Config) else "LeNet-5"


def teacher(result: LenetResult) -> str:
    """The teacher of the pruning, in words: `run` measured a separate
    teacher's error only where one taught."""
    if result.teacher_error is None:
        return "the dense network"
    return "a dense LeNet-5 (trained as the dense network was)"


def optimizer(config: LenetConfig) -> str:
    """The pruning's optimizer and weight decay, in words.

    Example:

    >>> from keras_prune.experiments.settings import Lenet5Config
    >>> optimizer(Lenet5Config()), optimizer(Lenet5Config(weight_decay=0.05))
    ('Adam (no weight decay)', 'AdamW (decoupled weight decay 0.05)')
    """
    if not config.weight_decay:
        return "Adam (no weight decay)"
    return f"AdamW (decoupled weight decay {config.weight_decay:g})"


def ranking(config: LenetConfig) -> str:
    """What the pruning's cuts rank by, in words.

    Example:

    >>> from keras_prune.experiments.settings import Lenet300Config
    >>> ranking(Lenet300Config())
    'by magnitude'
    """
    if config.ranking == "variational":
        return (
            "by signal-to-noise ratio under sparse variational dropout (each "
            "weight learns a noise level while pruning, Molchanov et al. 2017; "
            "the retraining runs without the noise)"
        )
    return "by magnitude"


def _layers(row: dict[str, Any]) -> list[str]:
    return [key.removeprefix("kept_") for key in row if key.startswith("kept_")]


def results_table(result: LenetResult) -> str:
    """This run's last epoch next to the published results."""
    last = result.rows[-1]
    lines = [
        "| method | kept (all weights) | test error |",
        "|---|---:|---:|",
    ]
    for method, reference, kept, error in PUBLISHED[network(result.config)]:
        lines.append(f"| {method} ({reference}) | {kept:.2%} | {error:.2%} |")
    lines.append(
        f"| keras_prune, dense | 100.00% | {result.rows[0]['test_error']:.2%} |"
    )
    if result.teacher_error is not None:
        lines.append(
            "| keras_prune's teacher (a dense LeNet-5, not pruned) | "
            f"100.00% | {result.teacher_error:.2%} |"
        )
    lines.append(
        f"| **keras_prune, last epoch** | **{last['kept']:.2%}** | "
        f"**{last['test_error']:.2%}** |"
    )
    return "\n".join(lines)


def layers_table(result: LenetResult) -> str:
    """Each layer's weights and the fraction it keeps at the end."""
    last = result.rows[-1]
    sizes = result.scan.sizes
    lines = ["| layer | weights | kept | kept weights |", "|---|---:|---:|---:|"]
    for name in _layers(last):
        kept = last[f"kept_{name}"]
        size = sizes.get(name, 0)
        lines.append(f"| {name} | {size:,} | {kept:.2%} | {round(kept * size):,} |")
    total = sum(sizes.values())
    lines.append(
        f"| all | {total:,} | {last['kept']:.2%} | {round(last['kept'] * total):,} |"
    )
    return "\n".join(lines)


def epochs_table(rows: list[dict[str, Any]], every: int = 10) -> str:
    """The dense row, every `every`-th epoch, guard events and the last."""
    names = _layers(rows[0])
    header = (
        "| epoch | phase | kept | "
        + " | ".join(f"kept {n}" for n in names)
        + " | val accuracy | test error | guard |"
    )
    lines = [header, "|" + "---|" * (6 + len(names))]
    for i, row in enumerate(rows):
        if i and i != len(rows) - 1 and i % every and not row["guard"].startswith("r"):
            continue
        lines.append(
            f"| {row['epoch']} | {row['phase']} | {row['kept']:.2%} | "
            + " | ".join(f"{row[f'kept_{n}']:.2%}" for n in names)
            + f" | {row['val_accuracy']:.2%} | {row['test_error']:.2%} | "
            f"{row['guard']} |"
        )
    return "\n".join(lines)


def plot(result: LenetResult, path: str | None = None) -> Any:
    """Test error against the kept fraction, epoch by epoch, with the
    published points. Saves to `path` and closes, or returns the figure."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    rows = result.rows
    axes.plot(
        [row["kept"] for row in rows],
        [100 * row["test_error"] for row in rows],
        ".-",
        color="tab:blue",
        label="keras_prune (every epoch)",
    )
    last = rows[-1]
    axes.plot(last["kept"], 100 * last["test_error"], "*", ms=14, color="tab:blue")
    for (method, _, kept, error), marker in zip(
        PUBLISHED[network(result.config)], "os^D", strict=True
    ):
        axes.plot(kept, 100 * error, marker, ms=8, label=method)
    axes.set_xscale("log")
    axes.invert_xaxis()
    axes.set_xlabel("fraction of all weights kept (log scale)")
    axes.set_ylabel("test error (%)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="upper left", fontsize="small")
    method = "variational" if result.config.ranking == "variational" else "magnitude"
    axes.set_title(f"{network(result.config)} on MNIST: gradual {method} pruning")
    return finish(figure, path)


def write_report(result: LenetResult, folder: str) -> dict[str, str]:
    """Writes `report.md`, then `error_vs_kept.png` and `sensitivity.png`.

    `rounds.csv` (every epoch) and `sensitivity.csv` are there already.

    Returns:
        `{kind: path}` of what the run wrote.
    """
    os.makedirs(folder, exist_ok=True)
    paths = {
        "report": os.path.join(folder, "report.md"),
        "csv": os.path.join(folder, CSV),
        "plot": os.path.join(folder, "error_vs_kept.png"),
        "sensitivity": os.path.join(folder, "sensitivity.png"),
        "model": os.path.join(folder, "pruned.keras"),
    }
    config = result.config
    name = network(config)
    quick = (
        "**Quick mode**: a subset of the data and a few epochs; the errors are "
        "not comparable to the published ones."
        if config.quick
        else ""
    )
    _write(
        paths["report"],
        f"""# {name} on MNIST: keras_prune against the published pruning results

- Network: {DESCRIPTIONS[name]}.
- Dense training: {config.dense_epochs} epochs on training images shifted at
  random by up to {config.shift} pixel{"" if config.shift == 1 else "s"}, Adam at
  {DENSE_RATES[config.dense_decay].format(rate=config.dense_lr)}.
- Pruning: every layer {ranking(config)} to its own target on a {config.schedule}
  schedule over {config.prune_epochs} epochs, with {teacher(result)} as teacher
  (distillation weight {config.distill}, temperature {config.temperature}) and an
  accuracy guard (a cut that costs more than {config.tolerance:.2%} of validation
  accuracy on {config.validation:,} held-out training images is undone and
  retried with half the step); then {config.tune_epochs} epochs of retraining.
  {optimizer(config)} at {config.prune_lr:g} while pruning and {config.tune_lr:g}
  after the last cut.
- The test error is the **last epoch's**: the test set picks nothing.
- Wall time: {result.wall_seconds / 60:.1f} min.

{quick}

## Result

{results_table(result)}

![test error against kept fraction](error_vs_kept.png)

## Kept weights per layer (last epoch)

{layers_table(result)}

## Sensitivity of the dense network (Han et al. 2015, Fig. 5)

Each layer pruned alone, no retraining, on the held-out images
(`keras_prune.sensitivity_scan`; `sensitivity.csv`):

```
{result.scan}
```

![sensitivity](sensitivity.png)

## Epochs

Every epoch is in `{CSV}`; here the dense network, every 10th epoch, guard
events and the last epoch.

{epochs_table(result.rows)}

```
{result.summary}
```

{_settings_and_versions(config, result.versions)}""",
    )
    plot(result, paths["plot"])
    result.scan.plot(paths["sensitivity"])
    return paths


def write_partial_report(
    config: LenetConfig, rows: list[dict], seconds: float, folder: str
) -> str:
    """Writes `report.md` for a run stopped before its end; returns its path.

    Example:

    >>> import tempfile
    >>> row = {"epoch": 29, "phase": "dense", "kept": 1.0, "kept_fc1": 1.0,
    ...        "val_accuracy": 0.99, "test_error": 0.012, "guard": ""}
    >>> path = write_partial_report(Lenet300Config(), [row], 60, tempfile.mkdtemp())
    >>> print(open(path).read().splitlines()[2])
    **Stopped after the dense training, before pruning epoch 1 of 90**, after 1.0 min.
    """
    config = config.resolved()
    total = config.prune_epochs + config.tune_epochs
    if not rows:
        stopped = "during the dense training"
    elif len(rows) == 1:
        stopped = f"after the dense training, before pruning epoch 1 of {total}"
    else:
        stopped = f"after epoch {len(rows) - 1} of {total} of pruning and retraining"
    return _unfinished(
        f"{network(config)} on MNIST",
        stopped,
        seconds,
        "Finished epochs",
        epochs_table(rows) if rows else "(none yet)",
        config,
        folder,
    )


def console(result: LenetResult) -> str:
    """What the command prints at its end."""
    return f"{results_table(result)}\n\n{layers_table(result)}"
