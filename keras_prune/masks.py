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
    if isinstance(value, bool | str) or not (0.0 <= number < 1.0):
        raise ValueError(f"Expected `{name}` in [0, 1). Received: {name}={value!r}")
    return number


def check_finite(weights: np.ndarray, what: str = "`weights`") -> np.ndarray:
    """Returns `weights` as an array; raises if any value is NaN or infinite.

    A magnitude ranking of non-finite values is meaningless (NaN sorts
    anywhere), so every cut checks first; such weights mean training has
    diverged.

    Args:
        weights: Values of any shape.
        what: How the error message names them. Defaults to `"`weights`"`.

    Returns:
        `np.asarray(weights)`.

    Raises:
        ValueError: Counting the NaN and infinite values.

    Example:

    >>> check_finite(np.array([1.0, np.nan, np.inf, np.nan]), "the kernel of 'fc1'")
    Traceback (most recent call last):
    ...
    ValueError: Expected the kernel of 'fc1' to be finite to rank it by magnitude. \
Received: 2 NaN and 1 infinite values among 4. Training has diverged: lower the \
learning rate or clip gradients.
    """
    array = np.asarray(weights)
    if np.issubdtype(array.dtype, np.inexact) and not np.isfinite(array).all():
        nan = int(np.count_nonzero(np.isnan(array)))
        infinite = int(np.count_nonzero(np.isinf(array)))
        raise ValueError(
            f"Expected {what} to be finite to rank it by magnitude. Received: "
            f"{nan} NaN and {infinite} infinite values among {array.size}. "
            "Training has diverged: lower the learning rate or clip gradients."
        )
    return array


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

    The new mask has exactly `pruned_count(sparsity, weights.size)` zeros
    (`round(sparsity * size)`, but never all of them: one weight is always
    kept), unless the current mask already has more, in which case it is
    returned unchanged: a pruned weight never comes back. Only weights still alive in
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
        ValueError: If `sparsity` is outside [0, 1), the shapes differ, or
            `weights` hold NaN or infinite values.

    Example:

    >>> magnitude_mask(np.array([0.1, -3.0, 0.5, 2.0]), None, 0.5)
    array([0., 1., 0., 1.])

    Reference:
        Han et al. 2015, "Learning both Weights and Connections for Efficient
        Neural Networks", arXiv:1506.02626.
    """
    sparsity = validate_sparsity(sparsity)
    weights = check_finite(weights)
    dtype = _mask_dtype(weights)
    if mask is None:
        mask = np.ones(weights.shape, dtype=dtype)
    mask = np.asarray(mask)
    if mask.shape != weights.shape:
        raise ValueError(
            "Expected `mask` to have the shape of `weights`, "
            f"{weights.shape}. Received: mask.shape={mask.shape}"
        )
    return _prune_smallest(weights, mask, pruned_count(sparsity, weights.size), dtype)


def _mask_dtype(weights: np.ndarray) -> np.dtype:
    """A mask takes its weights' float dtype (float32 for other kinds)."""
    return (
        weights.dtype
        if np.issubdtype(weights.dtype, np.floating)
        else np.dtype("float32")
    )


def pruned_count(sparsity: float, size: int) -> int:
    """How many of `size` weights a target `sparsity` prunes.

    `round(sparsity * size)`, capped at `size - 1`: pruning never empties a
    tensor (a layer with no weight left outputs a constant).

    Example:

    >>> pruned_count(0.5, 10), pruned_count(0.99, 40)
    (5, 39)
    """
    return min(int(round(sparsity * size)), max(size - 1, 0))


def _prune_smallest(
    weights: np.ndarray, mask: np.ndarray, count: int, dtype: np.dtype
) -> np.ndarray:
    """`mask` with its live weights pruned up to `count` zeros in all,
    smallest magnitudes first; unchanged if it already has that many."""
    alive = mask.reshape(-1) != 0
    new_mask = alive.astype(dtype)
    extra = count - (alive.size - int(np.count_nonzero(alive)))
    if extra > 0:
        scores = np.where(alive, np.abs(weights.reshape(-1)), np.inf)
        new_mask[np.argpartition(scores, extra - 1)[:extra]] = 0
    return new_mask.reshape(weights.shape)


def global_magnitude_masks(
    weights: list[np.ndarray],
    masks: list[np.ndarray],
    sparsity: float,
    min_kept: list[float] | None = None,
    max_kept: list[float] | None = None,
) -> list[np.ndarray]:
    """Prunes the smallest live weights of several tensors, ranked together.

    Global magnitude pruning: one threshold for all tensors, so that in all
    `round(sparsity * total size)` weights are zero. A tensor keeps at
    least `min_kept[i]` of its weights (and always one) and at most
    `max_kept[i]`; within those bounds the smallest magnitudes overall go
    first. Pruned weights stay pruned: a tensor already pruned past its
    share keeps its mask, and the total then overshoots the target.

    Args:
        weights: The tensors' values, any shapes.
        masks: Their current 0/1 masks, same shapes.
        sparsity: Target fraction of zeros over all tensors, in [0, 1).
        min_kept: Per tensor, the least kept fraction, in [0, 1]. Defaults
            to `None` (no floor but one weight).
        max_kept: Per tensor, the most kept fraction, in [0, 1]. Defaults
            to `None` (no cap).

    Returns:
        The new 0/1 masks, one per tensor, dtypes of `weights`.

    Raises:
        ValueError: On a bad sparsity, mismatched shapes or list lengths, or
            NaN or infinite weights.

    Example:

    >>> a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.5, 5.0])
    >>> [m.tolist() for m in global_magnitude_masks([a, b], [None, None], 0.5)]
    [[0.0, 0.0, 1.0, 1.0], [0.0, 1.0]]
    >>> [m.tolist() for m in global_magnitude_masks([a, b], [None, None], 0.5,
    ...     min_kept=[0.75, 0.0])]
    [[0.0, 1.0, 1.0, 1.0], [0.0, 1.0]]

    Reference:
        Han et al. 2015, arXiv:1506.02626 (magnitude criterion); the global
        ranking as in Frankle & Carbin 2019, arXiv:1803.03635.
    """
    sparsity = validate_sparsity(sparsity)
    count = len(weights)
    for name, values in (
        ("masks", masks),
        ("min_kept", min_kept),
        ("max_kept", max_kept),
    ):
        if values is not None and len(values) != count:
            raise ValueError(
                f"Expected `{name}` to have one entry per tensor ({count}). "
                f"Received: {len(values)} entries"
            )
    arrays = [check_finite(w, f"`weights[{i}]`") for i, w in enumerate(weights)]
    current = []
    for i, (w, m) in enumerate(zip(arrays, masks, strict=True)):
        m = np.ones(w.shape, bool) if m is None else np.asarray(m) != 0
        if m.shape != w.shape:
            raise ValueError(
                f"Expected `masks[{i}]` to have the shape of `weights[{i}]`, "
                f"{w.shape}. Received: {m.shape}"
            )
        current.append(m.reshape(-1))
    sizes = [w.size for w in arrays]
    already = [int(m.size - np.count_nonzero(m)) for m in current]
    lows, highs = [], []
    for i, size in enumerate(sizes):
        floor = 0.0 if min_kept is None else float(min_kept[i])
        cap = 1.0 if max_kept is None else float(max_kept[i])
        most = min(int(math.floor(size * (1.0 - floor) + 1e-9)), max(size - 1, 0))
        least = int(math.ceil(size * (1.0 - cap) - 1e-9))
        high = max(most, already[i])
        lows.append(min(max(least, already[i]), high))
        highs.append(high)
    target = int(round(sparsity * sum(sizes)))
    counts = list(lows)
    remaining = target - sum(counts)
    if remaining > 0:
        # The candidates of each tensor: its live weights past its floor,
        # smallest first, as many as its cap allows; the smallest overall win.
        pools, owners = [], []
        for i, (w, m) in enumerate(zip(arrays, current, strict=True)):
            live = np.sort(np.abs(w.reshape(-1)[m]))
            pool = live[lows[i] - already[i] : highs[i] - already[i]]
            pools.append(pool)
            owners.append(np.full(pool.size, i))
        pool = np.concatenate(pools)
        owner = np.concatenate(owners)
        take = min(remaining, pool.size)
        if take:
            chosen = np.argpartition(pool, take - 1)[:take]
            counts = [
                c + int(n)
                for c, n in zip(
                    counts, np.bincount(owner[chosen], minlength=count), strict=True
                )
            ]
    return [
        _prune_smallest(
            w,
            m.reshape(w.shape),
            n,
            _mask_dtype(w),
        )
        for w, m, n in zip(arrays, current, counts, strict=True)
    ]
