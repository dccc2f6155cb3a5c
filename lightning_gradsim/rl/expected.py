"""The expected (infinitely many episodes) policy-gradient and distillation updates, and their cosine.

The gate of ``gradsim gridworld`` sees one episode's REINFORCE gradient (paper, footnote 3: a
single sample, high variance). On the known model both updates also have exact expectations
(per episode, summed over its steps, without the division by the episode's length):

* policy gradient, with the discounted return-to-go and no ``gamma^t`` factor:
  ``E[sum_t (G_t - V(s_t)) grad log pi(a_t|s_t)] = sum_s d(s) sum_a pi(a|s) (Q(s, a) - V(s)) grad log pi(a|s)``;
* distillation: ``E[-grad sum_t CE(pi_T(s_t), pi(s_t))] = sum_s d(s) (pi_T(s) - pi(s)) grad logits(s)``,

with ``d`` the expected visits per episode. In logit space (the dual coefficients of the linear
student, :mod:`~lightning_gradsim.rl.student`) they are ``d(s) pi(s) * (Q(s) - V(s))`` and
``d(s) (pi_T(s) - pi(s))``; their cosine in parameter space uses the cell kernel ``K``. This is the
cosine the gate would measure without sampling noise.

Example::

    cos = expected_cosine(task, kernel, student_probs, teacher_probs, gamma=0.99)   # (N,)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .world import Layouts, action_values, policy_evaluation, visitation

__all__ = ["expected_updates", "expected_cosine"]


def expected_updates(layouts: Layouts, policy: Tensor, teacher: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """Expected per-episode policy-gradient and distillation updates in logit space, ``(N, S, 4)`` each.

    >>> from lightning_gradsim.rl.world import GridSpec, sample_layouts
    >>> lay = sample_layouts(2, GridSpec(height=4, width=4, num_pits=1, num_mud=1), seed=0)
    >>> uniform = torch.full((2, 16, 4), 0.25)
    >>> pg, dg = expected_updates(lay, uniform, uniform, gamma=0.9)
    >>> pg.shape, float(dg.abs().max())   # the teacher equals the student: no distillation signal
    (torch.Size([2, 16, 4]), 0.0)
    """
    p = policy.double()
    v = policy_evaluation(layouts, p, gamma=gamma)
    q = action_values(layouts, v, gamma=gamma)
    d = visitation(layouts, p).unsqueeze(-1)
    return d * p * (q - v.unsqueeze(-1)), d * (teacher.double() - p)


def expected_cosine(layouts: Layouts, kernel: Tensor, policy: Tensor, teacher: Tensor, gamma: float) -> Tensor:
    """``(N,)`` cosine, in the linear student's parameter space (cell kernel ``kernel`` ``(N, S, S)``),
    of the expected policy-gradient and distillation updates (0 where one of them is zero)."""
    pg, dg = expected_updates(layouts, policy, teacher, gamma)
    k = kernel.double()

    def inner(a: Tensor, b: Tensor) -> Tensor:
        return (a * torch.bmm(k, b)).sum((1, 2))

    denom = (inner(pg, pg) * inner(dg, dg)).sqrt()
    return torch.where(denom > 0, inner(pg, dg) / denom.clamp(min=1e-300), torch.zeros_like(denom))
