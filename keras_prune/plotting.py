"""The end every keras_prune plot shares: return the figure, or save it and
close it (a job drawing many plots must not keep them all open)."""

from __future__ import annotations

from typing import Any


def finish(figure: Any, path: str | None) -> Any:
    """Lays `figure` out; returns it when `path` is `None`, else saves it to
    `path` (any format matplotlib knows from the suffix), closes it and
    returns `None`.

    Example:

    >>> class Figure:  # stands in for matplotlib's, which has these methods
    ...     def tight_layout(self):
    ...         print("laid out")
    >>> figure = Figure()
    >>> finish(figure, None) is figure
    laid out
    True
    """
    figure.tight_layout()
    if path is None:
        return figure
    import matplotlib.pyplot as plt

    figure.savefig(path)
    plt.close(figure)
    return None
