"""Gridworld layouts, their exact dynamics model, and exact policy evaluation (torch, batched).

A layout is a ``(H, W)`` grid of cell codes plus a start cell. Cell codes:

=========  ====  ===================================================================
code       name  meaning
=========  ====  ===================================================================
``0``      EMPTY free cell, no reward
``1``      WALL  blocks movement (the outside of the grid reads as wall)
``2``      GOAL  positive reward ``reward_goal``, ends the episode (the teacher's kind)
``3``      GEM   positive reward ``reward_gem``, ends the episode (the other kind)
``4``      PIT   negative reward ``reward_pit``, ends the episode
``5``      MUD   negative reward ``reward_mud``, does not end the episode
=========  ====  ===================================================================

Dynamics (shared by :class:`~lightning_gradsim.rl.env.GridworldEnv` and
:class:`~lightning_gradsim.rl.batched.BatchedGridworld`): with probability ``drop`` the step is a
transition to a non-rewarding terminal state (reward 0, the episode ends, the agent does not move);
otherwise, with probability ``noise`` the chosen move is replaced by one of the 3 *other* moves
(uniformly), a move into a wall or off the grid leaves the agent in place, the reward is that of
the cell the agent is in after the move, and GOAL, GEM and PIT end the episode. The *transformed*
task (the cross-task experiment's main task) turns the removed reward cells (GOAL by default) into
EMPTY: no reward there, and they no longer end the episode.

Example::

    spec = GridSpec()
    layouts = sample_layouts(8, spec, seed=0)
    main_task = layouts.transformed()
    v = policy_evaluation(main_task, torch.full((8, spec.num_cells, 4), 0.25))  # random policy
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

__all__ = [
    "EMPTY",
    "WALL",
    "GOAL",
    "GEM",
    "PIT",
    "MUD",
    "NUM_CODES",
    "MOVES",
    "GridSpec",
    "REWARD_SCALES",
    "with_rewards",
    "Layouts",
    "sample_layouts",
    "windows",
    "policy_model",
    "policy_evaluation",
    "action_values",
    "visitation",
    "value_iteration",
]

EMPTY, WALL, GOAL, GEM, PIT, MUD = range(6)

#: Reward values ``(GOAL, GEM, PIT, MUD)`` by name. The paper's two positive values are blank in our
#: copy (D.2: "two types of positive rewards: [] and [] points"); its only surviving number is that
#: the gated students "score on average 3 points after 10,000 steps" in the main task, where the
#: teacher's GOAL is removed and a GEM is the only positive reward left. ``"paper3"`` (not given in
#: the paper; chosen from the text before any run): every reward of ``"legacy"`` times 10, so a GEM
#: is worth 5 points and an average of 3 is reachable (with 10 % move noise, a 1 % drop per step and
#: pits on the way), the teacher's GOAL (10) stays worth twice a GEM, and the optimal policies and the
#: Q-learning teacher's greedy policy are those of ``"legacy"`` (a positive scale changes neither); what
#: changes is the size of the policy gradient against the distillation gradient. ``"legacy"``: this
#: library's earlier values (+1, +0.5, -1, -0.1), under which a main-task return of 3 is impossible.
REWARD_SCALES: dict[str, tuple[float, float, float, float]] = {
    "paper3": (10.0, 5.0, -10.0, -1.0),
    "legacy": (1.0, 0.5, -1.0, -0.1),
}
NUM_CODES = 6
#: (row, column) offset of actions 0..3: up, right, down, left.
MOVES: tuple[tuple[int, int], ...] = ((-1, 0), (0, 1), (1, 0), (0, -1))
NUM_ACTIONS = len(MOVES)
#: RGB colour of each cell code in pictures: empty, wall, goal, gem, pit, mud.
CODE_COLOURS: tuple[tuple[int, int, int], ...] = (
    (235, 235, 235),
    (60, 60, 60),
    (40, 170, 60),
    (60, 120, 230),
    (200, 40, 40),
    (150, 100, 50),
)


@dataclass(frozen=True)
class GridSpec:
    """Parameters of the distribution over gridworlds (defaults are the experiment's).

    Args:
        height, width: grid size.
        wall_prob: probability that a cell is a wall (before placing the special cells).
        num_goals, num_gems, num_pits, num_mud: how many cells of each kind.
        reward_goal, reward_gem, reward_pit, reward_mud: reward on entering (or staying in) the cell.
        noise: probability that the move is replaced by one of the 3 other moves (uniformly).
        drop: per-step probability of a transition to a non-rewarding terminal state.
        view_radius: the agent sees a ``(2r+1, 2r+1)`` egocentric window.
    """

    height: int = 10
    width: int = 10
    wall_prob: float = 0.2
    num_goals: int = 1
    num_gems: int = 1
    num_pits: int = 2
    num_mud: int = 3
    reward_goal: float = 1.0
    reward_gem: float = 0.5
    reward_pit: float = -1.0
    reward_mud: float = -0.1
    noise: float = 0.1
    drop: float = 0.01
    view_radius: int = 4
    rewards: tuple[float, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.height < 2 or self.width < 2:
            raise ValueError(f"The grid must be at least 2x2, got {self.height}x{self.width}.")
        for name in ("wall_prob", "noise", "drop"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}.")
        if self.wall_prob >= 1.0:
            raise ValueError("wall_prob must be below 1 so that there are free cells.")
        needed = self.num_goals + self.num_gems + self.num_pits + self.num_mud + 1
        if needed > self.height * self.width:
            raise ValueError(
                f"The special cells and the start need {needed} cells but the grid has only "
                f"{self.height * self.width}; make the grid larger or use fewer special cells."
            )
        if self.view_radius < 0:
            raise ValueError(f"view_radius must be >= 0, got {self.view_radius}.")
        object.__setattr__(
            self, "rewards", (0.0, 0.0, self.reward_goal, self.reward_gem, self.reward_pit, self.reward_mud)
        )

    @property
    def num_cells(self) -> int:
        return self.height * self.width

    @property
    def view_size(self) -> int:
        return 2 * self.view_radius + 1

    def reward_table(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Reward of each cell code, ``(NUM_CODES,)``."""
        return torch.tensor(self.rewards, dtype=dtype)

    @staticmethod
    def terminal_table() -> Tensor:
        """Whether entering each cell code ends the episode, ``(NUM_CODES,)`` bool."""
        return torch.tensor([False, False, True, True, True, False])


def with_rewards(spec: GridSpec, scale: str) -> GridSpec:
    """``spec`` with the rewards of :data:`REWARD_SCALES` ``[scale]`` (GOAL, GEM, PIT, MUD).

    >>> with_rewards(GridSpec(), "paper3").rewards
    (0.0, 0.0, 10.0, 5.0, -10.0, -1.0)
    """
    if scale not in REWARD_SCALES:
        raise ValueError(f"rewards must be one of {tuple(REWARD_SCALES)}, got {scale!r}.")
    goal, gem, pit, mud = REWARD_SCALES[scale]
    return replace(spec, reward_goal=goal, reward_gem=gem, reward_pit=pit, reward_mud=mud)


@dataclass
class Layouts:
    """A batch of gridworlds: ``cells`` ``(N, H, W)`` long codes and ``start`` ``(N,)`` flat cell index."""

    cells: Tensor
    start: Tensor
    spec: GridSpec

    def __len__(self) -> int:
        return self.cells.shape[0]

    def transformed(self, removed: tuple[int, ...] = (GOAL,)) -> Layouts:
        """The new task: the cells of the ``removed`` codes (default: GOAL, the teacher's reward; the
        GEM cells still reward) become EMPTY, so they neither reward nor end the episode.

        >>> spec = GridSpec(2, 2, num_mud=0, num_pits=1)
        >>> lay = Layouts(torch.tensor([[[GOAL, GEM], [EMPTY, PIT]]]), torch.tensor([2]), spec)
        >>> lay.transformed().cells.tolist(), lay.transformed((GOAL, GEM)).cells.tolist()
        ([[[0, 3], [0, 4]]], [[[0, 0], [0, 4]]])
        """
        bad = [c for c in removed if c not in (GOAL, GEM)]
        if bad:
            raise ValueError(f"Only positive reward cells (GOAL={GOAL}, GEM={GEM}) can be removed, got {bad}.")
        cells = self.cells.clone()
        for code in removed:
            cells = torch.where(cells == code, torch.full_like(cells, EMPTY), cells)
        return Layouts(cells, self.start.clone(), self.spec)

    def index(self, idx: Tensor | slice | int) -> Layouts:
        """A sub-batch (``int`` keeps a batch of one)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return Layouts(self.cells[idx], self.start[idx], self.spec)

    def repeat(self, times: int) -> Layouts:
        """The batch repeated ``times`` times (``[l0, l1, .., l0, l1, ..]``)."""
        return Layouts(self.cells.repeat(times, 1, 1), self.start.repeat(times), self.spec)

    def flat_cells(self) -> Tensor:
        return self.cells.reshape(len(self), -1)

    def next_cell(self) -> Tensor:
        """``(N, S, 4)``: the cell reached from each cell by each move (walls and borders block)."""
        n, h, w = self.cells.shape
        rows = torch.arange(h).view(h, 1).expand(h, w).reshape(-1)
        cols = torch.arange(w).view(1, w).expand(h, w).reshape(-1)
        flat = self.flat_cells()
        out = []
        for dr, dc in MOVES:
            r, c = rows + dr, cols + dc
            inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
            target = (r.clamp(0, h - 1) * w + c.clamp(0, w - 1)).expand(n, -1)
            blocked = ~inside.expand(n, -1) | (flat.gather(1, target) == WALL)
            out.append(torch.where(blocked, torch.arange(h * w).expand(n, -1), target))
        return torch.stack(out, dim=-1)


def sample_layouts(num: int, spec: GridSpec | None = None, seed: int = 0, offset: int = 0) -> Layouts:
    """Draw ``num`` gridworlds: walls i.i.d., then the special cells and the start on distinct free cells.

    Deterministic given ``seed``: the batch holds layouts ``offset .. offset + num - 1`` of that
    seed's sequence (layout ``i`` does not depend on ``num``).

    Example::

        layouts = sample_layouts(200, GridSpec(height=8, width=8), seed=0)
    """
    spec = spec or GridSpec()
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}.")
    s = spec.num_cells
    specials = [GOAL] * spec.num_goals + [GEM] * spec.num_gems + [PIT] * spec.num_pits + [MUD] * spec.num_mud
    needed = len(specials) + 1
    cells = torch.empty(num, s, dtype=torch.long)
    start = torch.empty(num, dtype=torch.long)
    for i in range(num):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + offset + i)
        for _ in range(1000):
            walls = torch.rand(s, generator=g) < spec.wall_prob
            if int((~walls).sum()) >= needed:
                break
        else:  # pragma: no cover - needs an absurd wall_prob
            raise RuntimeError("Could not draw a layout with enough free cells; lower wall_prob.")
        keys = torch.rand(s, generator=g) + walls.float() * 2.0
        order = torch.argsort(keys)
        row = torch.where(walls, WALL, EMPTY).long()
        for j, code in enumerate(specials):
            row[order[j]] = code
        cells[i] = row
        start[i] = order[len(specials)]
    return Layouts(cells.view(num, spec.height, spec.width), start, spec)


def windows(cells: Tensor, positions: Tensor, radius: int) -> Tensor:
    """Egocentric ``(2r+1, 2r+1)`` windows of ``cells`` ``(N, H, W)`` around flat ``positions`` ``(N, ...)``.

    Outside the grid reads as WALL. Returns ``(N, ..., 2r+1, 2r+1)`` long codes.
    """
    n, h, w = cells.shape
    padded = torch.nn.functional.pad(cells, (radius, radius, radius, radius), value=WALL)
    offs = torch.arange(2 * radius + 1)
    rows = torch.div(positions, w, rounding_mode="floor")
    cols = positions % w
    extra = positions.dim() - 1
    r_idx = rows[..., None, None] + offs.view(*([1] * (extra + 1)), -1, 1)
    c_idx = cols[..., None, None] + offs.view(*([1] * (extra + 1)), 1, -1)
    b_idx = torch.arange(n).view(n, *([1] * (extra + 2)))
    return padded[b_idx, r_idx, c_idx]


def _expected_step(layouts: Layouts) -> tuple[Tensor, Tensor, Tensor]:
    """Per cell and executed move: next cell ``(N, S, 4)``, expected reward ``(N, S, 4)`` and
    continuation probability ``(N, S, 4)``, both including the ``drop`` to the non-rewarding end."""
    spec = layouts.spec
    nxt = layouts.next_cell()
    codes = layouts.flat_cells().gather(1, nxt.flatten(1)).view_as(nxt)
    reward = spec.reward_table(torch.float64)[codes] * (1.0 - spec.drop)
    cont = (~GridSpec.terminal_table()[codes]).double() * (1.0 - spec.drop)
    return nxt, reward, cont


def _effective_moves(spec: GridSpec, policy: Tensor) -> Tensor:
    """Probability of each executed move given the policy's action distribution: the chosen move
    with probability ``1 - noise``, each of the 3 others with ``noise / 3``."""
    other = spec.noise / (NUM_ACTIONS - 1)
    return (1.0 - spec.noise - other) * policy + other


def policy_model(layouts: Layouts, policy: Tensor) -> tuple[Tensor, Tensor]:
    """The Markov chain of ``policy`` ``(N, S, 4)`` on the known model: expected reward per step from
    every cell ``b`` ``(N, S)`` and the (substochastic) cell-to-cell matrix ``M`` ``(N, S, S)`` of the
    episode going on (its missing mass is the end of the episode)."""
    n, s = layouts.flat_cells().shape
    nxt, reward, cont = _expected_step(layouts)
    moves = _effective_moves(layouts.spec, policy.double())  # (N, S, 4)
    m = torch.zeros(n, s, s, dtype=torch.float64)
    m.scatter_add_(2, nxt, moves * cont)
    return (moves * reward).sum(-1), m


def policy_evaluation(layouts: Layouts, policy: Tensor, gamma: float = 1.0) -> Tensor:
    """Exact expected return from every cell, ``(N, S)``, for ``policy`` ``(N, S, 4)`` (undiscounted
    by default: the score; ``gamma < 1`` discounts).

    Solves ``v = b + gamma M v`` on the known model; it is finite because every step ends the episode
    with probability at least ``drop`` (which must then be > 0 when ``gamma == 1``). Read the start
    value with ``v.gather(1, layouts.start[:, None])``.
    """
    if layouts.spec.drop <= 0 and gamma >= 1.0:
        raise ValueError("policy_evaluation needs drop > 0 or gamma < 1 (otherwise the return may be unbounded).")
    b, m = policy_model(layouts, policy)
    s = b.shape[1]
    eye = torch.eye(s, dtype=torch.float64).expand_as(m)
    return torch.linalg.solve(eye - gamma * m, b.unsqueeze(-1)).squeeze(-1)


def action_values(layouts: Layouts, values: Tensor, gamma: float = 1.0) -> Tensor:
    """``Q(s, a)`` ``(N, S, 4)`` of a policy whose state values are ``values`` ``(N, S)`` (one
    Bellman backup: ``(1 - drop) sum_m p(m | a) [r(s'_m) + gamma alive(s'_m) V(s'_m)]``)."""
    nxt, reward, cont = _expected_step(layouts)
    mix = _effective_moves(layouts.spec, torch.eye(NUM_ACTIONS, dtype=torch.float64))  # (a, m)
    target = reward + gamma * cont * values.double().gather(1, nxt.flatten(1)).view_as(nxt)  # (N, S, m)
    return target @ mix.T


def visitation(layouts: Layouts, policy: Tensor) -> Tensor:
    """Expected number of visits ``(N, S)`` to every cell in one episode from the start cell."""
    _, m = policy_model(layouts, policy)
    n, s, _ = m.shape
    eye = torch.eye(s, dtype=torch.float64).expand_as(m)
    start = torch.nn.functional.one_hot(layouts.start, s).double().unsqueeze(-1)
    return torch.linalg.solve((eye - m).transpose(1, 2), start).squeeze(-1)


def value_iteration(layouts: Layouts, gamma: float = 1.0, tol: float = 1e-10, max_iter: int = 100_000) -> Tensor:
    """Optimal action values ``(N, S, 4)`` of the model: the fixed point Q-learning converges to.

    ``Q(s, a) = (1 - drop) sum_m p(m | a) [r(s'_m) + gamma * alive(s'_m) * max_a' Q(s'_m, a')]``,
    with ``alive`` false on terminal cells and ``p(m | a)`` the noise model.
    """
    spec = layouts.spec
    nxt, reward, cont = _expected_step(layouts)
    n, s, _ = nxt.shape
    eye = torch.eye(NUM_ACTIONS, dtype=torch.float64)
    mix = _effective_moves(spec, eye)  # (a, m)
    q = torch.zeros(n, s, NUM_ACTIONS, dtype=torch.float64)
    for _ in range(max_iter):
        v = q.max(-1).values  # (N, S)
        target = reward + gamma * cont * v.gather(1, nxt.flatten(1)).view_as(nxt)  # (N, S, m)
        new = target @ mix.T  # (N, S, a)
        if (new - q).abs().max() < tol:
            return new
        q = new
    return q
