"""The teacher: tabular Q-learning with uniform exploration, batched over gridworlds.

The teacher sees its position (it is tabular over cells), explores with uniformly random actions
from uniformly random start cells, and learns off-policy with step size ``(1 + n(s, a))^-0.6``
(``n`` the visit count, so the Robbins-Monro conditions hold and it converges to the model's
optimal values, :func:`~lightning_gradsim.rl.world.value_iteration`).

Example::

    layouts = sample_layouts(100, seed=0)
    q = q_learning(layouts, steps=20_000, generator=torch.Generator().manual_seed(1))
    policy = teacher_policy(q, temperature=0.0)  # (N, S, 4) greedy
"""

from __future__ import annotations

import torch
from torch import Tensor

from .batched import BatchedGridworld
from .world import NUM_ACTIONS, Layouts

__all__ = ["q_learning", "teacher_policy"]


def q_learning(
    layouts: Layouts,
    steps: int = 20_000,
    gamma: float = 1.0,
    generator: torch.Generator | None = None,
    lr_exponent: float = 0.6,
) -> Tensor:
    """Q-values ``(N, S, 4)`` after ``steps`` transitions per gridworld of uniform exploration, with
    discount ``gamma`` (the targets are ``r + gamma * max_a' Q(s', a')``, 0 after a terminal step)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    if not 0.5 < lr_exponent <= 1.0:
        raise ValueError(f"lr_exponent must be in (0.5, 1] for Q-learning to converge, got {lr_exponent}.")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    sim = BatchedGridworld(layouts, generator=generator)
    n, s = len(layouts), layouts.spec.num_cells
    q = torch.zeros(n, s, NUM_ACTIONS, dtype=torch.float64)
    counts = torch.zeros(n, s, NUM_ACTIONS, dtype=torch.float64)
    rows = torch.arange(n)
    sim.reset(positions=sim.random_free_positions(), observe=False)
    for _ in range(steps):
        state = sim.position
        actions = torch.randint(NUM_ACTIONS, (n,), generator=generator)
        _, reward, terminated = sim.step(actions, observe=False)
        target = reward.double() + gamma * (~terminated).double() * q[rows, sim.position].max(-1).values
        counts[rows, state, actions] += 1
        alpha = counts[rows, state, actions].pow(-lr_exponent)
        q[rows, state, actions] += alpha * (target - q[rows, state, actions])
        if terminated.any():
            sim.reset(mask=terminated, positions=sim.random_free_positions(terminated), observe=False)
    return q


def teacher_policy(q: Tensor, temperature: float = 0.0) -> Tensor:
    """Action distributions ``(..., 4)`` from Q-values: ``softmax(q / T)``, greedy (ties split) at ``T = 0``."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}.")
    q = q.float()
    if temperature == 0:
        best = q == q.max(-1, keepdim=True).values
        return best.float() / best.float().sum(-1, keepdim=True)
    return torch.softmax(q / temperature, dim=-1)
