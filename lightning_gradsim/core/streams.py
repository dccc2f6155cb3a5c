"""Keyed random streams: one generator per independent problem, so that what a problem draws does not
depend on which other problems share its batch (stacked runs: a run alone draws what it draws among others).

A stream is seeded from integers only (a seed, the problem's key, a step counter) by SplitMix64, so
it is the same on every machine, process and rank, and a resumed run that restores the counter draws
the same numbers.

>>> stream_seed(0, 7, 3) == stream_seed(0, 7, 3), stream_seed(0, 7, 3) == stream_seed(0, 7, 4)
(True, False)
>>> [round(float(torch.rand((), generator=g)), 4) for g in keyed_generators(0, [5, 5], 0)]  # same key, same draw
[0.9681, 0.9681]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["stream_seed", "keyed_generators", "check_keys"]

_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def stream_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (SplitMix64 over each part in turn)."""
    state = 0
    for part in parts:
        state = _splitmix64(state ^ (int(part) & _MASK))
    return state >> 1


def keyed_generators(seed: int, keys: Sequence[int], counter: int) -> tuple[torch.Generator, ...]:
    """One CPU generator per key, seeded from ``(seed, key, counter)``."""
    return tuple(torch.Generator().manual_seed(stream_seed(seed, key, counter)) for key in keys)


def check_keys(keys: Sequence[int], num_problems: int) -> tuple[int, ...]:
    """``keys`` as a tuple of ints, one per problem, or a ValueError/TypeError that says what is wrong.

    >>> check_keys([3, 1], 2)
    (3, 1)
    """
    if isinstance(keys, (str, bytes)) or not isinstance(keys, Sequence):
        raise TypeError(f"problem_keys must be a sequence of ints (one per problem), got {type(keys).__name__}.")
    if any(isinstance(k, bool) or not isinstance(k, int) for k in keys):
        raise TypeError(f"problem_keys must be ints (e.g. each stacked run's seed), got {list(keys)!r}.")
    if len(keys) != num_problems:
        raise ValueError(
            f"problem_keys has {len(keys)} key(s) but the batch has {num_problems} problem(s): give one key per "
            "problem (the batch dimensions flattened, in order)."
        )
    return tuple(keys)
