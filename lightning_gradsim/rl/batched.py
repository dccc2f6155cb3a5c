"""Many gridworlds stepped at once with a few tensor operations (same dynamics as ``GridworldEnv``).

Example::

    layouts = sample_layouts(256, seed=0).transformed()
    sim = BatchedGridworld(layouts, generator=torch.Generator().manual_seed(0))
    obs = sim.reset()
    obs, reward, terminated = sim.step(torch.randint(4, (256,)))
    sim.reset(mask=terminated)  # start the finished episodes again
"""

from __future__ import annotations

import torch
from torch import Tensor

from .world import NUM_ACTIONS, WALL, GridSpec, Layouts, windows

__all__ = ["BatchedGridworld"]


class BatchedGridworld:
    """``N`` independent gridworld episodes (no auto-reset: call :meth:`reset` with a mask).

    A step: with probability ``spec.drop`` a transition to a non-rewarding terminal state (reward
    0, the agent stays); otherwise the chosen move, replaced with probability ``spec.noise`` by one
    of the 3 other moves, and the reward (and termination) of the cell reached.

    Attributes:
        position: ``(N,)`` flat cell index of each agent.
    """

    def __init__(self, layouts: Layouts, generator: torch.Generator | None = None) -> None:
        self.layouts = layouts
        self.spec: GridSpec = layouts.spec
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self._next = layouts.next_cell()  # (N, S, 4)
        self._flat = layouts.flat_cells()
        self._reward = self.spec.reward_table()
        self._terminal = GridSpec.terminal_table()
        self._rows = torch.arange(len(layouts))
        self.position = layouts.start.clone()

    def __len__(self) -> int:
        return len(self.layouts)

    def observe(self) -> Tensor:
        """``(N, 2r+1, 2r+1)`` egocentric windows of cell codes."""
        return windows(self.layouts.cells, self.position, self.spec.view_radius)

    def reset(self, mask: Tensor | None = None, positions: Tensor | None = None, observe: bool = True) -> Tensor | None:
        """Put the agents (all, or where ``mask``) on the start cell or on ``positions``; returns
        observations (``None`` when ``observe=False``)."""
        target = self.layouts.start if positions is None else positions
        self.position = target.clone() if mask is None else torch.where(mask, target, self.position)
        return self.observe() if observe else None

    def random_free_positions(self, mask: Tensor | None = None) -> Tensor:
        """A uniformly random non-wall, non-terminal cell per gridworld (exploring starts), ``(N,)``;
        with ``mask`` only those rows are drawn (the others keep their position)."""
        flat = self._flat if mask is None else self._flat[mask]
        ok = (flat != WALL) & ~self._terminal[flat]
        keys = torch.rand(flat.shape, generator=self.generator) + ok.float()
        if mask is None:
            return keys.argmax(1)
        out = self.position.clone()
        out[mask] = keys.argmax(1)
        return out

    def step(self, actions: Tensor, observe: bool = True) -> tuple[Tensor | None, Tensor, Tensor]:
        """Move every agent; returns ``(observations, rewards, terminated)`` (``None`` observations
        when ``observe=False``; read :attr:`position` instead)."""
        n = len(self)
        g = self.generator
        noisy = torch.rand(n, generator=g) < self.spec.noise
        other_moves = (actions.long() + torch.randint(1, NUM_ACTIONS, (n,), generator=g)) % NUM_ACTIONS
        moves = torch.where(noisy, other_moves, actions.long())
        dropped = torch.rand(n, generator=g) < self.spec.drop
        moved = self._next[self._rows, self.position, moves]
        self.position = torch.where(dropped, self.position, moved)
        code = self._flat[self._rows, self.position]
        reward = torch.where(dropped, torch.zeros(()), self._reward[code])
        terminated = self._terminal[code] | dropped
        return (self.observe() if observe else None), reward, terminated
