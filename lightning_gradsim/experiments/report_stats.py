"""The statistics of ``gradsim report``: batch-means intervals, a change point, and the reading rules.

**Batch means.** Successive cosines of one run are autocorrelated (the network moves a little per
step, a gate may smooth the cosine with an EMA), so their sample standard deviation over
``sqrt(n)`` understates the mean's uncertainty. The ``n`` logged values are cut into
``W = min(20, n // 2)`` contiguous windows (sizes differ by at most one); the window means are
treated as independent, and the mean's standard error is ``sd(window means) / sqrt(W)``, its 95%
interval ``mean ± t_{0.975, W-1} · SE``. Twenty windows: the usual 10-30 of the method (enough for a
t quantile close to the normal one, 2.09 against 1.96), while each window still grows with the run
(25 steps in a 500-step run), so windows are long compared with the cosine's correlation time
unless a run is very short. A trend in the cosine (it drifts as training goes) widens the spread of
the window means: the interval is then conservative, and it is the interval of the run's *average*
cosine, not of any one step's.

**Reading rules** (:func:`reading`; ``τ`` the threshold, a part of the run is *positive* if its
95% interval lies above ``τ``, *conflict* if it lies below, *within noise* otherwise):

1. fewer than :data:`MIN_STEPS` logged cosines: ``"too few logged steps to read (n < 20)"``;
2. change point: the split index ``k`` that maximises the CUSUM ``|S_k - k S_n / n|`` (``S_k`` the
   sum of the first ``k`` cosines), with at least ``max(10, n // 10)`` values on each side. If the
   part before is positive and the part after is conflict: ``"conflict after step N"``; if the part
   before is conflict and the part after positive: ``"positive transfer after step N"``; ``N`` is the
   first logged step of the second part;
3. whole run positive: ``"positive transfer throughout"`` if the first and the last quarter are
   both positive, else ``"positive transfer overall; first quarter: A, last quarter: B"``;
4. whole run conflict: ``"conflict throughout"`` if both quarters are conflict, else
   ``"conflict overall; first quarter: A, last quarter: B"``;
5. otherwise: ``"undecided: the cosine is within noise of the threshold"``.

>>> import numpy as np
>>> mean, se, windows = batch_means(np.arange(8.0), windows=4)   # window means 0.5, 2.5, 4.5, 6.5
>>> float(mean), round(float(se), 4), windows
(3.5, 1.291, 4)
>>> reading(np.arange(40), np.full(40, 0.3) + 0.01 * np.cos(np.arange(40)), threshold=0.0)[0]
'positive transfer throughout'
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "WINDOWS",
    "MIN_STEPS",
    "t975",
    "batch_means",
    "interval",
    "running_se",
    "noise_fraction",
    "change_point",
    "classify",
    "reading",
]

#: number of batch-means windows (fewer when there are fewer than 2 values per window).
WINDOWS = 20
#: fewest logged cosines the report reads.
MIN_STEPS = 20
# t_{0.975, df} for df = 1..30 (beyond: the normal quantile 1.96)
_T975 = (
    *(12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131),
    *(2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042),
)


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (two-sided 95%).

    >>> t975(19), t975(1000)
    (2.093, 1.96)
    """
    if df < 1:
        return math.inf
    return _T975[df - 1] if df <= len(_T975) else 1.96


def batch_means(values: np.ndarray, windows: int = WINDOWS) -> tuple[float, float, int]:
    """``(mean, standard error, windows used)`` of ``values`` by batch means (module docs).

    The mean is that of all values; the SE is ``nan`` with fewer than 4 values (2 windows of 2).
    """
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    w = min(windows, n // 2)
    if w < 2:
        return float(values.mean()), math.nan, w
    means = np.array([part.mean() for part in np.array_split(values, w)])
    return float(values.mean()), float(means.std(ddof=1) / math.sqrt(w)), w


def interval(values: np.ndarray, windows: int = WINDOWS) -> tuple[float, float, float]:
    """``(mean, low, high)``: the batch-means 95% interval of the mean of ``values``."""
    mean, se, w = batch_means(values, windows)
    half = t975(w - 1) * se if w >= 2 else math.nan
    return mean, mean - half, mean + half


def running_se(values: np.ndarray, windows: int = WINDOWS) -> np.ndarray:
    """The batch-means SE of ``values[: t + 1]`` for every ``t`` (``nan`` while under 4 values)."""
    values = np.asarray(values, dtype=np.float64)
    csum = np.concatenate([[0.0], np.cumsum(values)])
    out = np.full(len(values), math.nan)
    for t in range(3, len(values)):
        m = t + 1
        w = min(windows, m // 2)
        # np.array_split's boundaries: the first m % w windows have one more value
        sizes = np.full(w, m // w)
        sizes[: m % w] += 1
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        means = (csum[bounds[1:]] - csum[bounds[:-1]]) / sizes
        out[t] = means.std(ddof=1) / math.sqrt(w)
    return out


def noise_fraction(decision_cos: np.ndarray, cos: np.ndarray, threshold: float, windows: int = WINDOWS) -> float:
    """Fraction of steps decided on a cosine within two standard errors of ``threshold``.

    The SE at step ``t`` is the running batch-means SE of the logged cosines up to ``t``
    (:func:`running_se`); a step before there is one (under 4 values) counts as decided by noise.
    ``decision_cos`` is the cosine the rule used (the smoothed one when logged), aligned with ``cos``.

    >>> noise_fraction(np.array([0.5] * 4 + [0.01]), np.array([0.4, 0.6, 0.4, 0.6, 0.5]), 0.0)
    0.8
    """
    se = running_se(cos, windows)
    noisy = np.isnan(se) | (np.abs(np.asarray(decision_cos) - threshold) < 2.0 * se)
    return float(noisy.mean()) if len(noisy) else math.nan


def change_point(values: np.ndarray) -> int | None:
    """The CUSUM split ``k`` (``values[:k]``, ``values[k:]``), each side ``>= max(10, n // 10)``; or None.

    >>> change_point(np.array([1.0] * 30 + [-1.0] * 20))
    30
    """
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    m = max(10, n // 10)
    if n < 2 * m:
        return None
    k = np.arange(n + 1)
    cusum = np.abs(np.concatenate([[0.0], np.cumsum(values)]) - k * values.sum() / n)
    return int(m + np.argmax(cusum[m : n - m + 1]))


def classify(low: float, high: float, threshold: float) -> str:
    """``"positive"`` (interval above ``threshold``), ``"conflict"`` (below) or ``"within noise"``.

    >>> classify(0.1, 0.3, 0.0), classify(-0.3, -0.1, 0.0), classify(-0.1, 0.1, 0.0)
    ('positive', 'conflict', 'within noise')
    """
    if low > threshold:
        return "positive"
    if high < threshold:
        return "conflict"
    return "within noise"


def reading(
    steps: np.ndarray,
    cos: np.ndarray,
    threshold: float = 0.0,
    whole: tuple[float, float] | None = None,
    windows: int = WINDOWS,
    unit: str = "step",
) -> tuple[str, int | None]:
    """The one-line reading of a cosine series and the step it names (rules in the module docs).

    ``whole``: the whole run's 95% interval ``(low, high)`` when it comes from elsewhere (the gate's
    logged running SE); default the batch-means interval of ``cos``.
    """
    cos = np.asarray(cos, dtype=np.float64)
    n = len(cos)
    if n < MIN_STEPS:
        return f"too few logged {unit}s to read (n = {n} < {MIN_STEPS})", None
    k = change_point(cos)
    if k is not None:
        before = classify(*interval(cos[:k], windows)[1:], threshold)
        after = classify(*interval(cos[k:], windows)[1:], threshold)
        if before == "positive" and after == "conflict":
            return f"conflict after {unit} {int(steps[k])}", int(steps[k])
        if before == "conflict" and after == "positive":
            return f"positive transfer after {unit} {int(steps[k])}", int(steps[k])
    low, high = whole if whole is not None else interval(cos, windows)[1:]
    overall = classify(low, high, threshold)
    q = n // 4
    early = classify(*interval(cos[:q], windows)[1:], threshold)
    late = classify(*interval(cos[n - q :], windows)[1:], threshold)
    if overall == "within noise":
        return "undecided: the cosine is within noise of the threshold", None
    if early == late == overall:
        return ("positive transfer throughout" if overall == "positive" else "conflict throughout"), None
    lead = "positive transfer overall" if overall == "positive" else "conflict overall"
    return f"{lead}; first quarter: {early}, last quarter: {late}", None
