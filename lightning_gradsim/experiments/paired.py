"""Paired-by-seed comparison of two methods: the paired t-test, with Student's t CDF written out.

No scipy needed: the two-sided p-value is the regularized incomplete beta function
``I_{df/(df+t^2)}(df/2, 1/2)``, evaluated with the continued fraction of Numerical Recipes
(``betacf``). The tests check it against ``scipy.stats`` when scipy is installed.

Example:

>>> res = paired_t_test([0.10, 0.12, 0.11, 0.13], [0.12, 0.13, 0.13, 0.15])
>>> round(res.mean_diff, 4), res.n, round(res.p_value, 4)
(-0.0175, 4, 0.006)
>>> round(student_t_sf(2.0, 9), 4)
0.0383
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

__all__ = ["PairedTest", "paired_t_test", "student_t_sf", "regularized_incomplete_beta"]


class PairedTest(NamedTuple):
    """Result of :func:`paired_t_test` on differences ``a_i - b_i``."""

    mean_diff: float  #: mean of ``a_i - b_i``
    std_diff: float  #: sample standard deviation of the differences
    t: float  #: the t statistic (``inf``/``-inf`` when every difference is equal and non-zero)
    p_value: float  #: two-sided p-value (``nan`` with fewer than 2 pairs)
    n: int  #: number of pairs


def _betacf(a: float, b: float, x: float, max_iter: int = 300, eps: float = 1e-15) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """``I_x(a, b)`` for ``0 <= x <= 1``, ``a, b > 0``.

    >>> round(regularized_incomplete_beta(0.5, 2.0, 2.0), 6)
    0.5
    """
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}.")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def student_t_sf(t: float, df: float) -> float:
    """One-sided upper tail ``P(T > t)`` of Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df must be positive, got {df}.")
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * regularized_incomplete_beta(df / (df + t * t), df / 2.0, 0.5)
    return tail if t >= 0 else 1.0 - tail


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """Two-sided paired t-test of ``mean(a - b) = 0``; ``a[i]`` and ``b[i]`` share seed ``i``."""
    if len(a) != len(b):
        raise ValueError(f"Paired samples need the same length, got {len(a)} and {len(b)}.")
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(diffs)
    if n == 0:
        raise ValueError("paired_t_test() needs at least one pair.")
    mean = sum(diffs) / n
    if n < 2:
        return PairedTest(mean, float("nan"), float("nan"), float("nan"), n)
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    if std == 0.0:
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
        return PairedTest(mean, std, t, 1.0 if mean == 0.0 else 0.0, n)
    t = mean / (std / math.sqrt(n))
    p = min(1.0, 2.0 * student_t_sf(abs(t), n - 1))
    return PairedTest(mean, std, t, p, n)
