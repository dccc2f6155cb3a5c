"""V-trace off-policy targets (Espeholt et al., 2018, *IMPALA*), in PyTorch.

Same signature and conventions as the reference implementation (``vtrace.py`` of
``deepmind/scalable_agent``): time-major ``[T, B]`` tensors (any number of trailing batch
dimensions), per-step ``discounts`` that are zero where an episode ended, and outputs that carry
no gradient. With ``log_rhos = 0`` (on-policy data) ``vs`` are the ``T``-step bootstrapped
returns.

Example:

>>> import torch
>>> from lightning_gradsim.rl.vtrace import from_importance_weights
>>> out = from_importance_weights(
...     log_rhos=torch.zeros(2, 1), discounts=torch.full((2, 1), 0.5),
...     rewards=torch.ones(2, 1), values=torch.zeros(2, 1), bootstrap_value=torch.tensor([4.0]))
>>> out.vs.squeeze(1).tolist()            # 1 + .5 * (1 + .5 * 4), 1 + .5 * 4
[2.5, 3.0]
>>> out.pg_advantages.squeeze(1).tolist()  # r_s + gamma_s * v_{s+1} - V(x_s)
[2.5, 3.0]
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["VTraceReturns", "from_importance_weights"]


class VTraceReturns(NamedTuple):
    """Outputs of :func:`from_importance_weights` (no gradient flows through them)."""

    vs: Tensor  #: ``[T, B]`` V-trace value targets ``v_s``
    pg_advantages: (
        Tensor  #: ``[T, B]`` ``rho_s (r_s + gamma_s v_{s+1} - V(x_s))``, rho clipped at ``clip_pg_rho_threshold``
    )


def _check(name: str, x: Tensor, shape: torch.Size) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if x.shape != shape:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)} but log_rhos has {tuple(shape)}: V-trace takes time-major "
            "[T, B] tensors of one shape (bootstrap_value: [B])."
        )


def from_importance_weights(
    log_rhos: Tensor,
    discounts: Tensor,
    rewards: Tensor,
    values: Tensor,
    bootstrap_value: Tensor,
    clip_rho_threshold: float | None = 1.0,
    clip_pg_rho_threshold: float | None = 1.0,
) -> VTraceReturns:
    """V-trace targets and policy-gradient advantages from log importance weights.

    With ``rho_t = min(rho_bar, pi(a_t|x_t) / mu(a_t|x_t))``, ``c_t = min(1, pi/mu)`` and
    ``delta_t = rho_t (r_t + gamma_t V(x_{t+1}) - V(x_t))``:
    ``v_s = V(x_s) + delta_s + gamma_s c_s (v_{s+1} - V(x_{s+1}))``, ``v_T = V(x_T)`` (the
    bootstrap value), and ``pg_advantages_s = min(rho_bar_pg, pi/mu) (r_s + gamma_s v_{s+1} - V(x_s))``.

    Args:
        log_rhos: ``[T, B]`` ``log pi(a_t|x_t) - log mu(a_t|x_t)`` (target minus behaviour policy).
        discounts: ``[T, B]`` ``gamma_t``, zero where the episode ended at step ``t``.
        rewards: ``[T, B]`` rewards ``r_t``.
        values: ``[T, B]`` ``V(x_t)`` under the target policy's value function.
        bootstrap_value: ``[B]`` ``V(x_T)``.
        clip_rho_threshold: ``rho_bar`` (``None``: no clipping).
        clip_pg_rho_threshold: the clipping of rho in the advantages (``None``: no clipping).

    Example (off-policy weights are clipped at 1, so a likelier action counts once):

    >>> import torch
    >>> out = from_importance_weights(torch.tensor([[2.0]]), torch.tensor([[0.9]]),
    ...                               torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([10.0]))
    >>> round(out.vs.item(), 4), round(out.pg_advantages.item(), 4)
    (10.0, 10.0)
    """
    if not isinstance(log_rhos, Tensor):
        raise TypeError(f"log_rhos must be a torch.Tensor, got {type(log_rhos).__name__}.")
    if log_rhos.dim() < 1 or log_rhos.shape[0] < 1:
        raise ValueError(f"log_rhos must be time-major [T, B] with T >= 1, got shape {tuple(log_rhos.shape)}.")
    for name, x in (("discounts", discounts), ("rewards", rewards), ("values", values)):
        _check(name, x, log_rhos.shape)
    _check("bootstrap_value", bootstrap_value, log_rhos.shape[1:])
    for name, thr in (("clip_rho_threshold", clip_rho_threshold), ("clip_pg_rho_threshold", clip_pg_rho_threshold)):
        if thr is not None and not thr > 0:
            raise ValueError(f"{name} must be a positive number or None, got {thr!r}.")
    with torch.no_grad():
        rhos = torch.exp(log_rhos)
        clipped_rhos = rhos if clip_rho_threshold is None else rhos.clamp(max=clip_rho_threshold)
        cs = rhos.clamp(max=1.0)
        values_next = torch.cat([values[1:], bootstrap_value.unsqueeze(0)], dim=0)
        deltas = clipped_rhos * (rewards + discounts * values_next - values)
        acc = torch.zeros_like(bootstrap_value)
        diffs = []
        for t in range(log_rhos.shape[0] - 1, -1, -1):
            acc = deltas[t] + discounts[t] * cs[t] * acc
            diffs.append(acc)
        vs = torch.stack(diffs[::-1], dim=0) + values
        vs_next = torch.cat([vs[1:], bootstrap_value.unsqueeze(0)], dim=0)
        pg_rhos = rhos if clip_pg_rho_threshold is None else rhos.clamp(max=clip_pg_rho_threshold)
        pg_advantages = pg_rhos * (rewards + discounts * vs_next - values)
    return VTraceReturns(vs=vs, pg_advantages=pg_advantages)
