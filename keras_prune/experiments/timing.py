"""Side-by-side timing: interleaved repetitions, medians and ratios.

Shared machines are noisy; timing candidates in turn, many times, and taking
medians keeps a slow spell from landing on one candidate only.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable


def time_interleaved(
    candidates: dict[str, Callable[[], object]],
    repeats: int = 20,
    warmup: int = 2,
    number: int = 1,
    settle: float = 0.0,
) -> dict[str, float]:
    """Times each candidate in turn, `repeats` rounds, and returns medians.

    The order of the candidates is shuffled in every round (with a fixed
    seed), since whichever runs first after another's work runs on colder
    caches.

    Args:
        candidates: `{name: function}`; each function runs the work once and
            must block until it is done (return a numpy value, for example).
        repeats: Rounds of timing; each round times every candidate once.
            Defaults to `20`.
        warmup: Untimed calls of each candidate first (tracing, caches).
            Defaults to `2`.
        number: Calls per timing, to lift short calls above the clock's
            resolution. Defaults to `1`.
        settle: Seconds of untimed calls of a candidate (at least one)
            right before each of its timings, so that it is timed in its
            own steady state (its data in cache, TensorFlow's threads and
            allocator used to it, the previous candidate's threads asleep),
            as a server that runs only it would see it; `0` for none.
            Defaults to `0`.

    Returns:
        `{name: median seconds per call}`.

    Example:

    >>> times = time_interleaved({"a": lambda: sum(range(100))}, repeats=3)
    >>> sorted(times) == ["a"] and times["a"] > 0
    True
    """
    if repeats < 1 or number < 1 or not settle >= 0:
        raise ValueError(
            "Expected `repeats` and `number` >= 1 and `settle` >= 0. "
            f"Received: repeats={repeats}, number={number}, settle={settle}"
        )
    for function in candidates.values():
        for _ in range(warmup):
            function()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    order = list(candidates)
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name in order:
            function = candidates[name]
            if settle > 0:
                settled = time.perf_counter() + settle
                function()
                while time.perf_counter() < settled:
                    function()
            start = time.perf_counter()
            for _ in range(number):
                function()
            samples[name].append((time.perf_counter() - start) / number)
    return {name: statistics.median(values) for name, values in samples.items()}
