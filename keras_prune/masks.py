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
    weights: np.ndarray,
    mask: np.ndarray | None,
    sparsity: float,
    block: tuple[int, int] | None = None,
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
        block: `None` to rank single weights (the default), or `(units,
            inputs)` to rank and prune whole blocks of that many output units
            by that many consecutive inputs, by their mean magnitude (see
            `block_scores`); the sparsity then counts blocks.

    Returns:
        A new array, the dtype and shape of `weights`, holding only 0 and 1.

    Raises:
        ValueError: If `sparsity` is outside [0, 1), the shapes differ, or
            `weights` hold NaN or infinite values.

    Example:

    >>> magnitude_mask(np.array([0.1, -3.0, 0.5, 2.0]), None, 0.5)
    array([0., 1., 0., 1.])
    >>> kernel = np.array([[0.1], [0.2], [3.0], [4.0]])  # 4 inputs, 1 unit
    >>> magnitude_mask(kernel, None, 0.5, block=(1, 2)).ravel()
    array([0., 0., 1., 1.])

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
    if block is not None:
        scores, live = block_scores(weights, mask, block)
        kept = magnitude_mask(scores, live, sparsity)
        return (expand_blocks(kept, block, weights.shape) * (mask != 0)).astype(dtype)
    return _prune_smallest(weights, mask, pruned_count(sparsity, weights.size), dtype)


def std_threshold_mask(
    weights: np.ndarray, mask: np.ndarray | None, quality: float
) -> tuple[np.ndarray, float]:
    """Han et al.'s threshold: prunes the live weights whose magnitude is
    below `quality` times the standard deviation of the live weights.

    Where `magnitude_mask` is told how many weights to prune, this is told
    how small a weight must be, relative to its tensor's spread: a layer of
    many near-zero weights loses many at one quality, a layer of evenly
    spread ones few. Only live weights are measured and ranked, so a pruned
    weight never comes back, and repeating a cut at the same quality prunes
    more (the survivors' spread is measured again). One weight, the
    largest, is always kept.

    Args:
        weights: The kernel values, any shape.
        mask: The current 0/1 mask, same shape, or `None` for ones.
        quality: The threshold in standard deviations, >= 0. For weights
            drawn from a normal distribution, quality 1 prunes about 68% of
            them, 2 about 95%.

    Returns:
        `(new mask, threshold)`: a 0/1 array of the dtype and shape of
        `weights`, and the threshold in the weights' units (magnitudes below
        it were pruned).

    Raises:
        ValueError: If `quality` is not a finite number >= 0, the shapes
            differ, or `weights` hold NaN or infinite values.

    Example:

    >>> weights = np.array([2.0, -2.0, 1.0, -1.0, 0.0, 0.0])  # std: sqrt(10/6)
    >>> mask, threshold = std_threshold_mask(weights, None, 1.0)
    >>> mask, round(threshold, 4)
    (array([1., 1., 0., 0., 0., 0.]), 1.291)
    >>> std_threshold_mask(weights, mask, 1.0)[0]  # the live weights' std: 2
    array([1., 1., 0., 0., 0., 0.])

    Reference:
        Han et al. 2015, arXiv:1506.02626; the quality parameter as in
        Han's Caffe implementation of Deep Compression (Han et al. 2016,
        arXiv:1510.00149).
    """
    quality = validate_quality(quality)
    weights = check_finite(weights)
    dtype = _mask_dtype(weights)
    alive = np.ones(weights.shape, bool) if mask is None else np.asarray(mask) != 0
    if alive.shape != weights.shape:
        raise ValueError(
            "Expected `mask` to have the shape of `weights`, "
            f"{weights.shape}. Received: mask.shape={alive.shape}"
        )
    magnitudes = np.abs(weights)
    live = weights[alive]
    threshold = quality * float(live.std()) if live.size else 0.0
    kept = alive & (magnitudes >= threshold)
    if live.size and not kept.any():
        kept.reshape(-1)[np.argmax(np.where(alive, magnitudes, -1.0))] = True
    return kept.astype(dtype), threshold


def validate_quality(value: object, name: str = "quality") -> float:
    """Checks that `value` is a finite number >= 0 (Han's quality
    parameter, in standard deviations) and returns it as a float.

    Example:

    >>> validate_quality(-1)
    Traceback (most recent call last):
    ...
    ValueError: Expected `quality` to be a finite number >= 0 (standard \
deviations of the live weights). Received: quality=-1
    """
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool | str) or not (0.0 <= number < math.inf):
        raise ValueError(
            f"Expected `{name}` to be a finite number >= 0 (standard deviations "
            f"of the live weights). Received: {name}={value!r}"
        )
    return number


def validate_granularity(value: object) -> tuple[int, int] | None:
    """Checks a pruning granularity of weights: `"weight"` (single weights,
    returned as `None`) or `(units, inputs)`, a block of that many output
    units by that many consecutive inputs (returned as a tuple of two ints).
    (`"unit"`, whole units and filters, needs the model's graph: the
    callback takes it, see `channels.ChannelGraph`.)

    Raises:
        ValueError: Naming `granularity` and the value received.

    Example:

    >>> validate_granularity("weight"), validate_granularity([1, 4])
    (None, (1, 4))
    """
    if isinstance(value, str) and value == "weight":
        return None
    if (
        isinstance(value, tuple | list)
        and len(value) == 2
        and all(
            isinstance(n, int | np.integer) and not isinstance(n, bool) and n > 0
            for n in value
        )
    ):
        return (int(value[0]), int(value[1]))
    raise ValueError(
        'Expected `granularity` to be "weight" or (units, inputs), two positive '
        'integers such as (1, 4) (or "unit", for the callback). Received: '
        f"granularity={value!r}"
    )


NORMS = ("l1", "l2")


def validate_norm(value: object) -> str:
    """Checks a unit norm, `"l1"` or `"l2"`, and returns it.

    Raises:
        ValueError: Naming `norm` and the value received.

    Example:

    >>> validate_norm("l2")
    'l2'
    """
    if not isinstance(value, str) or value not in NORMS:
        raise ValueError(
            f"Expected `norm` to be one of {list(NORMS)}. Received: norm={value!r}"
        )
    return value


def unit_scores(
    slices: list[tuple[np.ndarray, int, np.ndarray]],
    groups: np.ndarray,
    norm: str = "l1",
) -> np.ndarray:
    """The magnitude of each unit (or group of coupled units): a norm of all
    its weights, scaled by their number so that units of different sizes
    compare (`"l1"`: mean |w|; `"l2"`: root mean square). Within one layer
    this ranks units as the plain L1 or L2 norm does.

    Args:
        slices: `(weights, axis, group of each index along axis)` per
            weight tensor that holds units, such as `(kernel, -1, groups of
            the filters)`; a group may span several tensors (filters added
            by a residual connection).
        groups: The groups to score, 1-D.
        norm: `"l1"` or `"l2"`. Defaults to `"l1"`.

    Returns:
        float64 scores, one per entry of `groups` (0 for a group with no
        weights in `slices`).

    Raises:
        ValueError: For another `norm`, or non-finite weights.

    Example:

    >>> kernel = np.array([[1.0, 0.0, 3.0], [1.0, 0.0, -4.0]])  # 2 inputs, 3 units
    >>> unit_scores([(kernel, 1, np.array([0, 1, 2]))], np.array([0, 1, 2]))
    array([1. , 0. , 3.5])
    >>> unit_scores([(kernel, 1, np.array([0, 1, 2]))], np.array([2]), "l2")
    array([3.53553391])

    Reference:
        Li et al. 2017, "Pruning Filters for Efficient ConvNets",
        arXiv:1608.08710 (L1 norm of filters).
    """
    power = 1 if validate_norm(norm) == "l1" else 2
    position = {int(g): i for i, g in enumerate(np.asarray(groups).tolist())}
    sums = np.zeros(len(position))
    counts = np.zeros(len(position))
    for weights, axis, ids in slices:
        values = check_finite(weights)
        moved = np.moveaxis(np.abs(values.astype(np.float64)), axis, -1)
        moved = moved.reshape(-1, moved.shape[-1])
        index = np.array([position.get(int(g), -1) for g in ids])
        hit = index >= 0
        np.add.at(sums, index[hit], (moved**power).sum(axis=0)[hit])
        np.add.at(counts, index[hit], moved.shape[0])
    means = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    return np.asarray(means ** (1.0 / power))


def _blocked(array: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """`array` (at least 2-D; 1-D is one column) zero-padded and reshaped
    to `(..., input blocks, inputs, unit blocks, units)` over its last two
    axes (inputs, units), the layout of Keras kernels."""
    if array.ndim < 2:
        array = array.reshape(-1, 1)
    units, inputs = block
    rows, cols = array.shape[-2:]
    padded_rows, padded_cols = -(-rows // inputs) * inputs, -(-cols // units) * units
    pad = [(0, 0)] * (array.ndim - 2) + [
        (0, padded_rows - rows),
        (0, padded_cols - cols),
    ]
    padded = np.pad(array, pad)
    return padded.reshape(
        *array.shape[:-2], padded_rows // inputs, inputs, padded_cols // units, units
    )


def block_scores(
    weights: np.ndarray, mask: np.ndarray, block: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Mean magnitude of each block of live weights, and which blocks live.

    Blocks tile the last two axes of a kernel, `(..., inputs, units)` in
    Keras's layout: `block=(1, 4)` is 4 consecutive inputs of one unit,
    TFLite's sparse FULLY_CONNECTED layout. Edge blocks are partial; a
    block's score is the mean |weight| over its live weights.

    Args:
        weights: The kernel values, at least 1-D.
        mask: The current 0/1 mask, same shape.
        block: `(units, inputs)`.

    Returns:
        `(scores, live)`: float64 arrays of the block grid's shape; `live`
        is 1 for blocks with a live weight.

    Example:

    >>> scores, live = block_scores(np.array([[1.0], [3.0], [5.0]]),
    ...                             np.array([[1], [1], [0]]), (1, 2))
    >>> scores.ravel(), live.ravel()
    (array([2., 0.]), array([1., 0.]))
    """
    alive = _blocked(np.asarray(mask) != 0, block)
    magnitudes = _blocked(np.abs(np.asarray(weights, dtype=np.float64)), block)
    counts = alive.sum(axis=(-3, -1))
    sums = np.where(alive, magnitudes, 0.0).sum(axis=(-3, -1))
    scores = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    return scores, (counts > 0).astype(np.float64)


def expand_blocks(
    block_mask: np.ndarray, block: tuple[int, int], shape: tuple[int, ...]
) -> np.ndarray:
    """A mask over blocks (`block_scores`' grid) back to weights of `shape`.

    Example:

    >>> expand_blocks(np.array([[0.0], [1.0]]), (1, 2), (3, 1)).ravel()
    array([0., 0., 1.])
    """
    units, inputs = block
    full = np.repeat(np.repeat(block_mask, inputs, axis=-2), units, axis=-1)
    if len(shape) < 2:
        return full[: shape[0], 0] if shape else full.reshape(())
    return full[..., : shape[-2], : shape[-1]]


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
    block: tuple[int, int] | None = None,
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
        block: `None` for single weights (the default), or `(units,
            inputs)` to rank whole blocks by mean magnitude, as in
            `magnitude_mask`; sparsity and bounds then count blocks.

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
    alive = []
    for i, (w, m) in enumerate(zip(arrays, masks, strict=True)):
        m = np.ones(w.shape, bool) if m is None else np.asarray(m) != 0
        if m.shape != w.shape:
            raise ValueError(
                f"Expected `masks[{i}]` to have the shape of `weights[{i}]`, "
                f"{w.shape}. Received: {m.shape}"
            )
        alive.append(m)
    if block is not None:
        grids = [block_scores(w, m, block) for w, m in zip(arrays, alive, strict=True)]
        kept = global_magnitude_masks(
            [scores for scores, _ in grids],
            [live for _, live in grids],
            sparsity,
            min_kept,
            max_kept,
        )
        return [
            (expand_blocks(k, block, w.shape) * m).astype(_mask_dtype(w))
            for k, w, m in zip(kept, arrays, alive, strict=True)
        ]
    current = [m.reshape(-1) for m in alive]
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
