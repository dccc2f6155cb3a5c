"""The cosine's uncertainty over steps: a running mean, its standard error, and how many decisions were
taken on a cosine within two standard errors of the threshold ("decided by noise").

Consecutive cosines are autocorrelated (the parameters move little between steps), so the naive standard
error ``s / sqrt(n)`` is too small. We use **batch means**: the steps are cut into consecutive windows of
:data:`WINDOW` measured steps, and the standard error of the mean is the spread of the window means over
the square root of their number, ``SE = sd(window means) / sqrt(#windows)`` — valid when windows are
longer than the correlation time. Until two windows are complete the naive ``s / sqrt(n)`` stands in, and
with fewer than two measured steps there is no estimate: :data:`NO_ESTIMATE` (the whole range of a cosine).

Everything lives in one float64 tensor of moments per problem and auxiliary task, ``(*B, K-1, 9)``, kept in
:class:`~lightning_gradsim.core.state.GateState` (so it is checkpointed, reduced and resumed with the rest).

>>> import torch
>>> m = torch.zeros(1, N_MOMENTS, dtype=torch.float64)
>>> for cos in [0.5, 0.1, 0.3]:
...     m = update_moments(m, torch.tensor([cos]), torch.tensor([True]), torch.tensor([cos]), threshold=0.0)
>>> mean, se, noise = summarize(m)
>>> round(float(mean), 4), round(float(se), 4), round(float(noise), 4)  # naive SE: sd 0.2 / sqrt(3)
(0.3, 0.1155, 0.6667)

The first two decisions were within two standard errors of 0 (no estimate yet, then 0.1 < 2 x 0.2); the
third, 0.3 against 2 x 0.1155, was not.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["WINDOW", "N_MOMENTS", "NO_ESTIMATE", "update_moments", "summarize"]

#: measured steps per window of the batch-means standard error (ours, not given in the paper: long against
#: the cosine's correlation time in our runs, short enough to give several windows in a few hundred steps)
WINDOW = 25
#: the standard error reported while there is none (fewer than two measured steps): a cosine's whole range
NO_ESTIMATE = 2.0
# columns of the moments tensor
COUNT, SUM, SQSUM, WIN_SUM, WIN_N, WINS, WMEAN_SUM, WMEAN_SQSUM, NOISE = range(9)
N_MOMENTS = 9


def summarize(moments: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(mean, standard error, fraction decided by noise)`` of the measured cosines, per problem and task."""
    n = moments[..., COUNT]
    mean = moments[..., SUM] / n.clamp(min=1)
    naive_var = (moments[..., SQSUM] - n * mean * mean).clamp(min=0) / (n - 1).clamp(min=1)
    naive_se = (naive_var / n.clamp(min=1)).sqrt()
    wins = moments[..., WINS]
    wmean = moments[..., WMEAN_SUM] / wins.clamp(min=1)
    wvar = (moments[..., WMEAN_SQSUM] - wins * wmean * wmean).clamp(min=0) / (wins - 1).clamp(min=1)
    batch_se = (wvar / wins.clamp(min=1)).sqrt()
    se = torch.where(wins >= 2, batch_se, torch.where(n >= 2, naive_se, torch.full_like(n, NO_ESTIMATE)))
    noise = moments[..., NOISE] / n.clamp(min=1)
    return mean, se, noise


def update_moments(moments: Tensor, cosine: Tensor, mask: Tensor, decided_on: Tensor, threshold: float) -> Tensor:
    """The moments after one step: ``cosine`` (``(*B, K-1)``) joins where ``mask`` (measured and finite);
    ``decided_on`` (the cosine the rule used) counts as decided by noise when it lies within two standard
    errors (including this step) of ``threshold``. Returns a new tensor."""
    cos = cosine.to(moments.dtype)
    take = mask.to(moments.dtype)
    m = moments.clone()
    m[..., COUNT] += take
    m[..., SUM] += take * cos
    m[..., SQSUM] += take * cos * cos
    m[..., WIN_SUM] += take * cos
    m[..., WIN_N] += take
    full = m[..., WIN_N] >= WINDOW
    window_mean = m[..., WIN_SUM] / m[..., WIN_N].clamp(min=1)
    m[..., WINS] += full.to(m.dtype)
    m[..., WMEAN_SUM] += torch.where(full, window_mean, torch.zeros_like(window_mean))
    m[..., WMEAN_SQSUM] += torch.where(full, window_mean * window_mean, torch.zeros_like(window_mean))
    m[..., WIN_SUM] = torch.where(full, torch.zeros_like(window_mean), m[..., WIN_SUM])
    m[..., WIN_N] = torch.where(full, torch.zeros_like(window_mean), m[..., WIN_N])
    _, se, _ = summarize(m)
    near = (decided_on.to(m.dtype) - threshold).abs() < 2 * se
    m[..., NOISE] += take * near.to(m.dtype)
    return m
