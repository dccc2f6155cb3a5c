"""A gymnasium environment for one partially observable gridworld (plain numpy reference implementation).

Registered as ``"lightning_gradsim/Gridworld-v0"`` when :mod:`lightning_gradsim.rl` is imported
(with gymnasium installed: ``pip install lightning-gradsim[rl]``).

Example::

    import gymnasium as gym
    import lightning_gradsim.rl  # registers the environment

    env = gym.make("lightning_gradsim/Gridworld-v0", layout_seed=0, layout_index=3, task="transformed")
    obs, info = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from .world import CODE_COLOURS, EMPTY, GEM, GOAL, MOVES, NUM_CODES, WALL, GridSpec, sample_layouts

__all__ = ["GridworldEnv", "ENV_ID"]

ENV_ID = "lightning_gradsim/Gridworld-v0"
_TERMINAL_CODES = frozenset(int(i) for i in GridSpec.terminal_table().nonzero().flatten())

COLOURS = np.array(CODE_COLOURS, dtype=np.uint8)


class GridworldEnv(gym.Env):
    """One gridworld: 4 moves, transition noise, random termination, a ``(2r+1)^2`` egocentric view.

    A step: with probability ``drop`` a transition to a non-rewarding terminal state (reward 0,
    the agent stays); otherwise the chosen move, replaced with probability ``noise`` by one of
    the 3 other moves, and the reward (and termination) of the cell reached.

    The observation is the window of cell codes centred on the agent (``MultiDiscrete``, outside
    the grid reads as WALL); the agent's own cell is the centre. ``info`` holds the agent's
    ``position`` (flat cell index).

    Args:
        layout_seed, layout_index: which layout of :func:`~lightning_gradsim.rl.world.sample_layouts`.
        task: ``"original"`` (the teacher's) or ``"transformed"`` (the ``removed`` cells turned EMPTY).
        removed: the reward cell codes the transformed task removes (default: GOAL).
        spec: the :class:`~lightning_gradsim.rl.world.GridSpec` (defaults when ``None``).
        cells, start: an explicit layout (``(H, W)`` int codes and flat start index) instead of a sampled one.
        render_mode: ``None`` or ``"rgb_array"``.
        max_episode_steps: truncate after this many steps (``None``: episodes end by termination only).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(
        self,
        layout_seed: int = 0,
        layout_index: int = 0,
        task: str = "original",
        removed: tuple[int, ...] = (GOAL,),
        spec: GridSpec | None = None,
        cells: Any = None,
        start: int | None = None,
        render_mode: str | None = None,
        max_episode_steps: int | None = None,
    ) -> None:
        super().__init__()
        self.spec_ = spec or GridSpec()
        if task not in ("original", "transformed"):
            raise ValueError(f"task must be 'original' or 'transformed', got {task!r}.")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}.")
        if cells is None:
            layout = sample_layouts(1, self.spec_, seed=layout_seed, offset=layout_index)
            grid = layout.cells[0].numpy()
            start = int(layout.start[0])
        else:
            grid = np.asarray(cells, dtype=np.int64)
            if grid.shape != (self.spec_.height, self.spec_.width):
                raise ValueError(
                    f"cells has shape {grid.shape}; the spec says {(self.spec_.height, self.spec_.width)}."
                )
            if start is None:
                raise ValueError("Give the start cell (flat index) together with cells.")
            if grid.flat[start] == WALL:
                raise ValueError(f"The start cell {start} is a wall.")
        if task == "transformed":
            if any(code not in (GOAL, GEM) for code in removed):
                raise ValueError(f"removed must hold positive reward codes (GOAL={GOAL}, GEM={GEM}), got {removed}.")
            grid = np.where(np.isin(grid, list(removed)), EMPTY, grid)
        self.grid = grid.astype(np.int64)
        rad = self.spec_.view_radius
        self._padded = np.pad(self.grid, rad, mode="constant", constant_values=WALL)
        self.start = int(start)
        self.task = task
        self.render_mode = render_mode
        self.max_episode_steps = max_episode_steps
        size = self.spec_.view_size
        self.observation_space = spaces.MultiDiscrete(np.full((size, size), NUM_CODES, dtype=np.int64))
        self.action_space = spaces.Discrete(len(MOVES))
        self.position = self.start
        self.steps = 0

    def observe(self, position: int | None = None) -> np.ndarray:
        """The egocentric window at ``position`` (the agent's by default)."""
        position = self.position if position is None else position
        r, c = divmod(position, self.spec_.width)
        size = self.spec_.view_size
        return self._padded[r : r + size, c : c + size].copy()

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.position = self.start
        self.steps = 0
        return self.observe(), {"position": self.position}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        if not self.action_space.contains(action):
            raise ValueError(f"Invalid action {action!r}; actions are 0..{len(MOVES) - 1} (up, right, down, left).")
        spec = self.spec_
        self.steps += 1
        if self.np_random.random() < spec.drop:  # to the non-rewarding terminal state
            truncated = False
            return self.observe(), 0.0, True, truncated, {"position": self.position}
        if self.np_random.random() < spec.noise:  # one of the 3 other moves
            action = (int(action) + int(self.np_random.integers(1, len(MOVES)))) % len(MOVES)
        dr, dc = MOVES[int(action)]
        r, c = divmod(self.position, spec.width)
        nr, nc = r + dr, c + dc
        if 0 <= nr < spec.height and 0 <= nc < spec.width and self.grid[nr, nc] != WALL:
            self.position = nr * spec.width + nc
        code = int(self.grid.flat[self.position])
        reward = float(spec.rewards[code])
        terminated = code in _TERMINAL_CODES
        truncated = self.max_episode_steps is not None and self.steps >= self.max_episode_steps and not terminated
        return self.observe(), reward, terminated, bool(truncated), {"position": self.position}

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        scale = 16
        img = COLOURS[self.grid].repeat(scale, 0).repeat(scale, 1)
        r, c = divmod(self.position, self.spec_.width)
        img[r * scale + 4 : (r + 1) * scale - 4, c * scale + 4 : (c + 1) * scale - 4] = (250, 200, 0)
        return img
