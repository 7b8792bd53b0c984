"""Pure mask math: which weights a magnitude criterion keeps.

Nothing here touches Keras: the functions take and return numpy arrays, so
they can be checked by hand and reused by any layer or callback.
"""

from __future__ import annotations

import math

import numpy as np


def validate_sparsity(value: float, name: str = "sparsity") -> float:
    """Checks that `value` is a number in [0, 1) and returns it as a float.

    Args:
        value: The sparsity to check: the fraction of weights set to zero.
        name: The argument name used in the error message. Defaults to
            `"sparsity"`.

    Returns:
        `value` as a Python float.

    Raises:
        ValueError: If `value` is not a real number in [0, 1), or is NaN.

    Example:

    >>> validate_sparsity(0.9)
    0.9
    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not (0.0 <= number < 1.0):
        raise ValueError(f"Expected `{name}` in [0, 1). Received: {name}={value!r}")
    return number


def sparsity_of(mask: np.ndarray) -> float:
    """Returns the fraction of zeros in `mask`.

    Args:
        mask: An array of any shape; zeros count as pruned.

    Returns:
        A float in [0, 1]; 0.0 for an empty array.

    Example:

    >>> sparsity_of(np.array([1.0, 0.0, 0.0, 1.0]))
    0.5
    """
    mask = np.asarray(mask)
    if mask.size == 0:
        return 0.0
    return 1.0 - int(np.count_nonzero(mask)) / mask.size


def magnitude_mask(
    weights: np.ndarray, mask: np.ndarray | None, sparsity: float
) -> np.ndarray:
    """Computes a 0/1 mask that prunes the smallest-magnitude live weights.

    The new mask has exactly `round(sparsity * weights.size)` zeros, unless
    the current mask already has more, in which case it is returned
    unchanged: a pruned weight never comes back. Only weights still alive in
    `mask` are ranked, so the cut falls on the smallest survivors (Han et al.
    2015). Ties are broken arbitrarily but the count is always exact.

    Args:
        weights: The kernel values, any shape.
        mask: The current 0/1 mask, same shape as `weights`, or `None` for a
            mask of ones.
        sparsity: Target fraction of zeros, in [0, 1).

    Returns:
        A new array, the dtype and shape of `weights`, holding only 0 and 1.

    Raises:
        ValueError: If `sparsity` is outside [0, 1) or the shapes differ.

    Example:

    >>> magnitude_mask(np.array([0.1, -3.0, 0.5, 2.0]), None, 0.5)
    array([0., 1., 0., 1.])

    Reference:
        Han et al. 2015, "Learning both Weights and Connections for Efficient
        Neural Networks", arXiv:1506.02626.
    """
    sparsity = validate_sparsity(sparsity)
    weights = np.asarray(weights)
    dtype = weights.dtype if np.issubdtype(weights.dtype, np.floating) else np.float32
    if mask is None:
        mask = np.ones(weights.shape, dtype=dtype)
    mask = np.asarray(mask)
    if mask.shape != weights.shape:
        raise ValueError(
            "Expected `mask` to have the shape of `weights`, "
            f"{weights.shape}. Received: mask.shape={mask.shape}"
        )
    alive = mask.reshape(-1) != 0
    target_pruned = int(round(sparsity * weights.size))
    if target_pruned <= weights.size - np.count_nonzero(alive):
        return (mask != 0).astype(dtype)
    scores = np.where(alive, np.abs(weights.reshape(-1)), -np.inf)
    pruned = np.argpartition(scores, target_pruned - 1)[:target_pruned]
    new_mask = alive.astype(dtype)
    new_mask[pruned] = 0
    return new_mask.reshape(weights.shape)
